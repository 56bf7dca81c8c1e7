"""LCD on a Stable Diffusion folder: a tiny random diffusers pipeline saved to disk, loaded by
`teachers.from_pretrained` (UNet, VAE, CLIP, tokenizer, scheduler), captions tokenized on the
host, CLIP and the VAE run inside the compiled step; full (w-embedding) and LCM-LoRA modes."""
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import jax  # noqa: E402

from configs import sd15_lcd, sd15_lcf, sd15_lcm_lora, sd15_tcd, sdxl_tcd_lora  # noqa: E402
from lcm_jax import config_checks, objectives, teachers  # noqa: E402
from conftest import fast_compile  # noqa: E402
from support.sd import config_for  # noqa: E402


@pytest.mark.parametrize("module", [sd15_lcd, sd15_lcm_lora], ids=["full", "lora"])
def test_sd_folder_distils(folder, module):
    config = config_for(module, folder)
    config.lcd.lora and config.lcd.lora.update(rank=2, alpha=2.0)
    config_checks.validate(config, device_count=1, process_count=1)
    objective = objectives.build(config, "", None)  # the registry: lcd on the folder
    assert objective.base.latent_shape == (8, 8, 4)
    batch = objective.prepare_batch({"image": np.random.default_rng(0).uniform(
        -1, 1, (2, 16, 16, 3)).astype(np.float32), "caption": np.asarray(["a cat", "a dog"])})
    assert batch["input_ids"].shape == (2, 12) and "caption" not in batch
    frozen = objective.frozen
    assert set(frozen) == {"base", "text_encoder", "vae"}
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), frozen)
    new_state, metrics = fast_compile(objective.train_step, state, batch, frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) > 0
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params)))
    assert moved > 0
    if config.lcd.lora:  # one base UNet: only adapters are trained
        assert all(k[-1].key in ("lora_A", "lora_B") for k, _ in
                   jax.tree_util.tree_flatten_with_path(state.params)[0])
    else:
        assert state.params["time_embedding"]["cond_proj"]["kernel"].shape == (256, 8)


def test_sd_config_refuses_a_missing_folder():
    with pytest.raises(config_checks.ConfigError, match="model.pretrained"):
        config_checks.validate(sd15_lcd.get_config("/no/such/folder"), device_count=1, process_count=1)
    with pytest.raises(config_checks.ConfigError, match="model.pretrained is not set"):
        config_checks.validate(sd15_lcd.get_config(), device_count=1, process_count=1)


def test_tcd_lora_and_lcf_configs(folder):
    """SD 1.5 TCD, SDXL TCD-LoRA and SD 1.5 LCF validate before compiling (TCD's step on a
    folder is LCD's with another strategy: test_tcd_lcf checks them); LCF refuses a folder that is not
    an LCM (no time_cond_proj_dim) with the fix."""
    for module in (sd15_tcd, sdxl_tcd_lora, sd15_lcf):
        config_checks.validate(config_for(module, folder), device_count=1, process_count=1)
    with pytest.raises(ValueError, match="time_cond_proj_dim=None.*point config.model.pretrained at an LCM"):
        objectives.build(config_for(sd15_lcf, folder), "", None)


def test_sd_folder_smooth_diffusion_lora(folder):
    """configs/sd15_smooth.py on the folder: LoRA on the attention projections only, the
    penalty's VJP through the SD UNet, the running mean updated in the state."""
    from configs import sd15_smooth
    from lcm_jax.objectives.smooth import SmoothObjective

    config = config_for(sd15_smooth, folder)
    config.optimizer.accumulate_steps = 1  # the recipe accumulates 8 steps; one step must move B
    config.smooth.lora.update(rank=2, alpha=2.0)
    config_checks.validate(config, device_count=1, process_count=1)
    objective = SmoothObjective(config, teachers.from_pretrained(config))
    frozen = objective.frozen
    assert set(frozen) == {"base", "text_encoder", "vae"}
    batch = objective.prepare_batch({"image": np.random.default_rng(0).uniform(
        -1, 1, (2, 16, 16, 3)).astype(np.float32), "caption": np.asarray(["a cat", "a dog"])})
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), frozen)
    modules = {k[-2].key for k, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert modules == {"to_q", "to_k", "to_v", "to_out_0"}
    new_state, metrics = fast_compile(objective.train_step, state, batch, frozen)
    assert float(metrics["variation_penalty"]) > 0 and np.isfinite(float(metrics["loss"]))
    assert float(new_state.stats["variation_mean"]) > 0
    moved = [float(np.max(np.abs(v))) for k, v in jax.tree_util.tree_flatten_with_path(new_state.params)[0]
             if k[-1].key == "lora_B"]
    assert min(moved) > 0  # every adapter's B left zero after one step
