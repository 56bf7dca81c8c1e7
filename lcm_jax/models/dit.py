"""DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers") with adaLN-zero, NHWC.

The blocks (`DiTBlock`, `FinalLayer`) are shared by the DiT baseline and LEGO bricks. Parameter
names follow the official DiT/timm modules (x_embedder, t_embedder, y_embedder, blocks_i/attn/qkv,
blocks_i/mlp/fc1, adaLN_modulation, final_layer/linear) so that a checkpoint port is a rename.

Initialisation is DiT's: xavier_uniform Dense kernels and zero biases; the patch embedding is
initialised like a Dense on the flattened patch; normal(0.02) for the label table and the timestep
MLP; adaLN modulations and the final projection are zero, so every block starts as the identity
and the network's output at init is exactly zero.

NULL_CLASS convention: with `num_classes = K > 0`, the label embedding has K + 1 rows and index
K (`DiT.null_class`) is the null / unconditional class for classifier-free guidance. Training
drops a label by replacing it with K; sampling runs the unconditional branch with labels = K
(or labels=None, which means "all null"). With num_classes = 0 the model is unconditional and
has no label embedding.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lcm_jax.models.attention import dot_product_attention
from lcm_jax.models.embeddings import TimestepEmbedding, sincos_2d, timestep_embedding

FREQ_DIM = 256  # width of the sinusoidal timestep embedding fed to the timestep MLP (DiT's)

xavier = nn.initializers.xavier_uniform()
zeros = nn.initializers.zeros


def modulate(x, shift, scale):
    """adaLN: per-example shift/scale [B, D] applied to tokens [B, L, D]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def _layer_norm(dtype, name):
    # No affine: the per-example adaLN shift/scale replace it.
    return nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout: [q | k | v] x heads)."""
    width: int
    num_heads: int
    dtype: Any = jnp.float32
    attention: str = "auto"  # attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
        b, l, _ = x.shape
        qkv = nn.Dense(3 * self.width, dtype=self.dtype, kernel_init=xavier, name="qkv")(x)
        q, k, v = qkv.reshape(b, l, 3, self.num_heads, -1).transpose(2, 0, 1, 3, 4)
        out = dot_product_attention(q, k, v, self.attention)  # [B, L, H, D]
        return nn.Dense(self.width, dtype=self.dtype, kernel_init=xavier, name="proj")(
            out.reshape(b, l, self.width))


class Mlp(nn.Module):
    width: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(int(self.width * self.mlp_ratio), dtype=self.dtype, kernel_init=xavier,
                     name="fc1")(x)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(self.width, dtype=self.dtype, kernel_init=xavier, name="fc2")(h)


class DiTBlock(nn.Module):
    """adaLN-zero transformer block on tokens x [B, L, width] with condition c [B, width]."""
    width: int
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, c):
        mod = nn.Dense(6 * self.width, dtype=self.dtype, kernel_init=zeros,
                       name="adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        h = modulate(_layer_norm(self.dtype, "norm1")(x), shift_msa, scale_msa)
        attn = Attention(self.width, self.num_heads, self.dtype, self.attention, name="attn")
        x = x + gate_msa[:, None] * attn(h)
        h = modulate(_layer_norm(self.dtype, "norm2")(x), shift_mlp, scale_mlp)
        return x + gate_mlp[:, None] * Mlp(self.width, self.mlp_ratio, self.dtype, name="mlp")(h)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + zero-init projection of tokens to patch_size^2 * out_channels."""
    patch_size: int
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, c):
        width = x.shape[-1]
        mod = nn.Dense(2 * width, dtype=self.dtype, kernel_init=zeros,
                       name="adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(_layer_norm(self.dtype, "norm_final")(x), shift, scale)
        return nn.Dense(self.patch_size ** 2 * self.out_channels, dtype=self.dtype,
                        kernel_init=zeros, name="linear")(x)


def condition_embedding(t, labels, timestep_cond, *, batch: int, width: int, num_classes: int,
                        time_cond_proj_dim: int | None, dtype, label_embedding=None):
    """c [B, width] = t_embedder(sincos(t) + cond_proj(w-embedding)) + y_embedder(labels), shared
    by DiT and LEGO. Call it inside a compact method: its submodules are the caller's
    (cond_proj, t_embedder, y_embedder). labels None means the null class. `label_embedding`
    [B, width] replaces the table lookup (see `label_embedding`): give it or labels, not both."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    t_freq = timestep_embedding(t, FREQ_DIM)
    if (timestep_cond is None) != (time_cond_proj_dim is None):
        raise ValueError("timestep_cond (the w-embedding) must be given exactly when the model "
                         "has time_cond_proj_dim.")
    if timestep_cond is not None:  # as the SD UNet's cond_proj: added before the timestep MLP
        t_freq = t_freq + nn.Dense(FREQ_DIM, use_bias=False, dtype=dtype, kernel_init=zeros,
                                   name="cond_proj")(timestep_cond)
    c = TimestepEmbedding(width, dtype=dtype, name="t_embedder")(t_freq)
    if label_embedding is not None:
        if labels is not None or not num_classes:
            raise ValueError("label_embedding replaces labels: give it without labels, to a "
                             "class-conditional model (num_classes > 0).")
        # Cast as nn.Embed casts its rows: the same sum as the lookup of an equal row.
        c = c + jnp.asarray(label_embedding, dtype)
    elif num_classes:
        if labels is None:
            labels = jnp.full((batch,), num_classes, jnp.int32)  # the null class
        c = c + nn.Embed(num_classes + 1, width, dtype=dtype,
                         embedding_init=nn.initializers.normal(0.02), name="y_embedder")(labels)
    elif labels is not None:
        raise ValueError("labels were given to an unconditional model (num_classes=0).")
    return c


def label_embedding(params, labels):
    """The label table's rows [..., width] for `labels` (int, [B]) in the params of a DiT (or a
    LEGO stack: both embed labels with `condition_embedding`), float32 as stored. Passing them
    as `DiT(...)(x, t, label_embedding=rows)` gives the output of `labels`; another embedding
    there is a learned condition (null-text inversion starts from the null class's row)."""
    return jnp.take(params["y_embedder"]["embedding"], jnp.asarray(labels), axis=0)


def pos_embed(h: int, w: int, width: int, dtype):
    """Fixed sin-cos positions of an h x w token grid as [1, h * w, width]."""
    return jnp.asarray(sincos_2d(h, w, width), dtype)[None]


def unpatchify(x, h: int, w: int, patch_size: int):
    """Tokens [B, h * w, p * p * C] (within a token: row, column, channel) -> [B, h p, w p, C]."""
    b, p = x.shape[0], patch_size
    x = x.reshape(b, h, w, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, -1)


class DiT(nn.Module):
    """DiT: x [B, H, W, C], t [B] (int or float timesteps, or a scalar), labels [B] int or None
    -> [B, H, W, out_channels] float32 (out_channels defaults to C). Instead of labels, apply
    (not init) takes `label_embedding` [B, width]: rows of the label table or learned ones.

    H and W must be multiples of patch_size; the positions are computed from the actual H, W, so
    the same params apply at other resolutions. `dtype` is the compute dtype; params stay float32.
    See the module docstring for the null-class convention.
    """
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    num_classes: int = 0
    out_channels: int | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    time_cond_proj_dim: int | None = None  # the w-embedding input of consistency students
    attention: str = "auto"  # attention.IMPLEMENTATIONS

    @property
    def null_class(self) -> int:
        return self.num_classes

    @nn.compact
    def __call__(self, x, t, labels=None, timestep_cond=None, label_embedding=None):
        b, height, width_px, channels = x.shape
        p = self.patch_size
        if height % p or width_px % p:
            raise ValueError(f"Image size {height}x{width_px} is not a multiple of "
                             f"patch_size {p}.")
        h, w = height // p, width_px // p

        # Patch embedding, initialised like a Dense on the flattened patch (fan_out = width).
        patch_init = nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3)
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                    kernel_init=patch_init, name="x_embedder")(x)
        x = x.reshape(b, h * w, self.width) + pos_embed(h, w, self.width, x.dtype)

        c = condition_embedding(t, labels, timestep_cond, batch=b, width=self.width,
                                num_classes=self.num_classes,
                                time_cond_proj_dim=self.time_cond_proj_dim, dtype=self.dtype,
                                label_embedding=label_embedding)

        # Explicit names keep the param tree identical with and without remat.
        block = nn.remat(DiTBlock) if self.remat else DiTBlock
        for i in range(self.depth):
            x = block(self.width, self.num_heads, self.mlp_ratio, self.dtype, self.attention,
                      name=f"blocks_{i}")(x, c)
        x = FinalLayer(p, self.out_channels or channels, self.dtype, name="final_layer")(x, c)
        return unpatchify(x, h, w, p).astype(jnp.float32)




def from_config(model_config, in_channels: int, time_cond_proj_dim: int | None = None) -> DiT:
    """DiT from a `config.model` ConfigDict (fields as in configs/digits_diffusion.py).

    The output has in_channels channels (an eps / v / x0 prediction of the input);
    `time_cond_proj_dim` adds the w-embedding input of a consistency student.
    """
    m = model_config
    if m.name != "dit":
        raise ValueError(f"config.model.name is {m.name!r}; dit.from_config builds 'dit'.")
    if m.width % m.num_heads:
        raise ValueError(f"config.model.width={m.width} is not divisible by "
                         f"config.model.num_heads={m.num_heads}: set width to a multiple of "
                         f"num_heads (width = num_heads * head_dim).")
    if m.width % 4:
        raise ValueError(f"config.model.width={m.width} must be a multiple of 4 "
                         f"(the 2D sin-cos positions split it four ways).")
    dtype = m.get("dtype", "float32")
    from lcm_jax.models import DTYPES

    if dtype not in DTYPES:
        raise ValueError(f"config.model.dtype={dtype!r}; use 'float32' or 'bfloat16'.")
    return DiT(patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
               mlp_ratio=m.get("mlp_ratio", 4.0), num_classes=m.get("num_classes", 0),
               out_channels=in_channels, dtype=DTYPES[dtype], remat=m.get("remat", False),
               time_cond_proj_dim=time_cond_proj_dim, attention=m.get("attention", "auto"))
