"""Probability-flow ODE solver steps, written once and shared by samplers and objectives.

All steps are exponential-integrator updates in (alpha, sigma) coordinates (DPM-Solver, Lu et al.
2022; DPM-Solver++, Lu et al. 2022b). With h = lambda_end - lambda_start:

  first order, data form ("dpmsolver++"):  x_end = (sigma_e/sigma_s) x - alpha_e (e^-h - 1) D0
  first order, noise form ("dpmsolver"):   x_end = (alpha_e/alpha_s) x - sigma_e (e^h - 1) D0
  second order (midpoint) adds             -0.5 alpha_e (e^-h - 1) D1   or   -0.5 sigma_e (e^h - 1) D1

where D0 is the model's x0 (data form) or eps (noise form) at the start and D1 = (m_other - D0) / r
a finite difference. The data-form first order step IS the DDIM step alpha_e x0 + sigma_e eps.

`psi` is the one-step solver Psi(z_t, t, s) that LCD distils along (any t > s on the grid).
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from lcm_jax.diffusion import schedule as sched

SOLVERS = ("ddim", "dpm_solver", "dpm_solver_pp")
ALGORITHMS = ("dpmsolver++", "dpmsolver")


def half_log_snr(alpha, sigma):
    return jnp.log(alpha) - jnp.log(sigma)


def dpm_update(x, start, end, d0, d1=None, algorithm: str = "dpmsolver++"):
    """One DPM-Solver(++) update from `start` = (alpha_s, sigma_s) to `end` = (alpha_e, sigma_e).

    d0: the model's x0 (dpmsolver++) or eps (dpmsolver) at the start; d1: the second-order
    correction (None for first order). Coefficients are [B] arrays or scalars. sigma_e = 0 (the
    final step to the data) is exact: e^-h = 0 and the step returns D0.
    """
    (alpha_s, sigma_s), (alpha_e, sigma_e) = start, end
    h = half_log_snr(alpha_e, sigma_e) - half_log_snr(alpha_s, sigma_s)
    b = lambda c: sched.broadcast(c, x)
    if algorithm == "dpmsolver++":
        coef = -alpha_e * (jnp.exp(-h) - 1.0)
        x_end = b(sigma_e / sigma_s) * x + b(coef) * d0
    elif algorithm == "dpmsolver":
        coef = -sigma_e * (jnp.exp(h) - 1.0)
        x_end = b(alpha_e / alpha_s) * x + b(coef) * d0
    else:
        raise ValueError(f"Unknown DPM-Solver algorithm {algorithm!r}; choose one of {ALGORITHMS}.")
    if d1 is not None:
        x_end = x_end + b(0.5 * coef) * d1
    return x_end


def second_order_difference(m_here, m_there, lambda_here, lambda_there, h):
    """D1 = (m_there - m_here) / r with r = (lambda_there - lambda_here) / h (diffusers' 1 / r0 form)."""
    r = (lambda_there - lambda_here) / h
    return sched.broadcast(1.0 / r, m_here) * (m_there - m_here)


def model_term(x0, eps, algorithm: str):
    return x0 if algorithm == "dpmsolver++" else eps


# ----------------------------------------------------------------------------------------------
# Psi(z_t, t, s): the one-step solvers LCD distils along.
# ----------------------------------------------------------------------------------------------

def psi(solver: str, x_t, t, s, x0, eps, denoise_fn: Callable | None, schedule: sched.Schedule):
    """Solve the PF-ODE from integer timesteps t to s < t (both [B]) starting at x_t.

    x0, eps: the teacher's prediction at (x_t, t) (the first evaluation, made by the caller so
    that it can batch it). Second-order solvers evaluate `denoise_fn(x, t) -> (x0, eps)` once
    more, at the time midpoint m = (t + s) // 2 (the singlestep DPM-Solver-2 / DPM-Solver++(2S)
    of diffusers, whose intermediate point is the middle grid point).
      ddim:           first order (= DPM-Solver-1 = DPM-Solver++-1).
      dpm_solver:     DPM-Solver-2, noise form, midpoint.
      dpm_solver_pp:  DPM-Solver++(2S), data form, midpoint.
    """
    start, end = schedule.alpha_sigma(t), schedule.alpha_sigma(s)
    if solver == "ddim":
        return dpm_update(x_t, start, end, x0, algorithm="dpmsolver++")
    if solver not in SOLVERS:
        raise ValueError(f"Unknown solver {solver!r}; choose one of {SOLVERS}.")
    algorithm = "dpmsolver++" if solver == "dpm_solver_pp" else "dpmsolver"
    m = (t + s) // 2
    mid = schedule.alpha_sigma(m)
    d0 = model_term(x0, eps, algorithm)
    x_m = dpm_update(x_t, start, mid, d0, algorithm=algorithm)
    x0_m, eps_m = denoise_fn(x_m, m)
    lam_t, lam_m, lam_s = (half_log_snr(*ab) for ab in (start, mid, end))
    d1 = second_order_difference(d0, model_term(x0_m, eps_m, algorithm), lam_t, lam_m, lam_s - lam_t)
    # t = s (k = 1 at t = 0) is a zero step: the difference quotient is 0 / 0 there.
    d1 = jnp.where(sched.broadcast(jnp.asarray(t) != jnp.asarray(s), d1), d1, 0.0)
    return dpm_update(x_t, start, end, d0, d1, algorithm=algorithm)
