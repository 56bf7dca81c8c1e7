"""Config checks of `config.sample` (the grids during training) and `config.eval` (the final
evaluation): sampler names (the objective's), step counts, guidance, sample counts. Checked with
everything else before the run starts, so a bad one never costs the training before it."""
from __future__ import annotations

from lcm_jax.config_rules import at_least, bad, choice, get, is_int, is_real, present
from lcm_jax.diffusion import samplers


def config_problems(config, sampler_names=None):
    """config.sample and config.eval: sampler name (one of the objective's), step count, guidance."""
    total = get(config, "diffusion.num_train_timesteps")
    for section in ("sample", "eval"):
        if not get(config, section, None):
            continue
        name = get(config, f"{section}.sampler")
        if sampler_names:
            yield from choice(config, f"{section}.sampler", sampler_names, "sampler")
        steps = get(config, f"{section}.num_steps")
        yield from at_least(config, f"{section}.num_steps", 1)
        if is_int(steps) and steps >= 1:
            if name in samplers.FEW_STEP:
                limit = get(config, f"{section}.original_inference_steps", 50)
                if is_int(limit) and steps > limit:
                    yield bad(f"{section}.num_steps", steps, f"exceeds the {limit} "
                              f"original_inference_steps of the {name!r} sampler",
                               f"use at most {limit} steps (typically 1-8)")
            elif is_int(total) and 2 <= total < steps:
                yield bad(f"{section}.num_steps", steps,
                          f"exceeds diffusion.num_train_timesteps={total}",
                           f"use at most {total} steps")
        yield from at_least(config, f"{section}.guidance_scale", 0, integer=False,
                            fix="use 0 or more (1 = no guidance for most samplers)")
        gamma = get(config, f"{section}.gamma")
        if present(gamma) and (not is_real(gamma) or not 0 <= gamma <= 1):
            yield bad(f"{section}.gamma", gamma, "must be in [0, 1] (TCD's stochasticity: 0 "
                      "deterministic, 1 ~ LCM)", "e.g. 0.3")
        yield from choice(config, f"{section}.student_sampler", samplers.FEW_STEP, "few-step sampler")
    # The counts a run reads only at its end (eval) or every few steps (sample): checked here,
    # so a bad one never costs the training before it.
    for path in ("sample.every_steps", "sample.num_images", "eval.num_samples", "eval.batch_size",
                 "eval.teacher_steps", "eval.every_steps"):
        if present(get(config, path, None)):
            yield from at_least(config, path, 1)
    steps = get(config, "eval.steps", None)
    if present(steps) and (not isinstance(steps, (list, tuple)) or not steps
                           or not all(is_int(s) and s >= 1 for s in steps)):
        yield bad("eval.steps", steps, "is not a list of step counts >= 1", "e.g. [1, 2, 4, 8]")
