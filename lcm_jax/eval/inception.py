"""FID's Inception network in Flax: pytorch-fid's `InceptionV3([3])`, its 2048-d pool3 features.

This is the network of TF's FID (inception-2015-12-05, 1008 classes) as pytorch-fid ports it:
torchvision's Inception3 with the FID blocks (Mixed_5b-d, 6b-e: 3x3 average pools that do not count
the zero padding; Mixed_7b likewise; Mixed_7c: a 3x3 MAX pool in its pool branch), BatchNorm eps
1e-3, inference only. Parameter paths mirror the torch keys (Mixed_5b/branch5x5_1/conv/kernel,
.../bn/scale|bias|running_mean|running_var; the running statistics are params here), so the
weights map through `convert.torch_to_flax`, every key checked.

Input convention (pytorch-fid's `resize_input=True, normalize_input=True`): images [N, H, W, 3]
(or [N, H, W, 1], repeated to 3 channels) with values in [0, 1] - pass value_range=(-1, 1) for the
samplers' output - are resized to 299 x 299 by bilinear interpolation with half-pixel centres and
NO antialiasing (torch's F.interpolate(mode='bilinear', align_corners=False), also when shrinking),
then mapped to [-1, 1] by 2x - 1. Note that TF's FID resizes differently; pytorch-fid's numbers
are the reference here.

Weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth, converted once to safetensors (lcm_jax
loads no pickles, and downloads nothing):

    python -m lcm_jax.eval.inception convert pt_inception-2015-12-05-6726825d.pth inception.safetensors

    net = InceptionFeatures.from_safetensors("inception.safetensors")
    ref = dataset_stats(net.features, real_images, "stats/real.npz")   # cached (mu, sigma)
    score = net.fid(samples, ref, value_range=(-1, 1))
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.eval import fid as fid_lib
from lcm_jax.models import convert

RESOLUTION = 299
FEATURE_DIM = 2048
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
# Keys of the weight file that pool3 does not use: the 1008-way classifier and BN step counters.
IGNORED_KEYS = (r"fc\.(weight|bias)", r".*\.num_batches_tracked")


# ----------------------------------------------------------------------------------------------
# Modules (names mirror torchvision's Inception3 / pytorch-fid's FID blocks)
# ----------------------------------------------------------------------------------------------

class BatchNorm(nn.Module):
    """Inference BatchNorm; running statistics are params so one tree maps to the torch keys."""
    eps: float = 1e-3

    @nn.compact
    def __call__(self, x):
        shape = (x.shape[-1],)
        scale = self.param("scale", nn.initializers.ones, shape)
        bias = self.param("bias", nn.initializers.zeros, shape)
        mean = self.param("running_mean", nn.initializers.zeros, shape)
        var = self.param("running_var", nn.initializers.ones, shape)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN -> ReLU; kernel and padding (h, w) as in torchvision."""
    features: int
    kernel: tuple[int, int] = (1, 1)
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        (ph, pw), s = self.padding, self.stride
        x = nn.Conv(self.features, self.kernel, (s, s), [(ph, ph), (pw, pw)], use_bias=False,
                    name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


def _avg_pool_3x3(x):
    # TF's average pool (the FID blocks' patch): the zero padding is not counted.
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), "VALID")


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, name="branch1x1")(x)
        b5 = BasicConv2d(48, name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row = dict(kernel=(1, 7), padding=(0, 3))
        col = dict(kernel=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, name="branch1x1")(x)
        b7 = BasicConv2d(c7, name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 (pool 'avg', padding not counted) or FIDInceptionE_2 (pool 'max')."""
    pool: str

    @nn.compact
    def __call__(self, x):
        row = dict(kernel=(1, 3), padding=(0, 1))
        col = dict(kernel=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(320, name="branch1x1")(x)
        b3 = BasicConv2d(384, name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                              BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "max":  # max pools pad with -inf, as torch's
            pooled = nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_3x3(x)
        bp = BasicConv2d(192, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
    """Network input [N, 299, 299, 3] in [-1, 1] (see `preprocess`) -> pool3 features [N, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
            x = FIDInceptionA(pool_features, name=name)(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1 x 1


def preprocess(images, value_range=(0.0, 1.0)):
    """Images [N, H, W, 1 | 3] with values in value_range -> network input [N, 299, 299, 3] in
    [-1, 1]: pytorch-fid's bilinear resize (align_corners=False, no antialias), then 2x - 1."""
    lo, hi = value_range
    x = jnp.asarray(images)
    x = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) - lo) / (hi - lo)  # float64 stays
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    # antialias=False: jax would otherwise widen the kernel when shrinking; torch does not.
    x = jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 3), "bilinear", antialias=False)
    return 2.0 * x - 1.0


@functools.partial(jax.jit, static_argnames="value_range")
def _features(params, images, value_range):
    return InceptionV3().apply({"params": params}, preprocess(images, value_range))


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------

def abstract_params() -> dict:
    """The params tree as ShapeDtypeStructs (no memory, no compute)."""
    x = jnp.zeros((1, RESOLUTION, RESOLUTION, 3))
    return jax.eval_shape(InceptionV3().init, jax.random.key(0), x)["params"]


def params_from_state_dict(state_dict) -> dict:
    """A torch-layout FID Inception state dict (numpy) -> Flax params; ConversionError lists
    every missing, unexpected or mis-shaped key (e.g. torchvision's ImageNet Inception)."""
    return convert.torch_to_flax(state_dict, abstract_params(), ignore=IGNORED_KEYS)


def _missing_weights(path: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"FID Inception weights {path} do not exist. Download pytorch-fid's weight file "
        f"{WEIGHTS_URL} and convert it once: `python -m lcm_jax.eval.inception convert "
        f"pt_inception-2015-12-05-6726825d.pth {path}` (needs torch).")


def convert_weights(pth_path: str, out_path: str) -> None:
    """pytorch-fid's .pth -> safetensors (the torch state dict as it is), checked before writing."""
    if not os.path.exists(pth_path):
        raise FileNotFoundError(f"{pth_path} does not exist; download pytorch-fid's weight "
                                f"file {WEIGHTS_URL}.")
    import torch  # the only torch import in lcm_jax: this one-off conversion reads a pickle

    state = torch.load(pth_path, map_location="cpu", weights_only=True)
    state = {k: v.detach().cpu().numpy() for k, v in state.items()}
    try:
        params_from_state_dict(state)
    except convert.ConversionError as e:
        raise convert.ConversionError(f"{pth_path}: {e}") from None
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, out_path + ".tmp",
              metadata={"format": "pt"})
    os.replace(out_path + ".tmp", out_path)


# ----------------------------------------------------------------------------------------------
# Features and FID
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)  # params arrays have no truth value
class InceptionFeatures:
    """pool3 features of images [N, H, W, 1 | 3] with values in value_range (default [0, 1])."""

    params: Any
    batch_size: int = 50  # pytorch-fid's default

    @classmethod
    def from_safetensors(cls, path: str, batch_size: int = 50) -> "InceptionFeatures":
        if path.endswith(convert.PICKLE_SUFFIXES):
            raise ValueError(f"{path} is a pickle; convert it first: `python -m "
                             f"lcm_jax.eval.inception convert {path} inception.safetensors`.")
        if not os.path.exists(path):
            raise _missing_weights(path)
        try:
            params = params_from_state_dict(convert.load_weights(path))
        except convert.ConversionError as e:
            raise convert.ConversionError(f"{path}: {e}") from None
        return cls(jax.tree.map(jnp.asarray, params), batch_size)

    def features(self, images, value_range=(0.0, 1.0)) -> np.ndarray:
        """[N, 2048] float32, in fixed-size padded chunks: each image shape compiles once."""
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
            raise ValueError(f"InceptionFeatures expects NHWC images [N>0, H, W, 1 or 3], got "
                             f"shape {images.shape}.")
        lo, hi = value_range = (float(value_range[0]), float(value_range[1]))
        slack = 1e-3 * (hi - lo)  # round-off of a decoder's output
        if images.min() < lo - slack or images.max() > hi + slack:
            raise ValueError(f"images span [{images.min():.3g}, {images.max():.3g}], outside "
                             f"value_range={value_range}: pass the range the images use "
                             "(value_range=(-1, 1) for the samplers', (0, 255) for 8-bit) "
                             "and clip samples first.")
        chunk = min(self.batch_size, images.shape[0])
        out = []
        for start in range(0, images.shape[0], chunk):
            part = images[start:start + chunk]
            padded = np.pad(part, ((0, chunk - part.shape[0]), (0, 0), (0, 0), (0, 0)),
                            constant_values=lo)
            out.append(np.asarray(_features(self.params, padded, value_range))[:part.shape[0]])
        return np.concatenate(out)

    def fid(self, images, ref_stats, value_range=(0.0, 1.0)) -> float:
        """FID of images against ref_stats: (mu, sigma) or the path of a stats .npz."""
        mu_ref, sigma_ref = load_stats(ref_stats) if isinstance(ref_stats, str) else ref_stats
        mu, sigma = fid_lib.gaussian_stats(self.features(images, value_range))
        return fid_lib.frechet_distance(mu, sigma, mu_ref, sigma_ref)


# ----------------------------------------------------------------------------------------------
# Dataset statistics (.npz with pytorch-fid's keys mu and sigma: its stats files load here)
# ----------------------------------------------------------------------------------------------

def save_stats(path: str, mu, sigma, num_images: int | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {} if num_images is None else {"num_images": np.int64(num_images)}
    with open(path + ".tmp", "wb") as f:  # a file object: np.savez would append .npz to the name
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)
    os.replace(path + ".tmp", path)


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        if "mu" not in data or "sigma" not in data:
            raise KeyError(f"{path} holds {sorted(data.files)}, not FID statistics (mu, sigma); "
                           "delete it to recompute.")
        return data["mu"], data["sigma"]


def dataset_stats(features_fn: Callable, images, cache_path: str | None = None):
    """(mu, sigma) of features_fn(images), cached in cache_path (.npz) when given.

    `images`: an array, or a zero-argument callable returning one (called only on a cache miss,
    so a cached dataset is never loaded). A cache made from a different number of images than an
    array given now is an error, not silently reused.
    """
    if cache_path and os.path.exists(cache_path):
        with np.load(cache_path) as data:
            cached_n = int(data["num_images"]) if "num_images" in data else None
        if cached_n is not None and not callable(images) and len(images) != cached_n:
            raise ValueError(f"{cache_path} holds statistics of {cached_n} images, but "
                             f"{len(images)} were given; delete it to recompute.")
        return load_stats(cache_path)
    images = images() if callable(images) else images
    mu, sigma = fid_lib.gaussian_stats(features_fn(images))
    if cache_path:
        save_stats(cache_path, mu, sigma, len(images))
    return mu, sigma


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lcm_jax.eval.inception")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="pytorch-fid's pt_inception-*.pth -> safetensors")
    c.add_argument("pth")
    c.add_argument("out")
    args = parser.parse_args(argv)
    convert_weights(args.pth, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
