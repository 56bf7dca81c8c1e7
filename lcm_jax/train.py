"""The one training loop.

`run(config, workdir, objective, pipeline)` owns the TrainState, the one compiled step (donated
state, shardings from parallel.py, compiled ahead of time so errors and memory are known before
the first batch), orbax checkpoints (periodic, on SIGTERM, resumed from `workdir` by itself,
falling back past a corrupt newest one), metric writers (clu, metrics.jsonl, W&B), fixed-seed
sample grids, a progress bar, and a NaN guard. It never branches on which objective runs: it
calls the `lcm_jax.objectives.Objective` contract (frozen, prepare_batch, init_state,
train_step, sample_fn). The frozen networks enter the compiled step as an input (never baked in as constants), laid out
like the params; they are not checkpointed: the objective reloads them from their source.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import models, parallel, paths, tracking
from lcm_jax.objectives import common
from lcm_jax.errors import UserError

log = logging.getLogger("lcm_jax")


@flax.struct.dataclass
class TrainState:
    step: jnp.ndarray
    params: Any
    ema_params: Any  # the EMA / target network (theta^- of consistency distillation)
    opt_state: Any
    rng: jnp.ndarray  # base key; step s uses fold_in(rng, s), so a resumed run draws the same
    stats: Any = None  # running statistics an objective keeps beside the params, checkpointed
    # with them (Smooth Diffusion's mean variation); None for most objectives

    @classmethod
    def create(cls, params, tx, rng, stats=None) -> "TrainState":
        """Step 0, the EMA at the params. The trained params are the float32 master copy whatever
        the storage dtype of the frozen networks they may start from (`model.param_dtype`)."""
        params = models.as_dtype(params, jnp.float32)
        return cls(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                   opt_state=tx.init(params), rng=rng, stats=stats)


# ==============================================================================================
# Checkpoints
# ==============================================================================================

@contextlib.contextmanager
def _quiet_absl():
    """orbax logs every file operation at INFO through absl: keep the run's log readable."""
    from absl import logging as absl_logging

    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.WARNING)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


class CheckpointMismatch(UserError):
    """The run's state no longer has the saved structure (a changed width, LoRA rank, dtype, ...):
    resuming would train a different model, so the run stops before anything is written."""


class Checkpointer:
    """orbax CheckpointManager over {state, data}: atomic (written to a temporary directory and
    renamed), asynchronous (the step loop goes on while the files are written), keeps the newest
    `keep`, restores the newest one that reads back.

    Restoring tells two failures apart. A checkpoint whose files cannot be read (truncated,
    garbled) is moved aside to N.corrupt and the previous one is tried. A checkpoint that reads
    back but whose leaves differ from the run's state (path, shape or dtype) raises
    CheckpointMismatch before anything is renamed or written. A different mesh or device count is
    neither: orbax reshards the saved arrays onto the target's shardings."""

    def __init__(self, directory: str, keep: int):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.manager = ocp.CheckpointManager(
            paths.path(directory), item_names=("state", "data"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True))

    def save(self, step: int, state, data_states: list) -> None:
        """Starts writing step `step` (the arrays are copied off the devices first, so the
        caller may donate `state` at once); `wait()` or the next save finishes it."""
        args = self.ocp.args.Composite(state=self.ocp.args.StandardSave(state),
                                       data=self.ocp.args.JsonSave({"processes": data_states}))
        with _quiet_absl():
            self.manager.save(step, args=args, force=True)

    def wait(self) -> None:
        with _quiet_absl():
            self.manager.wait_until_finished()

    def path(self, step: int):
        return self.manager.directory / str(step)

    def check(self, abstract_state) -> None:
        """Raises CheckpointMismatch if the newest readable checkpoint's leaves differ from
        `abstract_state`'s; reads metadata only, renames and writes nothing."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            saved = self._saved_leaves(step)
            if saved is None:
                continue  # unreadable: restore() moves it aside and tries the previous one
            differences = leaf_differences(saved, leaves(abstract_state))
            if differences:
                raise CheckpointMismatch(
                    f"{self.manager.directory} holds step {step} of a run whose state differs "
                    f"from this config's in {len(differences)} leaves: {'; '.join(differences[:5])}"
                    f"{'; ...' if len(differences) > 5 else ''}. Resume with the config it was "
                    f"written with (see config.json beside it), or start a new run in another "
                    f"--workdir.")
            return

    def _saved_leaves(self, step: int) -> dict | None:
        try:
            with _quiet_absl():
                metadata = self.ocp.StandardCheckpointer().metadata(self.path(step) / "state")
            return leaves(metadata.item_metadata) or None  # orbax reads garbage as empty
        except Exception:  # noqa: BLE001 -- unreadable metadata: a corrupt checkpoint
            return None

    def restore(self, abstract_state):
        """(state, data_states) from the newest readable checkpoint, or None if there is none.
        A structure mismatch raises first (`check`): it must stop the run, not count as
        corruption."""
        self.check(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                with _quiet_absl():
                    restored = self.manager.restore(step, args=self.ocp.args.Composite(
                        state=self.ocp.args.StandardRestore(abstract_state),
                        data=self.ocp.args.JsonRestore()))
                return restored.state, restored.data["processes"]
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint: try the previous
                log.warning("Checkpoint %d in %s cannot be restored (%s: %s); moving it aside to "
                            "%d.corrupt and falling back to the previous one.", step,
                            self.manager.directory, type(e).__name__, e, step)
                self._move_aside(step)
        return None

    def _move_aside(self, step: int) -> None:
        """Keep an unreadable checkpoint for inspection, out of the way of the redone step."""
        if jax.process_index() == 0:
            path = self.path(step)
            path.rename(path.parent / f"{step}.corrupt")
        self.manager.reload()


def leaves(tree) -> dict:
    """{'params/blocks_0/attn/kernel': leaf} for a TrainState, its abstract shape or orbax's
    metadata of it (dataclass fields, dict keys and sequence indices all become names)."""
    tree = flax.serialization.to_state_dict(tree)
    return {common.param_path(path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_differences(saved: dict, target: dict) -> list[str]:
    """One line per leaf that is missing, new, or of another shape or dtype."""
    describe = lambda a: f"{tuple(a.shape)} {np.dtype(a.dtype).name}"
    lines = [f"{k} saved but not in this run" for k in sorted(saved.keys() - target.keys())]
    lines += [f"{k} new in this run ({describe(target[k])})" for k in sorted(target.keys() - saved.keys())]
    lines += [f"{k} saved {describe(saved[k])}, now {describe(target[k])}"
              for k in sorted(saved.keys() & target.keys())
              if describe(saved[k]) != describe(target[k])]
    return lines


def gather_data_states(state: dict) -> list:
    """Every process's pipeline position (they differ for streamed datasets), as a list."""
    if jax.process_count() == 1:
        return [state]
    from jax.experimental import multihost_utils

    encoded = np.frombuffer(json.dumps(state).encode().ljust(4096), np.uint8)
    gathered = multihost_utils.process_allgather(encoded)
    return [json.loads(bytes(row).decode().strip()) for row in gathered]


# ==============================================================================================
# Writers
# ==============================================================================================

class Writers:
    """clu metric writer + metrics.jsonl + Weights & Biases (process 0 writes)."""

    def __init__(self, config, workdir: str):
        self.primary = jax.process_index() == 0
        self.jsonl = paths.LineLog(paths.path(workdir) / "metrics.jsonl") if self.primary else None
        self.clu = _metric_writer(workdir, self.primary)
        self.wandb = tracking.start(config, workdir, self.primary)
        self.logs_checkpoints = bool(self.wandb) and config.wandb.get("log_checkpoints", False)

    def scalars(self, step: int, metrics: dict) -> None:
        if self.clu:
            self.clu.write_scalars(step, metrics)
        if self.jsonl:
            self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def images(self, step: int, name: str, grid: np.ndarray, path: str, caption: str = "") -> None:
        if not self.primary:
            return
        from PIL import Image

        image = Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid)
        paths.save_png(path, image)
        if self.wandb:
            import wandb

            self.wandb.log({name: wandb.Image(image, caption=f"step {step}{caption}")}, step=step)

    def results(self, step: int, results: dict) -> None:
        """Evaluation results: scalars eval/<path> and one W&B table ('eval_table')."""
        self.scalars(step, {f"eval/{k}": v for k, v in _flatten(results).items()})
        if self.wandb:
            self.wandb.log({"eval_table": tracking.results_table(results)}, step=step)

    def checkpoint(self, step: int, workdir, checkpoint_dir) -> None:
        tracking.log_checkpoint(self.wandb, workdir, step, checkpoint_dir)

    def summary(self, **values) -> None:
        if self.wandb:
            self.wandb.summary.update(values)

    def close(self) -> None:
        if self.clu:
            self.clu.flush()
        if self.jsonl:
            self.jsonl.close()
        if self.wandb:
            self.wandb.finish()


def _metric_writer(workdir: str, primary: bool):
    """clu's default writer (log lines + TensorBoard files), or None without TensorFlow (clu's
    writers import it; `pip install -e ".[tf]"` adds it): metrics.jsonl and W&B still record all."""
    import importlib.util

    if importlib.util.find_spec("tensorflow") is None:
        log.warning("TensorFlow is not installed: no TensorBoard files (pip install -e \".[tf]\").")
        return None
    from clu import metric_writers

    return metric_writers.create_default_writer(str(paths.path(workdir)), just_logging=not primary,
                                                asynchronous=False)


def image_grid(images: np.ndarray, columns: int = 10) -> np.ndarray:
    """[N, H, W, C] in [-1, 1] -> one uint8 grid image."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    rows = math.ceil(n / columns)
    columns = min(columns, n)
    grid = np.ones((rows * h, columns * w, c), np.float32)
    for i, im in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = im
    return np.round((np.clip(grid, -1, 1) + 1) * 127.5).astype(np.uint8)


# ==============================================================================================
# The compiled step, for either parallel mode
# ==============================================================================================

class Program:
    """Builds the state and the step for config.parallel.mode, and moves batches and states
    between the host and the devices in the matching layout."""

    def __init__(self, config, objective, example_batch: dict, devices=None, compile=True):
        self.mode = config.parallel.get("mode", "jit")
        self.objective = objective
        self.prepare_batch = objective.prepare_batch
        example_batch = self.prepare_batch(example_batch)
        init = objective.init_state
        # The networks the step reads but never trains, stored in model.param_dtype (bfloat16 halves
        # them); the trained params stay a float32 master copy (TrainState.create).
        frozen = models.as_dtype(objective.frozen, models.DTYPES[config.model.get("param_dtype", "float32")])
        abstract_frozen = jax.eval_shape(lambda: frozen)
        self.abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0), abstract_frozen)
        if self.mode == "pmap":
            self.frozen = parallel.replicate(frozen)
            self.sample_frozen = jax.device_put(frozen)  # one copy for sample grids
            step = jax.pmap(lambda s, b, f: objective.train_step(s, b, f, parallel.PMAP_AXIS),
                            axis_name=parallel.PMAP_AXIS, donate_argnums=0)
            self.step_fn = lambda state, batch: step(state, batch, self.frozen)
            self.init_fn = lambda rng: parallel.replicate(jax.jit(init)(rng, self.sample_frozen))
            return
        self.mesh = parallel.make_mesh(config.parallel, devices)
        fsdp_min_size = config.parallel.get("fsdp_min_size", 2 ** 16)
        self.state_sharding = parallel.state_shardings(self.mesh, self.abstract_state, fsdp_min_size)
        frozen_sharding = parallel.state_shardings(self.mesh, abstract_frozen, fsdp_min_size)
        self.frozen = self.sample_frozen = parallel.put(frozen, frozen_sharding)
        self.batch_sharding = parallel.batch_sharding(self.mesh)
        init_fn = jax.jit(init, out_shardings=self.state_sharding)
        self.init_fn = lambda rng: init_fn(rng, self.frozen)
        batch_shape = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype,
                                               sharding=self.batch_sharding)
                       for k, v in example_batch.items() if v.dtype.kind not in "USO"}
        shaped = lambda tree, shardings: jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)
        self.restore_target = shaped(self.abstract_state, self.state_sharding)
        self._step_inputs = (self.restore_target, batch_shape,
                             shaped(abstract_frozen, frozen_sharding))
        if compile:
            self.compile()

    def compile(self) -> None:
        """Ahead of time (jit mode): shape and sharding errors surface here, before any data is
        read. The loop calls it after the checkpoint check, which needs only the shapes."""
        if self.mode == "pmap":
            return
        step = jax.jit(self.objective.train_step, donate_argnums=0,
                       out_shardings=(self.state_sharding, parallel.replicated(self.mesh))
                       ).lower(*self._step_inputs).compile()
        self.step_fn = lambda state, batch: step(state, batch, self.frozen)

    def device_batch(self, local_batch: dict):
        local_batch = self.prepare_batch(local_batch)
        if self.mode == "pmap":
            return parallel.pmap_batch(local_batch)
        return parallel.global_batch(local_batch, self.batch_sharding)

    def host_state(self, state):
        """The state as saved: one copy (pmap replicas collapsed)."""
        return parallel.unreplicate(state) if self.mode == "pmap" else state

    def device_state(self, state):
        return parallel.replicate(state) if self.mode == "pmap" else state

    def checkpoint_target(self):
        return self.abstract_state if self.mode == "pmap" else self.restore_target

    def host_metrics(self, metrics) -> dict:
        metrics = parallel.unreplicate(metrics) if self.mode == "pmap" else metrics
        return {k: float(v) for k, v in parallel.to_host(metrics).items()}


# ==============================================================================================
# The loop
# ==============================================================================================

def run(config, workdir: str, objective, pipeline, *, evaluate: Callable | None = None,
        on_step: Callable[[int], None] | None = None,
        on_trained: Callable[[TrainState], None] | None = None):
    """Train to config.total_steps (resuming from `workdir` if it holds checkpoints); returns
    the final TrainState. `evaluate(step, params, frozen) -> dict` runs at the end (and every
    `config.eval.every_steps` when set, on the EMA params); `on_step(step)` is called
    after every step (tests use it to inject failures); `on_trained(final)` runs once the final
    checkpoint is on disk and before the final evaluation (exports: a failing evaluation then
    loses nothing, and experiments/evaluate.py can redo it)."""
    given, workdir = str(workdir), paths.path(workdir)  # as given: W&B's default group name
    workdir.mkdir(parents=True, exist_ok=True)
    example = peek(pipeline)
    program = Program(config, objective, example, compile=False)
    checkpointer = Checkpointer(workdir / "checkpoints", config.checkpoint.keep)
    # A changed model stops here, before anything is renamed or written.
    restored = checkpointer.restore(program.checkpoint_target())
    start = 0 if restored is None else int(parallel.to_host(restored[0].step))
    program.compile()
    record_config(config, workdir, start)  # once the config is known to build and compile
    if restored is None:
        state = program.init_fn(jax.random.PRNGKey(config.seed))
    else:
        state, data_states = restored
        state = program.device_state(state)
        pipeline.set_state(data_states[jax.process_index()])
    if start:
        log.info("Resumed from step %d in %s.", start, workdir)

    writers = Writers(config, given)
    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: stop.update(signal=sig))
    sample = jax.jit(lambda p, frozen, rng: objective.sample_fn(
        p, frozen, rng, config.sample.num_images, config.sample)[0])
    total = config.total_steps
    eval_every = config.get("eval", {}).get("every_steps", None)
    bar = _progress(total, start)
    metrics, last_saved, t0 = None, start, time.time()
    try:
        # The learning rate of the update at each step, logged beside the loss (the schedule
        # counts optimizer updates: one per `optimizer.accumulate_steps` steps).
        learning_rate = common.learning_rate(config.optimizer, config.total_steps)
        updates_every = common.accumulate_steps(config.optimizer)
        for step in range(start + 1, total + 1):
            batch = program.device_batch(next(pipeline))
            state, metrics = program.step_fn(state, batch)
            bar.update(1)
            if on_step is not None:
                on_step(step)
            is_last = step == total
            if step % config.log_every_steps == 0 or is_last:
                host = program.host_metrics(metrics)
                _check_finite(host, step, last_saved)
                host.update(steps_per_sec=(step - start) / (time.time() - t0),
                            data_skipped=float(getattr(pipeline, "num_skipped", 0)),
                            lr=float(learning_rate((step - 1) // updates_every)))
                writers.scalars(step, host)
                bar.set_postfix(loss=f"{host['loss']:.4f}")
            if step % config.checkpoint.every_steps == 0 or is_last or stop["signal"]:
                _check_finite(program.host_metrics(metrics), step, last_saved)
                checkpointer.save(step, program.host_state(state),
                                  gather_data_states(pipeline.get_state()))
                last_saved = step
                writers.summary(checkpoint=str(checkpointer.path(step)), checkpoint_step=step)
                if writers.logs_checkpoints:
                    checkpointer.wait()  # the artifact copies the files: they must be written
                    writers.checkpoint(step, workdir, checkpointer.path(step))
            if step % config.sample.every_steps == 0 or is_last:
                ema = program.host_state(state).ema_params
                images = sample(ema, program.sample_frozen,
                                jax.random.PRNGKey(config.seed + 1))  # fixed seed: comparable
                writers.images(step, "samples", image_grid(parallel.to_host(images)),
                               workdir / f"samples_{step:07d}.png", sample_caption(config.sample))
            if evaluate is not None and eval_every and step % eval_every == 0 and not is_last:
                writers.results(step, evaluate(step, program.host_state(state).ema_params,
                                               program.sample_frozen))
            if stop["signal"]:
                log.warning("Stopped by signal %s at step %d; checkpoint saved.", stop["signal"], step)
                return program.host_state(state)
        bar.close()
        final = program.host_state(state)
        checkpointer.wait()
        if on_trained is not None:
            on_trained(final)
        if evaluate is not None:
            try:
                results = evaluate(total, final.ema_params, program.sample_frozen)
            except Exception:
                log.error("The run is trained and checkpointed (step %d in %s), but its final "
                          "evaluation failed; fix the cause and redo it with experiments/"
                          "evaluate.py --workdir %s.", total, workdir, workdir)
                raise
            writers.results(total, results)
        return final
    finally:
        checkpointer.wait()  # the last asynchronous save is on disk before the run returns
        signal.signal(signal.SIGTERM, previous)
        writers.close()
        getattr(pipeline, "close", lambda: None)()  # a Prefetch's thread


def record_config(config, workdir: str, step: int) -> None:
    """W/config.json is the config of the newest start (export.py and evaluate.py rebuild the
    run from it). A start with other values keeps the previous one as W/config.<step>.json, the
    step at which it stopped applying, and logs the changed fields."""
    if jax.process_index() != 0:
        return
    workdir = paths.path(workdir)
    path, text = workdir / "config.json", config.to_json_best_effort(indent=2)
    if path.exists():
        old_text = path.read_text()
        if old_text == text:
            return
        changes = config_changes(json.loads(old_text), json.loads(text))
        log.warning("The config differs from the one this workdir last ran with (kept as "
                    "config.%d.json): %s", step, "; ".join(changes) or "formatting only")
        kept, suffix = workdir / f"config.{step}.json", 1
        while kept.exists():  # several restarts at one step: keep them all
            kept, suffix = workdir / f"config.{step}.{suffix}.json", suffix + 1
        path.rename(kept)
    paths.write_atomic(path, text)


def config_changes(old: dict, new: dict) -> list[str]:
    """'field: old -> new' for every dotted field that differs between two config dicts."""
    flat_old, flat_new = _flatten_any(old), _flatten_any(new)
    show = lambda flat, k: repr(flat[k]) if k in flat else "(unset)"
    return [f"{k}: {show(flat_old, k)} -> {show(flat_new, k)}"
            for k in sorted(flat_old.keys() | flat_new.keys())
            if k not in flat_old or k not in flat_new or flat_old[k] != flat_new[k]]


def _flatten_any(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten_any(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def peek(pipeline) -> dict:
    """One batch (for shapes), leaving the pipeline's position where it was."""
    saved = pipeline.get_state()
    batch = next(pipeline)
    pipeline.set_state(saved)
    return batch


def image_shape(config, pipeline=None) -> tuple:
    """(H, W, C) of the training images: the pipeline's, or (pipeline None: to evaluate or export
    without reading data) config.data's image_size and channels (3 unless set)."""
    if pipeline is not None:
        return tuple(peek(pipeline)["image"].shape[1:])
    size = config.data.get("image_size", 16)
    return (size, size, config.data.get("channels", 3))


def sample_caption(sample_config) -> str:
    """What a sample grid shows: ': SAMPLER, N steps, guidance G; CONDITIONS' (the prompts, or
    the classes cycling from 0 along the rows)."""
    prompts = sample_config.get("prompts", None)
    conditions = "prompts " + " | ".join(prompts) if prompts else "classes 0, 1, ... cycling"
    return (f": {sample_config.sampler}, {sample_config.num_steps} steps, guidance "
            f"{sample_config.get('guidance_scale', 1.0)}; {conditions}")


def _check_finite(metrics: dict, step: int, last_saved: int) -> None:
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(
            f"Non-finite metrics {bad} at step {step}; stopping. The last good checkpoint (step "
            f"{last_saved}) is kept: lower config.optimizer.lr or check the data, then rerun to "
            f"resume from it.")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)):
            flat[f"{prefix}{k}"] = float(v)
    return flat


def _progress(total: int, start: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                disable=jax.process_index() != 0 or os.environ.get("CI") == "true")
