"""Memory suites: XLA's compiled memory of a UNet forward, of the LCD step (full vs LCM-LoRA,
fp32 vs bf16 storage; SD 1.5 and SDXL) and of the paper-scale LEGO train steps. Abstract weights:
nothing runs."""
import json
import os

import jax
import jax.numpy as jnp

from lcm_jax.models import attention, unet

from .common import ROOT, compiled_memory
from .lcd import lcd_batch, lcd_objective, pooled_dim


UNET_CASES = (("sd15", 512), ("sd21", 768), ("sdxl", 1024))


def unet_memory(dtypes=("float32", "bfloat16")) -> dict:
    results = {}
    for name, side in UNET_CASES:
        config = json.load(open(os.path.join(ROOT, "configs/models", f"{name}_unet.json")))
        for dtype in dtypes:
            module = unet.from_config(config, dtype=getattr(jnp, dtype))
            c = module.config
            params = unet.abstract_params(module)
            x, t, kw = unet.example_inputs(c, 1, side // 8, 77)
            spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
            args = (params, spec(x), spec(t), jax.tree.map(spec, kw))
            fwd = lambda p, x, t, kw: module.apply({"params": p}, x, t, **kw)
            results[f"{name}_{side}_{dtype}"] = compiled_memory(fwd, *args)
            print(name, side, dtype, results[f"{name}_{side}_{dtype}"], flush=True)
    return results


MEMORY_CASES = {"sd15": ("sd15_unet.json", 512), "sdxl": ("sdxl_unet.json", 1024)}


def lcd_memory(batch: int = 1, cases=("sd15", "sdxl")) -> dict:
    """Peak compiled memory of the LCD step, full vs LCM-LoRA (r = 64, one base UNet), with the
    frozen teacher stored in float32 and in bfloat16 (`model.param_dtype`; the trained params
    stay a float32 master): SD 1.5 at 512^2 and SDXL at 1024^2, fp32 compute, remat, batch 1.
    (bf16 compute is left out: XLA's CPU backend computes bf16 convolutions through f32 copies,
    so its CPU figure says nothing of a GPU's.)"""
    from lcm_jax import models

    results = {}
    for case in cases:
        file, side = MEMORY_CASES[case]
        config = json.load(open(os.path.join(ROOT, "configs/models", file)))
        dim, pooled = config["cross_attention_dim"], pooled_dim(config)
        spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
        b = jax.tree.map(spec, lcd_batch(batch, side // 8, 77, dim, pooled=pooled))
        for mode, rank in (("full", 0), ("lora_r64", 64)):
            for param_dtype in ("float32", "bfloat16"):
                objective = lcd_objective(config, side, lora_rank=rank, remat=True, context=77)
                frozen = jax.eval_shape(lambda f: models.as_dtype(f, models.DTYPES[param_dtype]),
                                        objective.frozen)  # {"base": the teacher}
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

    from lcm_jax import config_checks, models
    from lcm_jax.objectives.edm import EDMObjective

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
        objective = EDMObjective(config, models.make_model(config.model, shape[-1]), shape)
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
