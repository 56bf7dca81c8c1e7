"""The objective contract (lcm_jax/objectives/__init__.py), checked over every registered objective:
each registry module exports what main.py, export.py and config_checks.py read, and each
objective satisfies the `Objective` Protocol and traces its state, step and samples with the
shapes the loop expects (abstractly: jax.eval_shape, nothing compiles)."""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lcm_jax import config_loading, models, objectives
from lcm_jax.objectives import conditioning, parts
from lcm_jax.objectives.diffusion import DiffusionObjective, schedule_from_config
from lcm_jax.objectives.edm import EDMObjective

CONFIGS = {"diffusion": "configs/digits_diffusion.py", "edm": "configs/digits_lego.py:pg,tiny",
           "lcd": "configs/digits_lcd.py:tiny", "tcd": "configs/digits_lcd.py:tiny",
           "lcf": "configs/digits_lcf.py:tiny", "smooth": "configs/digits_smooth.py:tiny"}
LATENT = (8, 8, 4)
B = 2


def tiny_base(config, w_embedding_dim=None, lcm=False) -> parts.Base:
    """A random latent DiT on 8x8x4 latents (no VAE: batches carry the latents); `lcm`: the
    network itself takes the w-embedding, as a distilled LCM does."""
    stage = config_loading.stage_config(config, "teacher_stage") if "teacher_stage" in config else config
    dim = w_embedding_dim or (config.lcd.get("w_embedding_dim", 256) if lcm else None)
    net = models.make_model(stage.model, LATENT[-1], dim if lcm else None)
    ints = jnp.zeros((1,), jnp.int32)
    args = (jax.random.PRNGKey(0), jnp.zeros((1,) + LATENT), ints, ints)
    params = net.init(*args, *((jnp.zeros((1, dim)),) if lcm else ()))
    student = models.make_model(stage.model, LATENT[-1], dim) if dim and not lcm else None
    return parts.Base(net, params, schedule_from_config(stage.diffusion), "epsilon",
                      conditioning.ClassConditioning(stage.model.num_classes), LATENT,
                      student_net=student if not lcm else net)


def build(name: str):
    config = config_loading.load(CONFIGS[name], [f"objective={name!r}"])
    module = objectives.module(name)
    if name == "diffusion":
        return config, DiffusionObjective(config, models.make_model(config.model, 1), (16, 16, 1))
    if name == "edm":
        return config, EDMObjective(config, models.make_model(config.model, 1), (16, 16, 1))
    if name == "smooth":
        return config, module.SmoothObjective(config, tiny_base(config))
    from lcm_jax.objectives.consistency import ConsistencyObjective

    base = tiny_base(config, lcm=name == "lcf",
                     w_embedding_dim=None if name == "lcf" else config.lcd.w_embedding_dim)
    return config, ConsistencyObjective(config, base, module.STRATEGY)


def example_batch(objective) -> dict:
    shape = getattr(objective, "image_shape", None) or objective.latent.shape
    key = "image" if shape[-1] == 1 else "latents"
    return {key: np.zeros((B,) + tuple(shape), np.float32), "label": np.arange(B, dtype=np.int32)}


@pytest.mark.parametrize("name", sorted(objectives.REGISTRY))
def test_registry_module_contract(name):
    module = objectives.module(name)
    assert callable(module.build) and callable(module.config_problems)
    assert isinstance(module.REQUIRED, tuple) and module.SAMPLERS
    assert module.DIGITS_EVALUATION in ("few_step_table", "samples")
    assert module.EXPORT is None or isinstance(module.EXPORT, objectives.Export)
    config = config_loading.load(CONFIGS[name], [f"objective={name!r}"])
    problems = list(module.config_problems(config))
    assert all(isinstance(p, str) for p in problems)


def test_unknown_objective_names_the_registry():
    with pytest.raises(ValueError, match="'lcdd' is not a known objective; use one of"):
        objectives.module("lcdd")


@pytest.mark.parametrize("name", sorted(objectives.REGISTRY))
def test_objective_protocol_and_abstract_step(name):
    config, objective = build(name)
    assert isinstance(objective, objectives.Objective)
    frozen = jax.eval_shape(lambda: objective.frozen)
    state = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0), frozen)
    batch = objective.prepare_batch(example_batch(objective))
    new_state, metrics = jax.eval_shape(objective.train_step, state, batch, frozen)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert "loss" in metrics and "grad_norm" in metrics and metrics["loss"].shape == ()
    loss, (aux_metrics, stats) = jax.eval_shape(objective.loss, state.params, state, batch, frozen,
                                                jax.random.PRNGKey(1))
    assert loss.shape == () and jax.tree.structure(stats) == jax.tree.structure(state.stats)
    sample_config = ml_collections.ConfigDict(dict(config.sample))
    images, labels = jax.eval_shape(lambda p, f, rng: objective.sample_fn(p, f, rng, 3, sample_config),
                                    state.params, frozen, jax.random.PRNGKey(2))
    assert images.shape[0] == labels.shape[0] == 3


def test_the_family_differs_only_by_strategy():
    """LCD, TCD and LCF are one class; their strategies say how the pair is made."""
    from lcm_jax.objectives import lcd, lcf, tcd

    assert lcd.STRATEGY.previous_point is tcd.STRATEGY.previous_point
    assert lcd.STRATEGY.end_time is None and tcd.STRATEGY.end_time is not None
    assert not lcf.STRATEGY.teacher and lcf.STRATEGY.previous_point is not lcd.STRATEGY.previous_point
    types = {type(build(name)[1]) for name in ("lcd", "tcd", "lcf")}
    assert len(types) == 1
    assert dataclasses.is_dataclass(lcd.STRATEGY)
