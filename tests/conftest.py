import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests import shared helpers

# JAX's persistent compilation cache, shared by both xdist workers and inherited by every
# subprocess and notebook kernel the tests start: the tiny chains, teachers and samplers that
# several tests build compile once per run (a notebook rerun: 147 s -> 56 s). It only skips
# recompiling identical programs; LCM_JAX_TEST_JAX_CACHE="" turns it off.
_CACHE = os.environ.setdefault("LCM_JAX_TEST_JAX_CACHE", os.path.join(
    __import__("tempfile").gettempdir(), f"lcm_jax_test_jax_cache_{os.getuid()}"))
if _CACHE:
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
    if "jax" in sys.modules:  # imported before this file: set it on the live config too
        sys.modules["jax"].config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


# The tests check values, not speed: XLA's CPU backend at its lowest optimisation level compiles
# about a third faster (the tiny digits chain: 75 s -> 50 s cold) and computes the same float32
# operations. Set in the environment, so every subprocess and notebook kernel the tests start
# inherits it; the benchmarks (experiments/benchmark.py) run at XLA's defaults.
FAST_COMPILE = "--xla_backend_optimization_level=0"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()


def with_devices(env: dict, count: int) -> dict:
    """`env` with `count` simulated CPU devices added to its XLA_FLAGS (the flags above kept)."""
    return dict(env, XLA_FLAGS=f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}".strip())


def write_tiny_tokenizer(folder, model_max_length=None) -> int:
    """A tiny CLIP byte-level BPE vocabulary (letters, word-final letters, 'cat', 'dog') in
    `folder`; returns the vocabulary size."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = ["c a", "ca t</w>", "d o", "do g</w>"]
    tokens = list(letters) + [c + "</w>" for c in letters] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    if model_max_length:
        with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
            json.dump({"model_max_length": model_max_length}, f)
    return len(tokens)


F32_EPS = 2.0 ** -23  # float32 machine epsilon: one ulp at 1.0


def f32_tol(ulps: float, *refs, floor: float = 1.0) -> float:
    """`ulps` float32 ulps at the scale of `refs` (their largest |value|, at least `floor`): an
    absolute tolerance between two separately compiled computations of the same float32 values
    (jit vs eager, another batch size or batch row, a remat'd graph, JAX vs torch). Each program
    fuses and orders its sums its own way (and XLA's CPU kernels follow the host's vector width),
    so they agree to some ulps per accumulated operation at the values' magnitude, not bit for
    bit. The same program run twice on the same inputs is bit-exact: test that with equality."""
    import numpy as np

    return ulps * F32_EPS * max([floor] + [float(np.max(np.abs(np.asarray(r)))) for r in refs])


def fast_compile(f, *args):
    """Compile at XLA's lowest backend optimisation and run: tests that check values, not speed."""
    import jax

    return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


# Fixtures used by more than one test module (their helpers live in tests/support/). Module scope,
# as each had in the module that defined it: built once per module that uses it.

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline folder (support.sd.build 'ddim'): test_lcd_sd,
    test_export."""
    from support.sd import build

    tmp = tmp_path_factory.mktemp("sd")
    build(tmp, "ddim")
    return str(tmp / "pipe")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """(torch CLIPModel, its folder: weights + tiny tokenizer + preprocessor, our scorer):
    test_clip_score, test_export."""
    from support.clip import tiny_clip

    return tiny_clip(str(tmp_path_factory.mktemp("clip")))
