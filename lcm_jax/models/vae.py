"""diffusers' AutoencoderKL (the Stable Diffusion VAE) in Flax Linen, NHWC, built from config.json.

Run under `apply`:  `encode(x) -> (mean, logvar)`, `sample(mean, logvar, rng)`, `decode(z)`,
`__call__(x, rng=None)` (reconstruction; also what `init` traces).
Plain functions of the unbound module that take `params` (their encoder / decoder is compiled
once per shape, so they are quick to call eagerly and also work inside a jit):
`encode_to_latents(params, x, rng)` / `decode_latents(params, z)` (the diffusion model's scaled
latents, as diffusers' pipelines scale them) and `decode_tiled(params, z, tile, overlap)`.
Images are in [-1, 1]. Submodule names are the state-dict names (see convert.py).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax.models import convert
from lcm_jax.models.attention import dot_product_attention
from lcm_jax.models.layers import Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

EPS = 1e-6  # every VAE norm (resnets, attention, conv_norm_out) uses 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # DiagonalGaussianDistribution's clamp

# Config fields we implement only at these values; anything else is refused with the field's name.
FIXED = {"act_fn": "silu"}
# Older diffusers checkpoints name the mid-block attention's layers query/key/value/proj_attn.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of diffusers' AutoencoderKL config that we use, with diffusers' defaults."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215  # SD 1.x/2.x; SDXL 0.13025
    shift_factor: float | None = None
    latents_mean: tuple | None = None  # per-channel latent statistics (e.g. Playground v2.5)
    latents_std: tuple | None = None
    force_upcast: bool = True  # diffusers pipelines decode in fp32 when the model is fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        n = len(d.get("block_out_channels", cls.block_out_channels))
        problems = [f"{k}={d[k]!r} (only {v!r} is supported)" for k, v in FIXED.items()
                    if d.get(k, v) != v]
        for key, block in (("down_block_types", "DownEncoderBlock2D"),
                           ("up_block_types", "UpDecoderBlock2D")):
            types = tuple(d.get(key, (block,) * n))
            if len(types) != n or any(t != block for t in types):
                problems.append(f"{key}={types!r} (want {n} x {block!r}, one per "
                                "block_out_channels entry)")
        groups = d.get("norm_num_groups", cls.norm_num_groups)
        if any(ch % groups for ch in d.get("block_out_channels", cls.block_out_channels)):
            problems.append(f"norm_num_groups={groups} does not divide block_out_channels="
                            f"{d.get('block_out_channels')}")
        latent = d.get("latent_channels", cls.latent_channels)
        for key in ("latents_mean", "latents_std"):
            if d.get(key) is not None and len(d[key]) != latent:
                problems.append(f"{key} has {len(d[key])} entries, latent_channels={latent}")
        if problems:
            raise ValueError("Unsupported AutoencoderKL config: " + "; ".join(problems) + ".")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        if isinstance(kw.get("sample_size"), tuple):  # diffusers tiles with the first entry too
            kw["sample_size"] = kw["sample_size"][0]
        return cls(**kw)

    def to_dict(self) -> dict:
        """diffusers' config.json for this VAE."""
        n = len(self.block_out_channels)
        return dict(dataclasses.asdict(self), _class_name="AutoencoderKL", act_fn="silu",
                    down_block_types=["DownEncoderBlock2D"] * n,
                    up_block_types=["UpDecoderBlock2D"] * n,
                    block_out_channels=list(self.block_out_channels))

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel (8 for Stable Diffusion)."""
        return 2 ** (len(self.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------

class MidAttention(nn.Module):
    """Single-head self-attention over all pixels with its own GroupNorm and a residual."""
    groups: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        hid = group_norm(self.groups, EPS, "group_norm")(x).astype(self.dtype)
        hid = hid.reshape(b, h * w, 1, c)  # [batch, tokens, 1 head, channels]
        q, k, v = (nn.Dense(c, dtype=self.dtype, name=n)(hid) for n in ("to_q", "to_k", "to_v"))
        out = dot_product_attention(q, k, v).reshape(b, h * w, c)  # "auto" (attention.py)
        return x + nn.Dense(c, dtype=self.dtype, name="to_out_0")(out).reshape(b, h, w, c)


class MidBlock(nn.Module):
    """resnet, (attention), resnet at the lowest resolution."""
    groups: int
    add_attention: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        resnet = lambda i: ResnetBlock2D(x.shape[-1], self.groups, EPS, use_time_emb=False,
                                         dtype=self.dtype, name=f"resnets_{i}")
        x = resnet(0)(x)
        if self.add_attention:
            x = MidAttention(self.groups, self.dtype, name="attentions_0")(x)
        return resnet(1)(x)


class Block(nn.Module):
    """DownEncoderBlock2D (resample='down') or UpDecoderBlock2D (resample='up'): resnets, then
    the resampling layer."""
    out_channels: int
    num_layers: int
    groups: int
    resample: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, use_time_emb=False,
                              dtype=self.dtype, name=f"resnets_{i}")(x)
        if self.resample == "down":
            x = Downsample2D(self.out_channels, padding=0, dtype=self.dtype,  # asymmetric pad
                             name="downsamplers_0")(x)
        elif self.resample == "up":
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _out(x, c: VAEConfig, out_channels: int, dtype):
    """conv_norm_out -> SiLU -> conv_out."""
    x = nn.silu(group_norm(c.norm_num_groups, EPS, "conv_norm_out")(x)).astype(dtype)
    return conv(out_channels, 3, dtype, "conv_out")(x)


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, chans = self.config, self.config.block_out_channels
        x = conv(chans[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, ch in enumerate(chans):
            x = Block(ch, c.layers_per_block, c.norm_num_groups,
                      None if i == len(chans) - 1 else "down", self.dtype,
                      name=f"down_blocks_{i}")(x)
        x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, self.dtype, name="mid_block")(x)
        return _out(x, c, 2 * c.latent_channels, self.dtype)


class Decoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c, chans = self.config, self.config.block_out_channels[::-1]
        x = conv(chans[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        x = MidBlock(c.norm_num_groups, c.mid_block_add_attention, self.dtype, name="mid_block")(x)
        for i, ch in enumerate(chans):
            x = Block(ch, c.layers_per_block + 1, c.norm_num_groups,
                      None if i == len(chans) - 1 else "up", self.dtype, name=f"up_blocks_{i}")(x)
        return _out(x, c, c.out_channels, self.dtype)


# ----------------------------------------------------------------------------------------------
# The autoencoder
# ----------------------------------------------------------------------------------------------

class AutoencoderKL(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype)
        self.decoder = Decoder(c, self.dtype)
        self.quant_conv = conv(2 * c.latent_channels, 1, self.dtype, "quant_conv") \
            if c.use_quant_conv else None
        self.post_quant_conv = conv(c.latent_channels, 1, self.dtype, "post_quant_conv") \
            if c.use_post_quant_conv else None

    def encode(self, x):
        """Images [B, H, W, in] -> the posterior's (mean, logvar), [B, H/f, W/f, latent] each."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def sample(self, mean, logvar, rng):
        """A draw from the diagonal Gaussian posterior (needs no parameters)."""
        return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

    def decode(self, z):
        """Unscaled latents [B, h, w, latent] -> images [B, h*f, w*f, out_channels]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z)

    def __call__(self, x, rng=None):
        """Reconstruction: the posterior mean (or a sample when `rng` is given), decoded."""
        mean, logvar = self.encode(x)
        return self.decode(mean if rng is None else self.sample(mean, logvar, rng))

    # -- functions of `params` (call them on the unbound module) ----------------------------------

    def _latent_stats(self):
        """(shift, scale) with model latents = (z - shift) * scale, as diffusers' pipelines do."""
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:  # SDXL-style per-channel stats
            return (jnp.asarray(c.latents_mean, jnp.float32),
                    c.scaling_factor / jnp.asarray(c.latents_std, jnp.float32))
        return c.shift_factor or 0.0, c.scaling_factor

    def encode_to_latents(self, params, x, rng=None, noise=None):
        """Images -> the diffusion model's latents: a posterior sample (drawn with `rng`, or
        mean + std * `noise` for caller-drawn standard normals; the mean when neither is given),
        shifted and scaled."""
        mean, logvar = _encode(self, params, x)
        if noise is not None:
            z = mean + jnp.exp(0.5 * logvar) * noise
        else:
            z = mean if rng is None else self.sample(mean, logvar, rng)
        shift, scale = self._latent_stats()
        return (z - shift) * scale

    def decode_latents(self, params, latents):
        """The diffusion model's latents -> images (the inverse scaling, then decode)."""
        shift, scale = self._latent_stats()
        return _decode(self, params, latents / scale + shift)

    def decode_tiled(self, params, z, tile: int | None = None, overlap: float = 0.25):
        """decode(z) in overlapping tiles of `tile` latent pixels (default sample_size / f), each
        blended linearly into its upper and left neighbours over `overlap` of a tile: diffusers'
        `tiled_decode`, step for step. The decoder runs on one tile at a time (its activations
        are the memory that grows with the image); each distinct tile shape (at most four)
        compiles once.
        Not equal to decode(z): attention and GroupNorm see one tile, not the whole latent."""
        f = self.config.factor
        tile = tile or self.config.sample_size // f
        if z.shape[1] <= tile and z.shape[2] <= tile:
            return _decode(self, params, z)
        step, blend = int(tile * (1 - overlap)), int(tile * f * overlap)
        keep = tile * f - blend  # each tile's rows / columns that are not blended into the next
        rows = [[_decode(self, params, z[:, i:i + tile, j:j + tile])
                 for j in range(0, z.shape[2], step)] for i in range(0, z.shape[1], step)]
        for i, row in enumerate(rows):
            for j, t in enumerate(row):
                # In place as in diffusers: later tiles blend with their neighbours' blended values.
                if i > 0:
                    t = _blend(rows[i - 1][j], t, blend, axis=1)
                if j > 0:
                    t = _blend(row[j - 1], t, blend, axis=2)
                row[j] = t
        return jnp.concatenate([jnp.concatenate([t[:, :keep, :keep] for t in row], axis=2)
                                for row in rows], axis=1)


def _blend(a, b, extent: int, axis: int):
    """b's first `extent` rows (axis 1) / columns (axis 2) fade in from a's last ones."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    w = (jnp.arange(extent, dtype=b.dtype) / extent).reshape((-1,) + (1,) * (3 - axis))
    head = jax.lax.slice_in_dim(b, 0, extent, axis=axis)
    tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    return jax.lax.dynamic_update_slice_in_dim(b, tail * (1 - w) + head * w, 0, axis=axis)


# One compiled encoder / decoder per (module, shape), shared by the helpers above and by callers
# that want the raw posterior or decode outside their own jit.
@functools.partial(jax.jit, static_argnums=0)
def _encode(module, params, x):
    return module.apply({"params": params}, x, method=AutoencoderKL.encode)


@functools.partial(jax.jit, static_argnums=0)
def _decode(module, params, z):
    return module.apply({"params": params}, z, method=AutoencoderKL.decode)


# ----------------------------------------------------------------------------------------------
# Building, loading, saving
# ----------------------------------------------------------------------------------------------

def from_config(config_dict: dict, *, dtype=jnp.float32) -> AutoencoderKL:
    return AutoencoderKL(VAEConfig.from_dict(config_dict), dtype=dtype)


def abstract_params(module: AutoencoderKL):
    """Parameter shapes via jax.eval_shape (no memory, no compute)."""
    x = jnp.zeros((1, module.config.factor, module.config.factor, module.config.in_channels))
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))["params"]


def rename_legacy_keys(state_dict: dict) -> dict:
    """query/key/value/proj_attn -> to_q/to_k/to_v/to_out.0 (what diffusers does on load)."""
    pattern = re.compile(r"((?:en|de)coder\.mid_block\.attentions\.\d+)\."
                         r"(query|key|value|proj_attn)\.")
    return {pattern.sub(lambda m: f"{m.group(1)}.{LEGACY_ATTENTION[m.group(2)]}.", k): v
            for k, v in state_dict.items()}


def from_pretrained(folder: str, *, dtype=jnp.float32, variant: str | None = None):
    """(module, params) from a diffusers AutoencoderKL folder (config.json + safetensors).
    `dtype` is the compute dtype; parameters load as float32."""
    module = from_config(convert.read_config(folder), dtype=dtype)
    state = rename_legacy_keys(convert.load_state_dict(folder, variant))
    return module, convert.torch_to_flax(state, abstract_params(module))


def save_pretrained(folder: str, config_dict: dict, params) -> None:
    """A folder that diffusers' AutoencoderKL.from_pretrained loads. The params are checked
    against the config first, so a mismatch fails here rather than in diffusers."""
    state = convert.flax_to_torch(params)
    convert.torch_to_flax(state, abstract_params(from_config(config_dict)))
    convert.save_folder(folder, dict(config_dict, _class_name="AutoencoderKL"), state)
