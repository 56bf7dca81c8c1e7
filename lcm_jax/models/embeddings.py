"""Sinusoidal embeddings shared by the DiT/LEGO backbones and the SD UNet port.

- `timestep_embedding`: diffusers' `get_timestep_embedding` (DiT's own embedder is the case
  flip_sin_to_cos=True, downscale_freq_shift=0; so is SD's).
- `TimestepEmbedding`: the MLP on top of it (Dense -> SiLU -> Dense), named like diffusers'
  `linear_1` / `linear_2` so that weight conversion is a rename.
- `sincos_2d`: the fixed 2D sin-cos positional embedding of MAE / DiT.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def timestep_embedding(t, dim: int, max_period: float = 10000, flip_sin_to_cos: bool = True,
                       downscale_freq_shift: float = 0):
    """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim] float32.

    exponent_j = -ln(max_period) j / (half - shift), j < half = dim // 2; args = t exp(exponent);
    [sin, cos] (or [cos, sin] when flip_sin_to_cos); odd dims get one zero column.
    The frequencies are static: the exponent is rounded to float32 exactly as diffusers does it,
    then exponentiated in float64 and rounded once, so they match torch's float32 `exp` to the bit
    in all but a few entries (torch's exp is not always correctly rounded) and do not depend on the
    backend's `exp`. A scalar t is broadcast to one row.
    """
    half = dim // 2
    exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
                / np.float32(half - downscale_freq_shift))
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    t = jnp.atleast_1d(jnp.asarray(t, jnp.float32))
    args = t[:, None] * freqs[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on a sinusoidal embedding: Dense(features) -> SiLU -> Dense(out_features or features).

    The default init is DiT's (normal(0.02) kernels, zero biases); converted SD weights replace it.
    """
    features: int
    out_features: int | None = None
    dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, emb):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=self.kernel_init,
                                         name=name)
        h = nn.silu(dense(self.features, "linear_1")(emb))
        return dense(self.out_features or self.features, "linear_2")(h)


def _sincos_1d(pos: np.ndarray, dim: int) -> np.ndarray:
    """[M] positions -> [M, dim]: [sin(pos w), cos(pos w)], w_j = 10000^(-j / (dim/2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))
    out = pos.reshape(-1)[:, None].astype(np.float64) * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """Fixed 2D sin-cos positions of a grid_h x grid_w token grid -> [grid_h * grid_w, dim] float32.

    Tokens in row-major (h, w) order. As in MAE/DiT's `get_2d_sincos_pos_embed` (whose square grid
    is the case grid_h == grid_w): the first half of the channels encodes the column (w)
    coordinate, the second half the row (h) coordinate, each as a 1D [sin, cos] embedding.
    Computed in float64 with numpy: the grid is static, so this is a constant under jit.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d needs dim divisible by 4, got {dim}.")
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([_sincos_1d(cols, dim // 2), _sincos_1d(rows, dim // 2)], axis=1)
    return emb.astype(np.float32)
