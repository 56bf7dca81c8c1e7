"""diffusers' UNet2DConditionModel in Flax Linen, NHWC, built from its config.json.

Covers SD 1.x (cross_attention_dim 768, 8 heads, 1x1-conv projections), SD 2.x (per-block heads,
linear projections, v-prediction teachers), SDXL (transformer_layers_per_block, "text_time"
addition embedding from pooled text embeddings and add_time_ids), LCM's `time_cond_proj_dim`
(the guidance-scale embedding through `time_embedding.cond_proj`), class embeddings for small
class-conditional models, and conv-only blocks. Unsupported config values fail with the field's name.

Note diffusers' naming: `attention_head_dim` is the NUMBER of heads when `num_attention_heads` is
unset (SD 1.5: 8 heads; SD 2.1: [5, 10, 20, 20] heads of 64 channels).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lcm_jax.models import convert
from lcm_jax.models.embeddings import timestep_embedding
from lcm_jax.models.layers import (Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D,
                                   conv, group_norm)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)

# Config fields we implement only at these values (diffusers' defaults); anything else is refused.
FIXED = {"center_input_sample": False, "only_cross_attention": False, "dual_cross_attention": False,
         "act_fn": "silu", "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
         "time_embedding_dim": None, "timestep_post_act": None, "time_embedding_act_fn": None,
         "encoder_hid_dim": None, "encoder_hid_dim_type": None, "class_embeddings_concat": False,
         "mid_block_only_cross_attention": None, "attention_type": "default",
         "conv_in_kernel": 3, "conv_out_kernel": 3, "mid_block_scale_factor": 1,
         "reverse_transformer_layers_per_block": None, "cross_attention_norm": None,
         "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0}


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The subset of diffusers' UNet2DConditionModel config that shapes the network."""
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: tuple = (2, 2, 2, 2)
    transformer_layers_per_block: tuple = (1, 1, 1, 1)
    num_heads: tuple = (8, 8, 8, 8)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    time_cond_proj_dim: int | None = None
    upcast_attention: bool = False  # fp32 attention; our attention already runs in the compute dtype

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        problems = [f"{k}={d[k]!r} (only {v!r} is supported)" for k, v in FIXED.items()
                    if k in d and d[k] != v and not (v is None and d[k] in (None, False))]
        n = len(d.get("block_out_channels", cls.block_out_channels))
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        if d.get("class_embed_type") not in (None,):
            problems.append(f"class_embed_type={d['class_embed_type']!r} (use num_class_embeds)")
        if d.get("addition_embed_type") not in (None, "text_time"):
            problems.append(f"addition_embed_type={d['addition_embed_type']!r} (only 'text_time')")
        for key, allowed in (("down_block_types", DOWN_BLOCKS), ("up_block_types", UP_BLOCKS)):
            problems += [f"{key} entry {b!r} (supported: {allowed})" for b in d.get(key, ())
                         if b not in allowed]
        if d.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in MID_BLOCKS:
            problems.append(f"mid_block_type={d['mid_block_type']!r} (supported: {MID_BLOCKS})")
        if isinstance(d.get("cross_attention_dim"), (list, tuple)):
            problems.append("cross_attention_dim as a per-block list")
        if problems:
            raise ValueError("Unsupported UNet config: " + "; ".join(problems) + ". lcm_jax ports "
                             "the SD 1.x / 2.x / XL UNet2DConditionModel; extend models/unet.py.")
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in fields}
        kw.update(layers_per_block=_per_block(d.get("layers_per_block", 2), n),
                  transformer_layers_per_block=_per_block(d.get("transformer_layers_per_block", 1), n),
                  num_heads=_per_block(heads, n))
        return cls(**kw)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4


class TimestepEmbedding(nn.Module):
    """linear_1 -> SiLU -> linear_2; LCM's cond_proj(w-embedding) is added before linear_1."""
    dim: int
    cond_proj: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cond=None):
        if self.cond_proj:
            x = x + nn.Dense(x.shape[-1], use_bias=False, dtype=self.dtype, name="cond_proj")(cond)
        x = nn.silu(nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x))
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(x)


class UNetBlock(nn.Module):
    """A down, mid or up block: resnets, each optionally followed by a Transformer2DModel, then an
    optional resampler. Up blocks concatenate one skip connection before each resnet."""
    config: UNetConfig
    channels: int
    num_layers: int
    heads: int
    transformer_layers: int
    cross_attention: bool
    resample: str | None = None  # "down" | "up" | None
    mid: bool = False  # the mid block: resnet, (attention, resnet)
    dtype: Any = jnp.float32
    remat: bool = False
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, emb, context, skips=()):
        c = self.config
        resnet = nn.remat(ResnetBlock2D) if self.remat else ResnetBlock2D
        res = []
        for j in range(self.num_layers):
            if skips:
                x = jnp.concatenate([x, skips[j]], axis=-1)
            if not (self.mid and j > 0):
                x = resnet(self.channels, c.norm_num_groups, c.norm_eps, dtype=self.dtype,
                           name=f"resnets_{j}")(x, emb)
            if self.cross_attention:
                x = Transformer2DModel(self.heads, self.channels // self.heads,
                                       self.transformer_layers, c.norm_num_groups,
                                       c.use_linear_projection, self.remat, self.dtype,
                                       self.attention, name=f"attentions_{j}")(x, context)
                if self.mid:
                    x = resnet(self.channels, c.norm_num_groups, c.norm_eps, dtype=self.dtype,
                               name=f"resnets_{j + 1}")(x, emb)
            res.append(x)
        if self.resample == "down":
            x = Downsample2D(self.channels, c.downsample_padding, self.dtype, name="downsamplers_0")(x)
            res.append(x)
        elif self.resample == "up":
            x = Upsample2D(self.channels, self.dtype, name="upsamplers_0")(x)
        return x, res


class UNet2DConditionModel(nn.Module):
    config: UNetConfig
    dtype: Any = jnp.float32  # compute dtype; params stay float32
    remat: bool = False  # rematerialise each resnet and transformer block (memory for compute)
    attention: str = "auto"  # attention.IMPLEMENTATIONS: "auto" is "chunked" on CPU, "xla" elsewhere

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states=None, class_labels=None,
                 timestep_cond=None, added_cond: dict | None = None):
        c = self.config
        emb = self._embedding(sample.shape[0], timesteps, class_labels, timestep_cond, added_cond)
        block = lambda name, **kw: UNetBlock(c, dtype=self.dtype, remat=self.remat,
                                             attention=self.attention, name=name, **kw)
        last = len(c.block_out_channels) - 1

        x = conv(c.block_out_channels[0], 3, self.dtype, "conv_in")(sample.astype(self.dtype))
        skips = [x]
        for i, kind in enumerate(c.down_block_types):
            x, res = block(f"down_blocks_{i}", channels=c.block_out_channels[i],
                           num_layers=c.layers_per_block[i], heads=c.num_heads[i],
                           transformer_layers=c.transformer_layers_per_block[i],
                           cross_attention=kind == "CrossAttnDownBlock2D",
                           resample="down" if i < last else None)(x, emb, encoder_hidden_states)
            skips += res

        if c.mid_block_type is not None:
            x, _ = block("mid_block", channels=c.block_out_channels[-1], num_layers=1,
                         heads=c.num_heads[-1], transformer_layers=c.transformer_layers_per_block[-1],
                         cross_attention=c.mid_block_type == "UNetMidBlock2DCrossAttn",
                         mid=True)(x, emb, encoder_hidden_states)

        for i, kind in enumerate(c.up_block_types):
            n = c.layers_per_block[::-1][i] + 1
            x, _ = block(f"up_blocks_{i}", channels=c.block_out_channels[::-1][i], num_layers=n,
                         heads=c.num_heads[::-1][i],
                         transformer_layers=c.transformer_layers_per_block[::-1][i],
                         cross_attention=kind == "CrossAttnUpBlock2D",
                         resample="up" if i < last else None,
                         )(x, emb, encoder_hidden_states, tuple(reversed(skips[-n:])))
            skips = skips[:-n]

        x = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, "conv_norm_out")(x)).astype(self.dtype)
        return conv(c.out_channels, 3, self.dtype, "conv_out")(x).astype(jnp.float32)

    def _embedding(self, b, timesteps, class_labels, timestep_cond, added_cond):
        c = self.config
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(t, c.block_out_channels[0], flip_sin_to_cos=c.flip_sin_to_cos,
                                   downscale_freq_shift=c.freq_shift)
        if (timestep_cond is None) != (c.time_cond_proj_dim is None):
            raise ValueError("timestep_cond (the w-embedding) must be given exactly when the "
                             "config has time_cond_proj_dim.")
        emb = TimestepEmbedding(c.time_embed_dim, c.time_cond_proj_dim is not None, self.dtype,
                                name="time_embedding")(t_emb.astype(self.dtype), timestep_cond)
        if c.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels are required: the config has num_class_embeds.")
            emb = emb + nn.Embed(c.num_class_embeds, c.time_embed_dim, dtype=self.dtype,
                                 name="class_embedding")(class_labels)
        if c.addition_embed_type == "text_time":
            if not added_cond or "text_embeds" not in added_cond or "time_ids" not in added_cond:
                raise ValueError("SDXL ('text_time') needs added_cond={'text_embeds': pooled text "
                                 "embeddings [B, D], 'time_ids': [B, 6]}.")
            time_embeds = timestep_embedding(added_cond["time_ids"].reshape(-1),
                                             c.addition_time_embed_dim,
                                             flip_sin_to_cos=c.flip_sin_to_cos,
                                             downscale_freq_shift=c.freq_shift).reshape(b, -1)
            add = jnp.concatenate([added_cond["text_embeds"], time_embeds], axis=-1)
            emb = emb + TimestepEmbedding(c.time_embed_dim, dtype=self.dtype,
                                          name="add_embedding")(add.astype(self.dtype))
        return emb


def from_config(config_dict: dict, *, dtype=jnp.float32, remat: bool = False, attention: str = "auto"):
    return UNet2DConditionModel(UNetConfig.from_dict(config_dict), dtype=dtype, remat=remat,
                                attention=attention)


def abstract_params(module: UNet2DConditionModel, sample_size: int = 8, context_len: int = 4):
    """Parameter shapes via jax.eval_shape (no memory, no compute)."""
    import jax

    c = module.config
    args = example_inputs(c, 1, sample_size, context_len)
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args[:2], **args[2]))["params"]


def example_inputs(c: UNetConfig, b: int, size: int, context_len: int):
    """(x, t, keyword inputs): zeros shaped as what a UNet of config `c` is called with (text
    embeddings, class labels, the w-embedding, SDXL's pooled embedding and time ids)."""
    kw = {"encoder_hidden_states": jnp.zeros((b, context_len, c.cross_attention_dim))}
    if c.num_class_embeds is not None:
        kw["class_labels"] = jnp.zeros((b,), jnp.int32)
    if c.time_cond_proj_dim is not None:
        kw["timestep_cond"] = jnp.zeros((b, c.time_cond_proj_dim))
    if c.addition_embed_type == "text_time":
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        kw["added_cond"] = {"text_embeds": jnp.zeros((b, pooled)), "time_ids": jnp.zeros((b, 6))}
    return jnp.zeros((b, size, size, c.in_channels)), jnp.zeros((b,), jnp.int32), kw


def from_pretrained(folder: str, *, dtype=jnp.float32, remat: bool = False, attention: str = "auto",
                    variant=None):
    """(module, params) from a diffusers UNet folder (config.json + safetensors)."""
    config = convert.read_config(folder)
    module = from_config(config, dtype=dtype, remat=remat, attention=attention)
    params = convert.torch_to_flax(convert.load_state_dict(folder, variant), abstract_params(module))
    return module, params


def save_pretrained(folder: str, config_dict: dict, params) -> None:
    """A folder that diffusers' UNet2DConditionModel.from_pretrained loads."""
    config = dict(config_dict, _class_name="UNet2DConditionModel")
    convert.save_folder(folder, config, convert.flax_to_torch(params))
