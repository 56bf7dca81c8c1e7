"""Two tiny train steps on 8 simulated CPU devices in every parallel layout; prints JSON.

  python tests/parallel_check.py [diffusion|lcd|tcd|smooth|lego][,...]
Run with XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/test_parallel.py does).
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402
import numpy as np  # noqa: E402
import tiny_run  # noqa: E402

from lcm_jax import train  # noqa: E402

LAYOUTS = {"one_device": ("jit", 1, 1), "data8": ("jit", 8, 1), "data2_fsdp4": ("jit", 2, 4),
           "fsdp8": ("jit", 1, 8), "pmap8": ("pmap", 8, 1)}


def build(objective_name, mode, data, fsdp):
    if objective_name == "diffusion":
        config = tiny_run.tiny_config()
        config.parallel.update(mode=mode, data=data, fsdp=fsdp, fsdp_min_size=0)
        return config, *tiny_run.build(config)
    if objective_name == "lego":  # EDM training of a tiny LEGO-PG with patch subsampling
        from lcm_jax import data as data_lib
        from lcm_jax import models
        from lcm_jax.objectives.edm import EDMObjective
        from support import lego

        config = lego.digits_lego_config("pg,sub,tiny")
        config.parallel.update(mode=mode, data=data, fsdp=fsdp, fsdp_min_size=0)
        pipeline = data_lib.make_pipeline(config.data, global_batch_size=config.batch_size, seed=0)
        model = models.make_model(config.model, 1)
        return config, EDMObjective(config, model, (16, 16, 1)), pipeline
    from lcm_jax import data as data_lib
    from support import lcd  # the tiny LCD teacher: random DiT + random VAE, 8x8 digits

    if objective_name == "smooth":  # the VJP penalty and its running mean, averaged globally
        from lcm_jax.objectives.smooth import SmoothObjective
        from support import smooth

        config = smooth.tiny_config()
        config.parallel.update(mode=mode, data=data, fsdp=fsdp, fsdp_min_size=0)
        pipeline = data_lib.make_pipeline(config.data, global_batch_size=config.batch_size, seed=0)
        return config, SmoothObjective(config, tiny_teacher(config, 8)), pipeline

    config = lcd.tiny_config()
    config.data.image_size = 8
    config.parallel.update(mode=mode, data=data, fsdp=fsdp, fsdp_min_size=0)
    pipeline = data_lib.make_pipeline(config.data, global_batch_size=config.batch_size, seed=0)
    return config, lcd.objective(config, tiny_teacher(config, config.lcd.w_embedding_dim),
                                 objective_name), pipeline


_TEACHERS = {}


def tiny_teacher(config, w_dim):
    """The tiny random teacher, built once per process (its init costs ~10 s; every layout and
    objective of a check uses the same one)."""
    from support import lcd

    if w_dim not in _TEACHERS:
        _TEACHERS[w_dim] = lcd.tiny_teacher(config, w_dim=w_dim)
    return _TEACHERS[w_dim]


def two_steps(objective_name, mode, data, fsdp):
    config, objective, pipeline = build(objective_name, mode, data, fsdp)
    batches = [pipeline.batch_at(i) for i in range(2)]
    devices = jax.devices()[:data * fsdp]
    program = train.Program(config, objective, batches[0], devices=devices)
    state = program.init_fn(jax.random.PRNGKey(0))
    losses = []
    for batch in batches:
        state, metrics = program.step_fn(state, program.device_batch(batch))
        losses.append(program.host_metrics(metrics)["loss"])
    sharded = 0
    if mode == "jit":  # how many params are split over 'fsdp'
        sharded = sum("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.params))
    host = jax.device_get(program.host_state(state))
    return losses, jax.tree.leaves((host.params, host.stats)), sharded


def main():
    """One JSON line per objective named (comma-separated): one process, one JAX start-up."""
    assert jax.device_count() == 8, "set XLA_FLAGS=--xla_force_host_platform_device_count=8"
    for objective in (sys.argv[1] if len(sys.argv) > 1 else "diffusion").split(","):
        print(json.dumps(report(objective)), flush=True)


def report(objective: str) -> dict:
    ref_losses, ref_params, _ = two_steps(objective, *LAYOUTS["one_device"])
    report = {}
    # LCD's and LEGO's layouts: data x fsdp together, and pmap (the diffusion check covers each
    # axis alone).
    names = ["data8", "data2_fsdp4", "fsdp8", "pmap8"] if objective == "diffusion" else ["data2_fsdp4", "pmap8"]
    for name in names:
        layout = LAYOUTS[name]
        losses, params, sharded = two_steps(objective, *layout)
        report[name] = {
            "losses": losses,
            "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "max_param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(params, ref_params)),
            "sharded_params": sharded}
    return report


if __name__ == "__main__":
    main()
