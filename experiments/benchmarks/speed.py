"""Speed suites: the LCD step against PyTorch (whole, in pieces, by HLO op category, MFU, under
XLA CPU options), sampling latency and compile time."""
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from lcm_jax.models import attention, unet

from .common import ROOT, alternating_rounds, median_ms
from .lcd import (EMA, LCD_BATCH, LCD_CONTEXT, LCD_UNET, LR, OPTIMIZER, TOTAL_STEPS, W_DIM,
                  init_unet, jax_lcd_step, lcd_batch, lcd_batch_for_step, lcd_objective,
                  torch_lcd_step)


def lcd_step(rounds: int = 7, steps: int = 5) -> dict:
    """images/s of each side from its median round (`alternating_rounds`): lcm_jax's step with its default
    attention ("auto": chunked on CPU) and with XLA's, and the PyTorch step."""
    import numpy as np
    import torch

    batch = lcd_batch_for_step()
    sides = {"jax": jax_lcd_step(batch, "auto"), "jax_xla_attention": jax_lcd_step(batch, "xla"),
             "torch": torch_lcd_step(batch)}
    seconds = alternating_rounds(sides, rounds, steps)
    jax_s, torch_s = (float(np.median(seconds[name])) for name in ("jax", "torch"))
    images = LCD_BATCH * steps
    result = {f"{name}_img_per_s": round(images / float(np.median(seconds[name])), 2) for name in sides}
    result.update(ratio=round(torch_s / jax_s, 3),
                  ratio_per_round=[round(t / j, 3) for j, t in zip(seconds["jax"], seconds["torch"])],
                  batch=LCD_BATCH, rounds=rounds, steps_per_round=steps,
                  jax_attention=attention.resolve("auto"),
                  unet={k: list(v) if isinstance(v, tuple) else v for k, v in LCD_UNET.items()},
                  torch_threads=torch.get_num_threads(), xla_flags=os.environ.get("XLA_FLAGS", ""))
    print(result, flush=True)
    return result


def lcd_breakdown(repeats: int = 10) -> dict:
    """The lcd_step suite's pieces, JAX vs PyTorch side by side (ms, median): the student UNet's
    forward, forward + backward, the teacher's 2B call (cond and uncond in one batch), and
    clip + AdamW + EMA over the student's params (lcm_jax: the train step's own update,
    `common.apply_gradients`). Same tiny UNet, batch, CPU; one run."""
    import ml_collections
    import numpy as np
    import torch

    from lcm_jax.objectives import common
    from lcm_jax.train import TrainState

    b, side = LCD_BATCH, LCD_UNET["sample_size"]
    batch = lcd_batch(b, side, LCD_CONTEXT, LCD_UNET["cross_attention_dim"])
    rng = np.random.default_rng(0)
    w_emb = rng.standard_normal((b, W_DIM)).astype("float32")
    t = np.full((b,), 500, np.int32)
    x, c = batch["latents"], batch["prompt_embeds"]
    x2, c2, t2 = np.concatenate([x, x]), np.concatenate([c, batch["uncond_embeds"]]), np.concatenate([t, t])

    student = unet.from_config(dict(LCD_UNET, time_cond_proj_dim=W_DIM))
    teacher = unet.from_config(LCD_UNET)
    params = init_unet(student, side)
    teacher_params = init_unet(teacher, side)
    fwd = lambda p, x, c, w: student.apply({"params": p}, x, jnp.asarray(t), encoder_hidden_states=c, timestep_cond=w)
    loss = lambda p, x, c, w: jnp.mean(fwd(p, x, c, w) ** 2)
    # The LCD step's optimizer and update: clip + AdamW + EMA, as objectives' train steps run it.
    tx = common.make_optimizer(ml_collections.ConfigDict(OPTIMIZER), TOTAL_STEPS)

    jx, jc, jw = map(jnp.asarray, (x, c, w_emb))
    grads = jax.jit(jax.grad(loss))(params, jx, jc, jw)
    # The EMA starts as its own copy of the params: the update donates both.
    state = {"train": TrainState.create(jax.tree.map(jnp.copy, params), tx, jax.random.PRNGKey(0)).replace(
        ema_params=jax.tree.map(jnp.copy, params))}
    jit_update = jax.jit(lambda s, g: common.apply_gradients(s, g, {}, tx, EMA)[0], donate_argnums=0)

    def jax_update():
        state["train"] = jit_update(state["train"], grads)
        jax.block_until_ready(state["train"].params)

    jit_fwd, jit_grad = jax.jit(fwd), jax.jit(jax.grad(loss))
    jit_teacher = jax.jit(lambda p, x, t, c: teacher.apply({"params": p}, x, t, encoder_hidden_states=c))
    ours = {
        "student_forward": lambda: jax.block_until_ready(jit_fwd(params, jx, jc, jw)),
        "student_forward_backward": lambda: jax.block_until_ready(jit_grad(params, jx, jc, jw)),
        "teacher_2b_forward": lambda: jax.block_until_ready(
            jit_teacher(teacher_params, jnp.asarray(x2), jnp.asarray(t2), jnp.asarray(c2))),
        "clip_adamw_ema": jax_update}

    import diffusers

    torch.manual_seed(0)
    s_net = diffusers.UNet2DConditionModel(**LCD_UNET, time_cond_proj_dim=W_DIM).train()
    t_net = diffusers.UNet2DConditionModel(**LCD_UNET).eval().requires_grad_(False)
    ema = [p.detach().clone() for p in s_net.parameters()]
    opt = torch.optim.AdamW(s_net.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
    tx_, tc, tw, tt = nchw(x), torch.from_numpy(c), torch.from_numpy(w_emb), torch.from_numpy(t).long()
    tx2, tc2, tt2 = nchw(x2), torch.from_numpy(c2), torch.from_numpy(t2).long()

    def torch_forward():
        with torch.no_grad():
            s_net(tx_, tt, timestep_cond=tw, encoder_hidden_states=tc)

    def torch_forward_backward():
        s_net.zero_grad(set_to_none=True)
        (s_net(tx_, tt, timestep_cond=tw, encoder_hidden_states=tc).sample ** 2).mean().backward()

    def torch_teacher():
        with torch.no_grad():
            t_net(tx2, tt2, encoder_hidden_states=tc2)

    torch_forward_backward()  # grads in place for the optimizer timing

    def torch_update():
        torch.nn.utils.clip_grad_norm_(s_net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, s_net.parameters()):
                e.mul_(EMA).add_(p, alpha=1 - EMA)

    theirs = {"student_forward": torch_forward, "student_forward_backward": torch_forward_backward,
              "teacher_2b_forward": torch_teacher, "clip_adamw_ema": torch_update}
    results = {}
    for name in ours:
        results[name] = {"jax_ms": median_ms(ours[name], repeats), "torch_ms": median_ms(theirs[name], repeats)}
        results[name]["torch_over_jax"] = round(results[name]["torch_ms"] / results[name]["jax_ms"], 3)
        print(name, results[name], flush=True)
    compiled = jax.jit(jax.grad(loss)).lower(params, jx, jc, jw).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    results["forward_backward_hlo"] = {"gflops": round(cost.get("flops", 0) / 1e9, 3),
                                       "gbytes_accessed": round(cost.get("bytes accessed", 0) / 1e9, 3)}
    results.update(batch=b, torch_threads=torch.get_num_threads(), xla_flags=os.environ.get("XLA_FLAGS", ""))
    return results


def _op_category(op_name: str) -> str:
    """An HLO op's place in the LCD step, from the JAX source path XLA keeps in its metadata."""
    import re

    phase = "backward" if "transpose(" in op_name else "forward"
    if "UNet2DConditionModel" not in op_name:
        return "loss, clip, AdamW, EMA"
    if re.search(r"/attn\d/", op_name):
        kind = "attention (q k^T, softmax, p v)"
    elif "conv_general_dilated" in op_name:
        kind = "convolutions"
    elif any("norm" in part for part in op_name.split("/")[:-1]):
        kind = "GroupNorm / LayerNorm"
    elif op_name.endswith("dot_general"):
        kind = "dense layers"
    else:
        kind = "elementwise (SiLU, GEGLU, residuals, concat)"
    return f"{phase}: {kind}"


def lcd_profile(steps: int = 5) -> dict:
    """Where the fused LCD step's time goes, from XLA's own profile: the step runs under
    jax.profiler; each executed HLO op (thunk) is mapped to its JAX source path and summed by
    category, ms per step. Ops run on both cores at once, so the sum can exceed the wall time."""
    import collections
    import glob
    import gzip
    import re
    import tempfile

    step = jax_lcd_step(lcd_batch_for_step())
    step(), step()
    wall = median_ms(step, 10)
    metadata = {m.group(1): m.group(2) for m in re.finditer(
        r'^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name="([^"]+)"', step.compiled.as_text(), re.M)}
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder, create_perfetto_trace=True)
        for _ in range(steps):
            step()
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(glob.glob(f"{folder}/**/perfetto_trace.json.gz", recursive=True)[0]))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    ms = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e.get("name") in metadata:
            ms[_op_category(metadata[e["name"]])] += e["dur"] / 1e3 / steps
    result = {"step_ms_median": wall, "ops_ms_sum": round(sum(ms.values()), 1),
              "ms_per_step": {k: round(v, 1) for k, v in ms.most_common()},
              "attention": attention.resolve("auto")}
    for k, v in result["ms_per_step"].items():
        print(f"{v:8.1f} ms  {k}", flush=True)
    return result


def matmul_flops_per_s(n: int = 2048, repeats: int = 10) -> float:
    """Dense float32 [n, n] @ [n, n] FLOP/s: this machine's attainable peak for XLA."""
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    matmul = jax.jit(lambda a, b: a @ b)
    return 2 * n ** 3 / (median_ms(lambda: jax.block_until_ready(matmul(a, a)), repeats) / 1e3)


def mfu(rounds: int = 7, steps: int = 5) -> dict:
    """Achieved FLOP/s of the fused LCD step (XLA's cost-analysis FLOPs over its median step time)
    as a fraction of the dense matmul FLOP/s measured in the same run, before and after the step
    (their mean). The PyTorch step is given the same FLOPs (the same math) for comparison."""
    import numpy as np

    batch = lcd_batch_for_step()
    sides = {"jax": jax_lcd_step(batch), "torch": torch_lcd_step(batch)}
    cost = sides["jax"].compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    peak_before = matmul_flops_per_s()
    seconds = alternating_rounds(sides, rounds, steps)
    peak = (peak_before + matmul_flops_per_s()) / 2
    result = {"step_gflops": round(flops / 1e9, 3), "matmul_gflop_per_s": round(peak / 1e9, 1),
              "matmul_gflop_per_s_before": round(peak_before / 1e9, 1)}
    for name, s in seconds.items():
        achieved = flops / (float(np.median(s)) / steps)
        result[name] = {"step_ms": round(1e3 * float(np.median(s)) / steps, 1),
                        "gflop_per_s": round(achieved / 1e9, 1), "mfu": round(achieved / peak, 3)}
    print(result, flush=True)
    return result


# XLA CPU options, given per program (`.compile(compiler_options=...)`, as XLA_FLAGS would set them)
# so that every variant runs in one process, alternating with the others and with PyTorch.
XLA_CPU_OPTIONS = {
    "default": {},
    "ynnpack_off": {"xla_cpu_experimental_ynn_fusion_type": ""},  # dots, convs, fusions: Eigen / XLA
    "xnnpack": {"xla_cpu_use_xnnpack": True},
    "onednn": {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True},
    "fast_math": {"xla_cpu_enable_fast_math": True},
    "vector_width_512": {"xla_cpu_prefer_vector_width": 512},
    "eigen_single_thread": {"xla_cpu_multi_thread_eigen": False},
    "concurrency_scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "no_fusion_emitters": {"xla_cpu_use_fusion_emitters": False},
}


def xla_flags(rounds: int = 7, steps: int = 5) -> dict:
    """ms per fused LCD step (median round) compiled under each of XLA_CPU_OPTIONS, all variants
    and the PyTorch step alternating in one process (`alternating_rounds`)."""
    import numpy as np

    batch = lcd_batch_for_step()
    sides = {name: jax_lcd_step(batch, compiler_options=options) for name, options in XLA_CPU_OPTIONS.items()}
    sides["torch"] = torch_lcd_step(batch)
    seconds = alternating_rounds(sides, rounds, steps)
    ms = {name: round(1e3 * float(np.median(s)) / steps, 1) for name, s in seconds.items()}
    results = {name: {"options": XLA_CPU_OPTIONS.get(name), "ms": ms[name],
                      "vs_default": round(ms[name] / ms["default"], 3)} for name in sides}
    for name in results:
        print(name, results[name], flush=True)
    return results


SAMPLING_VAE = dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, latent_channels=4,
                    norm_num_groups=8)  # SD's VAE layout (factor 8), narrow


def sampling(repeats: int = 5, batch: int = 1) -> dict:
    """Seconds from noise to decoded images, one compiled program per case (the same programs
    lcm_jax.pipeline runs): LCM 1 / 2 / 4 steps on the w-conditioned student (one UNet batch per
    step) vs the teacher's DDIM-50 and DPM-Solver++-25 with CFG (a 2B batch per step). The LCD
    step's tiny UNet, a narrow SD-layout VAE (16x16 latents -> 128^2 images), random weights."""
    import functools

    from lcm_jax import pipeline
    from lcm_jax.diffusion import schedule as sched
    from lcm_jax.models import vae

    rng = jax.random.PRNGKey(0)
    side = LCD_UNET["sample_size"]
    x = jax.random.normal(rng, (batch, side, side, 4))
    cond = {"encoder_hidden_states": jax.random.normal(rng, (batch, LCD_CONTEXT, LCD_UNET["cross_attention_dim"]))}
    uncond = jax.tree.map(jnp.zeros_like, cond)
    nets = {}
    for name, w_dim in (("teacher", None), ("student", W_DIM)):
        module = unet.from_config(dict(LCD_UNET, time_cond_proj_dim=w_dim))
        nets[name] = module, init_unet(module, side, rng=rng)
    decoder = vae.from_config(SAMPLING_VAE)
    decoder_params = decoder.init(rng, jnp.zeros((1, 8, 8, 3)))["params"]
    schedule = sched.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
    cases = {"decode_only": (None, 0, "student"), "lcm_1": ("lcm", 1, "student"), "lcm_2": ("lcm", 2, "student"),
             "lcm_4": ("lcm", 4, "student"), "ddim_50_cfg": ("ddim", 50, "teacher"),
             "dpmpp_25_cfg": ("dpm_solver_pp", 25, "teacher")}
    results = {}
    for case, (sampler, steps, net) in cases.items():
        module, params = nets[net]
        cfg = net == "teacher"
        options = pipeline.scheduler_options({}, sampler) if sampler else {}
        sample = (functools.partial(pipeline._sample, module, schedule, "epsilon", sampler, steps, cfg,
                                    0.3, options) if sampler else lambda p, x, *_: x)
        run = jax.jit(lambda p, vp, x, c, u, r: decoder.decode_latents(vp, sample(p, x, c, u, r, 8.0)))
        args = (params, decoder_params, x, cond, uncond, jax.random.PRNGKey(1))
        start = time.perf_counter()
        jax.block_until_ready(run(*args))
        compile_s = time.perf_counter() - start
        ms = median_ms(lambda: jax.block_until_ready(run(*args)), repeats)
        results[case] = {"seconds": round(ms / 1e3, 4), "first_call_s": round(compile_s, 2)}
        print(case, results[case], flush=True)
    ddim, decode = results["ddim_50_cfg"]["seconds"], results["decode_only"]["seconds"]
    for case in ("lcm_1", "lcm_2", "lcm_4", "dpmpp_25_cfg"):  # with the decode, and without it
        results[case]["of_ddim_50"] = round(results[case]["seconds"] / ddim, 4)
        results[case]["sampling_only_of_ddim_50"] = round(
            (results[case]["seconds"] - decode) / (ddim - decode), 4)
    results.update(batch=batch, repeats=repeats, image_side=side * 8)
    return results


def compile_time() -> dict:
    """Seconds to compile the lcd_step suite's fused step in a fresh process: cold, then again with
    config.parallel.compilation_cache_dir holding the first process's programs."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as cache:
        runs = [json.loads(subprocess.run(
            [sys.executable, "-m", "experiments.benchmark", "--compile_once", cache], cwd=ROOT,
            check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for _ in range(2)]
    result = {"cold_s": runs[0], "cached_s": runs[1], "cached_over_cold": round(runs[1] / runs[0], 3)}
    print(result, flush=True)
    return result


def compile_once(cache: str) -> float:
    import ml_collections

    from lcm_jax import parallel

    parallel.enable_compilation_cache(ml_collections.ConfigDict({"compilation_cache_dir": cache}))
    objective = lcd_objective(LCD_UNET, LCD_UNET["sample_size"] * 8)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    frozen = objective.frozen  # {"base": the teacher's params}
    state = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0), frozen)
    batch = jax.tree.map(spec, lcd_batch(LCD_BATCH, LCD_UNET["sample_size"], LCD_CONTEXT,
                                         LCD_UNET["cross_attention_dim"]))
    start = time.perf_counter()
    jax.jit(objective.train_step, donate_argnums=0).lower(state, batch, frozen).compile()
    return round(time.perf_counter() - start, 2)
