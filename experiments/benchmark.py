r"""Benchmarks: speed and memory measured side by side in one run, printed and saved as JSON.

  python experiments/benchmark.py --suite unet_memory --json OUT.json

Suites:
  unet_memory  compiled memory of ONE UNet forward (batch 1, fp32 and bf16 compute) for the
               real SD 1.5 @ 512^2, SD 2.1 @ 768^2 and SDXL @ 1024^2 configs, from XLA's memory
               analysis of the compiled program on abstract inputs: no weights, nothing runs.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from lcm_jax.models import unet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_CASES = (("sd15", 512), ("sd21", 768), ("sdxl", 1024))


def compiled_memory(fn, *args) -> dict:
    """XLA's own accounting of a compiled program (bytes -> GiB)."""
    start = time.time()
    compiled = jax.jit(fn).lower(*args).compile()
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


SUITES = {"unet_memory": unet_memory}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), required=True)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    results = {args.suite: SUITES[args.suite](), "device": str(jax.devices()[0])}
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
