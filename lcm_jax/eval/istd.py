"""ISTD, Smooth Diffusion's interpolation standard deviation (arXiv 2312.04410, Sec. 5.2).

For each prompt (or class) two initial noises eps_a, eps_b; 11 latents slerp(eps_a, eps_b, eta),
eta = 0, 0.1, ..., 1; each generated deterministically (DDIM-50 with CFG in the paper) and decoded;
the 10 L2 distances between adjacent images; their standard deviation; the mean over prompts.
A smooth latent space moves the image by equal amounts for equal steps: low ISTD.

The paper leaves the conventions unstated; here they are arguments, with these defaults:
  pixel_range (0, 1)   images mapped from the generator's [-1, 1] to [0, 1] first;
  reduction "sum"      the L2 distance is sqrt(sum of squares) over H, W, C (not a per-pixel mean);
  ddof 0               numpy's population standard deviation over the 10 distances.
Compare models only with the same prompts, noises, sampler and conventions.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.diffusion import inversion

ETAS = np.linspace(0.0, 1.0, 11)


def interpolation_latents(noise_a, noise_b, etas=ETAS):
    """[P, len(etas), ...]: slerp between each prompt's two noises."""
    return jnp.stack([inversion.slerp(noise_a, noise_b, float(e)) for e in etas], axis=1)


def adjacent_distances(frames, pixel_range=(0.0, 1.0), reduction: str = "sum"):
    """[P, F - 1] distances between adjacent frames [P, F, H, W, C] given in [-1, 1]."""
    lo, hi = pixel_range
    frames = (jnp.asarray(frames, jnp.float32) + 1.0) / 2.0 * (hi - lo) + lo
    sq = (frames[:, 1:] - frames[:, :-1]) ** 2
    if reduction == "sum":
        return jnp.sqrt(jnp.sum(sq, axis=(-3, -2, -1)))
    if reduction == "mean":
        return jnp.sqrt(jnp.mean(sq, axis=(-3, -2, -1)))
    raise ValueError(f"reduction={reduction!r}; use 'sum' or 'mean'.")


def istd(frames, pixel_range=(0.0, 1.0), reduction: str = "sum", ddof: int = 0) -> dict:
    """{"istd": the mean over prompts of std(adjacent distances), "per_prompt", "distances"}."""
    d = np.asarray(adjacent_distances(frames, pixel_range, reduction), np.float64)
    per_prompt = d.std(axis=1, ddof=ddof)
    return {"istd": float(per_prompt.mean()), "per_prompt": per_prompt, "distances": d}


def interpolation_frames(generate: Callable, noise_a, noise_b, conditions, etas=ETAS):
    """Frames [P, F, H, W, C] in [-1, 1]: `generate(latents [N, ...], conditions [N, ...])`
    (deterministic: DDIM with CFG, decoded) on every interpolated latent, one call per eta."""
    latents = interpolation_latents(noise_a, noise_b, etas)
    frames = [np.asarray(generate(latents[:, i], conditions)) for i in range(len(etas))]
    return np.stack(frames, axis=1)
