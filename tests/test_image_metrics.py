"""SSIM / PSNR / MSE equal scikit-image's; ISTD's conventions on hand-made frames."""
import numpy as np
import pytest

from lcm_jax.eval import image_metrics, istd


@pytest.mark.parametrize("shape,data_range", [((16, 16, 1), 2.0), ((20, 24, 3), 1.0)])
def test_metrics_equal_skimage(shape, data_range):
    from skimage import metrics

    rng = np.random.default_rng(0)
    a = rng.uniform(0, data_range, (2,) + shape).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.1 * data_range, a.shape), 0, data_range).astype(np.float32)
    ours = image_metrics.ssim(a, b, data_range)
    for i in range(2):
        ref = metrics.structural_similarity(a[i], b[i], data_range=data_range, channel_axis=-1)
        np.testing.assert_allclose(ours[i], ref, rtol=1e-4)
        np.testing.assert_allclose(image_metrics.psnr(a, b, data_range)[i],
                                   metrics.peak_signal_noise_ratio(a[i], b[i], data_range=data_range),
                                   rtol=1e-5)
        np.testing.assert_allclose(image_metrics.mse(a, b)[i], metrics.mean_squared_error(a[i], b[i]),
                                   rtol=1e-5)
    np.testing.assert_allclose(image_metrics.ssim(a, a, data_range), 1.0, rtol=1e-6)


def test_istd_conventions():
    """Frames moving by equal steps have ISTD 0; one jump makes it the std of the distances."""
    ramp = np.linspace(-1, 1, 11)[None, :, None, None, None] * np.ones((1, 11, 4, 4, 1))
    assert istd.istd(ramp)["istd"] < 1e-6
    jump = ramp.copy()
    jump[:, 6:] += 0.5  # in [-1, 1]: 0.25 in [0, 1] over 16 pixels between frames 5 and 6
    d = np.full(10, 0.1 * 4)  # each step: 0.1 in [0, 1] per pixel, L2 over 16 pixels = 0.4
    d[5] = (0.1 + 0.25) * 4
    result = istd.istd(jump)
    np.testing.assert_allclose(result["distances"][0], d, rtol=1e-5)
    np.testing.assert_allclose(result["istd"], d.std(), rtol=1e-5)
    np.testing.assert_allclose(istd.istd(jump, ddof=1)["istd"], d.std(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(istd.istd(jump, reduction="mean")["istd"], (d / 4).std(), rtol=1e-5)
