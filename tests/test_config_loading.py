"""The one override syntax (--config.FIELD=VALUE): every field settable, bad names and values
refused with the nearest fields, and main.py's errors printed as one line, no traceback."""
import os
import subprocess
import sys

import pytest

from lcm_jax import config_loading
from lcm_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_LCD = os.path.join(ROOT, "configs/digits_lcd.py:tiny")


def test_fields_that_default_to_none_or_hold_sequences_are_settable():
    config = config_loading.load(DIGITS_LCD, [
        "lcd.lora={'rank': 4, 'alpha': 4}",  # None on digits: LCM-LoRA on digits
        "model.clip_skip=2",  # an SD field this config lacks
        "eval.steps=(1, 2)",
        "optimizer.lr=3e-4", "optimizer.warmup_steps=5", "total_steps=7",
        "data.name=digits", "model.remat=true", "eval.sampler_kwargs.eta=0.5",
        "teacher_stage.model.width=64"])
    assert config.lcd.lora.rank == 4 and config.model.clip_skip == 2
    assert tuple(config.eval.steps) == (1, 2)
    assert config.optimizer.lr == 3e-4 and config.optimizer.warmup_steps == 5
    assert config.total_steps == 7 and config.model.remat is True
    assert config.eval.sampler_kwargs.eta == 0.5  # a free-form section
    # a stage section starts from the top level's: only the width differs
    assert config.teacher_stage.model.to_dict() == dict(config.model.to_dict(), width=64)
    assert config.is_locked


def test_split_argv_takes_both_spellings():
    rest, overrides = config_loading.split_argv(
        ["--workdir=w", "--config.total_steps=3", "--config.seed", "4", "--config=c.py"])
    assert rest == ["--workdir=w", "--config=c.py"]
    assert overrides == ["total_steps=3", "seed=4"]


@pytest.mark.parametrize("override, words", [
    ("eval.gama=0.3", ["config.eval.gama is no field", "config.eval.gamma"]),
    ("lcd.w_mn=1", ["did you mean config.lcd.w_min"]),
    ("optimizer.lr=fast", ["config.optimizer.lr holds a float", "give a float"]),
    ("total_steps=1.5", ["config.total_steps holds a int"]),
    ("total_steps", ["not FIELD=VALUE"]),
    ("lcd.w_min.x=1", ["config.lcd.w_min is a value"]),
])
def test_bad_overrides_name_the_field_and_the_fix(override, words):
    with pytest.raises(UserError) as error:
        config_loading.load(DIGITS_LCD, [override])
    assert all(w in str(error.value) for w in words), str(error.value)
    assert "\n" not in str(error.value)


def test_main_prints_one_line_errors_and_writes_nothing(tmp_path):
    """Bad input through the real CLI: exit 2, `error: ...` on one line, no traceback, no
    workdir (these checks run before anything is built)."""
    cases = [(["--config.eval.gama=0.3"], "did you mean config.eval.gamma"),
             (["--config.eval.gamma=2.0"], "config.eval.gamma=2.0 must be in [0, 1]"),
             (["--config.optimizer.lr=-1"], "config.optimizer.lr=-1.0 must be > 0"),
             (["--config=configs/no_such.py"], "no config file")]
    for args, words in cases:
        workdir = tmp_path / "w"
        argv = [sys.executable, "-m", "experiments.main",
                f"--config={DIGITS_LCD}", f"--workdir={workdir}", *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env=dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled"))
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and words in proc.stderr, proc.stderr[-2000:]
        assert not workdir.exists()
