"""Models registry: config.model -> a Denoiser, the one calling convention objectives use.

Objectives call `denoiser.apply(params, x, t, cond, w_emb=None)` whatever the backbone. `cond` is
either class labels [B] (mapped to the module's own argument: DiT `labels`, UNet `class_labels`;
the null class `num_classes` is the unconditional one) or a dict of the module's keyword inputs
(Stable Diffusion: `encoder_hidden_states`, and `added_cond` for SDXL). `w_emb` is the guidance-scale
embedding a consistency student takes through `time_cond_proj` (None for teachers).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

MODELS = ("dit", "unet", "lego")
# config.model.dtype (compute) and config.model.param_dtype (storage of the frozen networks)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def as_dtype(tree, dtype):
    """Every floating leaf of `tree` in `dtype` (integer leaves untouched): weights' storage."""
    cast = lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype else a
    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Denoiser:
    module: Any
    label_arg: str = "class_labels"

    def _inputs(self, cond, w_emb) -> dict:
        kwargs = dict(cond) if isinstance(cond, dict) else {self.label_arg: cond}
        if w_emb is not None:
            kwargs["timestep_cond"] = w_emb
        return kwargs

    def init(self, rng, x, t, cond, w_emb=None):
        return self.module.init(rng, x, t, **self._inputs(cond, w_emb))["params"]

    def apply(self, params, x, t, cond, w_emb=None, **kwargs):
        """The prediction; `kwargs` go to the module (LEGO: num_bricks, to skip its top brick).
        `params` may be a `lora.Unmerged`: the base with its adapters applied at call time."""
        from lcm_jax.models import lora

        if isinstance(params, lora.Unmerged):
            with lora.applied(params.lora, params.alpha, params.scale):
                return self.apply(params.base, x, t, cond, w_emb, **kwargs)
        return self.module.apply({"params": params}, x, t, **self._inputs(cond, w_emb), **kwargs)

    def outputs(self, params, x, t, cond, w_emb=None, **kwargs) -> list:
        """Every supervised output: each brick's for a LEGO stack, [the prediction] otherwise."""
        if hasattr(self.module, "outputs"):
            return self.module.apply({"params": params}, x, t, **self._inputs(cond, w_emb),
                                     method="outputs", **kwargs)
        return [self.apply(params, x, t, cond, w_emb, **kwargs)]


def make_model(model_config, in_channels: int, time_cond_proj_dim: int | None = None) -> Denoiser:
    """The backbone named by config.model; `time_cond_proj_dim` gives it the w-embedding input."""
    name = model_config.name
    if name == "dit":
        from lcm_jax.models import dit

        return Denoiser(dit.from_config(model_config, in_channels, time_cond_proj_dim), "labels")
    if name == "lego":
        from lcm_jax.models import lego

        return Denoiser(lego.from_config(model_config, in_channels, time_cond_proj_dim), "labels")
    if name == "unet":
        from lcm_jax.models import unet

        unet_config = dict(model_config.unet, in_channels=in_channels, out_channels=in_channels,
                           num_class_embeds=model_config.num_classes + 1,  # + the null class
                           time_cond_proj_dim=time_cond_proj_dim)
        dtype = DTYPES[model_config.get("dtype", "float32")]
        return Denoiser(unet.from_config(unet_config, dtype=dtype, remat=model_config.get("remat", False),
                                         attention=model_config.get("attention", "auto")), "class_labels")
    raise ValueError(f"config.model.name={name!r} is not a known model; use one of {MODELS}.")
