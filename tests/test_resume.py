"""--resume_from (lcm_jax/resume.py) on folders: what it fetches, what it refuses, and that a
refusal touches nothing. The exact resume from a logged artifact is in test_tracking.py."""
import os
import subprocess
import sys

import pytest

from lcm_jax import errors, resume

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def artifact(root, steps=(2, 4), run_id="run123"):
    """A downloaded checkpoint artifact's layout, with marker files standing in for orbax's."""
    for step in steps:
        os.makedirs(root / "checkpoints" / str(step))
        (root / "checkpoints" / str(step) / "state").write_text(f"step {step}")
    (root / "config.json").write_text("{}")
    (root / "wandb_run_id").write_text(run_id)
    return str(root)


def listing(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_the_newest_checkpoint_and_the_run_id_land_in_the_workdir(tmp_path):
    source = artifact(tmp_path / "artifact")
    workdir = tmp_path / "w"
    assert resume.prepare(source, str(workdir)) == 4
    assert listing(workdir) == ["checkpoints/4/state", "config.json", "resumed_from", "wandb_run_id"]
    assert (workdir / "wandb_run_id").read_text() == "run123"
    assert resume.prepare(source, str(workdir)) is None  # a rerun of the same command


def test_a_workdir_with_its_own_checkpoints_is_refused_untouched(tmp_path):
    workdir = tmp_path / "w"
    artifact(workdir, steps=(7,), run_id="mine")
    before = {p: open(os.path.join(workdir, p)).read() for p in listing(workdir)}
    with pytest.raises(errors.UserError, match=r"already holds checkpoints \(newest step 7\).*new --workdir"):
        resume.prepare(artifact(tmp_path / "artifact"), str(workdir))
    assert {p: open(os.path.join(workdir, p)).read() for p in listing(workdir)} == before


@pytest.mark.parametrize("source, message", [
    ("wandb:team/project", "is not wandb:ENTITY/PROJECT/RUNID"),
    ("/nonexistent/folder", "no checkpoints/STEP folder in it"),
])
def test_bad_sources_are_named(source, message):
    with pytest.raises(errors.UserError, match=message):
        resume.check(source)


def test_a_wandb_run_downloads_its_latest_checkpoint_artifact(tmp_path, monkeypatch):
    """wandb.Api is replaced by a local artifact folder: the test runs offline."""
    import shutil

    wandb = pytest.importorskip("wandb")
    local = artifact(tmp_path / "artifact", run_id="abc")
    asked = []

    class Artifact:
        def download(self, root):
            shutil.copytree(local, root)
            return root

    class Api:
        def artifact(self, name, type):
            asked.append((name, type))
            return Artifact()

    monkeypatch.setattr(wandb, "Api", Api)
    assert resume.prepare("wandb:team/lcm_jax/abc", str(tmp_path / "w")) == 4
    assert asked == [("team/lcm_jax/checkpoint-abc:latest", "checkpoint")]
    assert not [p for p in os.listdir(tmp_path / "w") if p.startswith(".resume-")]  # scratch removed


def test_the_flag_fails_in_one_line_before_anything_loads(tmp_path):
    workdir = tmp_path / "w"
    artifact(workdir, steps=(3,))
    out = subprocess.run([sys.executable, "-m", "experiments.main", "--config", "configs/digits_lcd.py",
                          "--workdir", str(workdir), "--resume_from", "wandb:a/b"],
                         cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("error: --resume_from 'wandb:a/b' is not")
