"""Conditions c and the unconditional branch for teacher-student objectives (LCD, TCD, LCF).

A conditioning turns a batch into `(cond, uncond)`, two pytrees of [B, ...] arrays that
`models.Denoiser.apply` takes, inside the compiled step (the text encoders are frozen inputs).
  ClassConditioning   class labels; the unconditional branch is the null class.
  TextConditioning    Stable Diffusion 1.x / 2.x: CLIP on tokenized captions (or cached
                      `prompt_embeds`); the unconditional branch is the encoded empty prompt.
  SDXLConditioning    both SDXL encoders + pooled embeds + time ids; the unconditional branch is
                      zero embeddings (SDXL's force_zeros_for_empty_prompt, as the LCD-SDXL scripts).
Each has `frozen` (its encoder params), `prepare_batch` (host side: captions -> token ids) and
`sample_conditions(frozen, n)` -> (cond, uncond, labels) for sample grids.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models import clip_text


class ClassConditioning:
    """Class labels; `class_names` (one caption per class) also reads batches that carry only
    captions, e.g. an image folder whose captions name the classes."""

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None):
        self.null_class = num_classes
        self.class_names = None if class_names is None else list(class_names)
        self.frozen = {}

    def prepare_batch(self, batch: dict) -> dict:
        if "label" in batch or "caption" not in batch:
            return batch
        if self.class_names is None:
            raise ValueError("The batch has captions but no labels, and this class-conditional "
                             "model has no class_names to read them with.")
        index = {name: i for i, name in enumerate(self.class_names)}
        unknown = sorted({str(c) for c in batch["caption"]} - set(index))
        if unknown:
            raise ValueError(f"Captions {unknown[:3]} name no class; each caption must be one of "
                             f"the class names, e.g. {self.class_names[0]!r}.")
        labels = np.asarray([index[str(c)] for c in batch["caption"]], np.int32)
        return {k: v for k, v in batch.items() if k != "caption"} | {"label": labels}

    def encode(self, batch: dict, frozen):
        labels = batch["label"]
        return labels, jnp.full_like(labels, self.null_class)

    def sample_conditions(self, frozen, num: int):
        labels = jnp.arange(num, dtype=jnp.int32) % self.null_class
        return labels, jnp.full_like(labels, self.null_class), labels


def _cycle(prompts: Sequence[str], num: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(num)]


class TextConditioning:
    """SD 1.x / 2.x prompts through one CLIP text encoder (`encode_sd`, optional clip_skip)."""

    def __init__(self, encoder, params, tokenizer, sample_prompts: Sequence[str] = ("",),
                 clip_skip: int | None = None):
        self.encoder, self.tokenizer, self.clip_skip = encoder, tokenizer, clip_skip
        self.max_length = tokenizer.model_max_length
        self.frozen = {"text_encoder": params}
        self.empty_ids = self.tokenize([""])  # [1, L]: the unconditional prompt
        self.sample_prompts = list(sample_prompts)

    def tokenize(self, prompts) -> np.ndarray:
        return clip_text.tokenize(self.tokenizer, list(prompts), self.max_length)

    def prepare_batch(self, batch: dict) -> dict:
        if "caption" not in batch or "prompt_embeds" in batch:
            return batch
        out = {k: v for k, v in batch.items() if k != "caption"}
        out["input_ids"] = self.tokenize(batch["caption"])
        return out

    def _embed(self, frozen, ids):
        return self.encoder.apply({"params": frozen["text_encoder"]}, ids, self.clip_skip,
                                  method="encode_sd")

    def _conditions(self, frozen, ids=None, embeds=None):
        h = embeds if embeds is not None else self._embed(frozen, ids)
        empty = jnp.broadcast_to(self._embed(frozen, jnp.asarray(self.empty_ids)), h.shape)
        return {"encoder_hidden_states": h}, {"encoder_hidden_states": empty}

    def encode(self, batch: dict, frozen):
        return self._conditions(frozen, batch.get("input_ids"), batch.get("prompt_embeds"))

    def sample_conditions(self, frozen, num: int):
        ids = jnp.asarray(self.tokenize(_cycle(self.sample_prompts, num)))
        cond, uncond = self._conditions(frozen, ids)
        return cond, uncond, jnp.arange(num) % len(self.sample_prompts)


class SDXLConditioning:
    """SDXL: hidden states of both encoders (concatenated), encoder 2's pooled projection and the
    micro-conditioning time ids (original size, crop top-left, target size)."""

    def __init__(self, encoders, params, tokenizers, image_size: int,
                 sample_prompts: Sequence[str] = ("",), clip_skip: int | None = None):
        self.encoders, self.tokenizers, self.clip_skip = encoders, tokenizers, clip_skip
        self.frozen = {"text_encoder": params[0], "text_encoder_2": params[1]}
        self.default_time_ids = np.asarray([image_size, image_size, 0, 0, image_size, image_size],
                                           np.float32)
        self.sample_prompts = list(sample_prompts)

    def tokenize(self, prompts):
        return [clip_text.tokenize(t, list(prompts), t.model_max_length) for t in self.tokenizers]

    def prepare_batch(self, batch: dict) -> dict:
        out = {k: v for k, v in batch.items() if k != "caption"}
        if "caption" in batch and "prompt_embeds" not in batch:
            out["input_ids"], out["input_ids_2"] = self.tokenize(batch["caption"])
        if "time_ids" not in out:
            n = len(next(iter(batch.values())))
            out["time_ids"] = np.broadcast_to(self.default_time_ids, (n, 6)).copy()
        return out

    def _conditions(self, frozen, ids, ids_2, time_ids, embeds=None, pooled=None):
        if embeds is None:
            embeds, pooled = clip_text.sdxl_prompt_embeds(
                self.encoders[0], frozen["text_encoder"], ids, self.encoders[1],
                frozen["text_encoder_2"], ids_2, self.clip_skip)
        cond = {"encoder_hidden_states": embeds,
                "added_cond": {"text_embeds": pooled, "time_ids": time_ids}}
        uncond = {"encoder_hidden_states": jnp.zeros_like(embeds),
                  "added_cond": {"text_embeds": jnp.zeros_like(pooled), "time_ids": time_ids}}
        return cond, uncond

    def encode(self, batch: dict, frozen):
        return self._conditions(frozen, batch.get("input_ids"), batch.get("input_ids_2"),
                                batch["time_ids"], batch.get("prompt_embeds"),
                                batch.get("pooled_prompt_embeds"))

    def sample_conditions(self, frozen, num: int):
        ids, ids_2 = (jnp.asarray(i) for i in self.tokenize(_cycle(self.sample_prompts, num)))
        time_ids = jnp.broadcast_to(jnp.asarray(self.default_time_ids), (num, 6))
        cond, uncond = self._conditions(frozen, ids, ids_2, time_ids)
        return cond, uncond, jnp.arange(num) % len(self.sample_prompts)


def concat(cond, uncond):
    """cond and uncond stacked into one 2B batch (the one batched teacher call)."""
    return jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
