"""The LCD step at Stable Diffusion's own scale, on a GPU: lcm_jax's fused step vs the reference
script's PyTorch step (same UNet config, batch and device; random weights; bf16 compute, the
frozen teacher stored in bf16, trained params in float32), images/s and peak memory, beside the
LCM paper's own rate; and cuDNN's flash attention against XLA's on the UNet's attention shapes.
Latents and prompt embeddings are given (both sides skip the VAE and the text encoder)."""
import gc
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax.models import attention

from .common import ROOT, alternating_rounds, memory_gib
from .lcd import jax_lcd_step, lcd_batch, pooled_dim, torch_lcd_step

# The LCM paper (2310.04378): 4,000 iterations of batch 72 at 768^2 in 32 A100-hours.
PAPER_IMG_PER_S_PER_A100 = 4000 * 72 / (32 * 3600)
# name: (UNet config, image side, per-device batch, LoRA rank); the paper's batch 72 over 8 GPUs
# is 9 per device.
CASES = {"sd21_768_full": ("sd21_unet.json", 768, 9, 0),
         "sd15_512_full": ("sd15_unet.json", 512, 16, 0),
         "sd15_512_lora64": ("sd15_unet.json", 512, 16, 64)}
# [B, L, heads, head dim] of the self- and cross-attention of SD 1.5 @ 512 and SD 2.1 @ 768.
ATTENTION_SHAPES = {"sd15_self": (4096, 4096, 8, 40), "sd15_cross": (4096, 77, 8, 40),
                    "sd21_self": (9216, 9216, 5, 64)}


def attention_check(batch: int = 2) -> dict:
    """Max |error| of the forward and of dL/dq against a float32 XLA reference on the same bf16
    inputs, for cuDNN (what "auto" runs here) and for XLA's bf16 attention."""
    results = {}
    for name, (length, keys, heads, dim) in ATTENTION_SHAPES.items():
        rng = np.random.default_rng(0)
        q, k, v = (jnp.asarray(rng.standard_normal((batch, n, heads, dim)), jnp.bfloat16)
                   for n in (length, keys, keys))
        loss = lambda impl, q, k, v: jnp.sum(attention.dot_product_attention(q, k, v, impl).astype(
            jnp.float32) * v.astype(jnp.float32).mean())  # a scalar whose dL/dq is dense
        f32 = lambda a: a.astype(jnp.float32)
        ref_out = attention.dot_product_attention(f32(q), f32(k), f32(v), "xla")
        ref_grad = jax.grad(lambda q: loss("xla", q, f32(k), f32(v)))(f32(q))
        row = {}
        for impl in ("auto", "xla"):
            kernel = attention.resolve(impl, q, k, v)
            out = jax.jit(lambda q, k, v: attention.dot_product_attention(q, k, v, impl))(q, k, v)
            grad = jax.jit(jax.grad(lambda q, k, v: loss(impl, q, k, v)))(q, k, v)
            row[kernel] = dict(out_max_err=float(jnp.max(jnp.abs(f32(out) - ref_out))),
                               grad_max_err=float(jnp.max(jnp.abs(f32(grad) - ref_grad))),
                               grad_max=float(jnp.max(jnp.abs(ref_grad))))
        results[name] = row
        print(name, row, flush=True)
    return results


def lcd_scale(cases=None, rounds: int = 3, steps: int = 5, torch_side: bool = True,
              progress: str | None = None) -> dict:
    """images/s (median round of `alternating_rounds`) and peak GiB of each side per case; JAX's
    peak is XLA's accounting of the compiled step (state, teacher and batch included), PyTorch's
    its allocator's peak over the warm-up and the rounds. The LoRA case runs lcm_jax alone.
    `progress`: a JSON file rewritten after every case (a killed run keeps what it measured)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a smoke run of tiny cases
    cuda = device == "cuda"
    results = {"paper_img_per_s_per_a100": PAPER_IMG_PER_S_PER_A100, "device": str(jax.devices()[0]),
               "attention_check": attention_check()}
    for name in cases or CASES:
        file, side, batch_size, rank = CASES[name]
        config = json.load(open(os.path.join(ROOT, "configs/models", file)))
        batch = lcd_batch(batch_size, side // 8, 77, config["cross_attention_dim"], pooled=pooled_dim(config))
        sides, row = {}, {"batch": batch_size, "image_side": side, "lora_rank": rank}
        for impl in ("auto", "xla"):  # XLA's attention only if the default fails
            try:
                sides["jax"] = jax_lcd_step(batch, impl, unet_config=config, lora_rank=rank,
                                            dtype=jnp.bfloat16, teacher_dtype=jnp.bfloat16)
                row["jax_attention"] = impl  # "auto": cuDNN here, as attention_check shows
                row["jax_memory"] = memory_gib(sides["jax"].compiled)
                break
            except Exception as e:  # noqa: BLE001 - a measurement records what failed and goes on
                row[f"jax_{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if torch_side and not rank:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sides["torch"] = torch_lcd_step(batch, config, device=device, bf16=True)
        seconds = alternating_rounds(sides, rounds, steps)
        for side_name, times in seconds.items():
            row[f"{side_name}_img_per_s"] = round(batch_size * steps / float(np.median(times)), 2)
            row[f"{side_name}_seconds_per_round"] = [round(s, 3) for s in times]
        if "torch" in sides:
            if cuda:
                row["torch_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
            if "jax" in sides:
                row["jax_over_torch"] = round(row["jax_img_per_s"] / row["torch_img_per_s"], 3)
        if "jax" in sides:
            row["jax_over_paper_a100"] = round(row["jax_img_per_s"] / PAPER_IMG_PER_S_PER_A100, 2)
        results[name] = row
        print(name, row, flush=True)
        del sides, seconds
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if progress:
            with open(progress, "w") as f:
                json.dump(results, f, indent=2)
    results.update(rounds=rounds, steps_per_round=steps, torch=torch.__version__, jax=jax.__version__)
    return results
