"""Text -> image: load a diffusers Stable Diffusion folder, encode, sample, decode.

  pipe = StableDiffusion.from_pretrained("path/to/stable-diffusion-v1-5")
  images = pipe("a photo of a cat", sampler="lcm", num_inference_steps=4, guidance_scale=8.0)

Samplers: "ddim", "dpm_solver_pp" (DPM-Solver++(2M)), "lcm", "tcd" (gamma). DDIM / DPM / TCD use
classifier-free guidance (one batched call, the negative prompt as the unconditional branch) when
guidance_scale > 1; LCM embeds w = guidance_scale - 1 through the UNet's time_cond_proj instead
(diffusers' LatentConsistencyModelPipeline). The whole loop runs as one jitted program per
(sampler, steps, shape). Randomness: latents from fold_in(key(seed), 0), step noise from
fold_in(key(seed), 1) per the samplers' contract.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.diffusion import consistency, samplers
from lcm_jax.diffusion import schedule as sched
from lcm_jax.models import clip_text, convert, unet, vae

SAMPLERS = ("ddim", "dpm_solver_pp", "lcm", "tcd")


@dataclasses.dataclass
class StableDiffusion:
    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    schedule: sched.Schedule
    scheduler_config: dict
    sample_size: int  # the UNet's latent side; images default to sample_size * vae factor
    _programs: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_pretrained(cls, folder: str, *, dtype=jnp.float32) -> "StableDiffusion":
        index_path = os.path.join(folder, "model_index.json")
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"{folder} has no model_index.json; give a diffusers Stable "
                                    "Diffusion pipeline folder (unet/, vae/, text_encoder/, ...).")
        with open(index_path) as f:
            if "text_encoder_2" in json.load(f):
                raise NotImplementedError("SDXL pipelines are not wired into pipeline.py yet; load "
                                          "their components with models.unet / vae / clip_text.")
        sub = lambda name: os.path.join(folder, name)
        unet_module, unet_params = unet.from_pretrained(sub("unet"), dtype=dtype)
        vae_module, vae_params = vae.from_pretrained(sub("vae"), dtype=dtype)
        text_module, text_params = clip_text.from_pretrained(sub("text_encoder"), dtype=dtype)
        with open(os.path.join(sub("scheduler"), "scheduler_config.json")) as f:
            sc = json.load(f)
        schedule = sched.make_schedule(sc.get("beta_schedule", "scaled_linear"),
                                       sc.get("num_train_timesteps", 1000),
                                       sc.get("beta_start", 0.00085), sc.get("beta_end", 0.012),
                                       trained_betas=sc.get("trained_betas"))
        sample_size = int(convert.read_config(sub("unet")).get("sample_size", 64))
        return cls(unet_module, unet_params, vae_module, vae_params, text_module, text_params,
                   clip_text.load_tokenizer(sub("tokenizer")), schedule, sc, sample_size)

    # ------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: Sequence[str], clip_skip: int | None = None):
        ids = clip_text.tokenize(self.tokenizer, list(prompts), self.tokenizer.model_max_length)
        return self.text_encoder.apply({"params": self.text_params}, jnp.asarray(ids), clip_skip,
                                       method="encode_sd")

    def __call__(self, prompt: str | Sequence[str], *, negative_prompt: str | Sequence[str] | None = None,
                 sampler: str = "ddim", num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 seed: int = 0, num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, gamma: float = 0.3, latents=None,
                 clip_skip: int | None = None, output_type: str = "np"):
        """Images as float32 numpy [B, H, W, 3] in [0, 1] (output_type="np") or PIL images."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: choose one of {SAMPLERS}.")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        negatives = negative_prompt if negative_prompt is not None else ""
        negatives = [negatives] * len(prompts) if isinstance(negatives, str) else \
            [n for n in negatives for _ in range(num_images_per_prompt)]
        f = self.vae.config.factor
        size = (height or self.sample_size * f, width or self.sample_size * f)
        if size[0] % f or size[1] % f:
            raise ValueError(f"height and width must be multiples of the VAE factor {f}; got {size}.")
        rng = jax.random.PRNGKey(seed)
        if latents is None:
            latents = jax.random.normal(jax.random.fold_in(rng, 0),
                                        (len(prompts), size[0] // f, size[1] // f,
                                         self.unet.config.in_channels))
        cond = self.encode_prompt(prompts, clip_skip)
        uncond = None if sampler == "lcm" or guidance_scale <= 1 else self.encode_prompt(negatives, clip_skip)
        run = self._compiled(sampler, num_inference_steps, float(guidance_scale), float(gamma))
        out = run(self.unet_params, jnp.asarray(latents), cond, uncond, jax.random.fold_in(rng, 1))
        images = self.vae.decode_latents(self.vae_params, out)
        images = np.asarray(jnp.clip(images / 2 + 0.5, 0.0, 1.0), np.float32)
        if output_type == "pil":
            from PIL import Image

            return [Image.fromarray(np.round(im * 255).astype(np.uint8)) for im in images]
        return images

    def _compiled(self, sampler: str, steps: int, guidance: float, gamma: float):
        sc, schedule, module = self.scheduler_config, self.schedule, self.unet
        prediction = sc.get("prediction_type", "epsilon")

        def run(params, x, cond, uncond, rng):
            apply = lambda x, t, c: module.apply({"params": params}, x, t, c)
            if sampler == "lcm":
                w_dim = module.config.time_cond_proj_dim
                w = (consistency.guidance_scale_embedding(jnp.full((x.shape[0],), guidance - 1.0), w_dim)
                     if w_dim else None)
                model_fn = lambda x, t: module.apply({"params": params}, x, t, cond, timestep_cond=w)
                return samplers.lcm(model_fn, x, schedule, steps, prediction_type=prediction, rng=rng,
                                    original_inference_steps=sc.get("original_inference_steps", 50))
            model_fn = samplers.guided(apply, cond, uncond, guidance) if uncond is not None else \
                (lambda x, t: apply(x, t, cond))
            if sampler == "ddim":
                return samplers.ddim(model_fn, x, schedule, steps, prediction_type=prediction,
                                     timestep_spacing=sc.get("timestep_spacing", "leading"),
                                     steps_offset=sc.get("steps_offset", 1),
                                     set_alpha_to_one=sc.get("set_alpha_to_one", False))
            if sampler == "tcd":
                return samplers.tcd(model_fn, x, schedule, steps, gamma=gamma, rng=rng,
                                    prediction_type=prediction)
            return samplers.dpm_solver_multistep(model_fn, x, schedule, steps, prediction_type=prediction)

        return run
