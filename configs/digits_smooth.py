r"""Smooth Diffusion on the digits teacher of README command 1 (LoRA on its attention).

Command (the chain of command 1 in workdirs/digits_lcd is reused, or trained there first):
  python -m experiments.main --config configs/digits_smooth.py --workdir workdirs/digits_smooth

The teacher (a class-conditional latent DiT) is fine-tuned with the eps-MSE + lambda * the
step-wise variation penalty; LoRA rank 8 on every attention projection (the DiT's fused qkv and
its output: the paper's q / k / v / out; A ~ N(0, 1/8^2), B = 0, as the reference's diffusers
0.20 LoRA), AdamW lr 1e-4 constant, grad clip 1, lambda 1 (the recipe), 10% condition dropout
(the teacher's, so that its guided sampling keeps working; the SD recipe has none).
W/results.json: FD-digits and accuracy of DDIM-50 samples at guidance 1.5.

Expected on the 2-core CPU: ~6 min (1,000 steps at ~3 steps/s, then the evaluation). Measured
before the reference's LoRA init (smooth.lora.init="gaussian": A 2.5x larger than peft's here)
and the bias-corrected running mean (smooth.mean_init) were set, so not yet for this config:
FD-digits 15.68 at 81.4% accuracy (the base teacher: 10.50, 81.8%), ISTD 0.217 -> 0.196. ISTD,
inversion and the lambda sweep: experiments/smooth_digits.py (README "Smooth Diffusion").

Short arguments: `configs/digits_smooth.py:tiny` is the seconds-long variant the tests use.
"""
import ml_collections

from configs import digits_lcd
from lcm_jax.models.lora import ATTENTION_TARGETS

DDIM = {"timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True}


VARIANTS = ("", "tiny")  # the arguments get_config takes (config_loading.known_fields reads each)

def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = digits_lcd.get_config("tiny" if arg == "tiny" else "")
    del c["lcd"]
    c.objective = "smooth"
    c.total_steps = 1000
    c.batch_size = 64
    c.smooth = ml_collections.ConfigDict(dict(
        lambda_reg=1.0, decay=0.01, cond_drop_prob=0.1, sample_posterior=False,
        # The reference starts the running mean at 0: for ~230 of these 1,000 steps the penalty
        # then shrinks every length instead of evening them out; bias correction does not.
        mean_init="bias_corrected",
        teacher_workdir="workdirs/digits_lcd",  # README command 1's chain (trained if absent)
        lora=ml_collections.ConfigDict(dict(rank=8, alpha=8.0, targets=ATTENTION_TARGETS,
                                            merged=False,
                                            init="gaussian"))))  # the reference's A ~ N(0, 1/8^2)
    c.ema_decay = 0.0  # the reference keeps no EMA: the live adapters are the model
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=0, decay="constant", b1=0.9, b2=0.999, weight_decay=1e-2,
        grad_clip=1.0))
    c.sample = ml_collections.ConfigDict(dict(
        every_steps=500, sampler="ddim", num_steps=50, guidance_scale=1.5, num_images=40,
        sampler_kwargs=DDIM))
    c.eval = ml_collections.ConfigDict(dict(
        sampler="ddim", num_steps=50, guidance_scale=1.5, num_samples=500, batch_size=250,
        sampler_kwargs=DDIM))
    c.wandb.tags = ("digits", "smooth")

    if arg == "tiny":
        c.total_steps = 4
        c.batch_size = 16
        c.smooth.teacher_workdir = ""  # the tiny chain, in the run's own workdir
        c.sample.update(every_steps=4, num_steps=2, num_images=4)
        c.eval.update(num_steps=2, num_samples=20, batch_size=20)
    elif arg:
        raise ValueError(f"Unknown config argument {arg!r}; use '' or 'tiny'.")
    return c
