"""experiments/export.py against diffusers' public loaders, on a tiny random SD folder: a full LCD
student's checkpoint becomes a LatentConsistencyModelPipeline folder, an LCM-LoRA checkpoint a
pytorch_lora_weights.safetensors for pipe.load_lora_weights; diffusers' images equal ours (same
latents, same step noise). experiments/evaluate.py scores the full run with CLIP. The checkpoints are written as train.run writes them (the train step
itself is tested in test_lcd_sd), with EMA and online weights apart so the --weights flag shows."""
import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402

from configs import sd15_lcd, sd15_lcm_lora  # noqa: E402
from lcm_jax import objectives, pipeline, train  # noqa: E402
from lcm_jax.models import lora  # noqa: E402
from support.sd import PROMPT, config_for, run_diffusers  # noqa: E402

from experiments import export  # noqa: E402


def checkpointed_run(workdir, config):
    """A workdir as train.run leaves it: config.json and one checkpoint (step 3)."""
    objective = objectives.build(config, "", None)
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), objective.frozen)
    rng = np.random.default_rng(0)
    moved = lambda tree, scale: jax.tree.map(lambda x: x + scale * rng.standard_normal(x.shape).astype(x.dtype), tree)
    state = state.replace(step=state.step + 3, params=moved(state.params, 0.05),
                          ema_params=moved(state.ema_params, 0.02))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    checkpointer = train.Checkpointer(os.path.join(workdir, "checkpoints"), 2)
    checkpointer.save(3, state, [{}])
    checkpointer.wait()  # saves are asynchronous
    return state


@pytest.mark.slow
def test_full_lcd_student_exports_a_pipeline_diffusers_runs(folder, tmp_path, monkeypatch):
    config = config_for(sd15_lcd, folder)
    state = checkpointed_run(str(tmp_path / "run"), config)
    summary = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert summary["kind"] == "pipeline" and summary["step"] == 3
    with open(tmp_path / "out" / "model_index.json") as f:
        assert json.load(f)["_class_name"] == "LatentConsistencyModelPipeline"

    ours = pipeline.StableDiffusion.from_pretrained(str(tmp_path / "out"))
    exported = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                            ours.unet_params, state.ema_params)
    assert max(jax.tree.leaves(exported)) == 0.0  # the EMA weights, bit for bit
    theirs = diffusers.LatentConsistencyModelPipeline.from_pretrained(str(tmp_path / "out"))
    assert theirs.unet.config.time_cond_proj_dim == 256
    assert theirs.scheduler.config.original_inference_steps == config.lcd.num_ddim_timesteps
    expected = run_diffusers(theirs, monkeypatch, 2, 5, prompt=PROMPT, guidance_scale=8.0)
    got = ours(PROMPT, sampler="lcm", num_inference_steps=2, guidance_scale=8.0, seed=5)
    assert np.max(np.abs(got - expected)) <= 1e-4

    online = export.export(str(tmp_path / "run"), str(tmp_path / "online"), weights="online")
    assert online["weights"] == "online"


@pytest.mark.slow
def test_lcm_lora_exports_what_load_lora_weights_takes(folder, tmp_path, monkeypatch):
    config = config_for(sd15_lcm_lora, folder)
    config.lcd.lora.update(rank=16, alpha=8.0)  # above the 8-channel layers' width: a rank_pattern
    checkpointed_run(str(tmp_path / "run"), config)
    summary = export.export(str(tmp_path / "run"), str(tmp_path / "out"))
    assert summary["kind"] == "lora"

    theirs = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    theirs.scheduler = diffusers.LCMScheduler.from_pretrained(str(tmp_path / "out" / "scheduler"))
    theirs.load_lora_weights(str(tmp_path / "out"))
    expected = run_diffusers(theirs, monkeypatch, 2, 6, prompt=PROMPT, guidance_scale=1.5)

    base = pipeline.StableDiffusion.from_pretrained(folder)
    with open(tmp_path / "out" / "scheduler" / "scheduler_config.json") as f:
        ours = base.load_lora_weights(str(tmp_path / "out"))
        ours.scheduler_config = json.load(f)
    got = ours(PROMPT, sampler="lcm", num_inference_steps=2, guidance_scale=1.5, seed=6)
    untouched = base(PROMPT, sampler="lcm", num_inference_steps=2, guidance_scale=1.5, seed=6)
    assert np.max(np.abs(untouched - expected)) > 1e-3  # the adapter changes the images
    assert np.max(np.abs(got - expected)) <= 1e-4
    unmerged = dataclasses.replace(base.load_lora_weights(str(tmp_path / "out"), fuse=False),
                                   scheduler_config=ours.scheduler_config)
    assert isinstance(unmerged.unet_params, lora.Unmerged)  # one base UNet in memory
    got = unmerged(PROMPT, sampler="lcm", num_inference_steps=2, guidance_scale=1.5, seed=6)
    assert np.max(np.abs(got - expected)) <= 1e-4


def test_export_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(ValueError, match="config.json does not exist.*--config"):
        export.export(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.slow
def test_evaluate_scores_an_sd_run_with_clip(folder, tmp_path, clip):
    """experiments/evaluate.py on the full LCD run: the student at 1 step, CLIP-scored with a
    tiny random CLIPModel folder; missing weight files fail with what to put there."""
    from experiments import evaluate

    _, clip_folder, scorer = clip
    checkpointed_run(str(tmp_path / "run"), config_for(sd15_lcd, folder))
    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    result = evaluate.evaluate(str(tmp_path / "run"), steps=(1,), num=2, batch_size=2,
                               prompts_file=str(tmp_path / "prompts.txt"), clip=clip_folder)
    score = result["table"]["lcm"]["1"]["clip_score"]
    assert 0 <= score <= 100 and result["step"] == 3
    assert json.load(open(tmp_path / "run" / "evaluation.json")) == result
    with pytest.raises(ValueError, match="--inception .* convert pytorch-fid"):
        evaluate.evaluate(str(tmp_path / "run"), inception=str(tmp_path / "none.safetensors"))
    with pytest.raises(ValueError, match="--prompts"):
        evaluate.evaluate(str(tmp_path / "run"), clip=clip_folder)
