"""The training loop: end to end, exact resume after kill -9, SIGTERM, corrupt checkpoints, NaN.

Fault-injection runs happen in fresh processes (tests/tiny_run.py) so that a real SIGKILL can
land in the middle of a run.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import tiny_run  # noqa: E402
from conftest import with_devices  # noqa: E402

ENV = dict(os.environ, WANDB_MODE="disabled", JAX_PLATFORMS="cpu")


def run_tiny(workdir, *args, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests/tiny_run.py"), str(workdir),
                           *args], env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"tiny_run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def load_params(workdir):
    with np.load(os.path.join(workdir, "final_params.npz")) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_tiny(workdir)
    return workdir


@pytest.mark.slow
def test_run_writes_checkpoints_metrics_and_samples(uninterrupted):
    steps = sorted(int(d) for d in os.listdir(uninterrupted / "checkpoints") if d.isdigit())
    assert steps == [2, 4, 6]  # every 2 steps, keep 3
    lines = [json.loads(l) for l in open(uninterrupted / "metrics.jsonl")]
    assert [l["step"] for l in lines] == [2, 4, 6]
    assert all(np.isfinite(l["loss"]) and l["loss"] > 0 for l in lines)
    assert os.path.exists(uninterrupted / "samples_0000006.png")


@pytest.mark.slow
def test_kill_9_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    proc = run_tiny(tmp_path, "--kill-at", "3", check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "final_params.npz")
    run_tiny(tmp_path)  # resumes from the step-2 checkpoint
    ours, ref = load_params(tmp_path), load_params(uninterrupted)
    assert ours.keys() == ref.keys()
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


@pytest.mark.slow
def test_sigterm_saves_and_exits(tmp_path):
    run_tiny(tmp_path, "--term-at", "3")
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [2, 3]


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back(uninterrupted, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted, workdir)
    os.remove(workdir / "final_params.npz")
    newest = workdir / "checkpoints" / "6" / "state"
    for root, _, files in os.walk(newest):  # garble every file of the newest state
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    proc = run_tiny(workdir, "--config.total_steps=6")
    assert "falling back" in proc.stderr
    assert os.path.isdir(workdir / "checkpoints" / "6.corrupt")  # kept for inspection
    ours, ref = load_params(workdir), load_params(uninterrupted)
    for k in ref:  # redone from step 4: the same params again
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    from lcm_jax import train

    config = tiny_run.tiny_config()
    objective, pipeline = tiny_run.build(config)
    inner = pipeline.batch_at

    def poisoned(step):  # the 4th batch is all NaN
        batch = inner(step)
        return dict(batch, image=np.full_like(batch["image"], np.nan)) if step == 3 else batch

    pipeline.batch_at = poisoned
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train.run(config, str(tmp_path), objective, pipeline)
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert steps == [2]


def snapshot(folder) -> dict:
    """Every file under `folder` with its bytes: what a refused resume must leave untouched."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


@pytest.mark.slow
@pytest.mark.parametrize("change, leaf", [
    ("model.width=48", "params/blocks_0/attn/proj/kernel saved (32, 32) float32, now (48, 48)"),
    ("model.depth=2", "params/blocks_1/attn/proj/kernel new in this run"),
])
def test_changed_model_refuses_to_resume_and_touches_nothing(uninterrupted, tmp_path, change, leaf):
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted, workdir)
    before = snapshot(workdir)
    proc = run_tiny(workdir, f"--config.{change}", "--config.total_steps=8", check=False)
    assert proc.returncode != 0
    assert "CheckpointMismatch" in proc.stderr and leaf in proc.stderr, proc.stderr[-3000:]
    assert "--workdir" in proc.stderr  # the fix: another workdir, or the old config
    assert snapshot(workdir) == before  # nothing renamed, nothing written, config.json kept


@pytest.mark.slow
def test_changed_schedule_resumes_and_keeps_the_old_config(uninterrupted, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(uninterrupted, workdir)
    old_config = (workdir / "config.json").read_text()
    proc = run_tiny(workdir, "--config.total_steps=8")
    assert "total_steps: 6 -> 8" in proc.stderr  # the changed fields, printed at start-up
    assert (workdir / "config.6.json").read_text() == old_config  # the history is kept
    assert json.loads((workdir / "config.json").read_text())["total_steps"] == 8
    assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [4, 6, 8]
    run_tiny(workdir, "--config.total_steps=8")  # the same config again: no new history file
    assert sorted(p.name for p in workdir.glob("config*.json")) == ["config.6.json", "config.json"]


@pytest.mark.slow
def test_resume_across_device_counts(uninterrupted, tmp_path):
    """orbax reshards: a checkpoint written on 8 devices (params FSDP-sharded 8 ways) resumes on
    1, and one written on 1 resumes on 8. Different device counts reduce in another order, so
    the final params match the 1-device run to float32 round-off, not bitwise."""
    eight = with_devices(ENV, 8)
    sharded = ["--config.parallel.fsdp=8", "--config.parallel.data=1", "--config.parallel.fsdp_min_size=0"]
    ref = load_params(uninterrupted)
    for name, first, then in (("8_to_1", eight, ENV), ("1_to_8", ENV, eight)):
        workdir = tmp_path / name
        for env, stop in ((first, ["--term-at", "4"]), (then, [])):  # SIGTERM saves step 4
            proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests/tiny_run.py"),
                                   str(workdir), *stop, *(sharded if env is eight else [])],
                                  env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
        assert "parallel.fsdp" in proc.stderr  # the resume saw (and printed) the mesh change
        ours = load_params(workdir)
        for k in ref:  # a few hundred float32 ops per param: 1e-5 is ~100 ulps of O(1) values
            np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_a_failing_final_evaluation_loses_nothing(tmp_path):
    """The final checkpoint and the run's outputs (on_trained) are written before the final
    evaluation, so its failure costs only the table."""
    from lcm_jax import train

    config = tiny_run.tiny_config()
    objective, pipeline = tiny_run.build(config)
    trained = []

    def boom(step, params, frozen):
        raise RuntimeError("scorer weights missing")

    with pytest.raises(RuntimeError, match="scorer weights missing"):
        train.run(config, str(tmp_path), objective, pipeline, evaluate=boom,
                  on_trained=lambda final: trained.append(int(final.step)))
    assert trained == [6]
    assert "6" in os.listdir(tmp_path / "checkpoints")


class _Guarded:
    """A module stand-in (os, os.path) whose file-system functions refuse paths inside `root`."""

    def __init__(self, module, root):
        self._module, self._root = module, str(root)

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if name == "path":
            return _Guarded(value, self._root)
        if not callable(value) or name in ("basename", "dirname", "join", "split", "fspath"):
            return value  # string operations: as valid on gs://bucket/run as on a folder

        def guarded(*args, **kwargs):
            for a in (*args, *kwargs.values()):
                if isinstance(a, (str, os.PathLike)) and os.fspath(a).startswith(self._root):
                    raise AssertionError(f"{self._module.__name__}.{name}({a!r}) on the workdir: "
                                         "use lcm_jax.paths / epath (gs:// workdirs)")
            return value(*args, **kwargs)
        return guarded


@pytest.mark.slow
def test_the_loop_touches_the_workdir_only_through_epath(tmp_path, monkeypatch):
    """A bucket (gs://) has no os.path / open: the loop, checkpoints, config.json, metrics,
    sample grids and W&B's run id must go through epath. Here a local workdir stands in for the
    bucket and the modules' own os / open refuse it."""
    from lcm_jax import tracking, train

    workdir = tmp_path / "bucket" / "run"
    for module in (train, tracking):
        monkeypatch.setattr(module, "os", _Guarded(os, workdir))
        monkeypatch.setattr(module, "open", _Guarded(__import__("builtins"), workdir).open,
                            raising=False)
    config = tiny_run.tiny_config(["wandb.mode='offline'"])
    objective, pipeline = tiny_run.build(config)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train.run(config, str(workdir), objective, pipeline)
    names = set(os.listdir(workdir))
    assert {"checkpoints", "config.json", "metrics.jsonl", "samples_0000006.png", "wandb_run_id"} <= names
    train.run(config, str(workdir), objective, pipeline)  # the resume path reads through epath too
