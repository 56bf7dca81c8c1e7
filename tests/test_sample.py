"""experiments/sample.py from a run's workdir: PNGs per image plus a grid, the seconds per image,
other canvases for models trained from scratch, and one-line errors for flags of the other
source. The run is the tiny digits DDPM (a DiT), trained here in-process."""
import os
import subprocess
import sys

import pytest
from PIL import Image

import tiny_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, WANDB_MODE="disabled")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from lcm_jax import train

    path = str(tmp_path_factory.mktemp("run"))
    config = tiny_run.tiny_config()
    objective, pipeline = tiny_run.build(config)
    train.run(config, path, objective, pipeline)
    return path


def sample(*args):
    return subprocess.run([sys.executable, "-m", "experiments.sample", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_samples_a_workdir_on_its_canvas_and_a_wider_one(workdir, tmp_path):
    proc = sample("--workdir", workdir, "--num", "3", "--steps", "2", "--out", str(tmp_path / "a"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "a")) == ["0000.png", "0001.png", "0002.png", "grid.png"]
    assert Image.open(tmp_path / "a" / "0001.png").size == (16, 16)
    assert "s per image (3 images" in proc.stdout
    proc = sample("--workdir", workdir, "--num", "2", "--steps", "2", "--width", "32",
                  "--weights", "online", "--out", str(tmp_path / "b"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Image.open(tmp_path / "b" / "0000.png").size == (32, 16)  # (width, height)


@pytest.mark.parametrize("args, words", [
    (["--prompt", "a cat"], "--prompt is for --model folders"),
    (["--lora", "."], "--lora is for --model folders"),
    (["--shifted_tiles"], "--shifted_tiles moves a LEGO tile grid; this run's model is 'dit'"),
])
def test_flags_of_the_other_source_are_one_line_errors(workdir, tmp_path, args, words):
    proc = sample("--workdir", workdir, *args, "--out", str(tmp_path / "c"))
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and words in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "c").exists()
