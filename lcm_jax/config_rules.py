"""The rules config checks are written with: dotted lookups that never raise, type tests, and the
one problem-line format `config.FIELD=VALUE why; fix.`

Generic checks live in lcm_jax.config_checks; each objective checks its own section with these
(objectives/*.py `config_problems`). Every check is a generator of problem lines.
"""
from __future__ import annotations

import numbers

MISSING = object()


def get(config, path: str, default=MISSING):
    """config.a.b via .get (works on ConfigDicts and dicts); `default` when any part is absent."""
    node = config
    for key in path.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(key, MISSING)
        if node is MISSING:
            return default
    return node


def present(value) -> bool:
    return value is not MISSING and value is not None


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def bad(path: str, value, why: str, fix: str) -> str:
    return f"config.{path}={value!r} {why}; {fix}."


def choice(config, path: str, choices, what: str):
    """A problem line if the field is set and not one of `choices`."""
    value = get(config, path)
    if present(value) and value not in choices:
        yield bad(path, value, f"is not a known {what}", f"use one of {tuple(choices)}")


def at_least(config, path: str, lo, *, integer: bool = True, fix: str | None = None):
    """A problem line if the field is set and is not a number (an int if `integer`) >= lo."""
    value = get(config, path)
    if not present(value):
        return
    kind = "an integer" if integer else "a number"
    if not (is_int(value) if integer else is_real(value)):
        yield bad(path, value, f"is not {kind}", fix or f"set it to {kind} >= {lo}")
    elif value < lo:
        yield bad(path, value, f"is below {lo}", fix or f"set it to {kind} >= {lo}")


def positive(config, path: str, *, allow_none: bool = False):
    value = get(config, path)
    if value is MISSING or (value is None and allow_none):
        return
    if not is_real(value) or value <= 0:
        none = " or None to turn it off" if allow_none else ""
        yield bad(path, value, "must be > 0", f"set it to a positive number{none}")


def in_unit_interval(config, path: str, what: str, example: float):
    """A problem line if the field is set and not in [0, 1)."""
    value = get(config, path)
    if present(value) and (not is_real(value) or not 0 <= value < 1):
        yield bad(path, value, f"must be in [0, 1) ({what})", f"e.g. {example}")


def lora(config, section: str, rank_fix: str):
    """`section.lora`, when set: a rank >= 1 and a positive alpha (or None)."""
    if get(config, f"{section}.lora", None):
        yield from at_least(config, f"{section}.lora.rank", 1, fix=rank_fix)
        yield from positive(config, f"{section}.lora.alpha", allow_none=True)


def sd_folder(config, needs: str, config_file: str):
    """A UNet objective without its local diffusers folder."""
    if get(config, "model.name") == "unet" and not get(config, "model.pretrained", None):
        yield (f"config.model.pretrained is not set; {needs} local diffusers folder: "
               f"--config {config_file}:/path/to/folder.")
