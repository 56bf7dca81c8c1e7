"""Data-parallel, FSDP and pmap steps equal one device's (8 simulated CPU devices)."""
import json
import os
import subprocess
import sys

import pytest

from lcm_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", WANDB_MODE="disabled")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests/parallel_check.py")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("layout", ["data8", "data2_fsdp4", "fsdp8", "pmap8"])
def test_layout_matches_one_device(report, layout):
    r = report[layout]
    assert r["max_loss_diff"] <= 1e-5, r
    assert r["max_param_diff"] <= 1e-5, r
    assert r["losses"][1] != r["losses"][0]  # two different steps really ran


def test_fsdp_really_shards(report):
    assert report["fsdp8"]["sharded_params"] > 0
    assert report["data2_fsdp4"]["sharded_params"] > 0
    assert report["data8"]["sharded_params"] == 0


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
