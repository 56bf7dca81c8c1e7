"""The parts objectives are composed of, instead of inherited from.

  Base         the frozen network an objective starts from (a teacher to distil, an LCM to
               fine-tune, a model to smooth) with its schedule, conditioning and latent space;
               every objective that has one passes its params to the step as `frozen["base"]`.
  LatentSpace  where the diffusion runs: a frozen VAE's latents (encode / decode, posterior draw
               or mean) or the pixels themselves.
  Network      a denoiser and how the trained params apply to it: as a whole, or as LoRA
               adapters on `frozen["base"]` (`params(trained, frozen)` gives what to call it with).

Frozen params (base, VAE, text encoders) are always arguments of the compiled step, never
constants closed over: `frozen` is the dict `train.Program` shards and passes in.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from lcm_jax.diffusion import schedule as sched
from lcm_jax.models import Denoiser, lora


@dataclasses.dataclass
class Base:
    """A frozen network and everything its objective needs around it (lcm_jax.teachers builds
    them from a diffusers folder or the digits chain). `student_net` is `net` with the
    guidance-scale embedding input (`time_cond_proj`) that a full-parameter consistency student
    adds; None where `net` has it already or no such student is trained."""
    net: Denoiser
    params: Any
    schedule: sched.Schedule
    prediction_type: str
    conditioning: Any  # objectives.conditioning.*
    latent_shape: tuple  # (h, w, c) of the network's input
    vae: Any = None  # AutoencoderKL module, or None: the network runs on pixels / cached latents
    vae_params: Any = None
    student_net: Denoiser | None = None

    def latent_space(self, sample_posterior: bool = True) -> "LatentSpace":
        return LatentSpace(tuple(self.latent_shape), self.vae, sample_posterior)

    def frozen(self) -> dict:
        """What the step reads and never trains: the base, its conditioning's encoders, the VAE."""
        vae = {} if self.vae is None else {"vae": self.vae_params}
        return {"base": self.params, **self.conditioning.frozen, **vae}


@dataclasses.dataclass(frozen=True)
class LatentSpace:
    """The space the diffusion runs in: `shape` (h, w, c); `vae` None means pixels (or latents
    the batches carry). `sample_posterior`: encode to a posterior draw (the SD scripts'
    latent_dist.sample()) or to the posterior mean; use what the network was trained on."""
    shape: tuple
    vae: Any = None
    sample_posterior: bool = True

    def encode(self, batch: dict, frozen, posterior_noise=None):
        """The batch's cached `latents`, else its images (pixels) or their VAE latents."""
        if "latents" in batch:
            return batch["latents"]
        if self.vae is None:
            return batch["image"]
        noise = posterior_noise if self.sample_posterior else None
        return self.vae.encode_to_latents(frozen["vae"], batch["image"], noise=noise)

    def decode(self, frozen, latents):
        """Images in [-1, 1]."""
        images = latents if self.vae is None else self.vae.decode_latents(frozen["vae"], latents)
        return jnp.clip(images, -1.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Network:
    """`denoiser` trained as a whole (`lora` None: the trained params are its params) or as LoRA
    adapters on the frozen `frozen["base"]` (`lora`: the config's rank / alpha / targets)."""
    denoiser: Denoiser
    lora: Any = None

    def params(self, trained, frozen):
        """What to call the denoiser with (LoRA: the base with the adapters, lora.adapted)."""
        return lora.adapted(frozen["base"], trained, self.lora) if self.lora else trained

    def init(self, rng, frozen, default_targets, full):
        """The trained params at step 0: fresh LoRA factors on `frozen["base"]` (B = 0: the
        network starts as the base; `default_targets` unless `lora.targets`; A drawn by
        `lora.init`, peft's rule unless set: lora.INITS), or `full(rng)`."""
        if not self.lora:
            return full(rng)
        return lora.init(rng, frozen["base"], self.lora.get("targets", default_targets),
                         self.lora.rank, self.lora.get("init", "peft"))

    def apply(self, trained, frozen, x, t, cond, w_emb=None, **kwargs):
        return self.denoiser.apply(self.params(trained, frozen), x, t, cond, w_emb, **kwargs)
