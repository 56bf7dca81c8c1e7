"""Samplers: DDIM, DPM-Solver(++) multistep and singlestep, LCM multistep, TCD.

Each sampler is a pure function `sampler(model_fn, x_T, schedule, num_steps, ..., rng)` that runs
its steps in one `lax.scan` (jittable, any batch, one compile whatever the step count's values).
`model_fn(x, t) -> raw model output` (eps / v / x0 per `prediction_type`) with t an int32 [B];
wrap a conditional network with `guided` for classifier-free guidance. Timesteps, step orders and
the noise contract (step i draws `normal(fold_in(rng, i))`) follow diffusers' schedulers, against
which they are tested step for step.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.diffusion import consistency
from lcm_jax.diffusion import schedule as sched
from lcm_jax.diffusion import solvers

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
SAMPLERS = ("ddim", "dpm_solver", "dpm_solver_pp", "dpm_solver_singlestep", "lcm", "tcd")
STOCHASTIC = ("lcm", "tcd")  # re-noise between steps: they take an `rng` (DDIM too when eta > 0)
FEW_STEP = ("lcm", "tcd")  # their steps come from a consistency model's skip grid


def guided(apply_fn: Callable, cond, uncond, guidance_scale: float) -> ModelFn:
    """model_fn(x, t) for `apply_fn(x, t, cond)` under classifier-free guidance.

    Conditional and unconditional branches run as ONE batched call of 2B; outputs combine as in
    diffusers' pipelines: out_u + g (out_c - out_u). cond / uncond: pytrees of [B, ...] arrays
    (the negative prompt goes in uncond). g <= 1 skips the unconditional branch.
    """
    if isinstance(guidance_scale, (int, float)) and guidance_scale <= 1.0:
        return lambda x, t: apply_fn(x, t, cond)

    def model_fn(x, t):
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)
        out = apply_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
        out_c, out_u = jnp.split(out, 2)
        return out_u + guidance_scale * (out_c - out_u)

    return model_fn


def step_noise(rng, i, x):
    return jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)


def _run(step_fn, carry, per_step: dict):
    """scan `step_fn(carry, inputs) -> carry` over the per-step arrays (plus the step index)."""
    n = len(next(iter(per_step.values())))
    xs = dict(per_step, i=jnp.arange(n))
    carry, _ = jax.lax.scan(lambda c, inp: (step_fn(c, inp), None), carry, xs)
    return carry


def _evaluate(model_fn, x, t, schedule, prediction_type):
    out = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32))
    alpha, sigma = schedule.alpha_sigma(t)
    return sched.to_x0_eps(out, x, alpha, sigma, prediction_type)


def _need_rng(rng, name):
    if rng is None:
        raise ValueError(f"{name} draws fresh noise at each step: pass rng=jax.random.key(seed).")


# ----------------------------------------------------------------------------------------------

def ddim_grid(schedule: sched.Schedule, num_steps: int, timestep_spacing: str = "leading",
              steps_offset: int = 1, set_alpha_to_one: bool = False):
    """(timesteps [n] descending, abar at each step's target [n]) of diffusers' DDIMScheduler;
    the last step lands on abar = 1 (set_alpha_to_one) or abar_0."""
    T = schedule.num_train_timesteps
    ts = sched.ddim_timesteps(num_steps, T, timestep_spacing, steps_offset)
    prev = ts - T // num_steps
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    return ts, jnp.where(prev >= 0, schedule.alphas_cumprod[np.maximum(prev, 0)], final)


def ddim(model_fn: ModelFn, x, schedule: sched.Schedule, num_steps: int, *,
         prediction_type: str = "epsilon", eta: float = 0.0, rng=None,
         timestep_spacing: str = "leading", steps_offset: int = 1,
         set_alpha_to_one: bool = False, clip_sample: float | None = None):
    """DDIM (Song et al.) with eta; defaults are Stable Diffusion's scheduler config."""
    if eta > 0:
        _need_rng(rng, "DDIM with eta > 0")
    ts, abar_prev = ddim_grid(schedule, num_steps, timestep_spacing, steps_offset, set_alpha_to_one)

    def step(x, s):
        x0, eps = _evaluate(model_fn, x, s["t"], schedule, prediction_type)
        if clip_sample is not None:
            x0 = jnp.clip(x0, -clip_sample, clip_sample)
        a_t, a_prev = schedule.abar(s["t"]), s["abar_prev"]
        std = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        x = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std ** 2) * eps
        return x + std * step_noise(rng, s["i"], x) if eta > 0 else x

    return _run(step, x, {"t": ts, "abar_prev": abar_prev})


def _dpm_grid(schedule, ts, final_sigmas_type):
    """(alpha, sigma) at each step's start and end; the final end is sigma = 0 or sigma_min."""
    a, s = schedule.alpha_sigma(ts)
    if final_sigmas_type == "zero":
        a_last, s_last = jnp.ones(()), jnp.zeros(())
    elif final_sigmas_type == "sigma_min":
        a_last, s_last = schedule.alpha_sigma(0)
    else:
        raise ValueError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}.")
    return a, s, jnp.append(a[1:], a_last), jnp.append(s[1:], s_last)


def _check_dpm(algorithm, final_sigmas_type, order):
    if algorithm not in solvers.ALGORITHMS:
        raise ValueError(f"Unknown DPM-Solver algorithm {algorithm!r}; choose one of {solvers.ALGORITHMS}.")
    if algorithm == "dpmsolver" and final_sigmas_type == "zero":
        raise ValueError("The noise-form 'dpmsolver' cannot step to sigma = 0; "
                         "use final_sigmas_type='sigma_min' (as diffusers requires).")
    if order not in (1, 2):
        raise ValueError(f"DPM-Solver order must be 1 or 2, got {order}.")


def dpm_solver_multistep(model_fn: ModelFn, x, schedule: sched.Schedule, num_steps: int, *,
                         prediction_type: str = "epsilon", algorithm: str = "dpmsolver++",
                         order: int = 2, lower_order_final: bool = True,
                         final_sigmas_type: str = "zero", timestep_spacing: str = "linspace",
                         steps_offset: int = 0):
    """DPM-Solver++(2M) / DPM-Solver-2 multistep (diffusers DPMSolverMultistepScheduler)."""
    _check_dpm(algorithm, final_sigmas_type, order)
    ts = sched.dpm_solver_timesteps(num_steps, schedule.num_train_timesteps, timestep_spacing,
                                    steps_offset)
    n = len(ts)
    last_first_order = final_sigmas_type == "zero" or (lower_order_final and n < 15)
    orders = np.array([1 if i == 0 or order == 1 or (i == n - 1 and last_first_order) else 2
                       for i in range(n)])
    a, s, a_end, s_end = _dpm_grid(schedule, ts, final_sigmas_type)
    lam = solvers.half_log_snr(a, s)

    def step(carry, k):
        x, m_prev = carry
        x0, eps = _evaluate(model_fn, x, k["t"], schedule, prediction_type)
        m = solvers.model_term(x0, eps, algorithm)
        start, end = (k["a"], k["s"]), (k["a_end"], k["s_end"])
        h = solvers.half_log_snr(*end) - k["lam"]
        d1 = solvers.second_order_difference(m, m_prev, k["lam"], k["lam_prev"], h)
        second = solvers.dpm_update(x, start, end, m, d1, algorithm)
        first = solvers.dpm_update(x, start, end, m, None, algorithm)
        return jnp.where(k["order"] == 2, second, first), m

    per_step = {"t": ts, "a": a, "s": s, "a_end": a_end, "s_end": s_end, "lam": lam,
                "lam_prev": jnp.append(lam[0] + 1.0, lam[:-1]),  # step 0's value is unused
                "order": orders}
    x, _ = _run(step, (x, jnp.zeros_like(x)), per_step)
    return x


def singlestep_orders(n: int, lower_order_final: bool, final_sigmas_type: str) -> list[int]:
    """Order of each step of second-order singlestep DPM-Solver (diffusers' get_order_list);
    an odd n or a final sigma of 0 forces lower_order_final, as diffusers' set_timesteps does."""
    if lower_order_final or n % 2 or final_sigmas_type == "zero":
        orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    else:
        orders = [1, 2] * (n // 2)
    if final_sigmas_type == "zero":
        orders[-1] = 1
    return orders


def dpm_solver_singlestep(model_fn: ModelFn, x, schedule: sched.Schedule, num_steps: int, *,
                          prediction_type: str = "epsilon", algorithm: str = "dpmsolver++",
                          lower_order_final: bool = False, final_sigmas_type: str = "zero"):
    """Second-order singlestep DPM-Solver(++) (diffusers DPMSolverSinglestepScheduler, order 2):
    a first-order step into the midpoint, then a second-order step from the segment's start
    across both intervals."""
    _check_dpm(algorithm, final_sigmas_type, 2)
    ts = sched.dpm_solver_timesteps(num_steps, schedule.num_train_timesteps, "linspace")
    orders = singlestep_orders(len(ts), lower_order_final, final_sigmas_type)
    a, s, a_end, s_end = _dpm_grid(schedule, ts, final_sigmas_type)
    lam = solvers.half_log_snr(a, s)

    def step(carry, k):
        x, x_start, m_start = carry  # the segment's start: x and model term at t_{i-1}
        x0, eps = _evaluate(model_fn, x, k["t"], schedule, prediction_type)
        m = solvers.model_term(x0, eps, algorithm)
        end = (k["a_end"], k["s_end"])
        start2 = (k["a_prev"], k["s_prev"])
        h = solvers.half_log_snr(*end) - k["lam_prev"]
        d1 = solvers.second_order_difference(m_start, m, k["lam_prev"], k["lam"], h)
        second = solvers.dpm_update(x_start, start2, end, m_start, d1, algorithm)
        first = solvers.dpm_update(x, (k["a"], k["s"]), end, m, None, algorithm)
        is2 = k["order"] == 2
        return jnp.where(is2, second, first), jnp.where(is2, x_start, x), jnp.where(is2, m_start, m)

    per_step = {"t": ts, "a": a, "s": s, "a_end": a_end, "s_end": s_end, "lam": lam,
                "a_prev": jnp.append(a[:1], a[:-1]), "s_prev": jnp.append(s[:1], s[:-1]),
                "lam_prev": jnp.append(lam[0] + 1.0, lam[:-1]), "order": np.array(orders)}
    x, _, _ = _run(step, (x, x, jnp.zeros_like(x)), per_step)
    return x


def lcm(model_fn: ModelFn, x, schedule: sched.Schedule, num_steps: int, *,
        prediction_type: str = "epsilon", rng=None, original_inference_steps: int = 50,
        sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """LCM multistep sampling (Latent Consistency Models, Algorithm 3; diffusers LCMScheduler).

    Each step maps x_t to the consistency output f(x_t, t); all but the last re-noise it to the
    next timestep with fresh noise. `model_fn` closes over the condition and the w-embedding.
    """
    _need_rng(rng, "LCM sampling")
    ts = sched.lcm_timesteps(num_steps, schedule.num_train_timesteps, original_inference_steps)
    prev = np.append(ts[1:], ts[-1])  # the last step's value is unused

    def step(x, k):
        x0, _ = _evaluate(model_fn, x, k["t"], schedule, prediction_type)
        denoised = consistency.consistency_fn(x, x0, k["t"], sigma_data, timestep_scaling)
        alpha, sigma = schedule.alpha_sigma(k["prev"])
        renoised = alpha * denoised + sigma * step_noise(rng, k["i"], x)
        return jnp.where(k["i"] < num_steps - 1, renoised, denoised)

    return _run(step, x, {"t": ts, "prev": prev})


def tcd_timesteps_s(ts: np.ndarray, gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """(t_prev, s) per step: s = floor((1 - gamma) t_prev), computed in float32 as diffusers does."""
    prev = np.append(ts[1:], 0)
    s = np.floor(np.float32(1.0 - gamma) * prev.astype(np.float32)).astype(np.int32)
    return prev.astype(np.int32), s


def tcd(model_fn: ModelFn, x, schedule: sched.Schedule, num_steps: int, *, gamma: float = 0.3,
        prediction_type: str = "epsilon", rng=None, original_inference_steps: int = 50):
    """TCD's strategic stochastic sampling (arXiv 2402.19159; diffusers TCDScheduler, eta = gamma).

    Jump from t to s = floor((1 - gamma) t_prev) with the predicted x0 and eps, then (gamma > 0,
    not the last step) forward-diffuse from s to t_prev with fresh noise. gamma = 0 is
    deterministic; the last step lands on timestep 0 (not on x0), as diffusers does.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"TCD gamma must be in [0, 1], got {gamma}.")
    if gamma > 0:
        _need_rng(rng, "TCD with gamma > 0")
    ts = sched.lcm_timesteps(num_steps, schedule.num_train_timesteps, original_inference_steps)
    prev, s = tcd_timesteps_s(ts, gamma)

    def step(x, k):
        x0, eps = _evaluate(model_fn, x, k["t"], schedule, prediction_type)
        x_s = sched.add_noise(x0, eps, *schedule.alpha_sigma(k["s"]))
        if gamma == 0:
            return x_s
        ratio = schedule.abar(k["prev"]) / schedule.abar(k["s"])
        renoised = jnp.sqrt(ratio) * x_s + jnp.sqrt(1 - ratio) * step_noise(rng, k["i"], x)
        return jnp.where(k["i"] < num_steps - 1, renoised, x_s)

    return _run(step, x, {"t": ts, "prev": prev, "s": s})


def sample(name: str, model_fn: ModelFn, x, schedule: sched.Schedule, num_steps: int, **kwargs):
    """Dispatch by name (configs name samplers): see SAMPLERS."""
    fns = {"ddim": ddim, "dpm_solver_pp": dpm_solver_multistep, "lcm": lcm, "tcd": tcd,
           "dpm_solver": lambda *a, **k: dpm_solver_multistep(
               *a, **{"algorithm": "dpmsolver", "final_sigmas_type": "sigma_min", **k}),
           "dpm_solver_singlestep": dpm_solver_singlestep}
    if name not in fns:
        raise ValueError(f"Unknown sampler {name!r}; choose one of {SAMPLERS}.")
    return fns[name](model_fn, x, schedule, num_steps, **kwargs)
