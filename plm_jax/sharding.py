"""Device mesh, logical-axis rules and the shardings derived from them.

Everything that knows about devices lives here. Models name their axes logically (`embed`,
`act_batch`, ...); one rule table (config `mesh.rules`) maps those names onto the mesh axes
`("data", "fsdp", "tensor")`. This module never imports `plm_jax.models`.

What it leaves out: the train-state shardings themselves are derived in `train/` from
`eval_shape(init)` with `logical_to_sharding`, not written here by hand.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from plm_jax.config import DEFAULT_AXIS_RULES, MeshConfig, resolve_mesh_shape, validate_for_devices
from plm_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # batch rows are split over both; fsdp also shards weights

LogicalNames = Sequence[str | None]

_RULES: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "plm_jax_axis_rules", default=DEFAULT_AXIS_RULES
)
_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("plm_jax_mesh", default=None)

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "batch_sharding",
    "constrain",
    "current_mesh",
    "logical_to_sharding",
    "logical_to_spec",
    "make_mesh",
    "shard_batch",
    "use_mesh",
    "validate_for_devices",
]


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the `("data", "fsdp", "tensor")` mesh, filling a `-1` axis with the rest.

    Devices keep `jax.devices()` order (process by process), so on several hosts each process
    owns a contiguous block of the batch axes and reads a contiguous slice of each batch.

    Raises:
      ConfigError: when the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(mesh_cfg, len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Mapping[str, Any] | None = None) -> Iterator[Mesh]:
    """Makes `mesh` and the logical rules current for `constrain` and jitted code."""
    rules_token = _RULES.set(dict(DEFAULT_AXIS_RULES if rules is None else rules))
    mesh_token = _MESH.set(mesh)
    try:
        # No jax.set_mesh here: constrain() builds explicit NamedShardings, and Flax would read
        # the parameters' logical names as mesh axes under an ambient mesh.
        yield mesh
    finally:
        _MESH.reset(mesh_token)
        _RULES.reset(rules_token)


def logical_to_spec(names: LogicalNames, rules: Mapping[str, Any] | None = None) -> PartitionSpec:
    """Maps logical axis names to a `PartitionSpec` over the mesh axes.

    A mesh axis is used at most once per array: a later dimension that maps to an axis already
    taken stays replicated (e.g. `heads` and `mlp` both on `tensor` in one weight).

    Raises:
      ConfigError: a name missing from the rule table.
    """
    rules = _RULES.get() if rules is None else rules
    used: set[str] = set()
    spec: list[Any] = []
    for name in names:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError(
                f"logical axis {name!r} has no entry in mesh.rules; add mesh.rules.{name}=AXIS "
                f"(one of {list(MESH_AXES)} or null)"
            )
        target = rules[name]
        axes = [] if target is None else [target] if isinstance(target, str) else list(target)
        axes = [a for a in axes if a not in used]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def logical_to_sharding(
    names: LogicalNames,
    mesh: Mesh,
    rules: Mapping[str, Any] | None = None,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """The `NamedSharding` of an array with these logical names on `mesh`.

    With `shape`, a dimension that its mesh axes do not divide evenly stays replicated (e.g. 2
    kv heads on 4 tensor devices: each device keeps both kv heads).
    """
    spec = logical_to_spec(names, rules)
    if shape is not None:
        fitted = []
        for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
            group = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            devices = int(np.prod([mesh.shape[a] for a in group])) if group else 1
            fitted.append(axes if size % devices == 0 else None)
        spec = PartitionSpec(*fitted)
    return NamedSharding(mesh, spec)


def current_mesh() -> Mesh | None:
    """The mesh `use_mesh` made current, or None (unsharded code, one device)."""
    return _MESH.get()


def constrain(x: jax.Array, names: LogicalNames) -> jax.Array:
    """Constrains an activation's sharding by logical names; a no-op outside `use_mesh`."""
    mesh = _MESH.get()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over `data` x `fsdp`, every other dimension replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(
    local: Mapping[str, np.ndarray], mesh: Mesh, global_rows: int
) -> dict[str, jax.Array]:
    """Assembles per-process batch slices into global arrays laid out over the batch axes.

    Args:
      local: this process's rows, each array `[global_rows / process_count, ...]`.
      mesh: the device mesh.
      global_rows: the global batch size.

    Returns:
      Global `jax.Array`s with `batch_sharding(mesh)`.
    """
    out = {}
    for key, value in local.items():
        sharding = batch_sharding(mesh, value.ndim)
        out[key] = jax.make_array_from_process_local_data(
            sharding, value, (global_rows, *value.shape[1:])
        )
    return out
