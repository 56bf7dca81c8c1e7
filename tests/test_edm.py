"""EDM math (diffusion/edm.py) against diffusers' EDMEulerScheduler and a plain Heun loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import f32_tol
from lcm_jax.diffusion import edm

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def scheduler():
    s = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0,
                                    final_sigmas_type="zero")
    s.set_timesteps(18)
    return s


def test_karras_sigmas_match_diffusers(scheduler):
    np.testing.assert_allclose(edm.karras_sigmas(18), scheduler.sigmas.numpy(), rtol=1e-6)
    assert edm.karras_sigmas(1).tolist() == [80.0, 0.0]


def test_preconditioning_matches_diffusers(scheduler):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    f = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
    for sigma in (0.002, 0.3, 2.5, 80.0):
        seen = {}

        def net(x_in, c_noise, _seen=seen):
            _seen["x_in"], _seen["c_noise"] = x_in, c_noise
            return jnp.asarray(f)

        d = edm.denoiser(net)(jnp.asarray(x), jnp.full((3,), sigma))
        xt, st = torch.from_numpy(x), torch.tensor(sigma)
        np.testing.assert_allclose(seen["x_in"], scheduler.precondition_inputs(xt, st).numpy(),
                                   rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(seen["c_noise"], np.full(3, scheduler.precondition_noise(st).item()),
                                   rtol=1e-6)
        ref = scheduler.precondition_outputs(xt, torch.from_numpy(f), st).numpy()
        np.testing.assert_allclose(d, ref, rtol=1e-5, atol=1e-6)


def test_network_target_makes_d_exact():
    """F = target gives D(x, sigma) = x0, and the loss ||F - target||^2 is EDM's weighted loss."""
    rng = np.random.default_rng(1)
    x0, n = rng.standard_normal((2, 2, 4, 4, 1)).astype(np.float32)
    sigma = jnp.array([0.05, 7.0])
    x = x0 + sigma[:, None, None, None] * n
    target = edm.network_target(x0, x, sigma)
    d = edm.denoiser(lambda x_in, c_noise: target)(x, sigma)
    np.testing.assert_allclose(d, x0, atol=2e-6)
    f = target + 0.1
    c_skip, c_out, _, _ = edm.preconditioning(sigma)
    d_f = c_skip[:, None, None, None] * x + c_out[:, None, None, None] * f
    weight = 1.0 / c_out ** 2  # EDM's lambda(sigma)
    np.testing.assert_allclose(weight[:, None, None, None] * (d_f - x0) ** 2, (f - target) ** 2,
                               rtol=1e-4)


def _heun_reference(denoise, x, sigmas):
    """EDM Algorithm 1 (deterministic), step by step in numpy."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - denoise(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            x_next = x + (s_next - s) * 0.5 * (d + (x_next - denoise(x_next, s_next)) / s_next)
        x = x_next
    return x


def test_heun_matches_the_algorithm_and_splits_exactly():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 4, 4, 1)) * 80).astype(np.float32)
    a = rng.standard_normal((4, 4, 1)).astype(np.float32)
    denoise_np = lambda x, s: np.tanh(x / np.sqrt(s ** 2 + 0.25)) * a  # a nonlinear denoiser
    denoise = lambda x, s: jnp.tanh(x / jnp.sqrt(s[:, None, None, None] ** 2 + 0.25)) * a
    sigmas = edm.karras_sigmas(6)
    ref = _heun_reference(denoise_np, x.astype(np.float64), sigmas.astype(np.float64))
    out = jax.jit(lambda x: edm.heun(denoise, x, sigmas))(x)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    split = edm.heun(denoise, edm.heun(denoise, x, sigmas[:4]), sigmas[3:])
    # Eager vs jit: XLA may fuse x + (s' - s) d into an FMA in one and not the other. Each step
    # damps the earlier rounding by s' / s, so what is left is the last steps' few ulps of
    # the output's scale (64 allowed); a wrong split point is off by O(1).
    np.testing.assert_allclose(split, out, rtol=0, atol=f32_tol(64, out))
    # A point mass: D = x0 everywhere lands on x0 exactly, from any start.
    np.testing.assert_allclose(edm.heun(lambda x, s: jnp.broadcast_to(a, x.shape), x, sigmas),
                               np.broadcast_to(a, x.shape), atol=1e-5)
    assert edm.num_evaluations(18) == 35


def _stochastic_reference(denoise, x, sigmas, gammas, noises, s_noise):
    """EDM Algorithm 2 as written, in float64: churn to t_hat, Euler, then the 2nd-order
    correction unless t_next = 0."""
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        t_hat = t * (1 + gammas[i])
        x_hat = x + np.sqrt(t_hat ** 2 - t ** 2) * s_noise * noises[i]
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if t_next != 0:
            d_next = (x - denoise(x, t_next)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
    return x


def test_stochastic_heun_matches_algorithm_2_and_is_algorithm_1_without_churn():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2, 4, 4, 1)) * 80).astype(np.float32)
    a = rng.standard_normal((4, 4, 1)).astype(np.float32)
    denoise_np = lambda x, s: np.tanh(x / np.sqrt(s ** 2 + 0.25)) * a
    denoise = lambda x, s: jnp.tanh(x / jnp.sqrt(s[:, None, None, None] ** 2 + 0.25)) * a
    sigmas, key = edm.karras_sigmas(8), jax.random.PRNGKey(5)
    churn = edm.Churn(s_churn=40.0, s_min=0.05, s_max=50.0, s_noise=1.003)  # EDM's ImageNet-64
    gammas = churn.gammas(sigmas[:-1], 8)
    inside = (sigmas[:-1] >= 0.05) & (sigmas[:-1] <= 50.0)
    assert 0 < inside.sum() < 8 and np.all(gammas == np.where(inside, np.sqrt(2) - 1, 0))
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), x.shape), np.float64)
              for i in range(8)]
    ref = _stochastic_reference(denoise_np, x.astype(np.float64), sigmas.astype(np.float64),
                                gammas, noises, 1.003)
    run = jax.jit(lambda x, c: edm.heun(denoise, x, sigmas, churn=c, rng=key), static_argnums=1)
    out = run(x, churn)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert np.max(np.abs(out - run(x, None))) > 1e-2  # the churn is really there
    # Split in two pieces at step 3 (LEGO's brick switch): the same noise, the same path.
    split = edm.heun(denoise, edm.heun(denoise, x, sigmas[:4], churn=churn, rng=key, num_steps=8),
                     sigmas[3:], churn=churn, rng=key, num_steps=8, first_step=3)
    np.testing.assert_allclose(split, out, rtol=0, atol=f32_tol(64, out))
    # S_churn = 0: exactly Algorithm 1 (the same program).
    np.testing.assert_array_equal(run(x, edm.Churn(s_churn=0.0)), run(x, None))
