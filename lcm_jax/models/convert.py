"""diffusers / transformers safetensors  <->  Flax params, both directions, every key checked.

Our Flax modules name their submodules after the PyTorch state-dict keys, with list indices
joined by '_' ("down_blocks.0.resnets.1.conv1.weight" <-> down_blocks_0/resnets_1/conv1/kernel).
What each leaf needs is decided by the TARGET tree: a Flax `kernel` is a transposed torch
`weight` (Linear [out, in] -> [in, out]; Conv OIHW -> HWIO), `scale` and `embedding` are torch
`weight`s as they are, `bias` is `bias`. Nothing is guessed from names alone, and any missing,
unexpected or mis-shaped key is reported before a single array is used.

Weights load from safetensors only: pickle checkpoints (.bin, .ckpt, .pt) can run arbitrary code.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np

from lcm_jax import paths
from lcm_jax.errors import UserError

# Torch module-list attributes: their numeric children are list positions, not names.
LIST_NAMES = {"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
              "downsamplers", "upsamplers", "to_out", "net", "layers", "blocks"}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")


class ConversionError(UserError):
    """A checkpoint that does not fit the module: every problem, one per line."""


# ----------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------

def torch_key_to_path(key: str) -> tuple[str, ...]:
    """'down_blocks.0.resnets.1.conv1.weight' -> ('down_blocks_0', 'resnets_1', 'conv1', 'weight')."""
    path: list[str] = []
    for part in key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return tuple(path)


def path_to_torch_key(path: tuple[str, ...], leaf_name: str) -> str:
    parts = []
    for name in path:
        m = re.fullmatch(r"(.+)_(\d+)", name)
        parts.extend([m.group(1), m.group(2)] if m and m.group(1) in LIST_NAMES else [name])
    return ".".join(parts + [leaf_name])


# ----------------------------------------------------------------------------------------------
# Leaves
# ----------------------------------------------------------------------------------------------

# kernel axis orders: torch -> Flax (Conv OIHW -> HWIO, Linear [out, in] -> [in, out]).
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}


def _to_flax_leaf(leaf: str, value: np.ndarray) -> np.ndarray:
    return value.transpose(_TO_FLAX[value.ndim]) if leaf == "kernel" and value.ndim in _TO_FLAX else value


def _to_torch_leaf(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim in _TO_FLAX:
        return value.transpose(np.argsort(_TO_FLAX[value.ndim]))  # the inverse permutation
    return value


def _torch_leaf_name(flax_leaf: str) -> str:
    return {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(flax_leaf, flax_leaf)


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    flat = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            flat.update(flatten(v, prefix + (k,)))
        else:
            flat[prefix + (k,)] = v
    return flat


def unflatten(flat: Mapping[tuple, object]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def torch_to_flax(state_dict: Mapping[str, np.ndarray], target: Mapping, *,
                  ignore: tuple[str, ...] = (), dtype=None) -> dict:
    """A torch state dict -> a Flax params tree shaped like `target` (arrays or ShapeDtypeStructs).

    `ignore`: regexes of source keys that are allowed to go unused (e.g. position_ids buffers).
    Raises ConversionError listing every missing, unexpected and mis-shaped key.
    """
    wanted = flatten(target)
    by_key = {path_to_torch_key(p[:-1], _torch_leaf_name(p[-1])): p for p in wanted}
    out, problems, seen = {}, [], set()
    for key, value in state_dict.items():
        path = by_key.get(key)
        if path is None:
            if not any(re.fullmatch(pattern, key) for pattern in ignore):
                problems.append(f"unexpected key {key} {tuple(value.shape)}")
            continue
        seen.add(key)
        converted = _to_flax_leaf(path[-1], np.asarray(value))
        expected = tuple(wanted[path].shape)
        if converted.shape != expected:
            problems.append(f"shape mismatch for {key}: checkpoint {tuple(value.shape)} -> "
                            f"{converted.shape}, the module expects {expected}")
            continue
        out[path] = converted.astype(dtype or wanted[path].dtype)
    problems += [f"missing key {key} {tuple(wanted[path].shape)}"
                 for key, path in by_key.items() if key not in seen]
    if problems:
        raise ConversionError(f"{len(problems)} problems converting the checkpoint:\n  "
                              + "\n  ".join(sorted(problems)))
    return unflatten(out)


def flax_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """A Flax params tree -> a torch-layout state dict of numpy arrays (contiguous)."""
    return {path_to_torch_key(p[:-1], _torch_leaf_name(p[-1])):
            np.ascontiguousarray(_to_torch_leaf(p[-1], np.asarray(v)))
            for p, v in flatten(params).items()}


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------

class MissingFile(UserError, FileNotFoundError):
    """A model folder or one of its files is not where the config says."""


def read_config(folder: str) -> dict:
    folder = paths.path(folder)
    if not folder.is_dir():
        raise MissingFile(f"{folder} does not exist; point it at a local diffusers / "
                          "transformers model folder (weights cannot be downloaded here).")
    if not (folder / "config.json").exists():
        raise MissingFile(f"{folder} has no config.json; give the component folder (e.g. "
                          "PIPELINE/unet), not the pipeline root or a weights file.")
    try:
        return json.loads((folder / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / 'config.json'} is not valid JSON ({e}); it is truncated or "
                        f"corrupt: copy the model folder again from its source.") from None


def load_weights(path) -> dict[str, np.ndarray]:
    """One safetensors file (local or on a bucket); a truncated or garbled one is named, with
    the fix."""
    from safetensors import SafetensorError
    from safetensors.numpy import load, load_file

    try:
        return load(paths.path(path).read_bytes()) if paths.is_remote(path) else load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}); copy it again "
                        f"from its source.") from None


def load_state_dict(folder: str, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a component folder: one safetensors file, an fp16/other variant, or shards
    listed in a `*.safetensors.index.json`. Pickle checkpoints are refused."""
    files = [p.name for p in paths.path(folder).iterdir()]
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    for stem in WEIGHT_NAMES:
        index = f"{stem}{suffix}.index.json"
        if index in files:
            index_json = json.loads((paths.path(folder) / index).read_text())
            shards = sorted(set(index_json["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(load_weights(os.path.join(folder, shard)))
            return state
        if f"{stem}{suffix}" in files:
            return load_weights(os.path.join(folder, f"{stem}{suffix}"))
    pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ConversionError(
            f"{folder} holds only pickle checkpoints ({', '.join(sorted(pickles))}), which lcm_jax "
            "does not load (unpickling can run arbitrary code). Convert once with PyTorch: "
            "`Model.from_pretrained(folder).save_pretrained(folder, safe_serialization=True)`.")
    wanted = f"{WEIGHT_NAMES[0]}{suffix} or {WEIGHT_NAMES[1]}{suffix}"
    raise MissingFile(f"{folder} has no {wanted}" + (
        f"; variants present: {sorted(f for f in files if f.endswith('.safetensors'))}"
        if any(f.endswith(".safetensors") for f in files) else "."))


def save_folder(folder: str, config: dict, state_dict: Mapping[str, np.ndarray],
                weights_name: str = "diffusion_pytorch_model.safetensors") -> None:
    """config.json + safetensors, written to temporary names and renamed (atomic per file)."""
    from safetensors.numpy import save

    folder = paths.path(folder)
    paths.write_atomic(folder / weights_name, save(
        {k: np.ascontiguousarray(v) for k, v in state_dict.items()}, metadata={"format": "pt"}))
    paths.write_atomic(folder / "config.json", json.dumps(config, indent=2, sort_keys=True))