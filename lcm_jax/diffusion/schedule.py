"""Discrete DDPM noise schedules, prediction conversions and timestep grids.

Conventions (those of Stable Diffusion and diffusers): T integer timesteps 0..T-1,
abar_t = prod_{s<=t} (1 - beta_s), x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), and the half-log-SNR lambda_t = log(alpha_t / sigma_t).
The betas are built in float64 and stored as float32 arrays.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("scaled_linear", "linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Schedule(NamedTuple):
    """abar_t for t = 0..T-1 (a pytree, so it can be closed over or passed into jit)."""

    alphas_cumprod: jnp.ndarray  # [T] float32

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def abar(self, t):
        """abar at integer timesteps t; t < 0 means 'before the first step' and gives 1."""
        t = jnp.asarray(t)
        return jnp.where(t >= 0, self.alphas_cumprod[jnp.clip(t, 0)], 1.0)

    def alpha_sigma(self, t):
        abar = self.abar(t)
        return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

    def lambda_(self, t):
        alpha, sigma = self.alpha_sigma(t)
        return jnp.log(alpha) - jnp.log(sigma)


def make_betas(beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
               beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
    T = num_train_timesteps
    if beta_schedule == "scaled_linear":  # Stable Diffusion
        return np.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal cosine, beta capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    raise ValueError(f"Unknown beta_schedule {beta_schedule!r}; choose one of {BETA_SCHEDULES}.")


def make_schedule(beta_schedule: str = "scaled_linear", num_train_timesteps: int = 1000,
                  beta_start: float = 0.00085, beta_end: float = 0.012,
                  trained_betas=None) -> Schedule:
    """The schedule from a named beta schedule, or from explicit `trained_betas` [T]."""
    if trained_betas is None:
        betas = make_betas(beta_schedule, num_train_timesteps, beta_start, beta_end)
    else:
        betas = np.asarray(trained_betas, np.float64)
    # float32 betas, their product accumulated in float64 and rounded once: exactly diffusers'
    # alphas_cumprod given the same betas (torch's CPU cumprod accumulates in double). Its float32
    # linspace rounds some scaled_linear betas differently: abar then agrees to ~1.3e-6 relative.
    alphas = (np.float32(1.0) - betas.astype(np.float32)).astype(np.float64)
    return Schedule(jnp.asarray(np.cumprod(alphas).astype(np.float32)))


def broadcast(coef, x):
    """A per-example coefficient [B] (or a scalar) shaped to broadcast against x [B, ...]."""
    coef = jnp.asarray(coef, dtype=x.dtype)
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


# ----------------------------------------------------------------------------------------------
# Prediction conversions. alpha, sigma: per-example [B] or scalars (broadcast against x).
# ----------------------------------------------------------------------------------------------

def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; "
                         f"choose one of {PREDICTION_TYPES}.")


def to_x0_eps(model_out, x_t, alpha, sigma, prediction_type: str):
    """(x0, eps) implied by a model output of the given type at x_t = alpha x0 + sigma eps."""
    check_prediction_type(prediction_type)
    a, s = broadcast(alpha, x_t), broadcast(sigma, x_t)
    if prediction_type == "epsilon":
        return (x_t - s * model_out) / a, model_out
    if prediction_type == "v_prediction":  # v = alpha eps - sigma x0
        return a * x_t - s * model_out, a * model_out + s * x_t
    return model_out, (x_t - a * model_out) / s  # "sample"


def from_x0_eps(x0, eps, alpha, sigma, prediction_type: str):
    """The model output of the given type whose conversion gives (x0, eps)."""
    check_prediction_type(prediction_type)
    a, s = broadcast(alpha, x0), broadcast(sigma, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "v_prediction":
        return a * eps - s * x0
    return x0


def add_noise(x0, eps, alpha, sigma):
    return broadcast(alpha, x0) * x0 + broadcast(sigma, x0) * eps


# ----------------------------------------------------------------------------------------------
# Timestep grids (numpy: they are static, decided before anything is traced; skip_pair is the
# skip grid's traced twin).
# ----------------------------------------------------------------------------------------------

class SkipGrid(NamedTuple):
    """The DDIM grid that LCD distils along (Latent Consistency Models, Sec. 4.3).

    With N grid points and skip k = T // N: timesteps[i] = k (i + 1) - 1 (= {19, 39, ..., 999} for
    T = 1000, N = 50); an example drawn at index i starts at t_{n+k} = timesteps[i] and its solver
    lands on t_n = max(timesteps[i] - k, 0) with abar_prev[i] = abar[timesteps[i - 1]] and abar[0]
    (not 1) for i = 0, exactly as the reference LCD scripts define them.
    """

    timesteps: np.ndarray  # [N] int32, t_{n+k}
    prev_timesteps: np.ndarray  # [N] int32, t_n
    skip: int


def skip_grid(num_train_timesteps: int = 1000, num_ddim_timesteps: int = 50) -> SkipGrid:
    T, N = num_train_timesteps, num_ddim_timesteps
    if N < 1 or T % N:
        raise ValueError(f"num_ddim_timesteps={N} must divide num_train_timesteps={T} "
                         f"(the skip k = T / N must be an integer); e.g. 50 for T = 1000.")
    k = T // N
    timesteps = np.arange(1, N + 1, dtype=np.int64) * k - 1
    return SkipGrid(timesteps.astype(np.int32), np.maximum(timesteps - k, 0).astype(np.int32), k)


def skip_pair(num_train_timesteps: int, num_points, n):
    """(t_{n+k}, t_n) at grid index n of the skip grid with N = `num_points` points, in jnp
    integer arithmetic: skip_grid's convention (k = T // N, t_{n+k} = k (n + 1) - 1, t_n =
    max(t_{n+k} - k, 0)) with N allowed to be traced, so that one compiled step can change its
    grid with the train step (the consistency family's skip curriculum, `skip_curriculum`). For
    each N that divides T it equals skip_grid(T, N)'s arrays at n; N must divide T, as there
    (checked where the values N takes are decided)."""
    n = jnp.asarray(n, jnp.int32)
    k = jnp.int32(num_train_timesteps) // jnp.asarray(num_points, jnp.int32)
    t = k * (n + 1) - 1
    return t, jnp.maximum(t - k, 0)


SKIP_SCHEDULES = ("doubling", "constant")  # lcd.k_schedule (None: the fixed grid)


def doubling_stages(n_start: int, n_final: int, total_steps: int) -> tuple[list[int], int]:
    """(N of each stage, the stage length K' in train steps) of improved CT's (Song & Dhariwal
    2023) doubling curriculum N(step) = min(n_start 2^floor(step / K'), n_final), K' = max(1,
    floor(total_steps / (log2(floor(n_final / n_start)) + 1))). iCT counts the grid's N + 1
    points, its t = 0 included: its N(k) - 1 is this N. T = 1000, 5 -> 50 over 6,000 steps: N =
    5, 10, 20, 40, 50 (k = 200 ... 20), K' = 1388, the last stage shortened."""
    if not 1 <= n_start <= n_final:
        raise ValueError(f"n_start={n_start} must be in [1, n_final={n_final}].")
    stage_steps = max(1, math.floor(total_steps / (math.log2(n_final // n_start) + 1)))
    stages = [n_start]
    while stages[-1] < n_final:
        stages.append(min(2 * stages[-1], n_final))
    return stages, stage_steps


def skip_curriculum(kind: str, n_start: int, n_final: int, total_steps: int):
    """step -> N(step), the skip grid's number of points (int32; `step` may be traced: one
    compiled train step serves every N). 'doubling': `doubling_stages`, indexed by min(step //
    K', last stage); 'constant': n_start throughout (a coarser grid than the sampler's n_final)."""
    if kind == "constant":
        return lambda step: jnp.full(jnp.shape(step), n_start, jnp.int32)
    if kind != "doubling":
        raise ValueError(f"Unknown skip schedule {kind!r}; use one of {SKIP_SCHEDULES}.")
    stages, stage_steps = doubling_stages(n_start, n_final, total_steps)
    table = jnp.asarray(stages, jnp.int32)
    return lambda step: table[jnp.minimum(jnp.asarray(step, jnp.int32) // stage_steps,
                                          len(stages) - 1)]


def curriculum_grid_sizes(kind: str, n_start: int, n_final: int) -> list[int]:
    """Every N a skip schedule takes (each must divide T)."""
    return [n_start] if kind == "constant" else doubling_stages(n_start, n_final, 1)[0]


def lcm_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                  original_inference_steps: int = 50, strength: float = 1.0) -> np.ndarray:
    """LCM / TCD inference timesteps (diffusers LCMScheduler.set_timesteps, default path).

    The distillation grid k [1..N'] - 1, N' = original_inference_steps * strength, reversed, then
    evenly spaced indices floor(linspace(0, N', n, endpoint=False)): 4 steps -> [999, 759, 499, 259].
    """
    T = num_train_timesteps
    k = T // original_inference_steps
    n_orig = int(original_inference_steps * strength)
    if not 1 <= num_inference_steps <= n_orig:
        raise ValueError(f"num_inference_steps={num_inference_steps} must be in [1, "
                         f"original_inference_steps * strength = {n_orig}].")
    origin = (np.arange(1, n_orig + 1) * k - 1)[::-1]
    idx = np.floor(np.linspace(0, len(origin), num_inference_steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.int32)


def ddim_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                   timestep_spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """DDIM / DDPM-style inference timesteps with diffusers' three spacings (SD: leading, offset 1)."""
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n} must be in [1, {T}].")
    if timestep_spacing == "leading":
        t = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif timestep_spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / n)) - 1
    elif timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n).round()[::-1]
    else:
        raise ValueError(f"Unknown timestep_spacing {timestep_spacing!r}; "
                         "choose 'leading', 'trailing' or 'linspace'.")
    return t.astype(np.int32)


def dpm_solver_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000,
                         timestep_spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """DPM-Solver inference timesteps (diffusers DPMSolver{Multi,Single}stepScheduler; the grid
    has n + 1 points of which the last, t = 0, is dropped: the final step goes to sigma = 0)."""
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps={n} must be in [1, {T}].")
    if timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif timestep_spacing == "leading":
        t = (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1] + steps_offset
    elif timestep_spacing == "trailing":
        t = np.arange(T, 0, -T / n).round() - 1
    else:
        raise ValueError(f"Unknown timestep_spacing {timestep_spacing!r}; "
                         "choose 'leading', 'trailing' or 'linspace'.")
    return t.astype(np.int32)
