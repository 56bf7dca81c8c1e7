"""A tiny random Stable Diffusion pipeline on disk (diffusers' folder layout), diffusers' pipelines
run from our latents and step noise, and the SD recipe configs pointed at such a folder
(test_pipeline, test_lcd_sd, test_export, test_notebooks; the `folder` fixture in conftest)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

from conftest import write_tiny_tokenizer  # noqa: E402
from lcm_jax import pipeline  # noqa: E402
from lcm_jax.diffusion import samplers  # noqa: E402
from support.unet import BASE  # noqa: E402

PROMPT, NEGATIVE = "a cat", "a dog"


def tiny_tokenizer(folder):
    vocab = write_tiny_tokenizer(str(folder), model_max_length=12)
    return transformers.CLIPTokenizer.from_pretrained(str(folder)), vocab


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_text_encoder(vocab, hidden=12, projection_dim=None):
    config = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=12, bos_token_id=vocab - 2,
        eos_token_id=vocab - 1, pad_token_id=vocab - 1, projection_dim=projection_dim or hidden)
    cls = transformers.CLIPTextModelWithProjection if projection_dim else transformers.CLIPTextModel
    return randomize(cls(config))


def tiny_vae():
    return randomize(diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1,
                                             norm_num_groups=4, latent_channels=4, sample_size=16,
                                             down_block_types=("DownEncoderBlock2D",) * 2,
                                             up_block_types=("UpDecoderBlock2D",) * 2))


def build(tmp, kind):
    torch.manual_seed(0)
    tokenizer, vocab = tiny_tokenizer(tmp / "tok")
    text = tiny_text_encoder(vocab)
    unet_config = dict(BASE, cross_attention_dim=12, **({"time_cond_proj_dim": 8} if kind == "lcm" else {}))
    unet = randomize(diffusers.UNet2DConditionModel(**unet_config))
    vae = tiny_vae()
    common = dict(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, safety_checker=None,
                  feature_extractor=None, requires_safety_checker=False)
    if kind == "lcm":
        pipe = diffusers.LatentConsistencyModelPipeline(scheduler=diffusers.LCMScheduler(), **common)
    else:
        pipe = diffusers.StableDiffusionPipeline(scheduler=diffusers.DDIMScheduler(
            clip_sample=False, set_alpha_to_one=False, steps_offset=1), **common)
    pipe.save_pretrained(str(tmp / "pipe"))
    return pipe, pipeline.StableDiffusion.from_pretrained(str(tmp / "pipe"))


def our_latents(seed, shape=(1, 8, 8, 4)):
    return jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), 0), shape)


def run_diffusers(pipe, monkeypatch, steps, seed, shape=(1, 8, 8, 4), **kwargs):
    """diffusers' pipeline from our initial latents, with our step noise in LCM / TCD steps."""
    import diffusers.schedulers.scheduling_lcm as lcm_module
    import diffusers.schedulers.scheduling_tcd as tcd_module

    latents = our_latents(seed, shape)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    noise = iter([np.asarray(samplers.step_noise(rng, i, latents)).transpose(0, 3, 1, 2)
                  for i in range(steps)])
    for module in (lcm_module, tcd_module):
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **kw: torch.from_numpy(next(noise).copy()))
    return pipe(num_inference_steps=steps, output_type="np", **kwargs,
                latents=torch.from_numpy(np.asarray(latents).transpose(0, 3, 1, 2))).images


def config_for(module, folder):
    c = module.get_config(folder)
    c.data.update(name="folder", path=folder, image_size=16)  # any existing folder passes checks
    c.batch_size = 2
    c.sample.prompts = ("a cat",)
    c.optimizer.warmup_steps = 0  # step 0 of a warmup has lr 0
    return c
