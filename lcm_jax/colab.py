"""The notebooks' Colab setup: install lcm_jax beside the runtime's own packages, and say when the
runtime must restart.

Colab ships TensorFlow, so lcm_jax is installed without its `[tf]` extra there (tensorflow-cpu
would replace the runtime's TensorFlow); a machine without TensorFlow gets the extra. pip may
also upgrade packages the runtime already imported (numpy, jax, ...): the old versions stay
loaded until the runtime restarts. `install` reports every distribution whose version changed,
and the setup cell then restarts the runtime (run the cell once more: the second install changes
nothing and goes on). Imports nothing outside the standard library, so the setup cell can use it
from the clone before the install.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys


def versions() -> dict[str, str]:
    """{distribution name (normalised): version} of everything installed."""
    return {d.metadata["Name"].lower().replace("_", "-"): d.version
            for d in importlib.metadata.distributions() if d.metadata["Name"]}


def requirement(path: str) -> str:
    """What to pip install: the clone, with `[tf]` only when no TensorFlow is importable."""
    return path if importlib.util.find_spec("tensorflow") else f"{path}[tf]"


def changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """'name old -> new' for each distribution that was installed before and changed version."""
    return [f"{name} {before[name]} -> {after[name]}" for name in sorted(before)
            if name in after and after[name] != before[name]]


def install(path: str, pip=None) -> list[str]:
    """pip install -e the clone at `path`; returns `changed` (empty: no restart needed).
    `pip(args)` runs pip (tests pass a fake)."""
    pip = pip or (lambda args: subprocess.run([sys.executable, "-m", "pip", *args], check=True))
    before = versions()
    pip(["install", "-q", "-e", requirement(path)])
    importlib.invalidate_caches()
    upgraded = changed(before, versions())
    if upgraded:
        print("lcm_jax's install changed packages the runtime came with (" + ", ".join(upgraded)
              + "): restarting the runtime; run this cell again.", flush=True)
    return upgraded
