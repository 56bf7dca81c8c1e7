"""CLIP text encoder: Flax ports of transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`.

Covers the Stable Diffusion text towers: SD1 (CLIP ViT-L/14, quick_gelu), SD2 (OpenCLIP ViT-H,
gelu), SDXL encoder 1 (CLIP-L) and encoder 2 (OpenCLIP bigG, with projection). Parameter paths
mirror the checkpoints' keys (text_model/encoder/layers_3/self_attn/q_proj/kernel,
text_projection/kernel), see `convert.py`. Outputs and pooling follow transformers exactly;
`encode_sd` / `encode_sdxl` follow diffusers' `encode_prompt` of the SD and SDXL pipelines.

    module, params = from_pretrained("PIPELINE/text_encoder")
    ids = tokenize(load_tokenizer("PIPELINE/tokenizer"), ["a photo of a cat"])
    embeds = module.apply({"params": params}, ids, clip_skip=None, method="encode_sd")
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models import convert

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP (SD1, SDXL encoder 1)
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),     # OpenCLIP (SD2, SDXL enc. 2), erf
}
LEGACY_EOS_TOKEN_ID = 2  # configs saved before transformers PR #24773: pool at argmax(input_ids)


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """The fields of a transformers `CLIPTextConfig` that shape the network (their defaults)."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of "
                             f"{sorted(ACTIVATIONS)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}.")

    @classmethod
    def from_dict(cls, config: dict) -> "TextEncoderConfig":
        if config.get("model_type", "clip_text_model") != "clip_text_model":
            raise ValueError(f"config model_type={config['model_type']!r}; expected "
                             "'clip_text_model' (a text_encoder folder, not a full CLIP model).")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})

    def to_dict(self) -> dict:
        return {"model_type": "clip_text_model", **dataclasses.asdict(self)}


# ----------------------------------------------------------------------------------------------
# Modules (names mirror transformers' submodules)
# ----------------------------------------------------------------------------------------------

class CLIPAttention(nn.Module):
    config: TextEncoderConfig
    dtype: Any = jnp.float32
    causal: bool = True  # the text tower; the vision tower (clip_vision.py) attends both ways

    @nn.compact
    def __call__(self, x, mask):
        b, l, d = x.shape
        heads = self.config.num_attention_heads
        dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
        q, k, v = (dense(n)(x).reshape(b, l, heads, d // heads)
                   for n in ("q_proj", "k_proj", "v_proj"))
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)  # [B, L, H, D]
        return dense("out_proj")(out.reshape(b, l, d))


class CLIPMLP(nn.Module):
    config: TextEncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        h = ACTIVATIONS[self.config.hidden_act](h)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(h)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer."""
    config: TextEncoderConfig
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x, mask):
        norm = lambda name: nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype,
                                         name=name)
        attention = CLIPAttention(self.config, self.dtype, self.causal, name="self_attn")
        x = x + attention(norm("layer_norm1")(x), mask)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(norm("layer_norm2")(x))


class CLIPTextEmbeddings(nn.Module):
    config: TextEncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        c = self.config
        tokens = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype,
                          name="token_embedding")(input_ids)
        positions = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype,
                             name="position_embedding")(jnp.arange(input_ids.shape[-1]))
        return tokens + positions


class CLIPEncoder(nn.Module):
    config: TextEncoderConfig
    dtype: Any = jnp.float32
    causal: bool = True

    def setup(self):
        self.layers = [CLIPEncoderLayer(self.config, self.dtype, self.causal)
                       for _ in range(self.config.num_hidden_layers)]

    def __call__(self, x, mask):
        hidden_states = [x]
        for layer in self.layers:
            x = layer(x, mask)
            hidden_states.append(x)
        return tuple(hidden_states)


class CLIPTextTransformer(nn.Module):
    """transformers' `text_model`: embeddings, causal encoder, final_layer_norm, EOS pooling."""
    config: TextEncoderConfig
    dtype: Any = jnp.float32

    def setup(self):
        self.embeddings = CLIPTextEmbeddings(self.config, self.dtype)
        self.encoder = CLIPEncoder(self.config, self.dtype)
        self.final_layer_norm = nn.LayerNorm(epsilon=self.config.layer_norm_eps, dtype=self.dtype)

    def __call__(self, input_ids, attention_mask=None):
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"input_ids must be [batch, length <= max_position_embeddings="
                             f"{c.max_position_embeddings}], got shape {input_ids.shape}.")
        # Padding keys are masked on top of the causal mask (transformers' create_causal_mask).
        mask = None if attention_mask is None else attention_mask[:, None, None, :].astype(bool)
        hidden_states = self.encoder(self.embeddings(input_ids), mask)
        last = self.final_layer_norm(hidden_states[-1])
        if c.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos = jnp.argmax(input_ids, axis=-1)  # EOS (49407) is the largest id in CLIP's vocab
        else:
            eos = jnp.argmax(input_ids == c.eos_token_id, axis=-1)  # first EOS: pad may equal EOS
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return {"last_hidden_state": last, "hidden_states": hidden_states,
                "pooler_output": pooled}


class CLIPTextModel(nn.Module):
    """`__call__(input_ids [B, L] int, attention_mask [B, L] | None) -> dict` with
    last_hidden_state (after final_layer_norm), hidden_states (embeddings + every layer, before
    the final norm), pooler_output (at the EOS token) and, with projection, text_embeds."""
    config: TextEncoderConfig
    dtype: Any = jnp.float32
    with_projection: bool = False

    def setup(self):
        self.text_model = CLIPTextTransformer(self.config, self.dtype)
        if self.with_projection:
            self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False,
                                            dtype=self.dtype)

    def __call__(self, input_ids, attention_mask=None):
        out = self.text_model(input_ids, attention_mask)
        if self.with_projection:
            out["text_embeds"] = self.text_projection(out["pooler_output"])
        return out

    def encode_sd(self, input_ids, clip_skip: int | None = None):
        """diffusers' StableDiffusionPipeline.encode_prompt: the last hidden state, or with
        clip_skip=k the output k layers earlier, passed through final_layer_norm as well."""
        out = self(input_ids)
        if clip_skip is None:
            return out["last_hidden_state"]
        return self.text_model.final_layer_norm(out["hidden_states"][-(clip_skip + 1)])

    def encode_sdxl(self, input_ids, clip_skip: int | None = None):
        """diffusers' StableDiffusionXLPipeline.encode_prompt, one encoder: (the penultimate
        hidden state, or (clip_skip + 1) before the last, WITHOUT final_layer_norm; text_embeds,
        or None without projection). SDXL always pools from encoder 2."""
        out = self(input_ids)
        return out["hidden_states"][-((clip_skip or 0) + 2)], out.get("text_embeds")


class CLIPTextModelWithProjection(CLIPTextModel):
    with_projection: bool = True


def sdxl_prompt_embeds(encoder_1, params_1, input_ids_1, encoder_2, params_2, input_ids_2,
                       clip_skip: int | None = None):
    """SDXL prompt embeddings: ([B, L, 768 + 1280] both encoders' hidden states, concatenated;
    [B, 1280] pooled text_embeds of encoder 2)."""
    h1, _ = encoder_1.apply({"params": params_1}, input_ids_1, clip_skip, method="encode_sdxl")
    h2, pooled = encoder_2.apply({"params": params_2}, input_ids_2, clip_skip,
                                 method="encode_sdxl")
    return jnp.concatenate([h1, h2], axis=-1), pooled


# ----------------------------------------------------------------------------------------------
# Loading and saving (transformers folders: config.json + model.safetensors)
# ----------------------------------------------------------------------------------------------

def abstract_params(module: CLIPTextModel) -> dict:
    """The params tree as ShapeDtypeStructs (no memory, no compute)."""
    ids = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(module.init, jax.random.key(0), ids)["params"]


def _with_prefix(state_dict: dict) -> dict:
    # transformers >= 5 saves a bare CLIPTextModel without the `text_model.` prefix that the Hub
    # checkpoints (and CLIPTextModelWithProjection) carry; read both the same way.
    return {k if k.startswith("text_model.") or k == "text_projection.weight"
            else f"text_model.{k}": v for k, v in state_dict.items()}


def from_pretrained(folder: str, *, with_projection: bool | None = None, dtype=jnp.float32,
                    variant: str | None = None) -> tuple[CLIPTextModel, dict]:
    """A transformers text-encoder folder -> (module, params). `with_projection=None` follows
    the checkpoint (a text_projection.weight means CLIPTextModelWithProjection); False drops it."""
    config = TextEncoderConfig.from_dict(convert.read_config(folder))
    state = _with_prefix(convert.load_state_dict(folder, variant))
    if with_projection is None:
        with_projection = "text_projection.weight" in state
    module = CLIPTextModel(config, dtype, with_projection)
    ignore = (r"text_model\.embeddings\.position_ids",) + (
        () if with_projection else (r"text_projection\.weight",))
    try:
        params = convert.torch_to_flax(state, abstract_params(module), ignore=ignore, dtype=dtype)
    except convert.ConversionError as e:
        raise convert.ConversionError(f"{folder}: {e}") from None
    return module, jax.tree.map(jnp.asarray, params)


def save_pretrained(folder: str, module: CLIPTextModel, params: dict,
                    config: dict | None = None) -> None:
    """Write a folder that transformers' CLIPTextModel(WithProjection).from_pretrained loads.
    `config`: the original config.json dict, whose extra fields (bos/pad ids, ...) are kept; the
    module's own fields win."""
    architecture = ("CLIPTextModelWithProjection" if module.with_projection else "CLIPTextModel")
    dtypes = {np.dtype(x.dtype) for x in jax.tree.leaves(params)}
    config = {**(config or {}), **module.config.to_dict(), "architectures": [architecture]}
    if len(dtypes) == 1:  # transformers 5 reads "dtype", 4.x "torch_dtype"
        config["dtype"] = config["torch_dtype"] = str(dtypes.pop())
    convert.save_folder(folder, config, convert.flax_to_torch(params), "model.safetensors")


# ----------------------------------------------------------------------------------------------
# Tokenizer (transformers' CLIPTokenizer; the tokenizer folder needs vocab.json + merges.txt)
# ----------------------------------------------------------------------------------------------

def load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    missing = [f for f in ("vocab.json", "merges.txt")
               if not os.path.exists(os.path.join(folder, f))]
    if missing and not os.path.exists(os.path.join(folder, "tokenizer.json")):  # transformers 5 saves only this
        raise FileNotFoundError(f"{folder} is not a CLIP tokenizer folder (missing "
                                f"{', '.join(missing)}); give e.g. PIPELINE/tokenizer.")
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int = 77) -> np.ndarray:
    """Prompts -> int32 [B, max_length], padded and truncated like the SD pipelines."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")["input_ids"]
    return ids.astype(np.int32)
