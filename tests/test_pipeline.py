"""Text -> image end to end against diffusers' pipelines on a tiny random SD pipeline on disk:
StableDiffusionPipeline + DDIMScheduler (classifier-free guidance with a negative prompt) and
LatentConsistencyModelPipeline + LCMScheduler (w-embedding, fresh noise each step)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from lcm_jax import pipeline  # noqa: E402
from lcm_jax.diffusion import samplers  # noqa: E402
from conftest import write_tiny_tokenizer  # noqa: E402
from test_unet import BASE  # noqa: E402

PROMPT, NEGATIVE = "a cat", "a dog"


def tiny_tokenizer(folder):
    vocab = write_tiny_tokenizer(str(folder), model_max_length=12)
    return transformers.CLIPTokenizer.from_pretrained(str(folder)), vocab


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def build(tmp, kind):
    torch.manual_seed(0)
    tokenizer, vocab = tiny_tokenizer(tmp / "tok")
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1)))
    unet_config = dict(BASE, cross_attention_dim=12, **({"time_cond_proj_dim": 8} if kind == "lcm" else {}))
    unet = randomize(diffusers.UNet2DConditionModel(**unet_config))
    vae = randomize(diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1,
                                            norm_num_groups=4, latent_channels=4, sample_size=16,
                                            down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2))
    common = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    if kind == "lcm":
        pipe = diffusers.LatentConsistencyModelPipeline(scheduler=diffusers.LCMScheduler(), **common)
    else:
        pipe = diffusers.StableDiffusionPipeline(scheduler=diffusers.DDIMScheduler(
            clip_sample=False, set_alpha_to_one=False, steps_offset=1), **common)
    pipe.save_pretrained(str(tmp / "pipe"))
    return pipe, pipeline.StableDiffusion.from_pretrained(str(tmp / "pipe"))


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


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        pipeline.StableDiffusion.from_pretrained(str(tmp_path))
    _, ours = build(tmp_path, "ddim")
    with pytest.raises(ValueError, match="sampler"):
        ours("a cat", sampler="euler")
    with pytest.raises(ValueError, match="multiples of the VAE factor"):
        ours("a cat", height=15)
