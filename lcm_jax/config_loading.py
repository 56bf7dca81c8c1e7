"""Config files and the one override syntax every script takes: `--config.a.b=VALUE`.

  load("configs/digits_lcd.py:tiny", ["lcd.lora={'rank': 4}", "eval.steps=(1, 2)"])

VALUE is a Python literal (`3`, `1e-4`, `True`, `'ddim'`, `(1, 2, 4)`, `{'rank': 4}`, `None`);
anything that does not parse as one is taken as a string (`--config.data.path=/data/x`). It must
fit the field: an int field takes an int, a float field an int or a float, a tuple field a list
or tuple, a section a dict; a field that is None takes any literal. A name that is no field of the
config nor of any shipped config is refused with the nearest valid names; a field of a shipped
config that this one lacks (e.g. `lcd.lora` sections of the SD configs, set on digits) is added.

The fields a config may hold are those of every config in configs/ (`known_fields`), the few the
code reads that no config sets (`EXTRA_FIELDS`), anything inside a free-form section
(`FREE_FORM`), and, inside a stage section (`vae_stage`, `teacher_stage`), any of these; a
misspelled field inside a config file is caught the same way (`unknown_fields`).
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import os
import re
import sys

import ml_collections

from lcm_jax.errors import UserError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_OVERRIDE = re.compile(r"^--config\.([A-Za-z_][\w.]*)(?:=(.*))?$", re.S)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without overrides, ['a.b=VALUE', ...]); `--config.a.b VALUE` works too."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        match = _OVERRIDE.match(argv[i])
        if match is None:
            rest.append(argv[i])
        elif match.group(2) is not None:
            overrides.append(f"{match.group(1)}={match.group(2)}")
        elif i + 1 < len(argv):
            overrides.append(f"{match.group(1)}={argv[i + 1]}")
            i += 1
        else:
            raise UserError(f"--config.{match.group(1)} has no value; write --config.{match.group(1)}=VALUE.")
        i += 1
    return rest, overrides


def load(spec: str, overrides=()) -> ml_collections.ConfigDict:
    """The config of `path[:arg]` (its get_config(arg)) with `overrides` applied, locked."""
    path, _, arg = spec.partition(":") if not os.path.exists(spec) else (spec, "", "")
    if not os.path.isfile(path):
        raise UserError(f"--config={spec}: no config file {path!r}; give a file from configs/, "
                        f"e.g. --config=configs/digits_lcd.py.")
    module = _import(path)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:  # a config's own refusal of its argument
        raise UserError(f"--config={spec}: {e}") from None
    config = apply(config, overrides)
    config.lock()
    return config


def apply(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """`config` (unlocked copy) with each 'a.b=VALUE' of `overrides` set."""
    config = ml_collections.ConfigDict(config.to_dict())
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep or not path:
            raise UserError(f"override {item!r} is not FIELD=VALUE; write e.g. --config.total_steps=100.")
        _set(config, path, text)
    return config


def _set(config, path: str, text: str) -> None:
    *parents, leaf = path.split(".")
    node = config
    for i, key in enumerate(parents):
        prefix = ".".join(parents[:i + 1])
        if node.get(key) is None:  # a section this config lacks (or leaves None): add it
            _require_known(config, prefix, path)
            # A stage section replaces the top-level one whole (teachers.stage_config): start it
            # from the top level's, so --config.teacher_stage.model.width=64 changes one field.
            inherited = config.get(prefix.partition(".")[2]) if i == 1 and parents[0] in STAGES else None
            node[key] = ml_collections.ConfigDict(
                inherited.to_dict() if isinstance(inherited, ml_collections.ConfigDict) else {})
        node = node[key]
        if not isinstance(node, ml_collections.ConfigDict):
            raise UserError(f"--config.{path}: config.{prefix} is a value, not a section.")
    if leaf not in node:
        _require_known(config, path, path)
    node[leaf] = _typed(path, node.get(leaf), text)


def _require_known(config, prefix: str, path: str) -> None:
    local = set(flatten(config))
    if any(k == prefix or k.startswith(prefix + ".") for k in local) or is_known(prefix, prefix=True):
        return
    raise UserError(f"--config.{path}: config.{prefix} is no field of this config or of any in "
                    f"configs/{nearest(prefix, known_fields() | local)}")


def _typed(path: str, current, text: str):
    """VALUE parsed as a literal (else a string), checked against the field's current type."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, bool):
        value = {"true": True, "false": False}.get(text.strip().lower(), value)
    if current is None or value is None:
        return ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    if isinstance(current, str):  # the text as written ('1e-4' stays '1e-4'), unquoted
        return value if isinstance(value, str) else text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if isinstance(current, ml_collections.ConfigDict) and isinstance(value, dict):
        return ml_collections.ConfigDict(value)
    if type(value) is type(current):
        return value
    raise UserError(f"--config.{path}={text}: config.{path} holds a {type(current).__name__} "
                    f"({current!r}); give a {type(current).__name__}.")


def flatten(config, prefix: str = "") -> dict:
    """{'a.b': value} over a ConfigDict or dict, sections included as their own entries."""
    flat = {}
    for key, value in config.items():
        flat[prefix + key] = value
        if isinstance(value, (dict, ml_collections.ConfigDict)):
            flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def nearest(name: str, known) -> str:
    """'; did you mean config.x or config.y?' (or '') for the closest dotted names."""
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    if not close:  # a misspelled leaf under a right section: compare the leaf alone
        section, _, leaf = name.rpartition(".")
        siblings = [k for k in known if k.rpartition(".")[0] == section]
        close = [s for s in difflib.get_close_matches(
            leaf, [k.rpartition(".")[2] for k in siblings], n=3, cutoff=0.5)]
        close = [f"{section}.{s}" if section else s for s in close]
    return f"; did you mean {' or '.join('config.' + c for c in close)}?" if close else \
        "; see configs/ for the fields there are."


def unknown_fields(config) -> list[str]:
    """One line per field of `config` that no shipped config has, with the nearest names."""
    if not known_fields():  # configs/ is not beside the package (an installed wheel)
        return []
    lines = []
    for path in flatten(config):
        parent = path.rpartition(".")[0]
        if not is_known(path) and (not parent or is_known(parent)):  # once, at the top unknown
            lines.append(f"config.{path} is no field of any config in configs/"
                         f"{nearest(path, known_fields())}")
    return lines


def is_known(path: str, prefix: bool = False) -> bool:
    """Whether `path` is a field of some shipped config, lies inside a free-form section, or is
    a stage's copy of a top-level field; prefix=True also accepts a section above such fields."""
    if path.partition(".")[0] in STAGES and "." in path:
        return is_known(path.partition(".")[2], prefix)
    known = known_fields()
    if path in known or any(path.startswith(f + ".") for f in FREE_FORM):
        return True
    return prefix and any(k.startswith(path + ".") for k in known)


# The stage sections of the digits chain: each holds top-level fields for its own run.
STAGES = ("vae_stage", "teacher_stage")


def stage_config(config, section: str) -> ml_collections.ConfigDict:
    """A full run config for one stage: the top level with each field of config.<section>
    replacing the top-level one (a section replaces the whole section)."""
    c = ml_collections.ConfigDict(config.to_dict())
    for key, value in config[section].items():
        c[key] = value
    return c

# Sections whose keys are free: keyword arguments passed through (a sampler's), or a diffusers
# model config (unknown keys are ignored there, as diffusers does).
FREE_FORM = ("sample.sampler_kwargs", "eval.sampler_kwargs", "model.unet", "vae")

# Fields the code reads (with a default) that no shipped config sets: a config may set them.
EXTRA_FIELDS = (
    "eval.every_steps", "eval.gamma", "eval.student_sampler", "sample.student_sampler",
    "sample.sigma_min", "sample.sigma_max", "eval.sigma_min", "eval.sigma_max",
    "sample.original_inference_steps", "eval.original_inference_steps",
    "sample.sampler_kwargs", "eval.sampler_kwargs",
    "data.split", "data.image_key", "diffusion.trained_betas", "optimizer.eps",
    "model.unet", "vae", "vae_kl_weight",
    "lcd.lora.init")  # LCM-LoRA configs keep peft's init; lcm_jax.models.lora.INITS


@functools.lru_cache(maxsize=1)
def known_fields() -> frozenset:
    """Every dotted field of every config in configs/ with each of its VARIANTS arguments."""
    if not os.path.isdir(CONFIGS_DIR):
        return frozenset()
    fields = set(EXTRA_FIELDS)
    for name in sorted(os.listdir(CONFIGS_DIR)):
        if not name.endswith(".py") or name.startswith("_"):
            continue
        module = _import(os.path.join(CONFIGS_DIR, name))
        for arg in getattr(module, "VARIANTS", ("",)):
            fields.update(flatten(module.get_config(arg) if arg else module.get_config()))
    return frozenset(fields)


def _import(path: str):
    """A config file as a module; its `from configs import ...` resolve in the repository root."""
    root = os.path.dirname(CONFIGS_DIR)
    if root not in sys.path:
        sys.path.append(root)
    spec = importlib.util.spec_from_file_location(f"lcm_jax_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
