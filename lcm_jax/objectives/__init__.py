"""Objectives registry: config.objective -> an object with frozen / init_state / train_step / sample_fn.

Objectives trained from scratch are built here from a model; distillation objectives also need a
teacher (`lcm_jax.teachers`): experiments/main.py builds LCD as `lcd.LCDObjective(config, teacher)`.
"""


def make_objective(config, model, image_shape):
    name = config.objective
    if name == "diffusion":
        from lcm_jax.objectives.diffusion import DiffusionObjective

        return DiffusionObjective(config, model, image_shape)
    if name == "edm":  # EDM-preconditioned training: LEGO stacks (every brick supervised), DiT
        from lcm_jax.objectives.edm import EDMObjective

        return EDMObjective(config, model, image_shape)
    if name == "lcd":
        raise ValueError("config.objective='lcd' distils a teacher: build it with "
                         "lcm_jax.objectives.lcd.LCDObjective(config, lcm_jax.teachers.from_pretrained("
                         "config)) (experiments/main.py does).")
    raise ValueError(f"config.objective={name!r} is not implemented yet; available: 'diffusion', 'edm', 'lcd'.")
