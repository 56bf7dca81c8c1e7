"""Runs the tiny digits config in a fresh process (for kill -9, SIGTERM and 8-device tests).

  python tests/tiny_run.py WORKDIR [--kill-at STEP] [--term-at STEP] [--config.FIELD=VALUE ...]
Prints one JSON line with the final params' checksum-free fingerprint path (params saved as .npz).
"""
import argparse
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tiny_config(overrides=()):
    """configs/digits_diffusion.py:tiny with 'field=VALUE' overrides (main.py's --config.field=VALUE)."""
    from lcm_jax import config_loading

    return config_loading.load(os.path.join(ROOT, "configs/digits_diffusion.py:tiny"), overrides)


def build(config):
    import jax

    from lcm_jax import data, objectives

    pipeline = data.make_pipeline(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count())
    return objectives.build(config, "", pipeline), pipeline


def flat_params(state):
    import jax

    from lcm_jax import parallel

    leaves = jax.tree_util.tree_flatten_with_path(parallel.to_host(state.params))[0]
    return {jax.tree_util.keystr(k): v for k, v in leaves}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--kill-at", type=int, default=0)
    parser.add_argument("--term-at", type=int, default=0)
    from lcm_jax import config_loading

    argv, overrides = config_loading.split_argv(sys.argv[1:])  # --config.FIELD=VALUE, as main.py
    args = parser.parse_args(argv)

    import numpy as np

    from lcm_jax import parallel, train

    config = tiny_config(overrides)
    parallel.initialize_distributed(config.parallel)  # before anything touches a device
    objective, pipeline = build(config)

    def on_step(step):
        if step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.term_at:
            os.kill(os.getpid(), signal.SIGTERM)

    state = train.run(config, args.workdir, objective, pipeline, on_step=on_step)
    params = flat_params(state)
    import jax

    if jax.process_index() == 0:
        np.savez(os.path.join(args.workdir, "final_params.npz"), **params)


if __name__ == "__main__":
    main()
