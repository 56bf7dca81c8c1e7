"""Encode a dataset once with a VAE and keep the latents (a latent cache).

Teachers train on cached latents; a `latents` key in a batch makes LCD skip its in-step VAE
encoding. The cache holds posterior means, shifted and scaled like the diffusion model's input.
"""
from __future__ import annotations

import jax
import numpy as np


def encode(vae_module, vae_params, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Images [N, H, W, C] in [-1, 1] -> model latents [N, h, w, c] (posterior means, scaled)."""
    return np.concatenate([
        np.asarray(vae_module.encode_to_latents(vae_params, jax.numpy.asarray(images[i:i + batch_size])))
        for i in range(0, len(images), batch_size)])

