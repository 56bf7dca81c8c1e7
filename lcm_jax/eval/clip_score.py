"""CLIP score: 100 * max(cos(image_embeds, text_embeds), 0) per (image, prompt) pair, as the
text-to-image papers (and torchmetrics' clip_score, which then averages) report it.

Loads a transformers `CLIPModel` folder, all of it local (weights cannot be downloaded here):
config.json (text_config + vision_config), model.safetensors (or shards), the tokenizer
(vocab.json + merges.txt, or tokenizer.json) and preprocessor_config.json (or transformers 5's
processor_config.json). Make one with
    CLIPModel.from_pretrained(name).save_pretrained(folder)
    CLIPProcessor.from_pretrained(name).save_pretrained(folder)
for name = openai/clip-vit-large-patch14 or laion/CLIP-ViT-g-14-laion2B-s12B-b42K.

Images: float [N, H, W, 3] (or [N, H, W, 1] / [N, H, W] grey, repeated to RGB) in [0, 1], of
any size: our samples in [-1, 1] go in as (x + 1) / 2. Preprocessing is CLIPImageProcessor's,
step for step (resize the shortest side to size.shortest_edge, center crop crop_size, rescale,
normalize with image_mean / image_std), except the resize: jax.image.resize 'bicubic'
(antialiased, Keys a=-0.5, the kernel PIL uses) on floats, clamped to [0, 1], where the processor
resizes uint8 images with PIL's two passes, each rounded to uint8. Measured on uint8 inputs: a
mean difference of about 0.3/255 (PIL's rounding) and a max of about 1/255 on smooth images; on
pure noise, where bicubic overshoots and PIL clips between its passes, ~1% of values differ by
more than 1.5/255, a few by up to ~20/255 (tests/test_clip_score.py). Our resize is torch's
interpolate(mode="bicubic", antialias=True) on floats, which the torchvision-backed
CLIPImageProcessor of transformers 5 runs (then rounds) on GPUs; on AVX CPUs torch resizes uint8
images much as PIL does.

    scorer = CLIPScorer.from_pretrained("CLIP_FOLDER")
    scores = scorer.score(images, prompts)  # [N]; report scores.mean()
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models import clip_text, clip_vision, convert

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3
HOW_TO_SAVE = ("save one with CLIPModel.from_pretrained(name).save_pretrained(folder) and "
               "CLIPProcessor.from_pretrained(name).save_pretrained(folder), e.g. name = "
               "openai/clip-vit-large-patch14")


# ----------------------------------------------------------------------------------------------
# Preprocessing (CLIPImageProcessor's, in JAX)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """The fields of a preprocessor_config.json that CLIPImageProcessor acts on (its defaults).
    `size`: the shortest edge (int) or an exact (height, width); None skips the resize."""
    size: int | tuple[int, int] | None = 224
    crop_size: tuple[int, int] | None = (224, 224)
    rescale_factor: float | None = 1 / 255
    image_mean: tuple[float, ...] | None = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] | None = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, c: dict) -> "Preprocessing":
        if c.get("resample", PIL_BICUBIC) != PIL_BICUBIC:
            raise ValueError(f"preprocessor_config.json resample={c['resample']} is not supported;"
                             f" only {PIL_BICUBIC} (bicubic), which every CLIP checkpoint uses.")
        size = c.get("size", {"shortest_edge": 224})
        if isinstance(size, dict):
            if set(size) - {"shortest_edge", "height", "width"} or (
                    "shortest_edge" not in size and not {"height", "width"} <= set(size)):
                raise ValueError(f"preprocessor_config.json size={size} is not supported; use "
                                 "{'shortest_edge': S} or {'height': H, 'width': W}.")
            size = size.get("shortest_edge") or (size["height"], size["width"])
        crop = c.get("crop_size", 224)
        crop = (crop, crop) if isinstance(crop, int) else (crop["height"], crop["width"])
        on = lambda key, value: value if c.get(key, True) else None
        return cls(on("do_resize", size), on("do_center_crop", crop),
                   on("do_rescale", c.get("rescale_factor", 1 / 255)),
                   on("do_normalize", tuple(c.get("image_mean", OPENAI_CLIP_MEAN))),
                   on("do_normalize", tuple(c.get("image_std", OPENAI_CLIP_STD))))

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """transformers' get_resize_output_image_size (default_to_square=False)."""
        if self.size is None:
            return height, width
        if not isinstance(self.size, int):
            return tuple(self.size)
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.size * long / short)  # truncated, as transformers does
        return (new_long, self.size) if width <= height else (self.size, new_long)

    def __call__(self, images: jax.Array) -> jax.Array:
        """Float images [N, H, W, 3] in [0, 1] -> pixel_values [N, crop_h, crop_w, 3] (NHWC)."""
        n, h, w, c = images.shape
        rh, rw = self.resized_shape(h, w)
        x = images.astype(jnp.float32)
        if (rh, rw) != (h, w):  # PIL clamps to uint8's range; so do we, without rounding
            x = jnp.clip(jax.image.resize(x, (n, rh, rw, c), "bicubic", antialias=True), 0, 1)
        if self.crop_size is not None:
            ch, cw = self.crop_size
            if ch > rh or cw > rw:
                raise ValueError(f"crop_size={self.crop_size} is larger than the {rh}x{rw} image "
                                 f"after resizing (size={self.size}); CLIPImageProcessor would "
                                 "zero-pad, which we do not: use a size >= crop_size.")
            top, left = (rh - ch) // 2, (rw - cw) // 2
            x = x[:, top:top + ch, left:left + cw]
        # Our [0, 1] is the processor's uint8 * (1 / 255): its uint8 times rescale_factor.
        x = x * (255 * (self.rescale_factor or 1))
        if self.image_mean is not None:
            x = (x - jnp.asarray(self.image_mean)) / jnp.asarray(self.image_std)
        return x


def as_rgb(images) -> np.ndarray:
    """Checks images are float [N, H, W, 1 | 3] (or [N, H, W]) in [0, 1]; grey -> RGB."""
    images = np.asarray(images)
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be floats in [0, 1], got dtype {images.dtype}; divide "
                        "uint8 images by 255.")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 3] (or grey [N, H, W, 1] / [N, H, W]), got "
                         f"shape {images.shape}.")
    lo, hi = float(images.min(initial=0)), float(images.max(initial=0))
    if lo < -1e-3 or hi > 1 + 1e-3:
        raise ValueError(f"images must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}]; map "
                         "samples in [-1, 1] with (x + 1) / 2.")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


# ----------------------------------------------------------------------------------------------
# Scorer
# ----------------------------------------------------------------------------------------------

def _pad_to(x: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([x, np.repeat(x[-1:], n - len(x), axis=0)]) if len(x) < n else x


class CLIPScorer:
    """CLIP towers + tokenizer + preprocessing. Every call runs in batches of `batch_size`
    (the last one padded), so each tower compiles once per input image size."""

    def __init__(self, text_module: clip_text.CLIPTextModel, text_params: dict,
                 vision_module: clip_vision.CLIPVisionModel, vision_params: dict, tokenizer,
                 preprocessing: Preprocessing, batch_size: int = 32):
        if not (text_module.with_projection and vision_module.with_projection):
            raise ValueError("CLIPScorer needs both projections (text_projection, "
                             "visual_projection): the modules' with_projection must be True.")
        self.text_module, self.text_params = text_module, text_params
        self.vision_module, self.vision_params = vision_module, vision_params
        self.tokenizer, self.preprocessing, self.batch_size = tokenizer, preprocessing, batch_size
        self.max_length = text_module.config.max_position_embeddings  # 77 for every CLIP
        self._images = jax.jit(lambda p, x: vision_module.apply(
            {"params": p}, preprocessing(x))["image_embeds"])
        # No attention mask: pooling reads the first EOS and attention is causal, so padding
        # after it (whatever the tokenizer pads with) changes nothing.
        self._texts = jax.jit(lambda p, ids: text_module.apply({"params": p}, ids)["text_embeds"])

    @classmethod
    def from_pretrained(cls, folder: str, *, batch_size: int = 32, dtype=jnp.float32,
                        variant: str | None = None) -> "CLIPScorer":
        config = convert.read_config(folder)
        if config.get("model_type") != "clip" or "vision_config" not in config:
            raise ValueError(f"{folder}/config.json is not a transformers CLIPModel config "
                             f"(model_type={config.get('model_type')!r}, needs text_config and "
                             f"vision_config); {HOW_TO_SAVE}.")
        # CLIPModel's projections are config.projection_dim wide, whatever the sub-configs say;
        # old configs also carry *_config_dict entries, which transformers lets win.
        sub = lambda name: {**(config.get(f"{name}_config") or {}),
                            **(config.get(f"{name}_config_dict") or {}),
                            "projection_dim": config.get("projection_dim", 512)}
        text = clip_text.CLIPTextModel(clip_text.TextEncoderConfig.from_dict(sub("text")), dtype,
                                       with_projection=True)
        vision = clip_vision.CLIPVisionModel(
            clip_vision.VisionEncoderConfig.from_dict(sub("vision")), dtype, with_projection=True)
        state = convert.load_state_dict(folder, variant)
        is_text = lambda k: k.startswith(("text_model.", "text_projection."))
        is_vision = lambda k: k.startswith(("vision_model.", "visual_projection."))
        unexpected = sorted(k for k in state if not (is_text(k) or is_vision(k) or k == "logit_scale"))
        try:
            if unexpected:
                raise convert.ConversionError(f"unexpected keys {unexpected}")
            text_params = convert.torch_to_flax(
                {k: v for k, v in state.items() if is_text(k)}, clip_text.abstract_params(text),
                ignore=(r"text_model\.embeddings\.position_ids",), dtype=dtype)
            vision_params = clip_vision.params_from_state_dict(
                vision, {k: v for k, v in state.items() if is_vision(k)}, dtype)
        except convert.ConversionError as e:
            raise convert.ConversionError(f"{folder}: {e}") from None
        return cls(text, jax.tree.map(jnp.asarray, text_params), vision, vision_params,
                   _load_tokenizer(folder), _load_preprocessing(folder), batch_size)

    def preprocess(self, images) -> jax.Array:
        """Images (see the module docstring) -> the vision tower's pixel_values, NHWC."""
        return self.preprocessing(jnp.asarray(as_rgb(images)))

    def image_embeds(self, images) -> np.ndarray:
        """[N, projection_dim], unnormalised (transformers' get_image_features)."""
        return self._batched(self._images, self.vision_params, as_rgb(images))

    def text_embeds(self, prompts: Sequence[str]) -> np.ndarray:
        """[N, projection_dim], unnormalised; prompts over 77 tokens are truncated (EOS kept)."""
        ids = clip_text.tokenize(self.tokenizer, prompts, self.max_length)
        return self._batched(self._texts, self.text_params, ids)

    def score(self, images, prompts: Sequence[str]) -> np.ndarray:
        """[N] float32: 100 * max(cos, 0) of image i and prompt i."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = as_rgb(images)
        if len(images) != len(prompts):
            raise ValueError(f"score pairs image i with prompt i: got {len(images)} images and "
                             f"{len(prompts)} prompts.")
        unit = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
        cos = np.sum(unit(self.image_embeds(images)) * unit(self.text_embeds(prompts)), axis=-1)
        return 100 * np.maximum(cos, 0)

    def _batched(self, fn, params, x: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            raise ValueError("nothing to score: got 0 images / prompts.")
        b = self.batch_size
        out = [np.asarray(fn(params, _pad_to(x[i:i + b], b)))[:len(x[i:i + b])]
               for i in range(0, len(x), b)]
        return np.concatenate(out).astype(np.float32)


def _load_tokenizer(folder: str):
    has = lambda f: os.path.exists(os.path.join(folder, f))
    if not (has("tokenizer.json") or (has("vocab.json") and has("merges.txt"))):
        raise FileNotFoundError(f"{folder} has no CLIP tokenizer (vocab.json + merges.txt, or "
                                f"tokenizer.json); {HOW_TO_SAVE}.")
    return clip_text.load_tokenizer(folder)


def _load_preprocessing(folder: str) -> Preprocessing:
    # Hub folders and image processors save preprocessor_config.json; transformers 5's
    # CLIPProcessor.save_pretrained nests the same dict in processor_config.json.
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f)
            if key is None or key in config:
                return Preprocessing.from_dict(config if key is None else config[key])
    raise FileNotFoundError(f"{folder} has no preprocessor_config.json (nor a processor_config.json "
                            f"with an image_processor); {HOW_TO_SAVE}.")
