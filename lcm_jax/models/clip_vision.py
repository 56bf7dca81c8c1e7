"""CLIP image encoder: Flax ports of transformers' `CLIPVisionModel` and
`CLIPVisionModelWithProjection` (image_embeds = visual_projection(pooler_output)).

The transformer layers are the text tower's (clip_text.py), without the causal mask. Parameter
paths mirror the checkpoints' keys (vision_model/embeddings/patch_embedding/kernel,
vision_model/pre_layrnorm/scale [sic], visual_projection/kernel), so the vision half of a
transformers `CLIPModel` state dict converts as it is. Images are NHWC (torch's pixel_values are
NCHW), already preprocessed: see eval/clip_score.py.

    module, params = from_pretrained("CLIP_VISION_FOLDER")
    out = module.apply({"params": params}, pixel_values)  # [B, image_size, image_size, 3]
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lcm_jax.models import clip_text, convert


@dataclasses.dataclass(frozen=True)
class VisionEncoderConfig:
    """The fields of a transformers `CLIPVisionConfig` that shape the network (their defaults)."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in clip_text.ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of "
                             f"{sorted(clip_text.ACTIVATIONS)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2  # transformers floors too

    @classmethod
    def from_dict(cls, config: dict) -> "VisionEncoderConfig":
        if config.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"config model_type={config['model_type']!r}; expected "
                             "'clip_vision_model' (a CLIP vision folder or a CLIPModel's "
                             "vision_config).")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})


class CLIPVisionEmbeddings(nn.Module):
    """[CLS] + one token per non-overlapping patch, plus learned absolute positions."""
    config: VisionEncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        c = self.config
        p = c.patch_size
        patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(pixel_values)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)  # row-major, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,))
        cls = jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, c.hidden_size))
        positions = nn.Embed(c.num_patches + 1, c.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(c.num_patches + 1))
        return jnp.concatenate([cls, patches], axis=1) + positions


class CLIPVisionTransformer(nn.Module):
    """transformers' `vision_model`: embeddings, pre_layrnorm, bidirectional encoder,
    post_layernorm of the CLS token (the pooler_output; last_hidden_state is not normed)."""
    config: VisionEncoderConfig
    dtype: Any = jnp.float32

    def setup(self):
        norm = lambda: nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype)
        self.embeddings = CLIPVisionEmbeddings(self.config, self.dtype)
        self.pre_layrnorm = norm()  # sic: the checkpoints' key
        self.encoder = clip_text.CLIPEncoder(self.config, self.dtype, causal=False)
        self.post_layernorm = norm()

    def __call__(self, pixel_values):
        c = self.config
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (c.image_size, c.image_size,
                                                                 c.num_channels):
            raise ValueError(f"pixel_values must be [batch, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}] (NHWC, image_size={c.image_size}), got shape "
                             f"{pixel_values.shape}; preprocess images with eval/clip_score.py.")
        hidden_states = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)), None)
        last = hidden_states[-1]
        return {"last_hidden_state": last, "hidden_states": hidden_states,
                "pooler_output": self.post_layernorm(last[:, 0])}


class CLIPVisionModel(nn.Module):
    """`__call__(pixel_values [B, S, S, C]) -> dict` with last_hidden_state, hidden_states
    (embeddings after pre_layrnorm + every layer), pooler_output and, with projection,
    image_embeds (unnormalised, as transformers' get_image_features)."""
    config: VisionEncoderConfig
    dtype: Any = jnp.float32
    with_projection: bool = False

    def setup(self):
        self.vision_model = CLIPVisionTransformer(self.config, self.dtype)
        if self.with_projection:
            self.visual_projection = nn.Dense(self.config.projection_dim, use_bias=False,
                                              dtype=self.dtype)

    def __call__(self, pixel_values):
        out = self.vision_model(pixel_values)
        if self.with_projection:
            out["image_embeds"] = self.visual_projection(out["pooler_output"])
        return out


class CLIPVisionModelWithProjection(CLIPVisionModel):
    with_projection: bool = True


def abstract_params(module: CLIPVisionModel) -> dict:
    """The params tree as ShapeDtypeStructs (no memory, no compute)."""
    c = module.config
    pixels = jnp.zeros((1, c.image_size, c.image_size, c.num_channels))
    return jax.eval_shape(module.init, jax.random.key(0), pixels)["params"]


def params_from_state_dict(module: CLIPVisionModel, state: dict, dtype=None) -> dict:
    """vision_model.* (+ visual_projection.weight) torch tensors -> our params; every key is
    checked (convert.torch_to_flax)."""
    ignore = (r"vision_model\.embeddings\.position_ids",) + (
        () if module.with_projection else (r"visual_projection\.weight",))
    params = convert.torch_to_flax(state, abstract_params(module), ignore=ignore, dtype=dtype)
    return jax.tree.map(jnp.asarray, params)


def from_pretrained(folder: str, *, with_projection: bool | None = None, dtype=jnp.float32,
                    variant: str | None = None) -> tuple[CLIPVisionModel, dict]:
    """A transformers CLIPVisionModel(WithProjection) folder -> (module, params).
    `with_projection=None` follows the checkpoint (a visual_projection.weight)."""
    config = VisionEncoderConfig.from_dict(convert.read_config(folder))
    # transformers >= 5 saves a bare CLIPVisionModel without the `vision_model.` prefix.
    state = {k if k.startswith("vision_model.") or k == "visual_projection.weight"
             else f"vision_model.{k}": v
             for k, v in convert.load_state_dict(folder, variant).items()}
    if with_projection is None:
        with_projection = "visual_projection.weight" in state
    module = CLIPVisionModel(config, dtype, with_projection)
    try:
        return module, params_from_state_dict(module, state, dtype)
    except convert.ConversionError as e:
        raise convert.ConversionError(f"{folder}: {e}") from None
