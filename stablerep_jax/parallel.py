"""Devices, meshes and multi-host plumbing shared by every job.

One mesh axis, `data`, spans every device of every host. Batches are sharded over it; params
are replicated; optimizer moments are sharded over it (each device keeps ~1/N of AdamW's state,
ZeRO-1 style) and XLA inserts the gathers. Each host feeds only its own slice of a batch.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Calls `jax.distributed.initialize` when this job is one of several processes.

    Explicit arguments win (two CPU processes on one machine use a loopback coordinator). With
    none, JAX's own cluster detection covers Cloud TPU pods and SLURM; a single process skips it.
    """
    if coordinator_address or (num_processes or 1) > 1:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif _looks_multi_host():
        jax.distributed.initialize()
    logging.info("process %d of %d; %d local of %d global devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].platform)


def hide_accelerators_from_tensorflow() -> None:
    """TensorFlow only reads and writes data here; it must never take GPU memory from JAX."""
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")


def start_job(flag_values) -> None:
    """What a job's main does first: hide accelerators from TensorFlow, then join the other
    processes (`--coordinator_address`, `--num_processes`, `--process_id`, or auto-detected)."""
    hide_accelerators_from_tensorflow()
    initialize_distributed(flag_values.coordinator_address, flag_values.num_processes,
                           flag_values.process_id)


def run_together(fn, what: str, coordinated: bool | None = None):
    """Runs `fn` on this process, then tells every process whether any failed, so that all go
    on together or all stop: the failed one with its own error, the others with a RuntimeError
    naming `what` and the failed process indices. Without this, one host's error leaves its
    peers waiting for it forever at the next barrier, collective or multi-host save.

    `coordinated` defaults to "more than one JAX process"; pass False for processes that run
    independently (no `jax.distributed`), which then just run `fn`.
    """
    if coordinated is None:
        coordinated = jax.process_count() > 1
    if not coordinated:
        return fn()
    from jax.experimental import multihost_utils
    error, result = None, None
    try:
        result = fn()
    except Exception as e:        # re-raised below, after telling the other processes
        error = e
    flags = multihost_utils.process_allgather(np.array(error is not None, np.int32))
    if error is not None:
        raise error
    failed = [i for i, flag in enumerate(np.asarray(flags).reshape(-1).tolist()) if flag]
    if failed:
        raise RuntimeError(f"{what}: process(es) {failed} failed (their logs name the "
                           "problem); this process stops too")
    return result


def _looks_multi_host() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        return True
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hostnames.split(",") if h]) > 1


def make_mesh(devices=None) -> Mesh:
    """A 1-D `data` mesh over all (or the given) devices, with classic auto sharding."""
    devices = list(devices if devices is not None else jax.devices())
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def from_host(mesh: Mesh, array: np.ndarray, spec: P) -> jax.Array:
    """An array every host holds in full -> a global array laid out by `spec`; each host fills
    only its own devices' shards (no host sends another host anything)."""
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec),
                                        lambda index: array[index])


def zero1_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Shards a leaf over its largest axis divisible by the mesh size; small leaves replicate."""
    size = mesh.shape[DATA_AXIS]
    candidates = [(dim, axis) for axis, dim in enumerate(shape) if dim % size == 0 and dim >= size]
    if not candidates or size == 1:
        return replicated(mesh)
    _, axis = max(candidates)
    spec = [None] * len(shape)
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, P(*spec))


def tree_zero1_shardings(mesh: Mesh, abstract_tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: zero1_sharding(mesh, tuple(x.shape)), abstract_tree)


def nearest_valid_batch_sizes(global_batch: int, device_count: int) -> tuple[int, ...]:
    """The multiples of `device_count` just below and above `global_batch` (below omitted if 0)."""
    below = global_batch // device_count * device_count
    above = below + device_count
    return (below, above) if below > 0 else (above,)


def host_local_batch_size(global_batch: int, device_count: int | None = None,
                          process_count: int | None = None) -> int:
    """This host's share of a global batch; the batch must split evenly over hosts and devices.

    `device_count` / `process_count` default to this run's (pass them to ask about a slice you
    do not have, e.g. 1376 captions on 64 chips).
    """
    devices = jax.device_count() if device_count is None else int(device_count)
    processes = jax.process_count() if process_count is None else int(process_count)
    if global_batch < 1:
        raise ValueError(
            f"batch_size={global_batch} (captions per global batch): must be positive, a "
            f"multiple of the {devices} devices ({devices}, {2 * devices}, ...): set "
            "--config.batch_size")
    if global_batch % devices:
        nearest = nearest_valid_batch_sizes(global_batch, devices)
        choices = " or ".join(str(b) for b in nearest)
        raise ValueError(
            f"batch_size={global_batch} (captions per global batch) is not divisible by the "
            f"{devices} devices; the nearest valid batch sizes are {choices} (multiples of "
            f"{devices}): set --config.batch_size. The learning rate scales with the batch "
            "(lr = optim.blr x batch_size x data.n_img x data.num_crop / 256 / 2, the reference's "
            "rule), so a different batch_size also changes lr; set optim.lr to fix it instead.")
    return global_batch // processes


def global_batch(mesh: Mesh, host_batch: dict) -> dict:
    """Stitches each host's numpy batch into global arrays sharded over `data` (leading axis)."""
    sharding = batch_sharded(mesh)

    def to_global(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree_util.tree_map(to_global, host_batch)


def per_device_bytes(tree: Any) -> int:
    """Bytes that the first local device holds for a tree of (sharded) arrays."""
    device = jax.local_devices()[0]
    total = 0
    for leaf in jax.tree_util.tree_leaves(tree):
        for shard in leaf.addressable_shards:
            if shard.device == device:
                total += shard.data.nbytes
    return total
