"""Objectives registry: config.objective -> an object with init_state / train_step / sample_fn."""


def make_objective(config, model, image_shape):
    name = config.objective
    if name == "diffusion":
        from lcm_jax.objectives.diffusion import DiffusionObjective

        return DiffusionObjective(config, model, image_shape)
    raise ValueError(f"config.objective={name!r} is not implemented yet; available: 'diffusion'.")
