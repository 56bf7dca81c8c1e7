"""Inversion, interpolation and editing of real images (Smooth Diffusion's applications).

  ddim_invert             x_0 -> x_T along the deterministic DDIM path, numerically diffusers'
                          DDIMInverseScheduler (the model at the target timestep t_i, the
                          coefficients of t_i - T/n), with the whole trajectory;
  null_text_inversion     per step, the unconditional input optimised so that the guided DDIM
                          step lands on the inverted trajectory (Mokady et al., as Smooth
                          Diffusion's wrapper: a fresh Adam per step, lr 1e-2 (1 - i / 100), up to
                          10 inner steps, early stop at loss < 1e-5 + 2e-5 i);
  ddim_generate           DDIM from x_T with a per-step model (per-step null inputs, a prompt
                          switch), equal to samplers.ddim for a fixed model;
  slerp                   spherical interpolation of latents (lerp when nearly parallel).
Models are functions of (x, t) as in samplers.py; the null-text functions take the unconditional
input as an explicit argument `null` (an embedding for SD, the null class's row for digits): one
null per step is shared by the whole batch (two images inverted together share one set).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lcm_jax.diffusion import samplers
from lcm_jax.diffusion import schedule as sched


def inverse_timesteps(num_steps: int, num_train_timesteps: int = 1000,
                      timestep_spacing: str = "leading", steps_offset: int = 1) -> np.ndarray:
    """DDIMInverseScheduler's timesteps (ascending): the DDIM sampler's, reversed."""
    return sched.ddim_timesteps(num_steps, num_train_timesteps, timestep_spacing, steps_offset)[::-1].copy()


def ddim_invert(model_fn: samplers.ModelFn, x0, schedule: sched.Schedule, num_steps: int, *,
                prediction_type: str = "epsilon", timestep_spacing: str = "leading",
                steps_offset: int = 1, set_alpha_to_one: bool = False):
    """The DDIM-inverted trajectory [n + 1, B, ...]: x0, then the latent at each inverse timestep
    (the last is x_T). Step i evaluates the model at (x, t_i) and moves from abar(t_i - T/n)
    (abar_0, or 1 with set_alpha_to_one, below 0) to abar(t_i), as DDIMInverseScheduler."""
    T = schedule.num_train_timesteps
    ts = inverse_timesteps(num_steps, T, timestep_spacing, steps_offset)
    current = np.minimum(ts - T // num_steps, T - 1)
    initial = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    abar_from = jnp.where(current >= 0, schedule.alphas_cumprod[np.maximum(current, 0)], initial)

    def step(x, s):
        out = model_fn(x, jnp.full((x.shape[0],), s["t"], jnp.int32))
        a_from, a_to = s["abar_from"], schedule.abar(s["t"])
        x0_hat, eps = sched.to_x0_eps(out, x, jnp.sqrt(a_from), jnp.sqrt(1 - a_from), prediction_type)
        x = jnp.sqrt(a_to) * x0_hat + jnp.sqrt(1 - a_to) * eps
        return x, x

    _, path = jax.lax.scan(step, x0, {"t": jnp.asarray(ts), "abar_from": abar_from})
    return jnp.concatenate([x0[None], path])


def ddim_step(x, out, t, abar_prev, schedule: sched.Schedule, prediction_type: str):
    """One deterministic DDIM step from t to the point with abar_prev."""
    alpha, sigma = schedule.alpha_sigma(t)
    x0, eps = sched.to_x0_eps(out, x, alpha, sigma, prediction_type)
    return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1 - abar_prev) * eps


def ddim_generate(step_model: Callable, x, schedule: sched.Schedule, num_steps: int, *,
                  prediction_type: str = "epsilon", timestep_spacing: str = "leading",
                  steps_offset: int = 1, set_alpha_to_one: bool = False):
    """DDIM from x_T where step i calls `step_model(x, t, i)` (i = 0 at the noisiest step)."""
    ts, abar_prev = samplers.ddim_grid(schedule, num_steps, timestep_spacing, steps_offset,
                                       set_alpha_to_one)

    def step(x, s):
        out = step_model(x, jnp.full((x.shape[0],), s["t"], jnp.int32), s["i"])
        return ddim_step(x, out, s["t"], s["abar_prev"], schedule, prediction_type), None

    x, _ = jax.lax.scan(step, x, {"t": jnp.asarray(ts), "abar_prev": abar_prev,
                                  "i": jnp.arange(len(ts))})
    return x


def guided_with_null(cond_fn: Callable, uncond_fn: Callable, guidance_scale: float):
    """model(x, t, null) = u + g (c - u), with u = uncond_fn(null, x, t), c = cond_fn(x, t)."""
    def model(x, t, null):
        u = uncond_fn(null, x, t)
        return u + guidance_scale * (cond_fn(x, t) - u)

    return model


def null_text_inversion(cond_fn: Callable, uncond_fn: Callable, null, trajectory,
                        schedule: sched.Schedule, num_steps: int, guidance_scale: float = 7.5, *,
                        prediction_type: str = "epsilon", timestep_spacing: str = "leading",
                        steps_offset: int = 1, set_alpha_to_one: bool = False,
                        inner_steps: int = 10, lr: float = 1e-2, tolerance: float = 1e-5):
    """Per-step null inputs [n, ...] (stacked like `null`) and the inner iterations used [n].

    Step i (from x_T down) starts from the previous step's optimised null, runs a fresh Adam
    (lr (1 - i / 100)) on mse(DDIM step of the guided model, the inverted latent one step
    earlier) for at most `inner_steps`, stopping once the loss (before the update) is below
    tolerance + 2e-5 i, then takes the guided step with the optimised null from where it is.
    `trajectory` is ddim_invert's output with the same grid; its batch shares the nulls."""
    ts, abar_prev = samplers.ddim_grid(schedule, num_steps, timestep_spacing, steps_offset,
                                       set_alpha_to_one)
    model = guided_with_null(cond_fn, uncond_fn, guidance_scale)
    targets = trajectory[::-1][1:]  # the latent each sampling step should land on

    def outer(carry, s):
        x, null = carry
        t = jnp.full((x.shape[0],), s["t"], jnp.int32)
        cond_out = jax.lax.stop_gradient(cond_fn(x, t))
        step_to = lambda out: ddim_step(x, out, s["t"], s["abar_prev"], schedule, prediction_type)

        def loss_fn(n):
            u = uncond_fn(n, x, t)
            return jnp.mean((step_to(u + guidance_scale * (cond_out - u)) - s["target"]) ** 2)

        tx = optax.adam(lr * (1.0 - s["i"] / 100.0))
        threshold = tolerance + 2e-5 * s["i"]

        def inner(c):
            j, n, opt_state, _ = c
            loss, grad = jax.value_and_grad(loss_fn)(n)
            updates, opt_state = tx.update(grad, opt_state, n)
            return j + 1, optax.apply_updates(n, updates), opt_state, loss < threshold

        j, null, _, _ = jax.lax.while_loop(lambda c: (c[0] < inner_steps) & ~c[3], inner,
                                           (0, null, tx.init(null), jnp.array(False)))
        x = step_to(model(x, t, null))
        return (x, null), (null, j)

    per_step = {"t": jnp.asarray(ts), "abar_prev": abar_prev, "target": targets,
                "i": jnp.arange(len(ts), dtype=jnp.float32)}
    _, (nulls, iterations) = jax.lax.scan(outer, (trajectory[-1], null), per_step)
    return nulls, iterations


def slerp(a, b, eta, dot_threshold: float = 0.9995):
    """Spherical interpolation per example (flattened), lerp when |cos| > dot_threshold."""
    flat_a, flat_b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    cos = jnp.sum(flat_a * flat_b, -1) / (jnp.linalg.norm(flat_a, axis=-1) * jnp.linalg.norm(flat_b, axis=-1))
    theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
    sin = jnp.where(jnp.abs(cos) > dot_threshold, 1.0, jnp.sin(theta))
    wa = jnp.where(jnp.abs(cos) > dot_threshold, 1 - eta, jnp.sin((1 - eta) * theta) / sin)
    wb = jnp.where(jnp.abs(cos) > dot_threshold, eta, jnp.sin(eta * theta) / sin)
    return sched.broadcast(wa, a) * a + sched.broadcast(wb, b) * b
