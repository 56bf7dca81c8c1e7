"""LoRA as a parameter transform: the base params are never touched.

`lora = init(rng, base, targets, rank)` makes low-rank factors for every kernel whose module
name is in `targets`; `merge(base, lora, alpha)` returns base + (alpha / rank) B A for those
kernels. Training differentiates through `merge` with respect to `lora` only, so ONE base copy
serves as the frozen teacher (apply with `base`) and as the student. Two ways to apply it:
`merge(...)` builds base + delta kernels (what export and inference want: one matmul per layer),
`Unmerged(base, lora, alpha)` adds (x A) B next to every targeted layer's x W at call time
(`Denoiser.apply` takes it as params): training then holds the base kernels once, with no merged
copies and no kernel-sized gradients. Both are equal up to float rounding.

Layout (peft's, so export is a transpose): a Dense kernel [in, out] gets A [in, r] and B [r, out];
a Conv kernel [kh, kw, in, out] gets A [kh, kw, in, r] (a conv like the base one) and
B [1, 1, r, out] (a 1x1 conv). B starts at 0 and A random, by one of INITS: "peft" (peft's
kaiming-uniform, a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in x window) or
"gaussian" (diffusers 0.20's LoRALinearLayer / LoRAConv2dLayer, which Smooth Diffusion trains:
N(0, (1/r)^2) whatever the fan). At rank 8 the gaussian A is 2.5x (the digits DiT, width 128)
to 8x (SD's 1280-wide layers) larger; Adam moves B at the lr whatever A's scale, so the adapter's
B A moves that much faster per step under "gaussian".
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import re
from typing import Iterable, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lcm_jax import paths
from lcm_jax.errors import UserError
from lcm_jax.models import convert

# The LCM-LoRA set (latent-consistency/lcm-lora-sdv1-5's adapter config).
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out", "proj", "net_2",
                    "conv1", "conv2", "conv_shortcut", "conv", "time_emb_proj")
# Attention only (Smooth Diffusion's recipe): SD's q / k / v / out, the DiT's fused qkv and out.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out_0", "attn/qkv", "attn/proj")
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
INITS = ("peft", "gaussian")  # how `init` draws A (module docstring)


def _targeted(path: tuple, targets: Iterable[str]) -> bool:
    """A kernel whose module name is a target. `proj` means ff.net.0.proj (GEGLU's projection)
    and `conv` the resamplers' convs: their parents are net_0 / downsamplers_k / upsamplers_k.
    A target 'parent/name' names the module with its parent (the DiT's 'attn/proj')."""
    if path[-1] != "kernel" or len(path) < 2:
        return False
    name, parent = path[-2], path[-3] if len(path) > 2 else ""
    if f"{parent}/{name}" in targets:
        return True
    if name == "proj" and parent != "net_0":
        return False
    if name == "conv" and not re.fullmatch(r"(down|up)samplers_\d+", parent):
        return False
    return name in targets


def init(rng, base: Mapping, targets: Iterable[str] = LCM_LORA_TARGETS, rank: int = 64,
         init: str = "peft") -> dict:
    """Factors for every targeted kernel of `base`: A drawn by `init` (INITS), B = 0. A layer
    narrower than `rank` gets its own width as rank (`save` records it in a rank_pattern)."""
    if init not in INITS:
        raise UserError(f"lora.init={init!r} is not a LoRA init; use one of {INITS} ('peft': "
                        f"kaiming-uniform, 'gaussian': N(0, 1/rank^2) as diffusers 0.20).")
    targets = tuple(targets)
    flat = convert.flatten(base)
    chosen = sorted(p for p in flat if _targeted(p, targets))
    if not chosen:
        raise ValueError(f"No kernel matches the LoRA targets {targets}; check config.lora.targets.")
    lora = {}
    for i, path in enumerate(chosen):
        kernel = flat[path]
        *window, fan_in, fan_out = kernel.shape
        r = min(rank, fan_in * int(np.prod(window, dtype=int)), fan_out)
        key, shape = jax.random.fold_in(rng, i), (*window, fan_in, r)
        if init == "gaussian":  # std 1/r with the layer's own r, as diffusers builds each layer at it
            a = jax.random.normal(key, shape, jnp.float32) / r
        else:
            bound = 1.0 / math.sqrt(fan_in * int(np.prod(window, dtype=int)))  # kaiming_uniform(a=sqrt 5)
            a = jax.random.uniform(key, shape, jnp.float32, -bound, bound)
        b = jnp.zeros((*([1] * len(window)), r, fan_out), jnp.float32)
        lora[path[:-1] + ("lora_A",)] = a
        lora[path[:-1] + ("lora_B",)] = b
    return convert.unflatten(lora)


def delta(a, b):
    """B A in the base kernel's layout."""
    if a.ndim == 2:
        return a @ b
    return jnp.einsum("hwir,ro->hwio", a, b[0, 0])


def merge(base: Mapping, lora: Mapping, alpha: float, scale: float = 1.0) -> dict:
    """base + scale * (alpha / r) B A on every targeted kernel; other params pass through."""
    flat_lora = convert.flatten(lora)
    merged = dict(convert.flatten(base))
    for path in flat_lora:
        if path[-1] != "lora_A":
            continue
        module = path[:-1]
        a, b = flat_lora[path], flat_lora[module + ("lora_B",)]
        kernel = merged[module + ("kernel",)]
        merged[module + ("kernel",)] = kernel + (scale * alpha / a.shape[-1]) * delta(a, b).astype(kernel.dtype)
    return convert.unflatten(merged)


def unmerge(merged: Mapping, lora: Mapping, alpha: float, scale: float = 1.0) -> dict:
    return merge(merged, lora, alpha, -scale)


def adapted(base: Mapping, lora: Mapping, settings) -> "Unmerged | dict":
    """The adapted network's params for a config's LoRA section (rank, alpha, merged): unmerged
    by default (one base copy, no kernel-sized temporaries), `merged=True` for the merged form."""
    alpha = settings.get("alpha", settings.rank)
    return merge(base, lora, alpha) if settings.get("merged", False) else Unmerged(base, lora, alpha)


@flax.struct.dataclass
class Unmerged:
    """Params for `Denoiser.apply`: the base, and factors applied next to each targeted layer."""
    base: Mapping
    lora: Mapping
    alpha: float = flax.struct.field(pytree_node=False)
    scale: float = flax.struct.field(pytree_node=False, default=1.0)


def materialized(params):
    """Plain params (for code that reads or edits kernels): an Unmerged merged, others as is."""
    return merge(params.base, params.lora, params.alpha, params.scale) if isinstance(params, Unmerged) else params


@contextlib.contextmanager
def applied(lora: Mapping, alpha: float, scale: float = 1.0):
    """Inside, every nn.Dense / nn.Conv whose scope path has factors returns
    x W + b + scale (alpha / r) (x A) B: A runs as the layer itself (its window, strides and
    padding) with r outputs and no bias, B as a 1x1 map of the r channels."""
    flat = convert.flatten(lora)
    factors = {p[:-1]: (flat[p], flat[p[:-1] + ("lora_B",)]) for p in flat if p[-1] == "lora_A"}
    layers = (nn.Dense, nn.Conv)

    def interceptor(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, layers):
            return y
        ab = factors.get(tuple(module.scope.path))
        if ab is None:
            return y
        a, b = ab
        r = a.shape[-1]
        h = module.clone(parent=None, features=r, use_bias=False).apply({"params": {"kernel": a}}, args[0])
        return y + ((scale * alpha / r) * (h @ b.reshape(r, b.shape[-1]).astype(h.dtype))).astype(y.dtype)

    with nn.intercept_methods(interceptor):
        yield


def trainable_mask(params: Mapping, lora_key: str = "lora") -> dict:
    """For optax.masked / multi_transform over {'base': ..., 'lora': ...}: True on LoRA leaves."""
    return {k: jax.tree.map(lambda _: k == lora_key, v) for k, v in params.items()}


# ----------------------------------------------------------------------------------------------
# Export / import: the peft format diffusers' load_lora_weights / load_lora_adapter accepts.
# ----------------------------------------------------------------------------------------------

def to_peft_state_dict(lora: Mapping, prefix: str = "unet") -> dict[str, np.ndarray]:
    out = {}
    for path, value in convert.flatten(lora).items():
        module = convert.path_to_torch_key(path[:-1], "").rstrip(".")
        v = np.asarray(value, np.float32)
        if v.ndim == 2:
            v = v.T  # A [in, r] -> lora_A.weight [r, in]; B [r, out] -> lora_B.weight [out, r]
        else:
            v = v.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        out[f"{prefix}.{module}.{path[-1]}.weight"] = np.ascontiguousarray(v)
    return out


def save(folder: str, lora: Mapping, alpha: float, prefix: str = "unet") -> str:
    """pytorch_lora_weights.safetensors with diffusers' adapter metadata: the rank, alpha and
    targets, and a `rank_pattern` for the layers whose rank `init` lowered to their width (peft
    builds every layer at `r` otherwise, and the load fails on their shapes). Alpha stays one
    value: peft scales each layer by alpha / its own rank, as `merge` does."""
    from safetensors.numpy import save

    state = to_peft_state_dict(lora, prefix)
    ranks = {k[len(prefix) + 1:-len(".lora_A.weight")]: v.shape[0]
             for k, v in state.items() if k.endswith("lora_A.weight")}  # module path -> rank
    counts = collections.Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], k))  # the most common rank, as diffusers infers it
    metadata = {f"{prefix}.r": r, f"{prefix}.lora_alpha": alpha,
                f"{prefix}.target_modules": sorted(ranks),
                f"{prefix}.rank_pattern": {m: k for m, k in sorted(ranks.items()) if k != r}}
    path = os.path.join(folder, WEIGHTS_NAME)
    paths.write_atomic(path, save(state, metadata={"format": "pt", "lora_adapter_metadata":
                                                   json.dumps(metadata, sort_keys=True)}))
    return path


def load(path: str, prefix: str = "unet") -> tuple[dict, float]:
    """(factors, alpha) from a pytorch_lora_weights.safetensors that `save` wrote (or any peft
    state dict with the same module names and lora_adapter_metadata), in our layout."""
    from safetensors import SafetensorError, safe_open

    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    try:
        with safe_open(path, "np") as f:
            metadata = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix + ".")}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is missing, truncated or corrupt ({type(e).__name__}: {e}); "
                        f"copy it again from its source.") from None
    if not state or f"{prefix}.lora_alpha" not in metadata:
        raise ValueError(f"{path} holds no '{prefix}.' LoRA factors with lora_adapter_metadata; "
                         "lcm_jax loads the peft layout that lora.save / diffusers' "
                         "save_lora_weights write (not kohya 'lora_unet_*' files).")
    factors = {}
    for key, value in state.items():
        module, leaf = key[len(prefix) + 1:-len(".weight")].rsplit(".", 1)
        path_ = convert.torch_key_to_path(module + ".x")[:-1] + (leaf,)
        factors[path_] = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
    return convert.unflatten(factors), float(metadata[f"{prefix}.lora_alpha"])
