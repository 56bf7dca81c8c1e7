"""Devices: the ('data', 'fsdp') mesh, parameter and batch shardings, the pmap path, multi-host.

jit mode (the default, the pjit way): one program over all devices. Batches are split over both
mesh axes; each parameter is either replicated or, under FSDP, split along its largest dimension
divisible by the 'fsdp' axis size (params below `fsdp_min_size` elements stay replicated, where
sharding costs more in collectives than it saves). XLA inserts the all-gathers and
reduce-scatters. pmap mode keeps a replica per local device and averages gradients with
`lax.pmean` over PMAP_AXIS, for users who want the classic data-parallel program.
"""
from __future__ import annotations

import logging
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both axes
PMAP_AXIS = "batch"

log = logging.getLogger("lcm_jax")


def initialize_distributed(parallel_config) -> None:
    """Make this process one of a multi-controller run, before anything touches a device.

    - explicit settings win: `parallel.coordinator_address` (or JAX_COORDINATOR_ADDRESS),
      `parallel.num_processes`, `parallel.process_id` go to jax.distributed.initialize, which
      fills whatever is left unset from the cluster, if any;
    - otherwise, in a cluster JAX bootstraps itself from (a Cloud TPU pod slice, SLURM, Open MPI's
      mpirun, a Kubernetes Job: `detect_cluster`) with more than one process:
      jax.distributed.initialize() with no arguments, JAX reading everything from the cluster;
    - otherwise (one machine, or a one-process cluster job): nothing.
    Never initializes twice. Without it, N hosts of a pod would train N independent runs."""
    if _distributed_is_initialized():
        return
    address = parallel_config.get("coordinator_address", "") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = parallel_config.get("num_processes") or None
    process_id = parallel_config.get("process_id", -1)
    process_id = None if process_id is None or process_id < 0 else process_id
    explicit = address or num_processes is not None or process_id is not None
    cluster = None if explicit else detect_cluster()
    if not explicit and (cluster is None or cluster[1] == 1):
        return
    # CPU hosts need a collectives backend for cross-process programs; GPU/TPU ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address=address or None,
                                   num_processes=num_processes, process_id=process_id)
    else:
        log.info("jax.distributed: %s cluster detected (%s processes); JAX reads the coordinator, "
                 "process count and id from it.", cluster[0], cluster[1] or "?")
        jax.distributed.initialize()


def detect_cluster() -> tuple[str, int | None] | None:
    """(name, process count or None when it cannot be read) of the cluster environment that
    jax.distributed.initialize() would bootstrap from, or None. Asks JAX's own registry
    (jax._src.clusters.ClusterEnv: the same environments, in the same order, skipping the opt-in
    mpi4py one, as JAX); if a JAX version lacks it, checks the variables those environments read."""
    try:
        from jax._src.clusters import ClusterEnv
        cluster_types = list(ClusterEnv._cluster_types)
    except (ImportError, AttributeError):
        return _cluster_from_env_vars()
    for env in cluster_types:
        if getattr(env, "opt_in_only_method", False) or not env.is_env_present():
            continue
        try:
            count = int(env.get_process_count())
        except Exception:  # noqa: BLE001 - e.g. a metadata server that does not answer: JAX decides
            count = None
        return getattr(env, "name", "") or env.__name__, count
    return None


def _cluster_from_env_vars() -> tuple[str, int | None] | None:
    """The fallback of `detect_cluster`: the variables of jax/_src/clusters/{slurm,ompi,
    cloud_tpu}_cluster.py (a GCE TPU VM's metadata server is not queried here)."""
    env = os.environ
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "ompi", _int_or_none(env.get("OMPI_COMM_WORLD_SIZE"))
    if all(v in env for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                              "SLURM_LOCALID")):
        return "slurm", _int_or_none(env.get("SLURM_NTASKS"))
    if env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES"):
        hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
        return "gketpu", len(hosts.split(",")) * (_int_or_none(env.get("MEGASCALE_NUM_SLICES")) or 1)
    return None


def _distributed_is_initialized() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)  # absent in older jax
    if is_initialized is not None:
        return bool(is_initialized())
    from jax._src import distributed
    return distributed.global_state.client is not None


def _int_or_none(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def enable_compilation_cache(parallel_config) -> None:
    """JAX's persistent compilation cache in config.parallel.compilation_cache_dir (off when
    empty): a rerun, a resume or another process with the same programs loads them instead of
    compiling. Every program is cached, however fast it compiled."""
    path = parallel_config.get("compilation_cache_dir", "")
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def mesh_shape(parallel_config, device_count: int) -> tuple[int, int]:
    data, fsdp = parallel_config.get("data", -1), parallel_config.get("fsdp", 1)
    if data == -1:
        data = device_count // fsdp
    if fsdp == -1:
        fsdp = device_count // data
    if data * fsdp != device_count:
        raise ValueError(f"config.parallel.data * config.parallel.fsdp = {data} * {fsdp} must equal "
                         f"the device count {device_count}; use -1 for one of them to fill.")
    return data, fsdp


def make_mesh(parallel_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(parallel_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def param_spec(shape, fsdp_size: int, min_size: int) -> P:
    """Shard the largest dimension that the 'fsdp' axis divides; replicate small params."""
    if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(mesh: Mesh, state_shape, fsdp_min_size: int = 2 ** 16):
    """NamedShardings for a pytree of ShapeDtypeStructs (from jax.eval_shape of the init).
    Scalars and rng keys are replicated; every array leaf follows `param_spec`."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, param_spec(leaf.shape, fsdp, fsdp_min_size)), state_shape)


def to_host(tree):
    """numpy copies of (replicated) arrays, also across processes, where a replicated array is
    not fully addressable and device_get refuses it: every process reads its local replica."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError("to_host reads replicated arrays only; gather sharded ones first.")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def put(tree, shardings):
    """Host arrays (the same on every process) -> global arrays laid out by `shardings`; each
    process fills only its own shards, so this also works across hosts."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
        tree, shardings)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """This process's numpy batch -> one global jax.Array per key (strings stay on the host)."""
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in local_batch.items() if v.dtype.kind not in "USO"}


# ----------------------------------------------------------------------------------------------
# pmap mode
# ----------------------------------------------------------------------------------------------

def pmap_batch(local_batch: dict) -> dict:
    """[B, ...] -> [local devices, B / local devices, ...] for pmap (strings stay on the host)."""
    n = jax.local_device_count()
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:])
            for k, v in local_batch.items() if v.dtype.kind not in "USO"}


def replicate(tree):
    """One copy per local device, stacked on a leading axis sharded over them (pmap's layout)."""
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), P(PMAP_AXIS))
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(x, (len(devices),) + np.shape(x)), sharding),
        jax.device_get(tree))


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


def example_offset(axis_name: str | None, local_batch_size: int):
    """Global index of this shard's first example: per-example randomness is keyed by it, so
    pmap, jit over any mesh, and one device draw exactly the same numbers."""
    if axis_name is None:
        return 0
    return jax.lax.axis_index(axis_name) * local_batch_size
