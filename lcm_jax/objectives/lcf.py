"""Latent Consistency Fine-tuning (LCF; Latent Consistency Models Sec. 4.4, Algorithm 4): a
distilled LCM fine-tuned on a custom dataset with NO teacher, as the consistency family's step.

Both points of the pair come from the same data sample z and the same noise on the forward
process: x_{t_{n+k}} = alpha_{t_{n+k}} z + sigma_{t_{n+k}} eps and x_hat_{t_n} = alpha_{t_n} z +
sigma_{t_n} eps (consistency training's estimate of the PF-ODE step, in place of the teacher's),
then LCD's loss d(f_theta(x_{t_{n+k}}, w, c, t_{n+k}), f_theta^-(x_hat_{t_n}, w, c, t_n)) with the
EMA (or online) target, skip k and the w-embedding kept (w ~ U[w_min, w_max] as in distillation,
so the fine-tuned LCM still takes the guidance scale it was distilled with).

The base is the LCM (its network has the w-embedding input `time_cond_proj`): the student
starts from `frozen["base"]`, which the step never calls. Full-parameter fine-tuning only.

The skip curriculum (`lcf.k_schedule`; None or absent: the fixed grid, k = T / N with N =
lcd.num_ddim_timesteps from the first step, bit for bit the step without it). Consistency
training converges from LARGE skips to small: with few grid points N the t = 0 boundary condition
reaches high t in few hops, and the finer grid then removes the bias of the coarse one (Song et
al. 2023 grow N from 2 to 150; improved CT, Song & Dhariwal 2023, doubles it in stages).
'doubling' is iCT's discretisation curriculum with s0 = `lcf.n_start` and s1 =
lcd.num_ddim_timesteps over K = config.total_steps train steps:

    N(step) = min(s0 2^floor(step / K'), s1),   K' = max(1, floor(K / (log2(floor(s1 / s0)) + 1)))

(iCT counts the grid's N + 1 points, its t = 0 included: its N(k) - 1 is this N). With T = 1000,
s0 = 5, s1 = 50: N = 5, 10, 20, 40, 50, the skip k = 200, 100, 50, 25, 20, the last stage
shortened (K = 6000: K' = 1388, N = 50 from step 5552). Every stage's N must divide T (the
config check lists the s0 that work: 5, 10, 20, 25, 40 or 50 here). N is a traced function of
state.step (`doubling_points`): ONE compiled step, no recompiles; per example n ~ U{0..N-1} is
drawn from the example's key as always (common.example_keys), t = k (n + 1) - 1 and s =
max(t - k, 0) on that N's grid (schedule.skip_pair, skip_grid's convention). Sampling keeps
original_inference_steps = lcd.num_ddim_timesteps (the last stage's grid). The online target
(`lcd.target = "online"`: theta^- = stop_gradient(theta), iCT's choice; the EMA then only feeds
the samples) and a constant lr (`optimizer.decay = "constant"`) are the other two knobs of that
recipe; configs/digits_lcf.py shows all three.
"""
import dataclasses
import math
import os

import jax.numpy as jnp

from lcm_jax import config_rules as rules
from lcm_jax.diffusion import schedule as sched
from lcm_jax.errors import UserError
from lcm_jax.objectives import Export, consistency


def forward_step(objective, frozen, draws, z, x_t, t, s, cond, uncond):
    """x_hat_{t_n}: the same sample and the same noise, at t_n (no teacher)."""
    return sched.add_noise(z, draws["noise"], *objective.schedule.alpha_sigma(s))


K_SCHEDULES = ("doubling",)  # lcf.k_schedule (None: the fixed grid)


def doubling_stages(n_start: int, n_final: int, total_steps: int) -> tuple[list[int], int]:
    """(N of each stage, the stage length K' in train steps) of iCT's doubling curriculum
    N(step) = min(n_start 2^floor(step / K'), n_final), K' = max(1, floor(total_steps /
    (log2(floor(n_final / n_start)) + 1))) (see the module docstring)."""
    if not 1 <= n_start <= n_final:
        raise ValueError(f"n_start={n_start} must be in [1, n_final={n_final}].")
    stage_steps = max(1, math.floor(total_steps / (math.log2(n_final // n_start) + 1)))
    stages = [n_start]
    while stages[-1] < n_final:
        stages.append(min(2 * stages[-1], n_final))
    return stages, stage_steps


def doubling_points(n_start: int, n_final: int, total_steps: int):
    """step -> N(step) (int32; `step` may be traced): the stages of `doubling_stages`, indexed by
    min(step // K', last stage)."""
    stages, stage_steps = doubling_stages(n_start, n_final, total_steps)
    table = jnp.asarray(stages, jnp.int32)
    return lambda step: table[jnp.minimum(jnp.asarray(step, jnp.int32) // stage_steps,
                                          len(stages) - 1)]


def curriculum(config, num_train_timesteps: int):
    """`lcf.k_schedule` -> step -> N (Strategy.curriculum), or None (unset: the fixed grid)."""
    kind = rules.get(config, "lcf.k_schedule", None)
    if kind is None:
        return None
    problems = list(curriculum_problems(config, num_train_timesteps))
    if problems:
        raise UserError("; ".join(problems))
    return doubling_points(config.lcf.get("n_start", 5), config.lcd.num_ddim_timesteps,
                           config.total_steps)


def curriculum_problems(config, num_train_timesteps):
    """lcf.k_schedule a known schedule; lcf.n_start an int in [1, N]; each stage's N divides T."""
    kind = rules.get(config, "lcf.k_schedule", None)
    if kind is None:
        return
    if kind not in K_SCHEDULES:
        yield rules.bad("lcf.k_schedule", kind, "is not a known skip schedule",
                        f"use one of {K_SCHEDULES} or None (the fixed grid)")
        return
    n_start, n_final = rules.get(config, "lcf.n_start", 5), rules.get(config, "lcd.num_ddim_timesteps")
    total = rules.get(config, "total_steps", None)
    if not (rules.is_int(n_final) and n_final >= 1 and rules.is_int(total)):
        return  # the generic checks report these
    if not rules.is_int(n_start) or not 1 <= n_start <= n_final:
        yield rules.bad("lcf.n_start", n_start, f"must be an integer in [1, "
                        f"lcd.num_ddim_timesteps={n_final}]", "e.g. 5 (skip k = T / 5 first)")
        return
    if not rules.is_int(num_train_timesteps):
        return
    stages, _ = doubling_stages(n_start, n_final, total)
    if any(num_train_timesteps % n for n in stages):
        fine = [s for s in range(1, n_final + 1)
                if not any(num_train_timesteps % n for n in doubling_stages(s, n_final, 1)[0])]
        yield rules.bad("lcf.n_start", n_start, f"gives the grid sizes N = {stages}, of which "
                        f"{[n for n in stages if num_train_timesteps % n]} do not divide "
                        f"num_train_timesteps={num_train_timesteps} (the skip k = T / N must be "
                        "an integer)", f"use one of {fine}")


STRATEGY = consistency.Strategy(previous_point=forward_step, teacher=False, curriculum=curriculum)
REQUIRED, SAMPLERS = consistency.REQUIRED, consistency.SAMPLERS
EXPORT = Export(network="student", lora_section="lcd", scheduler="LCMScheduler",
                pipeline="LatentConsistencyModelPipeline", adds_w_embedding=False,
                chain=lambda config, workdir: None)  # the LCM's chain is another run's
DIGITS_EVALUATION = "samples"


def build(config, workdir: str, pipeline) -> consistency.ConsistencyObjective:
    from lcm_jax import teachers

    if config.lcd.get("lora"):
        raise UserError("config.lcd.lora is set, but LCF fine-tunes the full LCM; set "
                        "config.lcd.lora=None.")
    if config.model.get("pretrained"):  # an LCM folder
        lcm = teachers.from_pretrained(config)
        dim = lcm.net.module.config.time_cond_proj_dim
        if dim != consistency.w_embedding_dim(config):
            raise UserError(
                f"LCF fine-tunes a distilled LCM, but {config.model.pretrained}/unet has "
                f"time_cond_proj_dim={dim} and config.lcd.w_embedding_dim="
                f"{consistency.w_embedding_dim(config)}: point config.model.pretrained at an LCM "
                f"folder (e.g. LCM_Dreamshaper_v7) and set w_embedding_dim to its time_cond_proj_dim.")
    else:  # the digits LCM of README command 1
        lcm = teachers.distilled_from_chained(config, config.lcf.lcm_workdir,
                                              consistency.w_embedding_dim(config))
    return consistency.ConsistencyObjective(config, dataclasses.replace(lcm, student_net=lcm.net),
                                            STRATEGY)


def config_problems(config):
    """The consistency checks, the skip curriculum, and where the LCM comes from: a folder or a
    digits LCD workdir."""
    yield from consistency.config_problems(config)
    # T: the config's (the digits chain); an SD folder's scheduler has 1000 like its configs.
    yield from curriculum_problems(config, rules.get(config, "diffusion.num_train_timesteps", 1000))
    if rules.get(config, "lcd.lora", None):
        yield rules.bad("lcd.lora", rules.get(config, "lcd.lora").to_dict(), "is set, but LCF "
                        "fine-tunes the full LCM", "set config.lcd.lora=None")
    if rules.get(config, "model.pretrained", None):
        return
    workdir = rules.get(config, "lcf.lcm_workdir", None)
    if not workdir:
        yield ("config.lcf.lcm_workdir is missing; LCF fine-tunes a distilled LCM: point it at "
               "the workdir of README command 1 (or set config.model.pretrained to an LCM folder).")
    else:
        from lcm_jax.teachers import student_path

        if not os.path.isfile(student_path(os.path.expanduser(str(workdir)))):
            yield rules.bad("lcf.lcm_workdir", workdir, "holds no distilled student "
                            f"({student_path('W')})", "run README command 1 with that --workdir first")
