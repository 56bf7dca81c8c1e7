"""W&B: what a run leaves in its offline run directory (config, metrics, sample grids, the eval
table, the checkpoint path and artifact, group), a resumed workdir continuing the same W&B run,
and another workdir resuming from the logged artifact (`--resume_from`) exactly."""
import json
import os

import numpy as np
import pytest

from lcm_jax import tracking

pytest.importorskip("wandb")
import tiny_run  # noqa: E402
import wandb_records  # noqa: E402

TABLE = {"lcm": {"1": {"fd": 3.0, "acc": 0.5}, "4": {"fd": 2.0, "acc": 0.75}},
         "teacher_ddim50": {"fd": 1.0, "acc": 0.9}, "notes": {"sampler": "lcm"}}


def test_results_rows_read_the_few_step_table():
    assert tracking.results_rows(TABLE) == [
        {"name": "lcm", "steps": 1, "fd": 3.0, "acc": 0.5},
        {"name": "lcm", "steps": 4, "fd": 2.0, "acc": 0.75},
        {"name": "teacher_ddim50", "steps": None, "fd": 1.0, "acc": 0.9}]


def test_flat_config():
    assert tracking.flat_config({"optimizer": {"lr": 1e-4, "betas": (0.9, 0.99)}, "seed": 0}) == {
        "optimizer.lr": 1e-4, "optimizer.betas": [0.9, 0.99], "seed": 0}


def test_environment_wins_over_the_config(monkeypatch):
    config = tiny_run.tiny_config()
    config.wandb.mode = "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.mode(config) == "disabled" and tracking.start(config, "unused") is None


@pytest.mark.slow
def test_offline_run_holds_everything_and_resumes(tmp_path, monkeypatch):
    from lcm_jax import train

    from lcm_jax import resume

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))  # offline artifact copies
    config = tiny_run.tiny_config()
    config.wandb.update(mode="offline", tags=("test",), log_checkpoints=True)
    config.total_steps, config.log_every_steps = 2, 1
    config.sample.every_steps = config.checkpoint.every_steps = 2
    workdir = str(tmp_path / "run")
    objective, pipeline = tiny_run.build(config)
    train.run(config, workdir, objective, pipeline, evaluate=lambda step, params, frozen: TABLE)
    config.total_steps = 4  # the same workdir, longer: resumes from step 2
    continued = train.run(config, workdir, objective, pipeline,
                          evaluate=lambda step, params, frozen: TABLE)

    first, second = wandb_records.read_runs(workdir)
    assert first["id"] == second["id"] == open(os.path.join(workdir, "wandb_run_id")).read()
    for run in (first, second):
        assert run["group"] == "run" and run["job_type"] == config.objective and run["name"] == "run"
        assert run["config"]["optimizer.lr"] == config.optimizer.lr  # flattened
        assert run["config"]["wandb.tags"] == ["test"]
    steps = lambda run, key: [h["_step"] for h in run["history"]
                              if any(k == key or k.startswith(key + "/") for k in h)]
    assert steps(first, "loss") == [1, 2] and steps(second, "loss") == [3, 4]  # continued
    assert steps(second, "samples") == [4] and steps(second, "eval_table") == [4]
    assert second["summary"]["eval/lcm/4/fd"] == 2.0
    assert second["summary"]["samples/caption"] == (
        "step 4: ddim, 2 steps, guidance 2.0; classes 0, 1, ... cycling")
    # The learning rate of each step's update, on the schedule the optimizer follows.
    from lcm_jax.objectives import common

    schedule = common.learning_rate(config.optimizer, 4)
    lrs = {h["_step"]: h["lr"] for h in second["history"] if "lr" in h}
    assert lrs and all(abs(lr - float(schedule(s - 1))) < 1e-9 for s, lr in lrs.items()), lrs
    checkpoint = second["summary"]["checkpoint"]
    assert checkpoint == os.path.join(workdir, "checkpoints", "4") and os.path.isdir(checkpoint)
    run_dir = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))[1]
    assert any(f.startswith("media/images/samples_") for f in second["files"])
    (table,) = (run_dir / "files" / "media" / "table").glob("eval_table_*.table.json")
    table = json.load(open(table))
    assert table["columns"] == ["name", "steps", "fd", "acc"]
    assert table["data"] == [["lcm", 1, 3.0, 0.5], ["lcm", 4, 2.0, 0.75], ["teacher_ddim50", None, 1.0, 0.9]]

    # Each checkpoint is a version of the run's artifact; a new machine resumes from it exactly.
    checkpoints = lambda run: [a for a in run["artifacts"] if a["type"] == "checkpoint"]
    (artifact,) = checkpoints(first)
    assert (artifact["type"], artifact["name"], artifact["aliases"], artifact["metadata"]) == (
        "checkpoint", f"checkpoint-{first['id']}", ["latest", "step-2"], {"step": 2})
    assert {"config.json", "wandb_run_id"} < set(artifact["files"])
    assert [a["aliases"] for a in checkpoints(second)] == [["latest", "step-4"]]
    downloaded = wandb_records.artifact_folder(artifact, str(tmp_path / "artifact"))
    elsewhere = str(tmp_path / "elsewhere")
    assert resume.prepare(downloaded, elsewhere) == 2
    assert open(os.path.join(elsewhere, "wandb_run_id")).read() == first["id"]  # the same W&B run
    pipeline = tiny_run.build(config)[1]  # a fresh pipeline: its position comes from the checkpoint
    resumed = train.run(config, elsewhere, objective, pipeline)
    ours, ref = tiny_run.flat_params(resumed), tiny_run.flat_params(continued)
    for k in ref:
        np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    assert resume.prepare(downloaded, elsewhere) is None  # the same command again: nothing to do


def test_a_study_table_is_a_summary_run_in_the_study_group(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    config = tiny_run.tiny_config()
    config.wandb.mode = "offline"
    tracking.log_results(config, str(tmp_path), "ablation", TABLE)  # experiments/lcd_ablation.py
    (run,) = wandb_records.read_runs(str(tmp_path / "summary"))
    assert (run["group"], run["job_type"], run["name"]) == (tmp_path.name, "summary", f"{tmp_path.name}-summary")
    assert any(f.startswith("media/table/ablation_") for f in run["files"])


def test_a_study_run_is_named_in_its_study_group():
    """experiments/*_digits.py: one W&B group per study (OUT's name), one run per variant."""
    from experiments import _harness

    config = _harness.in_study(tiny_run.tiny_config(), "/data/workdirs/cd_study/", "tcd")
    assert (config.wandb.group, config.wandb.name) == ("cd_study", "cd_study-tcd")
