r"""Smooth Diffusion's SD 1.5 recipe (arXiv 2312.04410; the official train.sh).

  python -m experiments.main --config configs/sd15_smooth.py:/path/to/stable-diffusion-v1-5 \
      --workdir W --config.data.path='/data/laion/{00000..00099}.tar'

LoRA rank 8 on the attention projections (to_q / to_k / to_v / to_out.0), A ~ N(0, 1/8^2) and
B = 0 as the reference's diffusers 0.20 LoRALinearLayer (peft's kaiming-uniform A is 4x-8x
smaller on these 320-1280 wide layers), AdamW lr 1e-4 constant
(weight decay 1e-2), grad clip 1, batch 96 = 3 per GPU x 4 GPUs x 8 accumulation, as here: a
global batch of 12 per step and optimizer.accumulate_steps=8 (on 8 devices: batch_size=24,
accumulate_steps=4, total_steps=120_000), 30k updates = 240k steps (every *_steps counts steps),
lambda 1, running-mean decay 0.01 per step (per micro-batch, as the reference updates it per
forward pass), 512^2, a posterior draw of the VAE latents, no condition dropout.
W/smooth/pytorch_lora_weights.safetensors loads with diffusers' pipe.load_lora_weights(W/smooth).
Expected (the paper, SD 1.5, 500 COCO prompts): ISTD 38.63 -> 16.54, FID 12.70 -> 12.10,
DDIM-inversion PSNR 13.97 -> 16.17 (not run here: no weights).
"""
import ml_collections

from configs._sd_lcd import PROMPTS, sd_base
from lcm_jax import tracking
from lcm_jax.models.lora import ATTENTION_TARGETS


def get_config(pretrained: str = "") -> ml_collections.ConfigDict:
    c = sd_base(pretrained, "smooth", image_size=512, prediction_type="epsilon", batch_size=12,
                total_steps=30_000 * 8, seed=42)
    c.smooth = ml_collections.ConfigDict(dict(
        lambda_reg=1.0, decay=0.01, cond_drop_prob=0.0, sample_posterior=True,
        mean_init="zero",  # the reference's: its ~230-step warm-up is 0.1% of 240k steps
        lora=ml_collections.ConfigDict(dict(rank=8, alpha=8.0, targets=ATTENTION_TARGETS,
                                            merged=False,
                                            init="gaussian"))))  # diffusers 0.20's A ~ N(0, 1/8^2)
    c.ema_decay = 0.0
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=0, decay="constant", b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-2,
        grad_clip=1.0,
        accumulate_steps=8))  # the paper's 8x gradient accumulation: 8 steps of 12 = one update of 96
    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=8000, keep=3))  # every 1000 updates
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=8000, sampler="ddim", num_steps=50, num_images=len(PROMPTS),
        guidance_scale=7.5, prompts=PROMPTS))
    c.wandb = tracking.default_config(("smooth", "lora"))
    return c
