"""Bad input, class by class (issue: the checks the config checks missed): every case exits 2
with one `error:` line naming the field, flag or file and the fix, no traceback, and nothing
trained or written. All are pre-compile checks: each process ends in seconds."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
MAIN = ["-m", "experiments.main", "--config=configs/digits_lcd.py:tiny"]


def run(args, workdir):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    return proc, errors


def tiny_pipeline_folder(folder, truncate: str) -> str:
    """An SD pipeline folder whose first-read weights file (`truncate`) is cut short."""
    import transformers
    from safetensors.numpy import save_file

    os.makedirs(os.path.join(folder, "text_encoder"))
    json.dump({"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]},
              open(os.path.join(folder, "model_index.json"), "w"))
    transformers.CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=2, vocab_size=60).to_json_file(
        os.path.join(folder, "text_encoder", "config.json"))
    path = os.path.join(folder, truncate)
    save_file({"w": np.zeros((64, 64), np.float32)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    return path


CASES = {
    # 1. stage sub-configs, checked before the chain's first stage
    "teacher_lr": (MAIN + ["--config.teacher_stage.optimizer.lr=-1.0"], "config.teacher_stage.optimizer.lr=-1.0"),
    "vae_batch": (MAIN + ["--config.vae_stage.batch_size=0"], "config.vae_stage.batch_size=0"),
    "teacher_steps": (MAIN + ["--config.teacher_stage.total_steps=0"], "config.teacher_stage.total_steps=0"),
    # 2. the eval and sample sections, read only at the end or every few steps
    "eval_num": (MAIN + ["--config.eval.num_samples=0"], "config.eval.num_samples=0"),
    "eval_steps": (MAIN + ["--config.eval.steps=[0, 2]"], "config.eval.steps=[0, 2]"),
    "sample_num": (MAIN + ["--config.sample.num_images=0"], "config.sample.num_images=0"),
    # 3. the scripts' flags
    "sample_steps": (["-m", "experiments.sample", "--model", ".", "--prompt", "x", "--steps", "0"], "--steps"),
    "sample_gamma": (["-m", "experiments.sample", "--model", ".", "--prompt", "x", "--gamma", "2"], "--gamma"),
    "sample_out": (["-m", "experiments.sample", "--model", ".", "--prompt", "x", "--out", "README.md"], "--out"),
    "evaluate_steps": (["-m", "experiments.evaluate", "--workdir", ".", "--steps", "1,x"], "--steps"),
    "evaluate_num": (["-m", "experiments.evaluate", "--workdir", ".", "--num", "0"], "--num"),
    "export_workdir": (["-m", "experiments.export", "--workdir", "/no/such/run", "--out", "o"], "--workdir"),
    # 5. unknown override fields, in main.py and in a config file's own fields
    "unknown_field": (MAIN + ["--config.eval.gama=0.3"], "did you mean config.eval.gamma"),
    "unknown_section": (MAIN + ["--config.optimiser.lr=0.1"], "did you mean config.optimizer"),
    "wrong_type": (MAIN + ["--config.total_steps=many"], "config.total_steps holds a int"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(name, tmp_path):
    args, words = CASES[name]
    args = [a.replace("--out", "--out") for a in args]
    workdir = tmp_path / "w"
    if args[:2] == ["-m", "experiments.main"]:
        args = args + [f"--workdir={workdir}"]
    proc, errors = run(args, workdir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and words in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists() and not os.path.exists(os.path.join(ROOT, "o"))


@pytest.mark.parametrize("weights", ["text_encoder/model.safetensors"])
def test_a_truncated_weights_file_is_named(tmp_path, weights):
    """4. corrupt weights: the file is named, said to be truncated or corrupt, re-copying advised."""
    path = tiny_pipeline_folder(str(tmp_path / "sd"), weights)
    proc, errors = run(["-m", "experiments.sample", "--model", str(tmp_path / "sd"), "--prompt", "x",
                        "--out", str(tmp_path / "out")], None)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert path in errors[0] and "truncated or corrupt" in errors[0] and "copy it again" in errors[0]
    assert not (tmp_path / "out").exists()


def test_truncated_files_are_named_by_every_loader(tmp_path):
    from lcm_jax.errors import UserError
    from lcm_jax.models import convert, lora

    path = tiny_pipeline_folder(str(tmp_path / "sd"), "text_encoder/model.safetensors")
    with pytest.raises(UserError, match="model.safetensors is truncated or corrupt"):
        convert.load_state_dict(os.path.dirname(path))
    os.replace(path, tmp_path / lora.WEIGHTS_NAME)
    with pytest.raises(UserError, match=f"{lora.WEIGHTS_NAME} is missing, truncated or corrupt"):
        lora.load(str(tmp_path))
    (tmp_path / "sd" / "text_encoder" / "config.json").write_text('{"hidden_size": 8,')
    with pytest.raises(UserError, match="config.json is not valid JSON"):
        convert.read_config(str(tmp_path / "sd" / "text_encoder"))


def test_a_cached_stage_of_another_model_is_refused(tmp_path):
    """The digits chain reuses finished stages: a changed model field must not half-load them."""
    import jax
    import jax.numpy as jnp

    from lcm_jax import teachers
    from lcm_jax.errors import UserError

    params = {"dense": {"kernel": jnp.zeros((4, 32)), "bias": jnp.zeros((32,))}}
    teachers.save_params(str(tmp_path / "ema_params.msgpack"), params)
    wider = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[:-1] + (48,), a.dtype), params)
    with pytest.raises(UserError, match=r"dense/kernel saved \(4, 32\) float32, now \(4, 48\).*new --workdir"):
        teachers.load_params(str(tmp_path / "ema_params.msgpack"), wider)
    assert teachers.load_params(str(tmp_path / "ema_params.msgpack"), params)["dense"]["kernel"].shape == (4, 32)
