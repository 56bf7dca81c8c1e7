"""The few-step table of the LCM paper (Table 1), measured on digits.

LCM (the distilled student's EMA, w-embedding at w = guidance_scale - 1) against its teacher
sampled with DDIM, DPM-Solver and DPM-Solver++ at the same step counts and the same guidance
(classifier-free, one batched call), plus the teacher's DDIM-50. Every method starts from the
same noise (one seed). Scores: FD-digits (lower is better) and the digits classifier's accuracy
on the intended class.
"""
from __future__ import annotations

import json

import ml_collections
import numpy as np

from lcm_jax import paths
from lcm_jax.eval import sampling

# name -> (sampler, its options): the baselines with the few-step-friendly settings of diffusers'
# schedulers (DDIM from t = 999 ("trailing") down to x0; DPM-Solver(++) multistep order 2).
BASELINES = {
    "ddim": ("ddim", {"timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True}),
    "dpm": ("dpm_solver", {}),
    "dpmpp": ("dpm_solver_pp", {}),
}


def few_step_table(objective, params, frozen, eval_config, evaluator, seed: int = 0,
                   grid_dir: str | None = None) -> dict:
    """{"lcm" (or "tcd"): {"1": {"fd", "acc"}, ...}, "ddim": {...}, "dpm": {...}, "dpmpp": {...},
    "teacher_ddim50": {...}} (keys follow eval_config.steps / teacher_steps)."""
    g = eval_config.guidance_scale
    student = lambda p, f, rng, n, sc: objective.sample_fn(p, f, rng, n, sc)
    teacher = lambda p, f, rng, n, sc: objective.teacher_sample_fn(f, rng, n, sc)
    name = eval_config.get("student_sampler", "lcm")  # TCD students: "tcd" with its gamma
    runs = [(name, str(k), student, _sample_config(name, k, g, {}, eval_config.get("gamma", 0.3)))
            for k in eval_config.steps]
    for name, (sampler, kwargs) in BASELINES.items():
        runs += [(name, str(k), teacher, _sample_config(sampler, k, g, kwargs))
                 for k in eval_config.steps]
    n = eval_config.teacher_steps
    runs.append((f"teacher_ddim{n}", None, teacher, _sample_config("ddim", n, g, BASELINES["ddim"][1])))

    table = {}
    for name, steps, fn, sample_config in runs:
        sample_config.update(num_samples=eval_config.num_samples, batch_size=eval_config.batch_size)
        metrics, images = sampling.evaluate_digits(fn, params, frozen, sample_config, evaluator, seed)
        if steps is None:
            table[name] = metrics
        else:
            table.setdefault(name, {})[steps] = metrics
        if grid_dir:
            _save_grid(images[:40], paths.path(grid_dir) / f"{name}{'_' + steps if steps else ''}.png")
    return table


def _sample_config(sampler: str, steps: int, guidance: float, kwargs: dict, gamma: float = 0.3):
    return ml_collections.ConfigDict(dict(sampler=sampler, num_steps=steps, guidance_scale=guidance,
                                          sampler_kwargs=kwargs, gamma=gamma))


def _save_grid(images: np.ndarray, path: str) -> None:
    from PIL import Image

    from lcm_jax.train import image_grid

    grid = image_grid(images)
    paths.save_png(path, Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid))


def format_table(table: dict) -> str:
    """A plain-text table: one row per method, FD-digits (accuracy) per step count."""
    steps = sorted({s for v in table.values() if "fd" not in v for s in v}, key=int)
    lines = ["method        " + "".join(f"{s + ' steps':>18}" for s in steps)]
    for name, row in table.items():
        if "fd" in row:
            lines.append(f"{name:<14}{row['fd']:>10.2f} ({row['acc']:.3f})")
        else:
            lines.append(f"{name:<14}" + "".join(f"{row[s]['fd']:>10.2f} ({row[s]['acc']:.3f})"
                                               for s in steps))
    return "\n".join(lines)


def save(table: dict, path: str) -> None:
    paths.write_atomic(path, json.dumps(table, indent=2))
