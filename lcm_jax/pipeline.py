"""Text -> image: load a diffusers Stable Diffusion or SDXL folder, encode, sample, decode.

  pipe = StableDiffusion.from_pretrained("path/to/stable-diffusion-v1-5")  # or an SDXL folder
  images = pipe("a photo of a cat", sampler="lcm", num_inference_steps=4, guidance_scale=8.0)

Samplers: "ddim", "dpm_solver_pp" (DPM-Solver++(2M)), "lcm", "tcd" (gamma). Each reads the
folder's scheduler_config.json as diffusers' `Scheduler.from_config(folder)` would: fields the
folder does not set take that scheduler's defaults, and settings we do not implement are refused.

Guidance follows diffusers' StableDiffusion(XL)Pipeline: a UNet with `time_cond_proj_dim` (a
distilled LCM / TCD student) embeds w = guidance_scale - 1 and runs no CFG, whatever the sampler;
any other UNet runs classifier-free guidance when guidance_scale > 1 (one batched 2B call, the
negative prompt as the unconditional branch), the LCM sampler included (the LCM-LoRA route).

SDXL: both encoders' penultimate hidden states, encoder 2's pooled projection, add_time_ids =
(original size, crop top-left, target size), and zeros as the unconditional branch when no negative
prompt is given and the folder's force_zeros_for_empty_prompt is set (its default).

The loop is one jitted program per (sampler, steps, CFG on/off, gamma); the guidance scale is a
traced input. Randomness: latents from fold_in(key(seed), 0), step noise from fold_in(key(seed), 1)
per the samplers' contract.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.diffusion import consistency, samplers
from lcm_jax.diffusion import schedule as sched
from lcm_jax import models
from lcm_jax.models import clip_text, convert, lora, unet, vae

SAMPLERS = ("ddim", "dpm_solver_pp", "lcm", "tcd")

# What each sampler reads from scheduler_config.json, with the defaults of the diffusers scheduler
# it mirrors (DDIMScheduler, DPMSolverMultistepScheduler, LCMScheduler, TCDScheduler).
SCHEDULER_FIELDS = {
    "ddim": {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True},
    "dpm_solver_pp": {"timestep_spacing": "linspace", "steps_offset": 0,
                      "final_sigmas_type": "zero", "lower_order_final": True},
    "lcm": {"original_inference_steps": 50},
    "tcd": {"original_inference_steps": 50},
}
# Settings we do not implement: field -> (that scheduler's default, the one value we support).
_NO_THRESHOLDING = {"thresholding": (False, False)}
UNSUPPORTED = {
    "ddim": {"clip_sample": (True, False), **_NO_THRESHOLDING},
    "dpm_solver_pp": {"algorithm_type": ("dpmsolver++", "dpmsolver++"), "solver_order": (2, 2),
                      "solver_type": ("midpoint", "midpoint"), "use_karras_sigmas": (False, False),
                      "use_exponential_sigmas": (False, False), "use_beta_sigmas": (False, False),
                      "use_lu_lambdas": (False, False), "euler_at_final": (False, False),
                      **_NO_THRESHOLDING},
    "lcm": {"clip_sample": (False, False), **_NO_THRESHOLDING},
    "tcd": {"clip_sample": (False, False), **_NO_THRESHOLDING},
}


def scheduler_options(scheduler_config: dict, sampler: str, sd_pipeline: bool = True) -> dict:
    """The sampler's keyword options from a folder's scheduler config, as diffusers reads it.
    `sd_pipeline`: StableDiffusionPipeline (SD 1.x / 2.x, not SDXL) rewrites every scheduler's
    steps_offset to 1 and clip_sample to False when it is built (a deprecation shim kept in
    diffusers 0.42); we do the same so that a folder samples as it does there."""
    if sd_pipeline:
        scheduler_config = dict(scheduler_config, steps_offset=1, clip_sample=False)
    problems = [f"{k}={scheduler_config.get(k, default)!r}" + ("" if k in scheduler_config else
                " (the diffusers default when unset)") + f": lcm_jax's {sampler!r} supports {ok!r}"
                for k, (default, ok) in UNSUPPORTED[sampler].items()
                if scheduler_config.get(k, default) != ok]
    if problems:
        raise ValueError("scheduler_config.json: " + "; ".join(problems) + ". Set the field in "
                         "the folder's scheduler/scheduler_config.json or pick another sampler.")
    return {k: scheduler_config.get(k, default) for k, default in SCHEDULER_FIELDS[sampler].items()}


def schedule_from_scheduler_config(sc: dict) -> sched.Schedule:
    if sc.get("rescale_betas_zero_snr"):
        raise ValueError("scheduler_config.json: rescale_betas_zero_snr=True is not supported.")
    return sched.make_schedule(sc.get("beta_schedule", "scaled_linear"),
                               sc.get("num_train_timesteps", 1000), sc.get("beta_start", 0.00085),
                               sc.get("beta_end", 0.012), trained_betas=sc.get("trained_betas"))


@dataclasses.dataclass(eq=False)
class StableDiffusion:
    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoders: tuple  # one (SD 1.x / 2.x) or two (SDXL)
    text_params: tuple
    tokenizers: tuple
    schedule: sched.Schedule
    scheduler_config: dict
    sample_size: int  # the UNet's latent side; images default to sample_size * vae factor
    force_zeros_for_empty_prompt: bool = False  # SDXL: zeros, not "", as the default negative
    _programs: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, folder: str, *, dtype=jnp.float32, param_dtype=None) -> "StableDiffusion":
        """`dtype`: the compute dtype; `param_dtype`: the weights' storage (jnp.bfloat16 halves
        the memory, e.g. SD 1.5 plus an LCM on a 16 GB T4; None keeps float32)."""
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.exists(index_path):
            raise convert.MissingFile(f"{folder} has no model_index.json; give a diffusers Stable "
                                    "Diffusion pipeline folder (unet/, vae/, text_encoder/, ...).")
        with open(index_path) as f:
            index = json.load(f)
        sub = lambda name: os.path.join(folder, name)
        names = ["text_encoder"] + (["text_encoder_2"] if index.get("text_encoder_2") else [])
        if not index.get("text_encoder") or not os.path.isdir(sub("text_encoder")):
            raise convert.ConversionError(f"{folder} has no text_encoder (an SDXL refiner?): only text-to-image "
                             "pipelines with their text encoder(s) are supported.")
        encoders = [clip_text.from_pretrained(sub(n), dtype=dtype) for n in names]
        tokenizers = [clip_text.load_tokenizer(sub(n.replace("text_encoder", "tokenizer")))
                      for n in names]
        unet_module, unet_params = unet.from_pretrained(sub("unet"), dtype=dtype)
        vae_module, vae_params = vae.from_pretrained(sub("vae"), dtype=dtype)
        with open(os.path.join(sub("scheduler"), "scheduler_config.json")) as f:
            sc = json.load(f)
        sample_size = int(convert.read_config(sub("unet")).get("sample_size", 64))
        stored = (lambda tree: tree) if param_dtype is None else (lambda tree: models.as_dtype(tree, param_dtype))
        return cls(unet_module, stored(unet_params), vae_module, stored(vae_params),
                   tuple(e[0] for e in encoders), tuple(stored(e[1]) for e in encoders), tuple(tokenizers), schedule_from_scheduler_config(sc),
                   sc, sample_size, len(names) == 2 and index.get("force_zeros_for_empty_prompt", True))

    def load_lora_weights(self, path: str, scale: float = 1.0, fuse: bool = True) -> "StableDiffusion":
        """diffusers' `pipe.load_lora_weights(path); pipe.fuse_lora(lora_scale=scale)`: a UNet LoRA
        in peft layout (what `lora.save` and lcm_jax's exports write) merged into a copy of the
        UNet params; `fuse=False` keeps it unmerged (`lora.Unmerged`: the factors applied next to
        each layer, no second UNet in memory: several LoRAs on one base fit a small GPU). The
        returned pipeline shares everything else, compiled programs included."""
        factors, alpha = lora.load(path)
        if not fuse:
            return dataclasses.replace(self, unet_params=lora.Unmerged(self.unet_params, factors,
                                                                      alpha, scale))
        return dataclasses.replace(self, unet_params=lora.merge(self.unet_params, factors, alpha, scale))

    @property
    def is_sdxl(self) -> bool:
        return len(self.text_encoders) == 2

    # ------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str], clip_skip: int | None = None):
        """SD: the text embeddings [B, L, D] (diffusers' StableDiffusionPipeline.encode_prompt).
        SDXL: (both encoders' hidden states concatenated [B, L, D1 + D2], pooled [B, D2])."""
        ids = [jnp.asarray(clip_text.tokenize(t, list(prompts), t.model_max_length))
               for t in self.tokenizers]
        return self._text_program(clip_skip)(self.text_params, ids)

    def _text_program(self, clip_skip):
        key = ("text", clip_skip)
        if key not in self._programs:
            encoders = self.text_encoders

            def encode(params, ids):
                if len(encoders) == 1:
                    return encoders[0].apply({"params": params[0]}, ids[0], clip_skip, method="encode_sd")
                return clip_text.sdxl_prompt_embeds(encoders[0], params[0], ids[0], encoders[1],
                                                    params[1], ids[1], clip_skip)

            self._programs[key] = jax.jit(encode)
        return self._programs[key]

    def _conditions(self, prompts, negatives, cfg: bool, size, clip_skip):
        """The UNet's keyword inputs for the prompts, and for the negatives (None without CFG)."""
        if not self.is_sdxl:
            cond = {"encoder_hidden_states": self.encode_prompt(prompts, clip_skip)}
            return cond, {"encoder_hidden_states": self.encode_prompt(negatives, clip_skip)} if cfg else None
        time_ids = jnp.broadcast_to(jnp.asarray([*size, 0, 0, *size], jnp.float32), (len(prompts), 6))
        embeds, pooled = self.encode_prompt(prompts, clip_skip)
        cond = {"encoder_hidden_states": embeds, "added_cond": {"text_embeds": pooled, "time_ids": time_ids}}
        if not cfg:
            return cond, None
        if negatives is None and self.force_zeros_for_empty_prompt:
            neg, neg_pooled = jnp.zeros_like(embeds), jnp.zeros_like(pooled)
        else:
            neg, neg_pooled = self.encode_prompt(negatives or [""] * len(prompts), clip_skip)
        return cond, {"encoder_hidden_states": neg, "added_cond": {"text_embeds": neg_pooled, "time_ids": time_ids}}

    def __call__(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 sampler: str = "ddim", num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 seed: int = 0, num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, gamma: float = 0.3, latents=None,
                 clip_skip: int | None = None, output_type: str = "np"):
        """Images as float32 numpy [B, H, W, 3] in [0, 1] (output_type="np") or PIL images."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: choose one of {SAMPLERS}.")
        options = scheduler_options(self.scheduler_config, sampler, sd_pipeline=not self.is_sdxl)
        repeat = lambda texts: [t for t in texts for _ in range(num_images_per_prompt)]
        prompts = repeat([prompt] if isinstance(prompt, str) else list(prompt))
        negatives = None if negative_prompt is None else repeat(
            [negative_prompt] * (len(prompts) // num_images_per_prompt)
            if isinstance(negative_prompt, str) else list(negative_prompt))
        if not self.is_sdxl and negatives is None:
            negatives = [""] * len(prompts)
        f = self.vae.config.factor
        size = (height or self.sample_size * f, width or self.sample_size * f)
        if size[0] % f or size[1] % f:
            raise ValueError(f"height and width must be multiples of the VAE factor {f}; got {size}.")
        rng = jax.random.PRNGKey(seed)
        if latents is None:
            latents = jax.random.normal(jax.random.fold_in(rng, 0),
                                        (len(prompts), size[0] // f, size[1] // f,
                                         self.unet.config.in_channels))
        w_embedded = self.unet.config.time_cond_proj_dim is not None
        cfg = guidance_scale > 1 and not w_embedded
        cond, uncond = self._conditions(prompts, negatives, cfg, size, clip_skip)
        run = self._sampling_program(sampler, num_inference_steps, cfg, float(gamma), options)
        out = run(self.unet_params, jnp.asarray(latents), cond, uncond, jax.random.fold_in(rng, 1),
                  jnp.float32(guidance_scale))
        images = self.vae.decode_latents(self.vae_params, out)
        images = np.asarray(jnp.clip(images / 2 + 0.5, 0.0, 1.0), np.float32)
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in images]
        return images

    def _sampling_program(self, sampler: str, steps: int, cfg: bool, gamma: float, options: dict):
        key = (sampler, steps, cfg, gamma if sampler == "tcd" else None, tuple(sorted(options.items())))
        if key not in self._programs:
            self._programs[key] = jax.jit(functools.partial(
                _sample, self.unet, self.schedule, self.scheduler_config.get("prediction_type", "epsilon"),
                sampler, steps, cfg, gamma, options))
        return self._programs[key]


def _sample(module, schedule, prediction, sampler, steps, cfg, gamma, options,
            params, x, cond, uncond, rng, guidance):
    w_dim = module.config.time_cond_proj_dim
    w = (consistency.guidance_scale_embedding(jnp.full((x.shape[0],), guidance - 1.0), w_dim)
         if w_dim else None)

    def apply(x, t, c):  # never the 2B batch when w is embedded (cfg is off then)
        if isinstance(params, lora.Unmerged):  # the factors next to each layer, one base copy
            with lora.applied(params.lora, params.alpha, params.scale):
                return module.apply({"params": params.base}, x, t, **c, timestep_cond=w)
        return module.apply({"params": params}, x, t, **c, timestep_cond=w)

    model_fn = samplers.guided(apply, cond, uncond, guidance) if cfg else (lambda x, t: apply(x, t, cond))
    common = dict(prediction_type=prediction, **options)
    if sampler == "lcm":
        return samplers.lcm(model_fn, x, schedule, steps, rng=rng, **common)
    if sampler == "tcd":
        return samplers.tcd(model_fn, x, schedule, steps, gamma=gamma, rng=rng, **common)
    if sampler == "ddim":
        return samplers.ddim(model_fn, x, schedule, steps, **common)
    return samplers.dpm_solver_multistep(model_fn, x, schedule, steps, **common)
