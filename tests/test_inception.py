"""FID Inception parity with PyTorch, on random weights (nothing is downloaded).

The reference is pytorch-fid's `InceptionV3([3])` (resize_input, normalize_input, the FID blocks),
transcribed below in torch with the weight file's state-dict keys: pytorch-fid itself needs
torchvision, and PyPI's torchvision is a CUDA build that cannot be imported next to the CPU torch
these tests use (and, installed, it breaks transformers' CLIPTextModel import). Where pytorch-fid
does import, `test_transcription_is_pytorch_fid` checks the transcription against it.

Random weights are made meaningful: BN scale/bias random, running statistics calibrated on the
test images (so every layer's activations are O(1) and the pool3 features too) and then perturbed,
so a wrong padding, pool or branch order shows in the features well above the 1e-4 tolerance.
"""
import copy
import os

import jax
import numpy as np
import pytest

from lcm_jax.eval import inception
from lcm_jax.models import convert
from lcm_jax.models.convert import ConversionError

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

# This random net amplifies float32 round-off ~1000x (torch float32 vs float64: 4e-4 absolute on
# features of max 5), so float32 agreement is judged relative to the largest feature, and the
# implementation itself in float64, where both sides agree to ~1e-13.
TOL = 1e-4


# ----------------------------------------------------------------------------------------------
# The torch reference: torchvision's Inception3 with pytorch-fid's FID blocks, pool3 output
# ----------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def fid_avg_pool(x):  # pytorch-fid's patch: TF's average pool ignores the padded zeros
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(fid_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(fid_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 (max_pool=False) / FIDInceptionE_2 (max_pool=True)."""

    def __init__(self, cin, max_pool):
        super().__init__()
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool
                  else fid_avg_pool(x))
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class TorchFIDInception(nn.Module):
    """Images NCHW in [0, 1] -> pool3 [N, 2048]; state-dict keys = pt_inception-2015-12-05's."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c = FIDInceptionA(192, 32), FIDInceptionA(256, 64)
        self.Mixed_5d, self.Mixed_6a = FIDInceptionA(288, 64), InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = FIDInceptionE(1280, False), FIDInceptionE(2048, True)
        self.fc = nn.Linear(2048, 1008)  # in the weight file; unused by pool3

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def random_fid_inception(images, seed=0):
    """Random conv weights (torch's default init, as pytorch-fid's unloaded net), random BN
    scale/bias, BN statistics calibrated on `images` and then perturbed."""
    torch.manual_seed(seed)
    model = TorchFIDInception()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0.0, 0.2)
            bn.momentum = 1.0  # running stats := this batch's
        model.train()(nchw(images))
        for bn in bns:
            bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.8, 1.25))
    return model.eval()


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """(torch model, our InceptionFeatures via .pth -> convert -> safetensors, images, folder)."""
    images = np.random.default_rng(0).random((3, 32, 32, 3)).astype(np.float32)
    model = random_fid_inception(images)
    folder = tmp_path_factory.mktemp("inception")
    torch.save(model.state_dict(), folder / "pt_inception.pth")
    inception.convert_weights(str(folder / "pt_inception.pth"), str(folder / "inception.safetensors"))
    net = inception.InceptionFeatures.from_safetensors(str(folder / "inception.safetensors"),
                                                       batch_size=2)  # 3 images: a padded batch
    return model, net, images, folder


def test_pool3_features_match_torch(nets):
    """float32, the production path: .pth -> convert -> safetensors -> features (padded batch)."""
    model, net, images, _ = nets
    with torch.no_grad():
        ref = model(nchw(images)).numpy()
    ours = net.features(images)
    assert ours.shape == ref.shape == (3, inception.FEATURE_DIM)
    scale = float(np.abs(ref).max())
    assert ref.std() > 0.1, "features too small for the comparison to mean anything"
    diff = float(np.abs(ours - ref).max())
    print(f"float32 pool3 max abs diff {diff:.2e} (feature std {ref.std():.3f}, max {scale:.2f})")
    assert diff <= TOL * scale


def test_pool3_features_exact_in_float64(nets):
    """The same weights (read back from the converted file) and one image, both sides float64."""
    from safetensors.numpy import load_file

    model, _, images, folder = nets
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(nchw(images[:1]).double()).numpy()
    state = load_file(str(folder / "inception.safetensors"))
    with jax.enable_x64(True):
        params = convert.torch_to_flax(state, inception.abstract_params(),
                                       ignore=inception.IGNORED_KEYS, dtype=np.float64)
        forward = jax.jit(lambda p, x: inception.InceptionV3().apply({"params": p},
                                                                     inception.preprocess(x)))
        ours = np.asarray(forward(params, images[:1].astype(np.float64)))
    assert ours.dtype == np.float64
    diff = float(np.abs(ours - ref).max())
    print(f"float64 pool3 max abs diff {diff:.2e}")
    assert diff <= TOL * 1e-4


def test_transcription_is_pytorch_fid(nets, monkeypatch):
    try:
        from pytorch_fid import inception as pytorch_fid_inception
    except Exception as e:  # not installed, or PyPI's CUDA torchvision next to a CPU torch
        pytest.skip(f"pytorch-fid does not import here: {e!r}")
    model, _, images, _ = nets
    monkeypatch.setattr(pytorch_fid_inception, "load_state_dict_from_url",
                        lambda *args, **kwargs: model.state_dict())
    reference = pytorch_fid_inception.InceptionV3([3]).eval()
    with torch.no_grad():
        want = reference(nchw(images))[0].flatten(1)
        np.testing.assert_allclose(model(nchw(images)).numpy(), want.numpy(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [16, 320])  # upsampling, and shrinking (where antialias matters)
def test_resize_matches_torch_interpolate(size):
    images = np.random.default_rng(size).random((2, size, size + 3, 3)).astype(np.float32)
    ours = np.asarray(inception.preprocess(images))
    with torch.no_grad():
        x = F.interpolate(nchw(images), size=(299, 299), mode="bilinear", align_corners=False)
    # JAX vs torch: 1e-5 is 84 float32 ulps of these [-1, 1] values (3 seen).
    np.testing.assert_allclose(ours, (2 * x - 1).numpy().transpose(0, 2, 3, 1), atol=1e-5, rtol=0)


def test_grayscale_and_value_range():
    gray = np.random.default_rng(1).random((2, 20, 20, 1)).astype(np.float32)
    want = np.asarray(inception.preprocess(np.repeat(gray, 3, axis=-1)))
    np.testing.assert_array_equal(np.asarray(inception.preprocess(gray)), want)
    np.testing.assert_allclose(np.asarray(inception.preprocess(2 * gray - 1, value_range=(-1, 1))),
                               want, atol=1e-6, rtol=0)


def test_features_rejects_images_outside_the_range(nets):
    _, net, images, _ = nets
    with pytest.raises(ValueError, match=r"value_range=\(-1, 1\)"):
        net.features(2 * images - 1)
    with pytest.raises(ValueError, match="NHWC"):
        net.features(images[0])


def test_missing_weights_say_where_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        inception.InceptionFeatures.from_safetensors(str(tmp_path / "inception.safetensors"))
    assert inception.WEIGHTS_URL in str(e.value)
    assert "python -m lcm_jax.eval.inception convert" in str(e.value)
    with pytest.raises(FileNotFoundError, match="pytorch-fid"):
        inception.convert_weights(str(tmp_path / "pt_inception.pth"), str(tmp_path / "out.safetensors"))
    with pytest.raises(ValueError, match="convert it first"):
        inception.InceptionFeatures.from_safetensors(str(tmp_path / "pt_inception.pth"))


def test_convert_checks_every_key(tmp_path):
    pth, out = str(tmp_path / "bad.pth"), str(tmp_path / "bad.safetensors")
    torch.save({"Mixed_5b.branch1x1.conv.weight": torch.zeros(64, 192, 3, 3),
                "AuxLogits.fc.weight": torch.zeros(1000, 768)}, pth)  # torchvision's ImageNet net has this
    with pytest.raises(ConversionError) as e:
        inception.convert_weights(pth, out)
    message = str(e.value)
    assert "shape mismatch for Mixed_5b.branch1x1.conv.weight" in message
    assert "unexpected key AuxLogits.fc.weight" in message
    assert "missing key Mixed_7c.branch_pool.bn.running_var" in message
    assert not os.path.exists(out)


def test_stats_cache_round_trip(tmp_path):
    images = np.random.default_rng(2).random((6, 4, 4, 1)).astype(np.float32)
    features_fn = lambda x: x.reshape(len(x), -1)  # noqa: E731 - stands in for the network
    calls = []

    def load_images():
        calls.append(1)
        return images

    path = str(tmp_path / "stats" / "real.npz")
    mu, sigma = inception.dataset_stats(features_fn, load_images, path)
    assert mu.shape == (16,) and sigma.shape == (16, 16) and os.path.exists(path)
    mu_2, sigma_2 = inception.dataset_stats(features_fn, load_images, path)
    assert len(calls) == 1  # the second call read the cache, without loading the images
    np.testing.assert_array_equal(mu_2, mu)
    np.testing.assert_array_equal(sigma_2, sigma)
    with pytest.raises(ValueError, match="delete it to recompute"):
        inception.dataset_stats(features_fn, images[:5], path)
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's --save-stats layout
    np.testing.assert_array_equal(inception.load_stats(str(tmp_path / "pytorch_fid.npz"))[1], sigma)


def test_fid_against_own_stats_is_zero(nets):
    _, net, images, folder = nets
    stats = inception.dataset_stats(net.features, images, str(folder / "stats.npz"))
    scale = float(np.trace(stats[1]))
    assert scale > 1.0
    assert net.fid(images, str(folder / "stats.npz")) <= 1e-6 * scale  # (mu, sigma) work too
