"""Reconstruction metrics in JAX: MSE, PSNR and SSIM (scikit-image's definition, tested against it).

Images are [..., H, W, C] floats with values in a range of width `data_range` (1 for [0, 1],
2 for [-1, 1], 255 for 8-bit). Each metric returns one value per image.
SSIM is skimage.metrics.structural_similarity's default: a 7 x 7 uniform window, K1 = 0.01,
K2 = 0.03, the sample covariance (N / (N - 1)), the mean over the window positions that fit
inside the image (the border of 3 cropped) and over channels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def mse(a, b):
    return jnp.mean((jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32)) ** 2, axis=(-3, -2, -1))


def psnr(a, b, data_range: float = 1.0):
    return 10.0 * jnp.log10(data_range ** 2 / mse(a, b))


def _window_mean(x, size: int):
    """Mean over every size x size window that fits ('valid'), per channel: [..., H', W', C]."""
    summed = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1,) * (x.ndim - 3) + (size, size, 1),
                                   (1,) * x.ndim, "VALID")
    return summed / size ** 2


def ssim(a, b, data_range: float = 1.0, win_size: int = 7, k1: float = 0.01, k2: float = 0.03):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if min(a.shape[-3:-1]) < win_size:
        raise ValueError(f"SSIM's {win_size}x{win_size} window does not fit images of "
                         f"{a.shape[-3:-1]}; pass a smaller odd win_size.")
    cov_norm = win_size ** 2 / (win_size ** 2 - 1)  # the sample covariance
    m = lambda x: _window_mean(x, win_size)
    ux, uy = m(a), m(b)
    vx, vy = cov_norm * (m(a * a) - ux * ux), cov_norm * (m(b * b) - uy * uy)
    vxy = cov_norm * (m(a * b) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return jnp.mean(s, axis=(-3, -2, -1))
