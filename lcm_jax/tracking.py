"""Weights & Biases: one W&B run per workdir, continued when the workdir resumes, and grouped by
experiment (the digits chain's VAE, teacher and student runs share the student's workdir's name as
group).

Offline by default: runs land in W/wandb/offline-run-*; `wandb sync W/wandb/offline-run-*` uploads
them (a resumed workdir has several, one W&B run id). The WANDB_MODE environment variable, when set,
wins over config.wandb.mode (`WANDB_MODE=disabled` turns tracking off everywhere).

`wandb.log_checkpoints=True` logs every checkpoint as the artifact `checkpoint-RUNID` (aliases
`latest` and `step-N`; files checkpoints/N/, config.json, wandb_run_id), so that another machine
resumes the run with `experiments/main.py --resume_from wandb:ENTITY/PROJECT/RUNID`
(lcm_jax/resume.py).
"""
import os

import ml_collections

from lcm_jax import paths

MODES = ("online", "offline", "disabled")


def default_config(tags=()) -> ml_collections.ConfigDict:
    """config.wandb: empty group / name / job_type are filled in from the workdir and objective."""
    return ml_collections.ConfigDict(dict(project="lcm_jax", entity="", mode="offline",
                                          tags=tuple(tags), group="", name="", job_type="",
                                          log_checkpoints=False))


def mode(config) -> str:
    return os.environ.get("WANDB_MODE") or config.wandb.get("mode", "offline")


def flat_config(tree: dict, prefix: str = "") -> dict:
    """{"optimizer": {"lr": 1e-4}} -> {"optimizer.lr": 1e-4}: every field filterable in the W&B UI."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def start(config, workdir: str, primary: bool = True):
    """The W&B run of `workdir` (a rerun continues it), or None when tracking is off."""
    if not primary or mode(config) == "disabled":
        return None
    import wandb

    w = config.wandb
    workdir = workdir.rstrip("/")
    group = w.get("group") or group_name(workdir)
    job_type = w.get("job_type") or config.get("objective", "train")
    name = w.get("name") or (group_name(workdir) if group == group_name(workdir) else
                             f"{group}-{job_type}")
    return wandb.init(project=w.project, entity=w.get("entity") or None, mode=mode(config),
                      dir=paths.local_dir(workdir, "wandb"), config=flat_config(config.to_dict()), tags=list(w.get("tags", ())),
                      group=group, job_type=job_type, name=name, id=run_id(workdir),
                      resume="allow", settings=wandb.Settings(quiet=True))


ARTIFACT_TYPE = "checkpoint"


def artifact_name(run_id: str) -> str:
    return f"checkpoint-{run_id}"


def log_checkpoint(run, workdir, step: int, checkpoint_dir) -> None:
    """W/checkpoints/STEP (on disk: the caller waited for the save), W/config.json and
    W/wandb_run_id as one version of the run's checkpoint artifact."""
    import wandb

    artifact = wandb.Artifact(artifact_name(run.id), type=ARTIFACT_TYPE, metadata={"step": step})
    artifact.add_dir(str(checkpoint_dir), name=f"checkpoints/{step}")
    for name in ("config.json", "wandb_run_id"):
        if (paths.path(workdir) / name).exists():
            artifact.add_file(str(paths.path(workdir) / name), name=name)
    run.log_artifact(artifact, aliases=["latest", f"step-{step}"])


def download_checkpoint(entity: str, project: str, run_id: str, root: str) -> str:
    """The newest checkpoint artifact of a W&B run, downloaded into `root`; returns `root`."""
    import wandb

    artifact = wandb.Api().artifact(f"{entity}/{project}/{artifact_name(run_id)}:latest",
                                    type=ARTIFACT_TYPE)
    return artifact.download(root=root)


def group_name(workdir: str) -> str:
    """The W&B group of a workdir: its name, so that a notebook and a CLI run of the same
    workdir (a relative and an absolute path) are one experiment."""
    return os.path.basename(str(workdir).rstrip("/"))


def run_id(workdir: str) -> str:
    """Kept in W/wandb_run_id, so a resumed run continues the same W&B run."""
    path = paths.path(workdir) / "wandb_run_id"
    if not path.exists():
        import uuid

        paths.write_atomic(path, uuid.uuid4().hex[:12])
    return path.read_text().strip()


def results_rows(results: dict, path: tuple = ()) -> list[dict]:
    """Nested evaluation results -> one row per dict of numbers. A numeric last key is the step
    count: the few-step table {"lcm": {"1": {"fd", "acc"}}, "teacher_ddim50": {...}} gives rows
    (name "lcm", steps 1, fd, acc) and (name "teacher_ddim50", steps None, fd, acc)."""
    rows, numbers = [], {}
    for key, value in results.items():
        if isinstance(value, dict):
            rows += results_rows(value, path + (str(key),))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers[key] = float(value)
    if numbers:
        steps = int(path[-1]) if path and path[-1].isdigit() else None
        name = "/".join(path[:-1] if steps is not None else path)
        rows.insert(0, {"name": name, "steps": steps, **numbers})
    return rows


def results_table(results: dict):
    import wandb

    rows = results_rows(results)
    columns = ["name", "steps"] + list(dict.fromkeys(k for row in rows for k in row if k not in ("name", "steps")))
    return wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])


def log_results(config, directory: str, name: str, results: dict) -> None:
    """A study's table (e.g. experiments/lcd_ablation.py) as its own run in the study's group."""
    summary = ml_collections.ConfigDict(config.to_dict())
    summary.wandb.update(group=summary.wandb.get("group") or group_name(directory), job_type="summary",
                         name="")
    if mode(summary) == "disabled":
        return
    (paths.path(directory) / "summary").mkdir(parents=True, exist_ok=True)
    run = start(summary, f"{directory.rstrip('/')}/summary")
    if run is not None:
        run.log({name: results_table(results)})
        run.finish()
