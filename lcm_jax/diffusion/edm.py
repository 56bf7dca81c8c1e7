"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models").

The parameterization LEGO's public code trains with: x = x0 + sigma * n, a network F preconditioned
as D(x, sigma) = c_skip x + c_out F(c_in x, c_noise), ln sigma ~ N(P_mean, P_std^2) during training,
and the Heun sampler on the Karras sigma grid: deterministic (Algorithm 1) or with EDM's churn
(Algorithm 2: S_churn, S_min, S_max, S_noise, as the LEGO paper's FIDs use). Pure functions of
arrays.

The loss lambda(sigma) ||D - x0||^2 with EDM's lambda = 1 / c_out^2 is exactly ||F - target||^2
with `target = (x0 - c_skip x) / c_out`, which is how objectives/edm.py writes it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

SIGMA_DATA = 0.5
P_MEAN, P_STD = -1.2, 1.2
SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x [B, ...], sigma [B]) -> D


def _expand(a, x):
    return jnp.reshape(a, a.shape + (1,) * (x.ndim - a.ndim))


def preconditioning(sigma, sigma_data: float = SIGMA_DATA):
    """(c_skip, c_out, c_in, c_noise) of EDM's Table 1 for sigma [B]."""
    sigma = jnp.asarray(sigma, jnp.float32)
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
    c_in = 1.0 / jnp.sqrt(sigma ** 2 + sigma_data ** 2)
    c_noise = jnp.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def training_sigma(key, shape=(), p_mean: float = P_MEAN, p_std: float = P_STD):
    """ln sigma ~ N(p_mean, p_std^2)."""
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape))


def network_target(x0, x, sigma, sigma_data: float = SIGMA_DATA):
    """What F must output for D(x, sigma) = x0: (x0 - c_skip x) / c_out."""
    c_skip, c_out, _, _ = preconditioning(sigma, sigma_data)
    return (x0 - _expand(c_skip, x) * x) / _expand(c_out, x)


def denoiser(net_fn: Callable, sigma_data: float = SIGMA_DATA) -> Callable:
    """D(x, sigma, *args) = c_skip x + c_out net_fn(c_in x, c_noise, *args) for any network F."""
    def denoise(x, sigma, *args):
        c_skip, c_out, c_in, c_noise = preconditioning(sigma, sigma_data)
        out = net_fn(_expand(c_in, x) * x, c_noise, *args)
        return _expand(c_skip, x) * x + _expand(c_out, x) * out.astype(jnp.float32)

    return denoise


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> np.ndarray:
    """EDM's grid: num_steps noise levels from sigma_max down to sigma_min, then 0 (static)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: the Heun sampler needs at least one step.")
    i = np.arange(num_steps, dtype=np.float64)
    ramp = i / max(num_steps - 1, 1)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return np.append(sigmas, 0.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class Churn:
    """EDM's stochastic sampler (Algorithm 2): at each step with S_min <= t_i <= S_max, raise the
    noise level to t_hat = (1 + gamma) t_i, gamma = min(S_churn / N, sqrt(2) - 1), by adding
    fresh noise of std S_noise sqrt(t_hat^2 - t_i^2), then take the Heun step from t_hat.
    S_churn = 0 is the deterministic sampler."""
    s_churn: float = 0.0
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0

    def gammas(self, sigmas, num_steps: int) -> np.ndarray:
        """gamma_i for the steps starting at `sigmas` (N = num_steps, the whole trajectory's)."""
        sigmas = np.asarray(sigmas, np.float64)
        inside = (sigmas >= self.s_min) & (sigmas <= self.s_max)
        return np.where(inside, min(self.s_churn / num_steps, np.sqrt(2.0) - 1.0), 0.0)


def heun(denoise_fn: DenoiseFn, x, sigmas, *, churn: Churn | None = None, rng=None,
         num_steps: int | None = None, first_step: int = 0) -> jnp.ndarray:
    """EDM's Heun sampler from x at sigmas[0] through the static grid `sigmas`: Algorithm 1, or
    Algorithm 2 with `churn` (its noise for step i from fold_in(rng, i)).

    Every step to a sigma > 0 is Heun (two evaluations); a final step to 0 is Euler (one). The
    steps to sigma > 0 run in one lax.scan. A grid may be a piece of a longer one: calling heun on
    sigmas[:b + 1] and then on sigmas[b:] (first_step=b, num_steps = the whole trajectory's)
    equals one call on sigmas, which is how a sampler switches networks mid-trajectory (LEGO
    brick skipping).
    """
    sigmas = np.asarray(sigmas, np.float32)
    b = x.shape[0]
    n = len(sigmas) - 1
    gammas = np.zeros(n) if churn is None else churn.gammas(sigmas[:-1], num_steps or n)
    stochastic = bool(np.any(gammas > 0))
    if stochastic and rng is None:
        raise ValueError("EDM's stochastic sampler (S_churn > 0) needs an rng.")
    t_hat = (sigmas[:-1] * (1.0 + gammas)).astype(np.float32)
    steps = {"t": sigmas[:-1], "t_hat": t_hat, "t_next": sigmas[1:],
             "i": np.arange(first_step, first_step + n, dtype=np.int32)}

    def churned(x, k):  # x at t_hat: x_i + S_noise sqrt(t_hat^2 - t_i^2) eps
        if not stochastic:
            return x
        eps = jax.random.normal(jax.random.fold_in(rng, k["i"]), x.shape, x.dtype)
        return x + jnp.sqrt(k["t_hat"] ** 2 - k["t"] ** 2) * churn.s_noise * eps

    def step(x, k):
        x, s, s_next = churned(x, k), k["t_hat"], k["t_next"]
        d = (x - denoise_fn(x, jnp.full((b,), s))) / s
        x_euler = x + (s_next - s) * d
        d_next = (x_euler - denoise_fn(x_euler, jnp.full((b,), s_next))) / s_next
        return x + (s_next - s) * 0.5 * (d + d_next), None

    last = sigmas[-1] == 0
    heun_steps = {key: v[:n - 1] if last else v for key, v in steps.items()}
    if len(heun_steps["t"]):
        x, _ = jax.lax.scan(step, x, jax.tree.map(jnp.asarray, heun_steps))
    if last:  # Euler into sigma = 0: D itself (at t_hat)
        k = {key: v[-1] for key, v in steps.items()}
        x = denoise_fn(churned(x, k), jnp.full((b,), k["t_hat"]))
    return x


def num_evaluations(num_steps: int) -> int:
    """Network evaluations of `heun` on karras_sigmas(num_steps): 2 per step, 1 for the last."""
    return 2 * num_steps - 1
