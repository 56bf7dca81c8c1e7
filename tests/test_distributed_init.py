"""parallel.initialize_distributed on a pod / cluster: jax.distributed.initialize() with no
arguments where JAX can bootstrap itself from the environment (simulated SLURM here), the
explicit settings where given, nothing on one machine, never twice. jax.distributed.initialize is
replaced by a recorder: no coordinator is started, nothing touches the backend."""
import os

import jax
import ml_collections
import pytest

from lcm_jax import parallel

# Every variable a JAX cluster environment (jax/_src/clusters/) or initialize() itself reads to
# decide anything; cleared so that the machine running the tests cannot leak into them.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_")
_CLUSTER_VARS = ("KUBERNETES_SERVICE_HOST", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT",
                 "JAX_LOCAL_DEVICE_IDS")

# What `srun --nodes=2 --ntasks=4 ...` exports to its third task (the second one on node002).
SLURM_TASK_2_OF_4 = {
    "SLURM_JOB_ID": "12345",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_NODELIST": "node[001-002]",
    "SLURM_JOB_NODELIST": "node[001-002]",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_NTASKS": "4",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "1",
}


def parallel_config(**kw):
    return ml_collections.ConfigDict(dict(dict(coordinator_address="", num_processes=0, process_id=-1), **kw))


@pytest.fixture
def calls(monkeypatch):
    """A clean environment; jax.distributed.initialize and jax.config.update record their calls."""
    for name in list(os.environ):
        if name.startswith(_CLUSTER_PREFIXES) or name in _CLUSTER_VARS:
            monkeypatch.delenv(name)
    record = {"initialize": [], "config": []}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: record["initialize"].append((a, kw)))
    monkeypatch.setattr(jax.config, "update", lambda *a: record["config"].append(a))
    return record


def set_env(monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def test_slurm_job_auto_detects(calls, monkeypatch):
    set_env(monkeypatch, SLURM_TASK_2_OF_4)
    parallel.initialize_distributed(parallel_config())
    assert calls["initialize"] == [((), {})]  # no arguments: JAX reads everything from SLURM
    assert ("jax_cpu_collectives_implementation", "gloo") in calls["config"]

    # ... and from this environment JAX's own detection gives process 2 of 4, node001 as the
    # coordinator (the job's first node, port 12345 % 4096 + 61440), one GPU per task.
    from jax._src.clusters import ClusterEnv, SlurmCluster

    assert SlurmCluster.is_env_present()
    address, count, pid, local_ids = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, None, 300)
    assert (address, count, pid, local_ids) == ("node001:61497", 4, 2, [0])
    assert parallel.detect_cluster() == ("slurm", 4)
    assert parallel._cluster_from_env_vars() == ("slurm", 4)  # the fallback for other JAX versions


def test_one_machine_or_one_task_does_nothing(calls, monkeypatch):
    parallel.initialize_distributed(parallel_config())
    assert parallel.detect_cluster() is None and parallel._cluster_from_env_vars() is None
    # A one-task SLURM job (sbatch / srun -n 1 on a multi-GPU node): nothing to coordinate, and
    # JAX's SLURM defaults would hide every GPU but SLURM_LOCALID's.
    set_env(monkeypatch, dict(SLURM_TASK_2_OF_4, SLURM_NTASKS="1", SLURM_PROCID="0"))
    parallel.initialize_distributed(parallel_config())
    assert calls == {"initialize": [], "config": []}


def test_explicit_settings_win(calls, monkeypatch):
    parallel.initialize_distributed(parallel_config(coordinator_address="10.0.0.1:1234",
                                                    num_processes=2, process_id=1))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:4321")
    set_env(monkeypatch, SLURM_TASK_2_OF_4)  # explicit settings win over the cluster's
    parallel.initialize_distributed(parallel_config())
    assert calls["initialize"] == [
        ((), dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)),
        ((), dict(coordinator_address="10.0.0.2:4321", num_processes=None, process_id=None))]


def test_never_twice(calls, monkeypatch):
    set_env(monkeypatch, SLURM_TASK_2_OF_4)
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    parallel.initialize_distributed(parallel_config(coordinator_address="10.0.0.1:1234"))
    parallel.initialize_distributed(parallel_config())
    assert calls["initialize"] == []
