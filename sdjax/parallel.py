"""Devices, meshes and shardings: parallelism as data, not as code paths.

The math never asks how many devices there are. A `Mesh` with axes ("data", "fsdp") is built once;
the batch is split over both axes, params are replicated or (with fsdp > 1) split along one
dimension over "fsdp". The same per-shard function also runs under `jax.pmap` for users of
pmapped code. Multi-host runs go through `jax.distributed.initialize`: every host runs the same
program, only I/O is per host.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
PARALLEL_MODES = ("jit", "pmap")
# Params smaller than this stay replicated under fsdp: splitting them saves nothing worth a gather.
FSDP_MIN_SIZE = 2 ** 16


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """Join a multi-host cluster (no-op for a single process with no coordinator given).

    With no arguments on a TPU pod or a managed cluster, JAX discovers the peers itself.
    """
    if coordinator_address is None and (num_processes or 1) == 1:
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def make_mesh(fsdp: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, fsdp) mesh over all devices (of every host); `fsdp` must divide the device count."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must be >= 1 and divide the number of devices ({len(devices)})")
    grid = np.array(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(mesh: Mesh, params: Any) -> Any:
    """Shardings for a params pytree: replicated, or, when the mesh's fsdp axis is > 1, each large
    param split over "fsdp" along its largest dimension that the axis size divides."""
    fsdp = mesh.shape[FSDP_AXIS]

    def spec(x) -> NamedSharding:
        shape = tuple(np.shape(x))
        if fsdp == 1 or int(np.prod(shape)) < FSDP_MIN_SIZE:
            return replicated(mesh)
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0:
                axes = [None] * len(shape)
                axes[dim] = FSDP_AXIS
                return NamedSharding(mesh, P(*axes))
        return replicated(mesh)

    return jax.tree.map(spec, params)


def check_batch_divides(batch_size: int, mesh: Mesh, what: str = "batch") -> None:
    if batch_size % mesh.size:
        raise ValueError(f"{what} size {batch_size} must be a multiple of the number of devices "
                         f"({mesh.size}); pad the batch or use fewer devices")


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Place host arrays (the global batch, identical on every host) on the mesh, split by batch."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]),
        tree)


def jit_over_batch(per_shard: Callable, mesh: Mesh, params_sharding: Any) -> Callable:
    """`per_shard(params, batch)` under jit on `mesh`: each device runs it on its slice of the batch
    (shard_map), params whole on every device (gathered from fsdp shards on entry)."""
    data = batch_sharding(mesh)
    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(BATCH_AXES)),
                           out_specs=P(BATCH_AXES), check_vma=False)
    return jax.jit(mapped, in_shardings=(params_sharding, data), out_shardings=data)


def pmap_over_batch(per_shard: Callable, *, static_broadcasted_argnums: Sequence[int] = ()) -> Callable:
    """Run `per_shard(params, batch...)` under `jax.pmap`: params broadcast, each batch leaf reshaped
    to (devices, per_device, ...) and back. Equal results to the jit/mesh path, by construction."""
    n = jax.local_device_count()
    pmapped = jax.pmap(per_shard, in_axes=(None, 0), static_broadcasted_argnums=static_broadcasted_argnums)

    def run(params, batch):
        def split(x):
            if x.shape[0] % n:
                raise ValueError(f"batch size {x.shape[0]} must be a multiple of the {n} local devices")
            return x.reshape((n, x.shape[0] // n) + x.shape[1:])

        out = pmapped(params, jax.tree.map(split, batch))
        return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)

    return run
