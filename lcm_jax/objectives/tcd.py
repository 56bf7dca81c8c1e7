"""Trajectory Consistency Distillation (TCD, arXiv 2402.19159): LCD's step with the trajectory
consistency function in place of the consistency function.

The student learns f_theta(x_t, t, s) = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) x0_theta(x_t, t)
(the first-order exponential-integrator jump from t to any s <= t; f(x, t, t) = x exactly) and is
trained on d(f_theta(x_{t_{n+k}}, t_{n+k}, s), f_theta^-(x_hat_{t_n}, t_n, s)), with x_hat_{t_n}
LCD's CFG-augmented teacher step (any solver, eps or v teachers), the EMA or online target, full
or LoRA: everything but the end point is LCD's (objectives/consistency.py).

The end point s: per example an end index j ~ U{0, ..., n} on the skip grid and s = t_j =
max(tau_j - k, 0), so s runs over {0, tau_0, ..., t_n}. Uniform over the grid points at or below
t_n covers every end the strategic stochastic sampler asks for (s = floor((1 - gamma) t_prev)
lands anywhere in [0, t_prev]); j = n makes the target the teacher's step itself (f(x, t_n, t_n)
= x). This is the community recipe's rule (end index uniform in {0..i}, s = tau_end - k clamped at
0); TCD's authors released no training code. The network never sees s: only the jump does.
"""
import jax
import jax.numpy as jnp

from lcm_jax.objectives import Export, consistency


def end_time(key, n, prev_timestep):
    """s = t_j with j ~ U{0, ..., n}; prev_timestep(j) = t_j on this step's skip grid."""
    j = jnp.minimum(jnp.floor(jax.random.uniform(key, ()) * (n + 1)).astype(jnp.int32), n)
    return prev_timestep(j)


STRATEGY = consistency.Strategy(previous_point=consistency.teacher_step, end_time=end_time,
                                student_sampler="tcd")
REQUIRED, SAMPLERS, config_problems = (consistency.REQUIRED, consistency.SAMPLERS,
                                       consistency.config_problems)
EXPORT = Export(network="student", lora_section="lcd", scheduler="TCDScheduler")
DIGITS_EVALUATION = "few_step_table"


def build(config, workdir: str, pipeline) -> consistency.ConsistencyObjective:
    return consistency.ConsistencyObjective(config, consistency.base_for(config, workdir, pipeline),
                                            STRATEGY)
