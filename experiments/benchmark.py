r"""Benchmarks: speed and memory measured side by side in one run, printed and saved as JSON.

  python experiments/benchmark.py --suite unet_memory --json OUT.json

Suites:
  unet_memory  compiled memory of ONE UNet forward (batch 1, fp32 and bf16 compute) for the
               real SD 1.5 @ 512^2, SD 2.1 @ 768^2 and SDXL @ 1024^2 configs, from XLA's memory
               analysis of the compiled program on abstract inputs: no weights, nothing runs.
  lcd_step     images/s of lcm_jax's fused LCD step vs the same step in PyTorch, written in the
               reference LCD script's order (student forward, teacher cond then uncond, DDIM,
               target forward, pseudo-Huber, backward, clip, AdamW, EMA; diffusers'
               UNet2DConditionModel), same tiny UNet config, same batch, same CPU, one run.
  lcd_memory   XLA's compiled peak memory of the full LCD step vs the LCM-LoRA step (one base
               UNet) for SD 1.5 at 512^2 (abstract weights: nothing runs).
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
  lego_memory  the paper-scale LEGO configs (configs/lego_imagenet64.py pg / pr, lego_imagenet256.py
               on 32x32x4 latents, lego_celeba64.py pg): XLA's compiled memory and FLOPs per
               image of ONE train step at a per-device batch (abstract weights: nothing runs).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lcm_jax.models import attention, unet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_CASES = (("sd15", 512), ("sd21", 768), ("sdxl", 1024))


def compiled_memory(fn, *args, donate_argnums=()) -> dict:
    """XLA's own accounting of a compiled program (bytes -> GiB)."""
    start = time.time()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    m = compiled.memory_analysis()
    gib = lambda b: round(b / 2 ** 30, 3)
    return {"arguments_gib": gib(m.argument_size_in_bytes), "outputs_gib": gib(m.output_size_in_bytes),
            "temporaries_gib": gib(m.temp_size_in_bytes),
            "peak_gib": gib(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                            - m.alias_size_in_bytes),
            "compile_s": round(time.time() - start, 1)}


def unet_memory(dtypes=("float32", "bfloat16")) -> dict:
    results = {}
    for name, side in UNET_CASES:
        config = json.load(open(os.path.join(ROOT, "configs/models", f"{name}_unet.json")))
        for dtype in dtypes:
            module = unet.from_config(config, dtype=getattr(jnp, dtype))
            c = module.config
            params = unet.abstract_params(module)
            x, t, kw = unet._example_inputs(c, 1, side // 8, 77)
            spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
            args = (params, spec(x), spec(t), jax.tree.map(spec, kw))
            fwd = lambda p, x, t, kw: module.apply({"params": p}, x, t, **kw)
            results[f"{name}_{side}_{dtype}"] = compiled_memory(fwd, *args)
            print(name, side, dtype, results[f"{name}_{side}_{dtype}"], flush=True)
    return results


# ==============================================================================================
# LCD: one fused step (ours) vs the reference script's step (PyTorch)
# ==============================================================================================

# A small SD-shaped UNet (cross-attention down/up blocks) on 16x16 latents: big enough that the
# UNet, not the Python around it, dominates both sides.
LCD_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                layers_per_block=1, norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
LCD_BATCH, LCD_CONTEXT, W_DIM, W_RANGE, HUBER_C, EMA, LR = 8, 16, 256, (5.0, 15.0), 0.001, 0.95, 1e-5


class CachedTextConditioning:
    """Conditioning from precomputed prompt embeddings (both sides skip the text encoder); with
    `pooled` (SDXL) also the pooled embedding and the size / crop time ids."""
    frozen = {}

    def __init__(self, context: int, dim: int, pooled: int = 0):
        self.shape, self.pooled = (context, dim), pooled

    def prepare_batch(self, batch):
        return batch

    def _added(self, batch, pooled):
        return {"added_cond": {"text_embeds": pooled, "time_ids": batch["time_ids"]}} if self.pooled else {}

    def encode(self, batch, frozen):
        h = batch["prompt_embeds"]
        cond = {"encoder_hidden_states": h, **self._added(batch, batch.get("pooled_embeds"))}
        uncond = {"encoder_hidden_states": jnp.broadcast_to(batch["uncond_embeds"][:1], h.shape),
                  **self._added(batch, jnp.zeros_like(batch.get("pooled_embeds", h[:, 0])))}
        return cond, uncond

    def sample_conditions(self, frozen, num):  # shapes for the student's init; no sampling here
        batch = {"time_ids": jnp.zeros((num, 6)), "pooled_embeds": jnp.zeros((num, self.pooled))}
        cond = {"encoder_hidden_states": jnp.zeros((num,) + self.shape), **self._added(batch, batch["pooled_embeds"])}
        return cond, cond, jnp.arange(num)


def lcd_objective(unet_config: dict, image_side: int, params=None, lora_rank: int = 0,
                  remat: bool = False, context: int = LCD_CONTEXT, attention: str = "auto",
                  dtype=jnp.float32):
    """LCDObjective on a UNet teacher with cached text embeddings; params=None: abstract weights."""
    import ml_collections

    from lcm_jax import models
    from lcm_jax.diffusion import schedule as sched
    from lcm_jax.objectives.lcd import LCDObjective, Teacher

    teacher_module = unet.from_config(unet_config, remat=remat, attention=attention, dtype=dtype)
    student_module = unet.from_config(dict(unet_config, time_cond_proj_dim=W_DIM), remat=remat,
                                      attention=attention, dtype=dtype)
    if params is None:
        params = unet.abstract_params(teacher_module)
    side = image_side // 8
    teacher = Teacher(models.Denoiser(teacher_module), params,
                      sched.make_schedule("scaled_linear", 1000, 0.00085, 0.012), "epsilon",
                      CachedTextConditioning(context, unet_config["cross_attention_dim"], _pooled_dim(unet_config)),
                      (side, side, 4),
                      student_net=models.Denoiser(student_module))
    config = ml_collections.ConfigDict(dict(
        total_steps=10 ** 6, ema_decay=EMA,
        optimizer=dict(lr=LR, warmup_steps=0, decay="constant", grad_clip=1.0, weight_decay=0.0,
                       b1=0.9, b2=0.999, eps=1e-8),
        lcd=dict(num_ddim_timesteps=50, solver="ddim", w_min=W_RANGE[0], w_max=W_RANGE[1],
                 w_embedding_dim=W_DIM, loss="huber", huber_c=HUBER_C,
                 target="online" if lora_rank else "ema",
                 lora=dict(rank=lora_rank, alpha=float(lora_rank)) if lora_rank else None)))
    return LCDObjective(config, teacher)


def _pooled_dim(unet_config: dict) -> int:
    """SDXL's pooled text embedding width (0 for SD 1.x / 2.x)."""
    if unet_config.get("addition_embed_type") != "text_time":
        return 0
    return unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]


def lcd_batch(b: int, side: int, context: int, dim: int, seed: int = 0, pooled: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    batch = {"latents": rng.standard_normal((b, side, side, 4)).astype("float32"),
             "prompt_embeds": rng.standard_normal((b, context, dim)).astype("float32"),
             "uncond_embeds": rng.standard_normal((b, context, dim)).astype("float32")}
    if pooled:
        batch.update(pooled_embeds=rng.standard_normal((b, pooled)).astype("float32"),
                     time_ids=np.tile(np.asarray([[8.0 * side, 8.0 * side, 0, 0, 8.0 * side, 8.0 * side]],
                                                 "float32"), (b, 1)))
    return batch


def jax_lcd_step(batch: dict, attention: str = "auto", compiler_options: dict | None = None):
    """A callable running one fused LCD step of lcm_jax (until its loss is ready)."""
    module = unet.from_config(LCD_UNET)
    x, t, kw = unet._example_inputs(module.config, 1, LCD_UNET["sample_size"], LCD_CONTEXT)
    params = module.init(jax.random.PRNGKey(0), x, t, **kw)["params"]
    objective = lcd_objective(LCD_UNET, LCD_UNET["sample_size"] * 8, params, attention=attention)
    frozen = {"teacher": params}
    state = jax.jit(objective.init_state)(jax.random.PRNGKey(0), frozen)
    device_batch = jax.device_put(batch)
    step_fn = jax.jit(objective.train_step, donate_argnums=0).lower(state, device_batch, frozen).compile(
        compiler_options=compiler_options)
    holder = {"state": state}

    def step():
        holder["state"], metrics = step_fn(holder["state"], device_batch, frozen)
        jax.block_until_ready(metrics["loss"])

    step.compiled = step_fn
    return step


def torch_lcd_step(batch: dict):
    """The reference LCD script's step (diffusers examples/consistency_distillation), verbatim in
    structure: 4 UNet forwards (student, teacher cond, teacher uncond, target) + 1 backward."""
    import copy

    import diffusers
    import torch

    torch.manual_seed(0)
    teacher = diffusers.UNet2DConditionModel(**LCD_UNET).eval().requires_grad_(False)
    student = diffusers.UNet2DConditionModel(**LCD_UNET, time_cond_proj_dim=W_DIM)
    student.load_state_dict(teacher.state_dict(), strict=False)
    student.train()
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    sched = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = sched.alphas_cumprod
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    k = 20
    ddim_ts = torch.arange(1, 51) * k - 1
    latents = torch.from_numpy(batch["latents"]).permute(0, 3, 1, 2).contiguous()
    embeds = torch.from_numpy(batch["prompt_embeds"])
    uncond = torch.from_numpy(batch["uncond_embeds"])[:1].expand_as(embeds)
    b = latents.shape[0]
    col = lambda a: a[:, None, None, None]

    def scalings(t):
        st = t.float() * 10.0
        return 0.25 / (st ** 2 + 0.25), st / (st ** 2 + 0.25) ** 0.5

    def w_embedding(w):
        w = w * 1000.0
        half = W_DIM // 2
        freqs = torch.exp(torch.arange(half) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        args = w[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)

    def step():
        index = torch.randint(0, 50, (b,))
        start = ddim_ts[index]
        t = torch.clamp(start - k, min=0)
        cs_start, co_start = scalings(start)
        cs, co = scalings(t)
        noise = torch.randn_like(latents)
        noisy = col(alpha[start]) * latents + col(sigma[start]) * noise
        w = (W_RANGE[1] - W_RANGE[0]) * torch.rand(b) + W_RANGE[0]
        w_emb = w_embedding(w)
        out = student(noisy, start, timestep_cond=w_emb, encoder_hidden_states=embeds).sample
        x0 = (noisy - col(sigma[start]) * out) / col(alpha[start])
        model_pred = col(cs_start) * noisy + col(co_start) * x0
        with torch.no_grad():
            eps_c = teacher(noisy, start, encoder_hidden_states=embeds).sample
            eps_u = teacher(noisy, start, encoder_hidden_states=uncond).sample
            x0_c = (noisy - col(sigma[start]) * eps_c) / col(alpha[start])
            x0_u = (noisy - col(sigma[start]) * eps_u) / col(alpha[start])
            x0_w = x0_c + col(w) * (x0_c - x0_u)
            eps_w = eps_c + col(w) * (eps_c - eps_u)
            x_prev = col(alpha[t]) * x0_w + col(sigma[t]) * eps_w
            out_t = target(x_prev, t, timestep_cond=w_emb, encoder_hidden_states=embeds).sample
            x0_t = (x_prev - col(sigma[t]) * out_t) / col(alpha[t])
            target_pred = col(cs) * x_prev + col(co) * x0_t
        loss = torch.mean(torch.sqrt((model_pred - target_pred) ** 2 + HUBER_C ** 2) - HUBER_C)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p_t, p in zip(target.parameters(), student.parameters()):
                p_t.mul_(EMA).add_(p, alpha=1 - EMA)

    return step


def _rounds(sides: dict, rounds: int, steps: int) -> dict:
    """Seconds of each of `rounds` rounds of `steps` calls per side, the sides alternating within a
    round (so all see the same machine state), after two warm-up calls each (JAX compiles there)."""
    seconds = {name: [] for name in sides}
    for step in sides.values():
        step(), step()
    for _ in range(rounds):
        for name, step in sides.items():
            start = time.perf_counter()
            for _ in range(steps):
                step()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def lcd_batch_for_step() -> dict:
    return lcd_batch(LCD_BATCH, LCD_UNET["sample_size"], LCD_CONTEXT, LCD_UNET["cross_attention_dim"])


def lcd_step(rounds: int = 7, steps: int = 5) -> dict:
    """images/s of each side from its median round (`_rounds`): lcm_jax's step with its default
    attention ("auto": chunked on CPU) and with XLA's, and the PyTorch step."""
    import numpy as np
    import torch

    batch = lcd_batch_for_step()
    sides = {"jax": jax_lcd_step(batch, "auto"), "jax_xla_attention": jax_lcd_step(batch, "xla"),
             "torch": torch_lcd_step(batch)}
    seconds = _rounds(sides, rounds, steps)
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

    import numpy as np

    step = jax_lcd_step(lcd_batch_for_step())
    step(), step()
    wall = _median_ms(step, 10)
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
    return 2 * n ** 3 / (_median_ms(lambda: jax.block_until_ready(matmul(a, a)), repeats) / 1e3)


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
    seconds = _rounds(sides, rounds, steps)
    peak = (peak_before + matmul_flops_per_s()) / 2
    result = {"step_gflops": round(flops / 1e9, 3), "matmul_gflop_per_s": round(peak / 1e9, 1),
              "matmul_gflop_per_s_before": round(peak_before / 1e9, 1)}
    for name, s in seconds.items():
        achieved = flops / (float(np.median(s)) / steps)
        result[name] = {"step_ms": round(1e3 * float(np.median(s)) / steps, 1),
                        "gflop_per_s": round(achieved / 1e9, 1), "mfu": round(achieved / peak, 3)}
    print(result, flush=True)
    return result


def write_digits_shards(folder: str, side: int = 128, shards: int = 4) -> str:
    """The digits train split as webdataset shards: {key}.png (side x side, 8-bit grey) + .txt."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from lcm_jax.data import digits

    images, labels = digits.load("train", side, 1)
    pixels = np.round((images[..., 0] + 1) * 127.5).astype(np.uint8)
    for shard, index in enumerate(np.array_split(np.arange(len(pixels)), shards)):
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w") as tar:
            for i in index:
                png = io.BytesIO()
                Image.fromarray(pixels[i]).save(png, format="PNG")
                for ext, data in (("png", png.getvalue()), ("txt", f"digit {labels[i]}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(folder, "*.tar")


def prefetch(rounds: int = 5, steps: int = 20) -> dict:
    """Training steps/s on a webdataset of the digits (128^2 PNGs decoded and resized to 16^2, batch
    64, configs/digits_diffusion.py's DiT, unconditional labels), reading in the loop
    (data.prefetch=0) vs in a thread (data.prefetch=2). The loop is the training loop's: no block
    per step, one at the end of each round; the two alternate round by round."""
    import tempfile

    import numpy as np

    from configs import digits_diffusion
    from lcm_jax import data, models, objectives, train

    config = digits_diffusion.get_config()
    with tempfile.TemporaryDirectory() as folder:
        config.data = dict(name="webdataset", path=write_digits_shards(folder), image_size=16,
                           channels=1, shuffle_buffer=256, random_flip=False)
        objective = objectives.make_objective(config, models.make_model(config.model, 1), (16, 16, 1))
        labels = np.full((config.batch_size,), 10, np.int32)  # the null class: no labels in the shards
        sides = {}
        for depth in (0, 2):
            pipeline = data.make_pipeline(dict(config.data, prefetch=depth),
                                          global_batch_size=config.batch_size, seed=0)
            program = train.Program(config, objective, dict(train.peek(pipeline), label=labels))
            sides[f"prefetch_{depth}"] = {"pipeline": pipeline, "program": program,
                                          "state": program.init_fn(jax.random.PRNGKey(0))}

        def run(side, n):
            start = time.perf_counter()
            for _ in range(n):
                batch = dict(next(side["pipeline"]), label=labels)
                side["state"], metrics = side["program"].step_fn(side["state"], side["program"].device_batch(batch))
            jax.block_until_ready(metrics["loss"])
            return time.perf_counter() - start

        seconds = {name: [] for name in sides}
        for side in sides.values():
            run(side, 3)  # warm-up
        for _ in range(rounds):
            for name, side in sides.items():
                seconds[name].append(run(side, steps))
        decode = sides["prefetch_0"]["pipeline"]
        start = time.perf_counter()
        for _ in range(steps):
            next(decode)
        decode_ms = 1e3 * (time.perf_counter() - start) / steps
        for side in sides.values():
            side["pipeline"].close() if hasattr(side["pipeline"], "close") else None
    result = {name: round(steps / float(np.median(s)), 2) for name, s in seconds.items()}
    result = {"steps_per_s": result, "speedup": round(result["prefetch_2"] / result["prefetch_0"], 3),
              "decode_ms_per_batch": round(decode_ms, 1), "batch": config.batch_size}
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
    and the PyTorch step alternating in one process (`_rounds`)."""
    import numpy as np

    batch = lcd_batch_for_step()
    sides = {name: jax_lcd_step(batch, compiler_options=options) for name, options in XLA_CPU_OPTIONS.items()}
    sides["torch"] = torch_lcd_step(batch)
    seconds = _rounds(sides, rounds, steps)
    ms = {name: round(1e3 * float(np.median(s)) / steps, 1) for name, s in seconds.items()}
    results = {name: {"options": XLA_CPU_OPTIONS.get(name), "ms": ms[name],
                      "vs_default": round(ms[name] / ms["default"], 3)} for name in sides}
    for name in results:
        print(name, results[name], flush=True)
    return results


MEMORY_CASES = {"sd15": ("sd15_unet.json", 512), "sdxl": ("sdxl_unet.json", 1024)}


def lcd_memory(batch: int = 1, cases=("sd15", "sdxl")) -> dict:
    """Peak compiled memory of the LCD step, full vs LCM-LoRA (r = 64, one base UNet), with the
    frozen teacher stored in float32 and in bfloat16 (`model.param_dtype`; the trained params
    stay a float32 master): SD 1.5 at 512^2 and SDXL at 1024^2, fp32 compute, remat, batch 1.
    (bf16 compute is left out: XLA's CPU backend computes bf16 convolutions through f32 copies,
    so its CPU figure says nothing of a GPU's.)"""
    from lcm_jax import train

    results = {}
    for case in cases:
        file, side = MEMORY_CASES[case]
        config = json.load(open(os.path.join(ROOT, "configs/models", file)))
        dim, pooled = config["cross_attention_dim"], _pooled_dim(config)
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
        b = jax.tree.map(spec, lcd_batch(batch, side // 8, 77, dim, pooled=pooled))
        for mode, rank in (("full", 0), ("lora_r64", 64)):
            for param_dtype in ("float32", "bfloat16"):
                objective = lcd_objective(config, side, lora_rank=rank, remat=True, context=77)
                frozen = jax.eval_shape(lambda f: train.as_dtype(f, train.PARAM_DTYPES[param_dtype]),
                                        {"teacher": objective.teacher.params})
                state = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0), frozen)
                step = lambda s, bt, f: objective.train_step(s, bt, f)
                name = f"{case}_{mode}_{param_dtype}"
                results[name] = compiled_memory(step, state, b, frozen, donate_argnums=0)
                results[name]["trainable_params"] = int(sum(x.size for x in jax.tree.leaves(state.params)))
                print(name, results[name], flush=True)
        for param_dtype in ("float32", "bfloat16"):
            peak = lambda mode: results[f"{case}_{mode}_{param_dtype}"]["peak_gib"]
            results[f"{case}_lora_over_full_{param_dtype}"] = round(peak("lora_r64") / peak("full"), 3)
        results[f"{case}_bfloat16_over_float32_full"] = round(
            results[f"{case}_full_bfloat16"]["peak_gib"] / results[f"{case}_full_float32"]["peak_gib"], 3)
    results.update(batch=batch, attention=attention.resolve("auto"))
    return results


def lego_memory(batch: int = 32) -> dict:
    """Train-step memory and FLOPs of the paper-scale LEGO configs, per device at `batch`."""
    import importlib

    from lcm_jax import config_checks, models, objectives

    cases = {"imagenet64_pg_L": ("lego_imagenet64", "pg", (64, 64, 3)),
             "imagenet64_pr_L": ("lego_imagenet64", "pr", (64, 64, 3)),
             "imagenet256_u_XL_latent": ("lego_imagenet256", "", (32, 32, 4)),
             "celeba64_pg_S": ("lego_celeba64", "pg", (64, 64, 3))}
    results = {}
    for name, (module_name, arg, shape) in cases.items():
        config = importlib.import_module(f"configs.{module_name}").get_config(arg)
        if config.data.name == "folder":  # nothing is read: any existing folder validates
            config.data.path = ROOT
        config_checks.validate(config, device_count=1)
        objective = objectives.make_objective(config, models.make_model(config.model, shape[-1]), shape)
        state = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0))
        key = "latents" if shape[-1] == 4 else "image"
        batch_spec = {key: jax.ShapeDtypeStruct((batch,) + shape, jnp.float32),
                      "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
        memory = compiled_memory(objective.train_step, state, batch_spec, donate_argnums=0)
        lowered = jax.jit(objective.train_step).lower(state, batch_spec)  # HLO FLOPs, no compile
        results[name] = dict(memory, batch=batch,
                             params=int(sum(x.size for x in jax.tree.leaves(state.params))),
                             train_gflops_per_image=round(
                                 lowered.cost_analysis()["flops"] / batch / 1e9, 2))
        print(name, results[name], flush=True)
    return results


def _median_ms(fn, repeats: int) -> float:
    import numpy as np

    fn()
    fn()  # warm-up (and compile)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1e3 * float(np.median(times)), 2)


def lcd_breakdown(repeats: int = 10) -> dict:
    """The lcd_step suite's pieces, JAX vs PyTorch side by side (ms, median): the student UNet's
    forward, forward + backward, the teacher's 2B call (cond and uncond in one batch), and
    clip + AdamW + EMA over the student's params. Same tiny UNet, batch, CPU; one run."""
    import numpy as np
    import optax
    import torch

    b, side = LCD_BATCH, LCD_UNET["sample_size"]
    batch = lcd_batch(b, side, LCD_CONTEXT, LCD_UNET["cross_attention_dim"])
    rng = np.random.default_rng(0)
    w_emb = rng.standard_normal((b, W_DIM)).astype("float32")
    t = np.full((b,), 500, np.int32)
    x, c = batch["latents"], batch["prompt_embeds"]
    x2, c2, t2 = np.concatenate([x, x]), np.concatenate([c, batch["uncond_embeds"]]), np.concatenate([t, t])

    student = unet.from_config(dict(LCD_UNET, time_cond_proj_dim=W_DIM))
    teacher = unet.from_config(LCD_UNET)
    xe, te, kw = unet._example_inputs(student.config, 1, side, LCD_CONTEXT)
    params = student.init(jax.random.PRNGKey(0), xe, te, **kw)["params"]
    kw.pop("timestep_cond", None)
    teacher_params = teacher.init(jax.random.PRNGKey(0), xe, te, **kw)["params"]
    fwd = lambda p, x, c, w: student.apply({"params": p}, x, jnp.asarray(t), encoder_hidden_states=c, timestep_cond=w)
    loss = lambda p, x, c, w: jnp.mean(fwd(p, x, c, w) ** 2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(LR, 0.9, 0.999, 1e-8, weight_decay=0.0))

    def update(p, ema, opt, g):
        u, opt = tx.update(g, opt, p)
        p = optax.apply_updates(p, u)
        return p, jax.tree.map(lambda e, q: EMA * e + (1 - EMA) * q, ema, p), opt

    jx, jc, jw = map(jnp.asarray, (x, c, w_emb))
    grads = jax.jit(jax.grad(loss))(params, jx, jc, jw)
    state = {"p": jax.tree.map(jnp.copy, params), "ema": jax.tree.map(jnp.copy, params), "opt": tx.init(params)}
    jit_update = jax.jit(update, donate_argnums=(0, 1, 2))

    def jax_update():
        state["p"], state["ema"], state["opt"] = jit_update(state["p"], state["ema"], state["opt"], grads)
        jax.block_until_ready(state["p"])

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
        results[name] = {"jax_ms": _median_ms(ours[name], repeats), "torch_ms": _median_ms(theirs[name], repeats)}
        results[name]["torch_over_jax"] = round(results[name]["torch_ms"] / results[name]["jax_ms"], 3)
        print(name, results[name], flush=True)
    compiled = jax.jit(jax.grad(loss)).lower(params, jx, jc, jw).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    results["forward_backward_hlo"] = {"gflops": round(cost.get("flops", 0) / 1e9, 3),
                                       "gbytes_accessed": round(cost.get("bytes accessed", 0) / 1e9, 3)}
    results.update(batch=b, torch_threads=torch.get_num_threads(), xla_flags=os.environ.get("XLA_FLAGS", ""))
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
        xe, te, kw = unet._example_inputs(module.config, 1, side, LCD_CONTEXT)
        nets[name] = module, module.init(rng, xe, te, **kw)["params"]
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
        ms = _median_ms(lambda: jax.block_until_ready(run(*args)), repeats)
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
            [sys.executable, os.path.abspath(__file__), "--compile_once", cache], check=True,
            capture_output=True, text=True).stdout.strip().splitlines()[-1]) for _ in range(2)]
    result = {"cold_s": runs[0], "cached_s": runs[1], "cached_over_cold": round(runs[1] / runs[0], 3)}
    print(result, flush=True)
    return result


def _compile_once(cache: str) -> float:
    import ml_collections

    from lcm_jax import parallel

    parallel.enable_compilation_cache(ml_collections.ConfigDict({"compilation_cache_dir": cache}))
    objective = lcd_objective(LCD_UNET, LCD_UNET["sample_size"] * 8)
    spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    frozen = {"teacher": objective.teacher.params}
    state = jax.eval_shape(objective.init_state, jax.random.PRNGKey(0), frozen)
    batch = jax.tree.map(spec, lcd_batch(LCD_BATCH, LCD_UNET["sample_size"], LCD_CONTEXT,
                                         LCD_UNET["cross_attention_dim"]))
    start = time.perf_counter()
    jax.jit(objective.train_step, donate_argnums=0).lower(state, batch, frozen).compile()
    return round(time.perf_counter() - start, 2)


SUITES = {"unet_memory": unet_memory, "lcd_step": lcd_step, "lcd_memory": lcd_memory,
          "lego_memory": lego_memory, "sampling": sampling, "compile": compile_time,
          "lcd_breakdown": lcd_breakdown, "lcd_profile": lcd_profile, "xla_flags": xla_flags, "mfu": mfu,
          "prefetch": prefetch}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--compile_once", metavar="CACHE", help=argparse.SUPPRESS)  # compile's child
    args = parser.parse_args()
    if args.compile_once:
        print(json.dumps(_compile_once(args.compile_once)))
        return
    if not args.suite:
        parser.error("--suite is required")
    results = {args.suite: SUITES[args.suite](), "device": str(jax.devices()[0])}
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
