"""Models registry: config.model -> a Denoiser, the one calling convention objectives use.

Objectives call `denoiser.apply(params, x, t, labels)` and `denoiser.init(rng, x, t, labels)`
whatever the backbone; the Denoiser maps labels to the module's own argument (DiT `labels`,
UNet `class_labels`). Labels use the null class `num_classes` for classifier-free guidance.
"""
from __future__ import annotations

import dataclasses
from typing import Any

MODELS = ("dit", "unet")


@dataclasses.dataclass(frozen=True)
class Denoiser:
    module: Any
    label_arg: str

    def init(self, rng, x, t, labels):
        return self.module.init(rng, x, t, **{self.label_arg: labels})["params"]

    def apply(self, params, x, t, labels):
        return self.module.apply({"params": params}, x, t, **{self.label_arg: labels})


def make_model(model_config, in_channels: int) -> Denoiser:
    name = model_config.name
    if name == "dit":
        from lcm_jax.models import dit

        return Denoiser(dit.from_config(model_config, in_channels), "labels")
    if name == "unet":
        import jax.numpy as jnp

        from lcm_jax.models import unet

        unet_config = dict(model_config.unet, in_channels=in_channels, out_channels=in_channels,
                           num_class_embeds=model_config.num_classes + 1)  # + the null class
        dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[model_config.get("dtype", "float32")]
        return Denoiser(unet.from_config(unet_config, dtype=dtype,
                                         remat=model_config.get("remat", False)), "class_labels")
    raise ValueError(f"config.model.name={name!r} is not a known model; use one of {MODELS}.")
