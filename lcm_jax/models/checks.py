"""Config checks of `config.model`: the backbone's name and dtypes, the image size it can take,
the LEGO stack, the DiT's heads (lcm_jax.config_checks runs them with the rest)."""
from __future__ import annotations

import json
import os

from lcm_jax import config_rules as rules
from lcm_jax.models import DTYPES, MODELS, attention, lego

VAE_FACTOR = 8  # Stable Diffusion's AutoencoderKL: 3 downsamplings
MIN_IMAGE_SIZE = 8


def config_problems(config):
    yield from rules.choice(config, "model.name", MODELS, "model")
    yield from rules.choice(config, "model.attention", attention.IMPLEMENTATIONS,
                            "attention implementation")
    for path in ("model.dtype", "model.param_dtype"):
        yield from rules.choice(config, path, DTYPES, "dtype")
    yield from _image_size(config)
    yield from _lego(config)


def _image_size(config):
    """data.image_size >= 8 and divisible by what the model (and the VAE, if any) downsamples."""
    size = rules.get(config, "data.image_size")
    if not rules.present(size):
        if rules.get(config, "data.name") not in (None, "digits"):  # digits defaults to 16
            yield "config.data.image_size is missing; give the training resolution, e.g. 512."
        return
    if not rules.is_int(size) or size < MIN_IMAGE_SIZE:
        yield rules.bad("data.image_size", size, f"is not an integer >= {MIN_IMAGE_SIZE}",
                        "give the training resolution in pixels, e.g. 16 or 512")
        return

    factor, why = 1, []
    name = rules.get(config, "model.name")
    if name == "dit":
        patch = rules.get(config, "model.patch_size")
        if rules.present(patch) and (not rules.is_int(patch) or patch < 1):
            yield rules.bad("model.patch_size", patch, "is not a positive integer", "e.g. 2")
            return
        if rules.present(patch):
            factor, why = patch, [f"model.patch_size={patch}"]
    elif name == "lego":
        stack = _lego_stack(config)
        if stack and not lego.stack_problems(stack):
            factor, why = lego.max_tile(stack), ["the LEGO stack's tile sizes"]
    elif name == "unet":
        channels = rules.get(config, "model.unet.block_out_channels")  # the diffusers UNet config
        if isinstance(channels, (list, tuple)) and channels:
            factor = 2 ** (len(channels) - 1)
            why = [f"the UNet's {len(channels) - 1} downsamplings"]
    vae_folder = rules.get(config, "model.vae", None)  # an EDM / LEGO latent model's frozen VAE
    vae_config = os.path.join(os.path.expanduser(str(vae_folder)), "config.json")
    if vae_folder and os.path.isfile(vae_config):
        with open(vae_config) as f:
            vae_factor = 2 ** (len(json.load(f).get("block_out_channels", [0] * 4)) - 1)
        factor, why = factor * vae_factor, why + [f"the VAE's factor {vae_factor}"]
    if rules.get(config, "vae", None):  # the chain's VAE stage: latents are image_size / factor
        channels = rules.get(config, "vae.block_out_channels")
        vae_factor = (2 ** (len(channels) - 1) if isinstance(channels, (list, tuple)) and channels
                      else VAE_FACTOR)
        factor, why = factor * vae_factor, why + [f"the VAE's factor {vae_factor}"]
    if size % factor:
        yield rules.bad("data.image_size", size, f"is not divisible by {factor} ({' x '.join(why)})",
                        f"use a multiple of {factor}, e.g. {max(factor, size // factor * factor)}")

    if name == "dit":
        width, heads = rules.get(config, "model.width"), rules.get(config, "model.num_heads")
        if rules.is_int(width) and rules.is_int(heads) and (heads < 1 or width % heads):
            yield rules.bad("model.width", width, f"is not divisible by model.num_heads={heads}",
                            "choose num_heads that divides width (e.g. width=128, num_heads=4)")


def _lego_stack(config):
    if rules.get(config, "model.layout", None):
        try:
            return lego.named_stack(rules.get(config, "model.layout"), rules.get(config, "model.size", "S"))
        except ValueError:
            return None
    stack = rules.get(config, "model.stack", None)
    return tuple(tuple(b) for b in stack) if isinstance(stack, (list, tuple)) else stack


def _lego(config):
    if rules.get(config, "model.name") != "lego":
        return
    layout = rules.get(config, "model.layout", None)
    if layout:
        try:
            lego.named_stack(layout, rules.get(config, "model.size", "S"))
        except ValueError as e:
            yield f"config.model.layout / config.model.size: {e}"
        return
    stack = _lego_stack(config)
    if not isinstance(stack, tuple):
        yield rules.bad("model.stack", stack, "is not a list of bricks",
                        "give [[r, p, depth, width, num_heads], ...] or model.layout='PG-64'")
        return
    yield from lego.stack_problems(stack)
