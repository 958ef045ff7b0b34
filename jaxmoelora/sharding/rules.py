"""Logical axis names -> mesh axes. The model names its axes; only this table knows the physical mesh."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# (logical name, mesh axes in order of preference); MaxText-style. A logical name may map to several mesh axes.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", ("tensor",)),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),
    ("expert", ("expert",)),
    ("lora_rank", ()),
)


def make_mesh(axis_sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the given axis sizes; one size may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    names = tuple(axis_sizes)
    sizes = [int(axis_sizes[n]) for n in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(axis_sizes)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split as {dict(axis_sizes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(names, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"but {len(devices)} are available")
    device_array = np.asarray(devices).reshape(sizes)
    return Mesh(device_array, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Sequence[str]]] = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec for an array: each dimension takes the rule's mesh axes that exist in `mesh`, are not used
    by an earlier dimension, and divide the dimension; otherwise it is replicated."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[Any] = []
    for name, dim in zip(logical_axes, shape):
        chosen: list[str] = []
        for axis in table.get(name, ()) if name else ():
            if axis not in mesh.shape or axis in used or mesh.shape[axis] == 1:
                continue
            size = int(np.prod([mesh.shape[a] for a in chosen + [axis]]))
            if dim % size == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    return PartitionSpec(*spec)


def variable_sharding(variable: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
    axes = variable.get_metadata().get("logical_axes")
    value = variable.get_value()
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
    """A tree like `state` with a NamedSharding for every variable, from its `logical_axes` metadata."""
    return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES, only=...) -> nnx.Module:
    """Places the variables of `model` selected by the filter `only` (all by default) onto their shardings in `mesh`
    (in place) and returns the model."""
    state = nnx.state(model, only)
    shardings = state_shardings(state, mesh, rules)
    values = jax.tree.map(lambda v: v.get_value(), state,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    placed = jax.device_put(values, shardings)
    nnx.update(model, placed)
    return model


def batch_sharding(mesh: Mesh, rank: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
    """Sharding for a (batch, ...) input: batch over the rule's mesh axes, the rest replicated."""
    axes = [a for a in dict(rules).get("batch", ()) if a in mesh.shape and mesh.shape[a] > 1]
    first = None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (rank - 1))))
