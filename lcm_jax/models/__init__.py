"""Models registry: config.model.name -> a Flax Linen module."""


def make_model(model_config, in_channels: int):
    name = model_config.name
    if name == "dit":
        from lcm_jax.models import dit

        return dit.from_config(model_config, in_channels)
    raise ValueError(f"config.model.name={name!r} is not available yet; available: 'dit'.")
