r"""Benchmarks: speed and memory measured side by side in one run, printed and saved as JSON.

  python -m experiments.benchmark --suite unet_memory --json OUT.json

Suites:
  unet_memory  compiled memory of ONE UNet forward (batch 1, fp32 and bf16 compute) for the
               real SD 1.5 @ 512^2, SD 2.1 @ 768^2 and SDXL @ 1024^2 configs, from XLA's memory
               analysis of the compiled program on abstract inputs: no weights, nothing runs.
  lcd_step     images/s of lcm_jax's fused LCD step vs the same step in PyTorch, written in the
               reference LCD script's order (student forward, teacher cond then uncond, DDIM,
               target forward, pseudo-Huber, backward, clip, AdamW, EMA; diffusers'
               UNet2DConditionModel), same tiny UNet config, same batch, same CPU, one run.
  lcd_memory   XLA's compiled peak memory of the full LCD step vs the LCM-LoRA step (one base
               UNet), frozen teacher in fp32 and in bf16, for SD 1.5 at 512^2 and SDXL at 1024^2
               (abstract weights: nothing runs).
  lcd_profile  the fused LCD step's time by HLO op category (attention, convolutions, norms, dense,
               elementwise, optimizer; forward / backward) from XLA's profile (jax.profiler).
  mfu          achieved FLOP/s of the fused LCD step (XLA's cost-analysis FLOPs / median step time)
               over the dense matmul FLOP/s of this machine measured in the same run.
  prefetch     training steps/s on a webdataset of the digits, batches decoded in the loop vs in
               a thread (config.data.prefetch).
  xla_flags    the lcd_step suite's JAX step compiled under each set of XLA CPU options
               (XLA_CPU_OPTIONS: YNNPACK, XNNPACK, oneDNN, fast math, vector width, threading,
               scheduler, emitters), all alternating with the PyTorch step in one process.
  lcd_breakdown  the lcd_step suite's pieces, JAX vs PyTorch (ms): student forward, forward +
               backward, the teacher's 2B call, clip + AdamW + EMA; XLA's FLOPs of fwd + bwd.
  sampling     seconds from noise to decoded images: LCM 1 / 2 / 4 steps (w-conditioned student)
               vs DDIM-50 and DPM-Solver++-25 with CFG, the LCD step's tiny UNet, batch 1.
  compile      seconds to compile the fused LCD step in a fresh process, cold and with the
               persistent compilation cache (config.parallel.compilation_cache_dir) warm.
  lcd_scale    on a GPU: the fused LCD step at SD scale (SD 2.1 @ 768^2 at the LCM paper's batch 9
               per device, SD 1.5 @ 512^2 full and LoRA r64; bf16) vs the reference script's
               PyTorch step on the same GPU, img/s and peak GiB, beside the paper's 2.5 img/s per
               A100; cuDNN flash attention's error vs XLA's on the UNet's attention shapes.
  lego_memory  the paper-scale LEGO configs (configs/lego_imagenet64.py pg / pr, lego_imagenet256.py
               on 32x32x4 latents, lego_celeba64.py pg): XLA's compiled memory and FLOPs per
               image of ONE train step at a per-device batch (abstract weights: nothing runs).

The suites live in experiments/benchmarks/ (common.py, lcd.py: the shared LCD step; speed.py,
memory.py, data_loading.py, accelerator.py).
"""
import argparse
import json

import jax

from experiments import _harness
from experiments.benchmarks import accelerator, data_loading, memory, speed

SUITES = {"unet_memory": memory.unet_memory, "lcd_memory": memory.lcd_memory,
          "lego_memory": memory.lego_memory, "lcd_step": speed.lcd_step,
          "lcd_scale": accelerator.lcd_scale,
          "lcd_breakdown": speed.lcd_breakdown, "lcd_profile": speed.lcd_profile, "mfu": speed.mfu,
          "xla_flags": speed.xla_flags, "sampling": speed.sampling, "compile": speed.compile_time,
          "prefetch": data_loading.prefetch}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--compile_once", metavar="CACHE", help=argparse.SUPPRESS)  # compile's child
    args = parser.parse_args()
    if args.compile_once:
        print(json.dumps(speed.compile_once(args.compile_once)))
        return
    if not args.suite:
        parser.error("--suite is required")
    results = {args.suite: SUITES[args.suite](), "device": str(jax.devices()[0])}
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    _harness.main(main)
