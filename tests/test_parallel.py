"""Data-parallel, FSDP and pmap steps equal one device's (8 simulated CPU devices)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import f32_tol, with_devices
from lcm_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(objectives: str) -> list[dict]:
    env = dict(with_devices(os.environ, 8),
               JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests/parallel_check.py"), objectives],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(objectives.split(",")):]]


@pytest.mark.slow
@pytest.mark.parametrize("objectives", ["diffusion", "lcd,tcd,smooth", "lego"])
def test_layouts_match_one_device_and_fsdp_shards(objectives):
    """Two steps of plain diffusion (data8, data2_fsdp4, fsdp8, pmap8), of LCD, TCD and Smooth
    Diffusion (frozen teacher + VAE sharded like the params; Smooth's running mean compared too;
    one process for the three) and of a LEGO stack under EDM with patch subsampling (per-example
    tile draws), each on data2_fsdp4 and pmap8. One test per subprocess, so that parallel
    workers never run the same 8-device check twice."""
    for report in check(objectives):
        for layout, r in report.items():
            # Each layout is its own program: its sums (the batch mean, the all-reduce) run in
            # another order. Losses: 84 ulps at their scale. Params: Adam's first steps scale the
            # gradient's rounding by up to lr / eps, so 176 ulps (as test_lcd); a wrong reduction
            # is off by ~1e-3.
            assert r["max_loss_diff"] <= f32_tol(84, r["losses"][0]), (layout, r)
            assert r["max_param_diff"] <= f32_tol(176), (layout, r)
            assert r["losses"][1] != r["losses"][0]  # two different steps really ran
        assert report["data2_fsdp4"]["sharded_params"] > 0  # FSDP really shards
        if "data8" in report:
            assert set(report) == {"data8", "data2_fsdp4", "fsdp8", "pmap8"}
            assert report["fsdp8"]["sharded_params"] > 0
            assert report["data8"]["sharded_params"] == 0
        else:
            assert set(report) == {"data2_fsdp4", "pmap8"}


def test_param_spec_rules():
    assert parallel.param_spec((128, 96), 4, 0) == parallel.P("fsdp", None)
    assert parallel.param_spec((6, 96), 4, 0) == parallel.P(None, "fsdp")
    assert parallel.param_spec((7, 5), 4, 0) == parallel.P()  # nothing divisible: replicate
    assert parallel.param_spec((128, 96), 4, 10 ** 6) == parallel.P()  # below the size threshold
    assert parallel.param_spec((128, 96), 1, 0) == parallel.P()


def test_mesh_shape_fills():
    from ml_collections import ConfigDict
    assert parallel.mesh_shape(ConfigDict(dict(data=-1, fsdp=2)), 8) == (4, 2)
    assert parallel.mesh_shape(ConfigDict(dict(data=2, fsdp=-1)), 8) == (2, 4)
    with pytest.raises(ValueError, match="config.parallel.data"):
        parallel.mesh_shape(ConfigDict(dict(data=3, fsdp=1)), 8)


@pytest.mark.slow
def test_two_processes_on_localhost_match_one(tmp_path):
    """A real multi-controller run: 2 processes x 1 CPU device (gloo collectives) train the tiny
    config, checkpoint (data positions all-gathered) and end where one process ends."""
    import socket

    import numpy as np

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    run = lambda workdir, *extra: subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests/tiny_run.py"), str(workdir), *extra], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sets = lambda pid: [f"--config.parallel.coordinator_address=127.0.0.1:{port}",
                        "--config.parallel.num_processes=2", f"--config.parallel.process_id={pid}"]
    procs = [run(tmp_path / "two", *sets(pid)) for pid in (0, 1)]
    single = run(tmp_path / "one")
    for p in procs + [single]:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    two, one = np.load(tmp_path / "two" / "final_params.npz"), np.load(tmp_path / "one" / "final_params.npz")
    # Two processes reduce over gloo in another order than one: 176 ulps, as the layouts above.
    assert max(float(np.max(np.abs(two[k] - one[k]))) for k in one.files) <= f32_tol(176)
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["2", "4", "6"]
