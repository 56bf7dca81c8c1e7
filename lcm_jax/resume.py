"""`--resume_from`: start a workdir from another machine's checkpoint, then resume as usual.

  wandb:ENTITY/PROJECT/RUNID  the run's newest `checkpoint-RUNID` artifact (logged with
                              `wandb.log_checkpoints=True`; lcm_jax/tracking.py), downloaded
  DIR                         an artifact already downloaded (`wandb artifact get ...`) or any
                              folder laid out as one: checkpoints/STEP/, optionally config.json
                              and wandb_run_id (then W&B continues the same run)

The workdir must be empty of checkpoints: a workdir that has its own resumes from them by itself,
and is refused here rather than overwritten. Rerunning the same command (e.g. after a kill) is
not a conflict: W/resumed_from records the source, and the workdir resumes from its own newest
checkpoint. The checkpoint lands in W/checkpoints/STEP by one rename, so a killed fetch leaves
nothing behind that a rerun would read.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile

from lcm_jax import errors, paths

WANDB = re.compile(r"^wandb:([^/\s]+)/([^/\s]+)/([^/\s]+)$")
FLAG = "--resume_from"


def check(source: str) -> None:
    """A UserError unless `source` is wandb:ENTITY/PROJECT/RUNID or a checkpoint folder."""
    if source.startswith("wandb:"):
        if not WANDB.match(source):
            raise errors.UserError(f"{FLAG} {source!r} is not wandb:ENTITY/PROJECT/RUNID "
                                   "(e.g. wandb:my-team/lcm_jax/1a2b3c4d5e6f)")
        return
    _newest_step(source)


def prepare(source: str, workdir: str) -> int | None:
    """Puts the source's newest checkpoint into `workdir`; returns its step, or None when the
    workdir was already started from `source` (it then resumes from its own checkpoints)."""
    check(source)
    workdir = paths.path(workdir)
    marker = workdir / "resumed_from"
    if marker.exists() and marker.read_text().strip() == source:
        return None
    held = _steps(workdir / "checkpoints")
    if held:
        raise errors.UserError(
            f"{FLAG} {source}: {workdir} already holds checkpoints (newest step {max(held)}) and "
            "resumes from them by itself; drop --resume_from, or give a new --workdir")
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(workdir), prefix=".resume-") as scratch:
        folder = _fetch(source, scratch)
        step = _newest_step(folder)
        (workdir / "checkpoints").mkdir(exist_ok=True)
        staged = os.path.join(scratch, "staged")
        shutil.copytree(os.path.join(folder, "checkpoints", str(step)), staged)
        os.replace(staged, str(workdir / "checkpoints" / str(step)))  # one rename: all or nothing
        for name in ("config.json", "wandb_run_id"):
            if os.path.exists(os.path.join(folder, name)) and not (workdir / name).exists():
                paths.write_atomic(workdir / name, open(os.path.join(folder, name)).read())
    paths.write_atomic(marker, source)
    return step


def _fetch(source: str, scratch: str) -> str:
    """The folder holding checkpoints/STEP for `source` (a wandb: source is downloaded)."""
    match = WANDB.match(source)
    if not match:
        return source
    from lcm_jax import tracking

    try:
        return tracking.download_checkpoint(*match.groups(), root=os.path.join(scratch, "artifact"))
    except Exception as e:  # noqa: BLE001 -- wandb's errors (no such run, no login, offline)
        raise errors.UserError(
            f"{FLAG} {source}: cannot download its checkpoint artifact ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); check the run path, `wandb login`, and that "
            "the run logged checkpoints (wandb.log_checkpoints=True)") from None


def _steps(folder) -> list[int]:
    folder = paths.path(folder)
    if not folder.is_dir():
        return []
    return [int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()]


def _newest_step(folder: str) -> int:
    steps = _steps(os.path.join(folder, "checkpoints"))
    if not steps:
        raise errors.UserError(
            f"{FLAG} {folder}: no checkpoints/STEP folder in it; give wandb:ENTITY/PROJECT/RUNID "
            "or a downloaded checkpoint artifact (a folder with checkpoints/STEP/)")
    return max(steps)
