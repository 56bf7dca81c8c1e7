"""Consistency-model pieces: boundary scalings, the consistency function, the w-embedding,
and TCD's trajectory consistency function.

The boundary scalings are those of the reference LCD scripts and diffusers' LCMScheduler, on
integer timesteps: c_skip = sd^2 / ((st)^2 + sd^2), c_out = st / sqrt((st)^2 + sd^2), with
sigma_data sd = 0.5 and timestep scaling s = 10. c_skip(0) = 1, c_out(0) = 0, so f(x, 0) = x.
(c_out lacks EDM's sigma_data factor; kept for compatibility with released LCM weights.)
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lcm_jax.diffusion import schedule as sched
from lcm_jax.diffusion import solvers


def boundary_scalings(t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """(c_skip, c_out) at integer timesteps t (any shape)."""
    st = jnp.asarray(t, jnp.float32) * timestep_scaling
    denom = st ** 2 + sigma_data ** 2
    return sigma_data ** 2 / denom, st / jnp.sqrt(denom)


def consistency_fn(x_t, x0, t, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """f(x_t, t) = c_skip(t) x_t + c_out(t) x0, with x0 the network's data prediction."""
    c_skip, c_out = boundary_scalings(t, sigma_data, timestep_scaling)
    return sched.broadcast(c_skip, x_t) * x_t + sched.broadcast(c_out, x_t) * x0


def guidance_scale_embedding(w, dim: int = 256, scale: float = 1000.0):
    """Sinusoidal embedding of guidance scales w [B] -> [B, dim] (sin first, no flip).

    As in the reference LCD scripts: w' = 1000 w; frequencies exp(-ln(1e4) j / (dim/2 - 1)).
    Pipelines embed w = guidance_scale - 1 (the LCM CFG convention x0_c + w (x0_c - x0_u)).
    The arguments reach 1.4e4 rad at w = 14, where one fp32 ulp is ~1e-3 rad: the frequencies are
    computed in float64 and rounded once, so the only error left is the product's rounding.
    """
    w = jnp.asarray(w, jnp.float32) * scale
    half = dim // 2
    freqs = np.exp(np.arange(half) * -(math.log(10000.0) / (half - 1))).astype(np.float32)
    args = w[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def trajectory_consistency_fn(x_t, x0, t, s, schedule: sched.Schedule):
    """TCD's f(x_t, t, s): the first-order exponential-integrator (DDIM) jump from t to s <= t,
    (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) x0 with h = lambda_s - lambda_t. f(x, t, t) = x
    exactly, also where sigma_t = 0 (a schedule with abar_0 = 1), whose jump is 0 / 0 there."""
    jump = solvers.dpm_update(x_t, schedule.alpha_sigma(t), schedule.alpha_sigma(s), x0)
    same = sched.broadcast(jnp.asarray(t) == jnp.asarray(s), x_t)
    return jnp.where(same, x_t, jump)
