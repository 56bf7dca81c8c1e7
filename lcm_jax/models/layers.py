"""Building blocks of the Stable Diffusion UNet and VAE (diffusers' modules), NHWC.

Submodule names are diffusers' state-dict names (list positions joined with '_', see convert.py),
so loading a checkpoint is a mechanical rename. Normalisations run in float32 whatever the
compute dtype (as diffusers' upcasting does); attention goes through attention.py, whose `attention`
field picks XLA's or the chunked implementation.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lcm_jax.models.attention import dot_product_attention


def group_norm(groups: int, eps: float, name: str):
    return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=jnp.float32, name=name)


def conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding: int | None = None):
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, + time embedding, GroupNorm -> SiLU -> conv, + (1x1) shortcut."""
    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    use_time_emb: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, "norm1")(x)).astype(self.dtype)
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if self.use_time_emb:
            t = nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
            h = h + t[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, "norm2")(h)).astype(self.dtype)
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        return x + h


class Downsample2D(nn.Module):
    """Strided 3x3 conv. padding=1 (UNet) or 0 with an asymmetric (0, 1) pad first (VAE)."""
    out_channels: int
    padding: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.out_channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.out_channels, 3, self.dtype, "conv")(x)


class Attention(nn.Module):
    """diffusers' Attention: to_q / to_k / to_v (no bias by default), to_out.0 with bias."""
    heads: int
    dim_head: int
    out_dim: int
    bias: bool = False
    dtype: Any = jnp.float32
    attention: str = "auto"  # attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x, context=None):
        context = x if context is None else context
        inner = self.heads * self.dim_head
        dense = lambda n, name, bias=self.bias: nn.Dense(n, use_bias=bias, dtype=self.dtype, name=name)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, self.dim_head)
        q, k, v = (split(dense(inner, name)(src)) for name, src in
                   (("to_q", x), ("to_k", context), ("to_v", context)))
        out = dot_product_attention(q, k, v, self.attention).reshape(x.shape[0], x.shape[1], inner)
        return dense(self.out_dim, "to_out_0", bias=True)(out)


class GEGLU(nn.Module):
    inner: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """ff.net.0 = GEGLU(dim -> 4 dim), ff.net.2 = Linear(4 dim -> dim) (net.1 is dropout)."""
    dim: int
    mult: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = GEGLU(self.dim * self.mult, self.dtype, name="net_0")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention to the text, GEGLU feed-forward."""
    dim: int
    heads: int
    dim_head: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)
        attn = lambda name: Attention(self.heads, self.dim_head, self.dim, dtype=self.dtype,
                                      attention=self.attention, name=name)
        x = x + attn("attn1")(ln("norm1")(x).astype(self.dtype))
        x = x + attn("attn2")(ln("norm2")(x).astype(self.dtype), context)
        return x + FeedForward(self.dim, dtype=self.dtype, name="ff")(ln("norm3")(x).astype(self.dtype))


class Transformer2DModel(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear for SD2/SDXL), transformer blocks, proj_out, residual."""
    heads: int
    dim_head: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    remat: bool = False
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        proj = (lambda n, name: nn.Dense(n, dtype=self.dtype, name=name)) if self.use_linear_projection \
            else (lambda n, name: conv(n, 1, self.dtype, name))
        hid = group_norm(self.groups, 1e-6, "norm")(x).astype(self.dtype)
        if self.use_linear_projection:
            hid = proj(inner, "proj_in")(hid.reshape(b, h * w, c))
        else:
            hid = proj(inner, "proj_in")(hid).reshape(b, h * w, inner)
        block = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
        for i in range(self.num_layers):
            hid = block(inner, self.heads, self.dim_head, self.dtype, self.attention,
                        name=f"transformer_blocks_{i}")(hid, context)
        if self.use_linear_projection:
            hid = proj(c, "proj_out")(hid).reshape(b, h, w, c)
        else:
            hid = proj(c, "proj_out")(hid.reshape(b, h, w, inner))
        return x + hid
