"""Text -> image end to end against diffusers' pipelines on tiny random SD / SDXL pipelines on disk:
StableDiffusionPipeline + DDIMScheduler (classifier-free guidance with a negative prompt),
LatentConsistencyModelPipeline + LCMScheduler (w-embedding, fresh noise each step), the scheduler
fields each sampler reads from the folder, w-embedded UNets under every sampler, the LCM-LoRA route
(LCM sampler with CFG), and StableDiffusionXLPipeline (DDIM + CFG, LCM)."""
import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from lcm_jax import pipeline  # noqa: E402
from lcm_jax.diffusion import samplers  # noqa: E402
from conftest import f32_tol  # noqa: E402
from support.sd import (NEGATIVE, PROMPT, build, randomize, run_diffusers, tiny_text_encoder,  # noqa: E402
                        tiny_tokenizer, tiny_vae)
from support.unet import CONFIGS  # noqa: E402


@pytest.mark.parametrize("steps", [2, 4])
def test_ddim_with_guidance_and_negative_prompt_matches_diffusers(tmp_path, steps):
    theirs_pipe, ours_pipe = build(tmp_path, "ddim")
    ours = ours_pipe(PROMPT, negative_prompt=NEGATIVE, sampler="ddim", num_inference_steps=steps,
                     guidance_scale=5.0, seed=3)
    latents = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(3), 0), (1, 8, 8, 4))
    theirs = theirs_pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps,
                         guidance_scale=5.0, output_type="np",
                         latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2))).images
    assert ours.shape == theirs.shape == (1, 16, 16, 3)
    assert np.max(np.abs(ours - theirs)) <= 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_matches_diffusers(tmp_path, steps):
    import diffusers.schedulers.scheduling_lcm as lcm_module
    theirs_pipe, ours_pipe = build(tmp_path, "lcm")
    ours = ours_pipe(PROMPT, sampler="lcm", num_inference_steps=steps, guidance_scale=8.0, seed=5)
    key = jax.random.PRNGKey(5)
    latents = jax.random.normal(jax.random.fold_in(key, 0), (1, 8, 8, 4))
    noise = iter([np.asarray(samplers.step_noise(jax.random.fold_in(key, 1), i, latents))
                  .transpose(0, 3, 1, 2) for i in range(steps)])
    original = lcm_module.randn_tensor
    lcm_module.randn_tensor = lambda shape, **kw: torch.from_numpy(next(noise).copy())
    try:
        theirs = theirs_pipe(PROMPT, num_inference_steps=steps, guidance_scale=8.0, output_type="np",
                             latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2))).images
    finally:
        lcm_module.randn_tensor = original
    assert np.max(np.abs(ours - theirs)) <= 1e-3


@pytest.fixture(scope="module")
def sd_pipes(tmp_path_factory):
    """Built once: 'ddim' (a plain UNet, the LCM-LoRA route's base) and 'lcm' (w-embedded)."""
    folders = {kind: tmp_path_factory.mktemp(kind) for kind in ("ddim", "lcm")}
    pipes = {kind: build(folder, kind) for kind, folder in folders.items()}
    pipes["folders"] = {kind: folder / "pipe" for kind, folder in folders.items()}
    return pipes


SCHEDULERS = {"ddim": "DDIMScheduler", "dpm_solver_pp": "DPMSolverMultistepScheduler",
              "lcm": "LCMScheduler", "tcd": "TCDScheduler"}
# (folder, our sampler, steps, guidance, scheduler config fields set in the folder)
CASES = {
    "w-unet ddim": ("lcm", "ddim", 2, 3.0, {}),
    "w-unet tcd": ("lcm", "tcd", 2, 3.0, {}),
    "w-unet dpm++": ("lcm", "dpm_solver_pp", 3, 3.0, {}),
    "lora-route lcm cfg": ("ddim", "lcm", 2, 1.5, {}),
    "tcd original steps": ("ddim", "tcd", 3, 2.0, {"original_inference_steps": 25}),
    "dpm++ folder fields": ("ddim", "dpm_solver_pp", 3, 2.0, {
        "timestep_spacing": "trailing", "final_sigmas_type": "sigma_min", "lower_order_final": False}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_samplers_follow_the_folder_and_the_unet_like_diffusers(sd_pipes, monkeypatch, case):
    """diffusers' StableDiffusionPipeline with `Scheduler.from_config(folder)`: a w-embedded UNet
    takes w = g - 1 under any scheduler and runs no CFG; a plain UNet runs CFG under the LCM
    scheduler too; TCD / DPM++ read original_inference_steps, spacing, offset, final sigma."""
    kind, sampler, steps, guidance, fields = CASES[case]
    theirs, ours = sd_pipes[kind]
    config = dict(ours.scheduler_config, **fields)  # the folder's scheduler_config.json, edited
    scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(config)
    reference = diffusers.StableDiffusionPipeline(**dict(theirs.components, scheduler=scheduler),
                                                  requires_safety_checker=False)
    gamma = {"eta": 0.3} if sampler == "tcd" else {}
    expected = run_diffusers(reference, monkeypatch, steps, 7, prompt=PROMPT, negative_prompt=NEGATIVE,
                             guidance_scale=guidance, **gamma)
    ours = dataclasses.replace(ours, scheduler_config=config, _programs={})
    got = ours(PROMPT, negative_prompt=NEGATIVE, sampler=sampler, num_inference_steps=steps,
               guidance_scale=guidance, seed=7, gamma=0.3)
    assert np.max(np.abs(got - expected)) <= 1e-4


def test_unsupported_scheduler_fields_are_refused(sd_pipes):
    _, ours = sd_pipes["ddim"]
    bad = dataclasses.replace(ours, scheduler_config=dict(ours.scheduler_config, use_karras_sigmas=True))
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        bad(PROMPT, sampler="dpm_solver_pp", num_inference_steps=2)
    unset = {k: v for k, v in ours.scheduler_config.items() if k != "clip_sample"}
    with pytest.raises(ValueError, match="clip_sample=True .the diffusers default when unset"):
        pipeline.scheduler_options(unset, "ddim", sd_pipeline=False)  # SDXL: no shim


def build_sdxl(tmp, w_dim=None):
    torch.manual_seed(1)
    tokenizer, vocab = tiny_tokenizer(tmp / "tok")
    unet = randomize(diffusers.UNet2DConditionModel(**dict(CONFIGS["sdxl"], time_cond_proj_dim=w_dim)))
    scheduler = (diffusers.LCMScheduler() if w_dim else
                 diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_text_encoder(vocab, 8), tokenizer=tokenizer,
        text_encoder_2=tiny_text_encoder(vocab, 8, projection_dim=8), tokenizer_2=tokenizer,
        unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(tmp / "pipe"))
    return pipe, pipeline.StableDiffusion.from_pretrained(str(tmp / "pipe"))


def test_sdxl_matches_diffusers(tmp_path, monkeypatch):
    """StableDiffusionXLPipeline: DDIM + CFG with zeros as the default negative
    (force_zeros_for_empty_prompt) and with a negative prompt; LCM on a w-embedded SDXL UNet."""
    theirs, ours = build_sdxl(tmp_path / "ddim")
    assert ours.is_sdxl and ours.force_zeros_for_empty_prompt
    for negative in (None, NEGATIVE):
        expected = run_diffusers(theirs, monkeypatch, 2, 3, prompt=PROMPT, negative_prompt=negative,
                                 guidance_scale=5.0)
        got = ours(PROMPT, negative_prompt=negative, num_inference_steps=2, guidance_scale=5.0, seed=3)
        assert got.shape == (1, 16, 16, 3)
        assert np.max(np.abs(got - expected)) <= 1e-4, negative
    theirs, ours = build_sdxl(tmp_path / "lcm", w_dim=8)
    expected = run_diffusers(theirs, monkeypatch, 2, 4, prompt=PROMPT, guidance_scale=8.0)
    got = ours(PROMPT, sampler="lcm", num_inference_steps=2, guidance_scale=8.0, seed=4)
    assert np.max(np.abs(got - expected)) <= 1e-4


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline.StableDiffusion.from_pretrained(str(tmp_path))
    _, ours = build(tmp_path, "ddim")
    with pytest.raises(ValueError, match="sampler"):
        ours("a cat", sampler="euler")
    with pytest.raises(ValueError, match="multiples of the VAE factor"):
        ours("a cat", height=15)


def test_sd_inversion_matches_diffusers_and_edits(tmp_path):
    """lcm_jax.editing on an SD folder: DDIM inversion with the prompt equals the UNet under
    diffusers' DDIMInverseScheduler (from the folder's scheduler config) step for step; null-text
    inversion, reconstruction, interpolation and prompt-switch editing run end to end (three
    compiled programs: inversion, null-text inversion, generation, all at batch 2)."""
    from lcm_jax import editing

    theirs_pipe, ours_pipe = build(tmp_path, "ddim")
    model = editing.LatentModel.from_stable_diffusion(ours_pipe)
    prompts = [PROMPT, NEGATIVE]
    latents = jax.random.normal(jax.random.PRNGKey(4), (2, 8, 8, 4))
    ours = model._invert(2)(model.params, latents, model.condition(prompts))
    inverse = diffusers.DDIMInverseScheduler.from_config(theirs_pipe.scheduler.config)
    inverse.set_timesteps(2)
    embeds = theirs_pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    x = torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2))
    with torch.no_grad():
        for i, t in enumerate(inverse.timesteps):
            x = inverse.step(theirs_pipe.unet(x, t, embeds).sample, t, x).prev_sample
            np.testing.assert_allclose(np.asarray(ours[i + 1]).transpose(0, 3, 1, 2), x.numpy(),
                                       rtol=1e-4, atol=1e-4)

    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    inv = model.invert(images, prompts, num_steps=2, guidance_scale=5.0, null_text=True)
    assert inv.nulls.shape == (2, 1, 12, 12)  # one null embedding per step, shared by the pair
    pair = np.array([0, 1])
    frames = model.interpolate(inv.select(pair), inv.select(pair[::-1]), etas=[0.0, 0.5, 1.0])
    assert frames.shape == (2, 3, 16, 16, 3)
    # Equal inputs at another batch row (or call): XLA's CPU kernels may round rows differently
    # (1.3e-5 seen on one machine). Budget: 32 ulps per UNet call, x 9 for CFG at g = 5
    # (|1 - g| + g), x 2 DDIM steps, at the images' scale; a wrong end is off by O(0.1).
    tol = f32_tol(32 * 9 * 2, frames)
    np.testing.assert_allclose(frames[:, 0], model.reconstruct(inv), rtol=0, atol=tol)
    np.testing.assert_allclose(frames[0, 2], frames[1, 0], rtol=0, atol=tol)  # the other end
    edited = model.edit(images, prompts, prompts[::-1], ratio=0.5, num_steps=2, guidance_scale=5.0,
                        null_text=False)
    assert edited.shape == (2, 16, 16, 3) and np.all(np.isfinite(edited))


def test_bfloat16_weights_halve_the_memory_and_stay_close(sd_pipes):
    """param_dtype=bfloat16 (sd_lcm_sampling.ipynb on an accelerator): every float weight is
    stored in bf16, and images stay near float32's (bf16 keeps ~3 significant digits)."""
    import jax.numpy as jnp

    _, ours = sd_pipes["ddim"]
    half = pipeline.StableDiffusion.from_pretrained(str(sd_pipes["folders"]["ddim"]),
                                                    dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    trees = lambda p: (p.unet_params, p.vae_params, p.text_params)
    assert {a.dtype for a in jax.tree.leaves(trees(half)) if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.bfloat16)}
    nbytes = lambda p: sum(a.nbytes for a in jax.tree.leaves(trees(p)))
    assert nbytes(half) * 2 == nbytes(ours)
    kwargs = dict(sampler="ddim", num_inference_steps=2, guidance_scale=5.0, seed=3)
    full, low = ours(PROMPT, **kwargs), half(PROMPT, **kwargs)
    assert np.isfinite(low).all() and np.max(np.abs(np.asarray(low, np.float32) - full)) < 0.05
