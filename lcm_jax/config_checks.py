"""Checks a full experiment config before anything is built or compiled.

`validate(config)` collects every problem it finds and raises one `ConfigError` with a line per
problem; each line names the field (`config.diffusion.prediction_type`), the bad value and the fix,
so a researcher fixes them all in one go. It returns None when the config is good.

A field that no config in configs/ has is a problem (a misspelling; the line names the nearest
fields): a new objective adds its fields to its config there. The fields the train loop always
reads are required (`REQUIRED`, plus the objective module's own); every other check runs only
when its field is set. Here: the mesh, batch, optimizer, sampling counts, loop and path checks;
each objective checks its own section (`objectives.REGISTRY` modules' `config_problems`) and
the models theirs (`models.checks`), with the rules of `config_rules`.
"""
from __future__ import annotations

import importlib.util
import os

import jax

from lcm_jax import config_loading, data, objectives, tracking
from lcm_jax import config_rules as rules
from lcm_jax.config_rules import at_least, bad, choice, get, is_int, positive, present
from lcm_jax.data import webdataset
from lcm_jax.errors import UserError
from lcm_jax.eval import checks as eval_checks
from lcm_jax.models import checks as model_checks

PARALLEL_MODES = ("jit", "pmap")
REQUIRED = ("objective", "total_steps", "batch_size", "model.name", "data.name", "optimizer.lr")


class ConfigError(UserError):
    """A config that cannot run; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(problems[0] if len(problems) == 1 else
                         f"The config has {len(problems)} problems:\n" +
                         "\n".join(f"  - {p}" for p in problems))


def validate(config, *, device_count: int | None = None, process_count: int | None = None) -> None:
    """Raises ConfigError listing every problem of `config`; returns None if there are none.

    device_count / process_count default to jax.device_count() / jax.process_count() (call this
    after multi-host initialisation); the local device count is device_count // process_count
    when device_count is given, else jax.local_device_count().
    """
    process_count = jax.process_count() if process_count is None else process_count
    if device_count is None:  # reading counts initialises the backend: only here, never at import
        device_count, local_device_count = jax.device_count(), jax.local_device_count()
    else:
        local_device_count = max(device_count // process_count, 1)

    counts = (device_count, process_count, local_device_count)
    problems = [*config_loading.unknown_fields(config), *_run_problems(config, *counts)]
    for section in config_loading.STAGES:  # the chain's earlier runs, by the same rules
        if get(config, section, None):
            stage = config_loading.stage_config(config, section)
            problems += [p for p in map(_in_stage(config, section), _run_problems(stage, *counts))
                         if p not in problems]
    if problems:
        raise ConfigError(problems)


def _objective(config):
    """The objectives registry module `config.objective` names, or None (with a problem line)."""
    name = get(config, "objective")
    if present(name) and name not in objectives.REGISTRY:
        return None
    return objectives.module(name) if present(name) else None


def _run_problems(config, device_count: int, process_count: int, local_device_count: int):
    module = _objective(config)
    return [*_required(config, module), *choice(config, "objective", objectives.REGISTRY, "objective"),
            *choice(config, "data.name", data.DATASETS, "dataset"),
            *at_least(config, "data.prefetch", 0, fix="set it to the batches to read ahead, e.g. 2 (0: none)"),
            *_batch_and_mesh(config, device_count, process_count, local_device_count),
            *model_checks.config_problems(config), *_optimizer(config),
            *(module.config_problems(config) if module else ()),
            *eval_checks.config_problems(config, module.SAMPLERS if module else None), *_loop(config), *_paths(config, process_count)]


def _in_stage(config, section: str):
    """A stage's problem line, renamed to the field that set it: config.optimizer.lr of the VAE
    stage is config.vae_stage.optimizer.lr when that section sets it (otherwise the top-level
    field is at fault, and the line stays as it is, reported once)."""
    def rename(problem: str) -> str:
        field = problem.removeprefix("config.").split("=")[0].split(" ")[0]
        if problem.startswith("config.") and field.split(".")[0] in config[section]:
            return f"config.{section}.{problem.removeprefix('config.')}"
        return problem
    return rename


def _required(config, module):
    for path in REQUIRED + (module.REQUIRED if module else ()):
        if get(config, path, None) is None:
            example = "configs/digits_lego.py" if path == "edm" else "configs/digits_diffusion.py"
            yield f"config.{path} is missing; set it ({example} shows every field)."


def _mesh(config, device_count: int):
    """config.parallel.data * config.parallel.fsdp == device_count, one -1 filling the rest."""
    sizes = {axis: get(config, f"parallel.{axis}", default) for axis, default in
             (("data", -1), ("fsdp", 1))}
    wrong = [axis for axis, size in sizes.items() if not is_int(size) or (size < 1 and size != -1)]
    for axis in wrong:
        yield bad(f"parallel.{axis}", sizes[axis], "is not a mesh axis size",
                  "use a positive integer, or -1 to fill with the remaining devices")
    if wrong:
        return
    fills = [axis for axis, size in sizes.items() if size == -1]
    fixed = [size for size in sizes.values() if size != -1]
    shown = ", ".join(f"parallel.{axis}={size}" for axis, size in sizes.items())
    if len(fills) > 1:
        yield (f"config.{shown}: only one mesh axis may be -1; give the other its size "
               f"(e.g. parallel.fsdp=1).")
    elif fills and any(device_count % size for size in fixed):
        yield (f"config.{shown}: the fixed sizes do not divide the {device_count} devices; "
               f"choose sizes that divide {device_count}.")
    elif not fills and fixed[0] * fixed[1] != device_count:
        yield (f"config.{shown}: data * fsdp = {fixed[0] * fixed[1]} but there are "
               f"{device_count} devices; make the product {device_count}, or set one to -1.")


def _batch_and_mesh(config, device_count: int, process_count: int, local_device_count: int):
    yield from at_least(config, "total_steps", 1)
    batch = get(config, "batch_size")
    if present(batch) and (not is_int(batch) or batch < 1):
        yield bad("batch_size", batch, "is not a positive integer",
                  "set the global batch size, e.g. 128")
    elif present(batch):
        if batch % device_count:
            yield bad("batch_size", batch, f"is not divisible by the {device_count} devices",
                      f"use a multiple of {device_count}")
        elif batch % process_count:
            yield bad("batch_size", batch, f"is not divisible by the {process_count} processes",
                      f"use a multiple of {process_count}")
        elif (get(config, "parallel.mode") == "pmap"
              and (batch // process_count) % local_device_count):
            yield bad("batch_size", batch, f"gives a per-process batch of "
                      f"{batch // process_count} that pmap cannot split over "
                       f"{local_device_count} local devices",
                       f"use a multiple of {process_count * local_device_count}")

    yield from choice(config, "parallel.mode", PARALLEL_MODES, "parallel mode")
    if get(config, "parallel.mode", "jit") == "pmap":
        fsdp = get(config, "parallel.fsdp", 1)
        if fsdp not in (1, -1):
            yield bad("parallel.fsdp", fsdp, "needs parallel.mode='jit' (pmap replicates params)",
                      "set parallel.fsdp=1 or parallel.mode='jit'")
    else:
        yield from _mesh(config, device_count)


def _optimizer(config):
    yield from positive(config, "optimizer.lr")
    warmup, total = get(config, "optimizer.warmup_steps"), get(config, "total_steps")
    yield from at_least(config, "optimizer.warmup_steps", 0)
    if is_int(warmup) and is_int(total) and 0 <= warmup and warmup >= total >= 1:
        yield bad("optimizer.warmup_steps", warmup, f"is not below total_steps={total}",
                  f"use fewer warmup steps than {total} (e.g. {total // 10})")
    yield from positive(config, "optimizer.grad_clip", allow_none=True)
    yield from rules.in_unit_interval(config, "ema_decay", "the EMA rate", 0.999)
    yield from _accumulation(config)


def _accumulation(config):
    """optimizer.accumulate_steps = k: every *_steps field counts train steps (one batch of
    batch_size each); the optimizer updates every k-th step, on the mean gradient of k batches."""
    k = get(config, "optimizer.accumulate_steps")
    yield from at_least(config, "optimizer.accumulate_steps", 1,
                        fix="set it to an integer >= 1 (1: no accumulation)")
    if not (is_int(k) and k > 1):
        return
    batch = get(config, "batch_size")
    for path in ("total_steps", "optimizer.warmup_steps"):
        steps = get(config, path)
        if is_int(steps) and steps % k:
            yield bad(path, steps, f"is not a multiple of optimizer.accumulate_steps={k}",
                      f"it counts steps of batch_size={batch}, and an update happens every {k} "
                       f"steps (effective batch {k} x {batch}): use a multiple of {k}, "
                       f"e.g. {max(k, round(steps / k) * k)}")


def _loop(config):
    yield from at_least(config, "checkpoint.every_steps", 1)
    yield from at_least(config, "checkpoint.keep", 1)
    yield from at_least(config, "log_every_steps", 1)
    yield from choice(config, "wandb.mode", tracking.MODES, "wandb mode")


def _paths(config, process_count: int):
    """Pretrained weights and data must already be on disk: nothing is downloaded here."""
    pretrained = get(config, "model.pretrained", None)
    if pretrained:
        path = os.path.expanduser(str(pretrained))
        if not os.path.exists(path):
            yield (f"config.model.pretrained={pretrained!r} does not exist; point it at a local "
                   f"diffusers folder (weights cannot be downloaded here).")
        elif not (os.path.isfile(os.path.join(path, "config.json"))
                  or os.path.isfile(os.path.join(path, "unet", "config.json"))):
            yield (f"config.model.pretrained={pretrained!r} is not a diffusers folder (no "
                   f"config.json, no unet/config.json); point it at a model folder or a "
                   f"pipeline folder saved by diffusers.")

    vae_folder = get(config, "model.vae", None)
    if vae_folder and not os.path.isfile(os.path.join(os.path.expanduser(str(vae_folder)),
                                                      "config.json")):
        yield (f"config.model.vae={vae_folder!r} is not a diffusers AutoencoderKL folder (no "
               f"config.json); point it at a local VAE folder, e.g. /path/to/sd-v1-5/vae.")

    name, path = get(config, "data.name"), get(config, "data.path", None)
    if name not in ("folder", "webdataset"):
        if name == "tfds" and not get(config, "data.tfds_name", None):
            yield "config.data.tfds_name is missing; name a tfds dataset, e.g. 'mnist'."
        if name == "tfds" and importlib.util.find_spec("tensorflow") is None:
            yield ("config.data.name='tfds' reads through TensorFlow, which is not installed; "
                   "pip install -e \".[tf]\" (or any tensorflow).")
        return
    what = ("a folder of images" if name == "folder"
            else "the .tar shards ('/data/{00000..00099}.tar')")
    if not path:
        yield f"config.data.path is not set; point it at {what}."
    elif name == "folder" and not os.path.isdir(os.path.expanduser(str(path))):
        yield bad("data.path", path, "is not a folder", f"point it at {what}")
    elif name == "webdataset":
        try:
            shards = webdataset.list_shards(str(path))
        except ValueError as e:
            yield str(e)
        else:
            if len(shards) < process_count:
                yield bad("data.path", path, f"has {len(shards)} shards for {process_count} "
                          f"processes", "give at least one shard per process")
