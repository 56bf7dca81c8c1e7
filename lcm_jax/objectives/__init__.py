"""Objectives: `config.objective` -> a module in REGISTRY -> the objective the train loop runs.

Adding an objective is one module here plus one REGISTRY line. The module exports:

  build(config, workdir, pipeline) -> Objective   everything it needs, from the config (a teacher
                                                  from a diffusers folder or the digits chain,
                                                  trained in `workdir` first when absent)
  config_problems(config) -> iterator of str      its own config section, one line per problem
                                                  (field, value, fix); lcm_jax.config_checks
                                                  runs it with the generic checks
  REQUIRED                                        dotted fields it reads without a default
  SAMPLERS                                        the names config.sample/eval.sampler may take
  DIGITS_EVALUATION                               on the digits: "few_step_table" (a student vs
                                                  its teacher's solvers) or "samples" (FD-digits)
  EXPORT: Export | None                           what experiments/export.py writes for it

The objective itself (`Objective` below) is what `train.Program` compiles: `init_state` and
`train_step` (ONE jitted program, state donated, `frozen` passed in sharded, never closed over),
`sample_fn` for sample grids and evaluation. Objectives are composed of `parts` (Base, LatentSpace,
Network) and share `common.train_step`; none subclasses another.
"""
from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any, Callable, Protocol, runtime_checkable

REGISTRY = {  # config.objective -> the module that owns it
    "diffusion": "lcm_jax.objectives.diffusion",
    "edm": "lcm_jax.objectives.edm",
    "lcd": "lcm_jax.objectives.lcd",
    "tcd": "lcm_jax.objectives.tcd",
    "lcf": "lcm_jax.objectives.lcf",
    "smooth": "lcm_jax.objectives.smooth",
}


def module(name: str) -> ModuleType:
    """The module REGISTRY names for `config.objective` (imported on first use)."""
    if name not in REGISTRY:
        from lcm_jax.errors import UserError

        raise UserError(f"config.objective={name!r} is not a known objective; use one of "
                        f"{tuple(REGISTRY)}.")
    return importlib.import_module(REGISTRY[name])


def build(config, workdir: str, pipeline) -> "Objective":
    """The objective `config.objective` names, built for `config` (see the module contract)."""
    return module(config.objective).build(config, workdir, pipeline)


@runtime_checkable
class Objective(Protocol):
    """What `train.run` and the evaluations call. `frozen`: the networks the step reads and never
    trains ({"base": ..., "vae": ..., encoders}), passed to every program as an argument."""
    frozen: dict
    tx: Any  # optax.GradientTransformation

    def prepare_batch(self, batch: dict) -> dict:
        """Host side, before the batch is put on devices (e.g. captions -> token ids)."""

    def init_state(self, rng, frozen):
        """The TrainState (params, optimizer, EMA, rng, stats)."""

    def train_step(self, state, batch, frozen, axis_name: str | None = None):
        """(new state, metrics): `common.train_step` with the objective's loss."""

    def loss(self, params, state, batch, frozen, rng, axis_name: str | None = None):
        """(loss, (metrics, stats))."""

    def sample_fn(self, params, frozen, rng, num_images: int, sample_config):
        """(images in [-1, 1], labels) of the trained network."""

    def save_outputs(self, workdir: str, params) -> None:
        """What later runs read (a digits student, a Smooth export), written when training ends."""


@dataclasses.dataclass(frozen=True)
class Export:
    """What experiments/export.py writes for an objective's run.

    network: the trained network's folder name in a digits export.
    lora_section: the config section whose `lora` says LoRA vs full params.
    scheduler: the diffusers scheduler class the export names (None: the base's own).
    pipeline: the pipeline class of a full SD 1.x/2.x export (None: the teacher's class).
    adds_w_embedding: the exported UNet adds `time_cond_proj` (an LCM base already has it).
    full_pipeline: whether a full-parameter run on an SD folder exports as a pipeline folder.
    chain: the digits workdir whose VAE / teacher stages must be finished (None: none)."""
    network: str
    lora_section: str
    scheduler: str | None = None
    pipeline: str | None = None
    adds_w_embedding: bool = True
    full_pipeline: bool = True
    chain: Callable = lambda config, workdir: workdir
