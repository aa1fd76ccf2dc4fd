"""Devices to plan for: the attached ones, or compile-only TPU devices named by a topology.

    parse_topology("v5p-32")   -> ("v5p", "2x2x4"): a Cloud TPU type (the number counts
                                  TensorCores for v5p, chips for v5e/v6e) or the
                                  "v5p:2x2x4" form libtpu takes
    topology_devices(name)     compile-only devices from libtpu (no TPU needed)
    chip_memory(device)        bytes of HBM per chip, from the published specifications

Compile-only devices have no `memory_stats()`, so the chip's memory comes from the table.
"""

from __future__ import annotations

import os
import re
from typing import Any

from plm_jax.errors import ConfigError

GIB = 2**30

# Published HBM per chip (Cloud TPU system architecture pages), by `device_kind`. v4 is left
# out: libtpu's compile-only v4 devices are TensorCores, not chips, so the table would not fit.
CHIP_HBM = {
    "tpu v5 lite": 16 * GIB,
    "tpu v5": 95 * GIB,
    "tpu v6 lite": 32 * GIB,
}
# Published HBM bandwidth per chip, bytes/s (Cloud TPU pages; NVIDIA datasheets, SXM parts).
HBM_BANDWIDTH = {"tpu v5 lite": 819e9, "tpu v5": 2765e9, "tpu v6 lite": 1640e9}
_GPU_BANDWIDTH = (("h100 pcie", 2.0e12), ("h100", 3.35e12), ("h200", 4.8e12), ("a100", 2.0e12))
# Cloud TPU type prefix -> (libtpu's name, whether the type's number counts TensorCores).
GENERATIONS = {
    "v5p": ("v5p", True),
    "v5e": ("v5e", False),
    "v5litepod": ("v5e", False),
    "v6e": ("v6e", False),
}
# Chips -> slice shape, for the shapes Cloud TPU offers.
_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_3D = {
    4: "2x2x1",
    8: "2x2x2",
    16: "2x2x4",
    32: "2x4x4",
    64: "4x4x4",
    128: "4x4x8",
    256: "4x8x8",
    512: "8x8x8",
    1024: "8x8x16",
    2048: "8x16x16",
    4096: "16x16x16",
    6144: "16x16x24",
    8960: "16x20x28",
}


def parse_topology(name: str) -> tuple[str, str]:
    """(libtpu generation, slice shape) for `v5p-32`, `v5e-8`, `v6e-256` or `v5p:2x2x4`.

    Raises:
      ConfigError: a name of neither form, an unknown generation or an unoffered size.
    """
    name = name.strip().lower()
    if m := re.fullmatch(r"(v5p|v5e|v6e|v5litepod)[:=_](\d+(?:x\d+)+)", name):
        gen, shape = GENERATIONS[m.group(1)][0], m.group(2)
        dims = shape.count("x") + 1
        if dims != (3 if gen == "v5p" else 2):
            raise ConfigError(
                f"--topology {name}: {gen} slices are {'3' if gen == 'v5p' else '2'}-D "
                f"(e.g. {'v5p:2x2x4' if gen == 'v5p' else 'v5e:2x4'})"
            )
        return gen, shape
    m = re.fullmatch(r"(v5p|v5e|v6e|v5litepod)-(\d+)", name)
    if m is None:
        raise ConfigError(
            f"--topology {name!r} is not a TPU slice; give a Cloud TPU type such as v5e-8, "
            "v5p-32, v6e-256, or a libtpu topology such as v5p:2x2x4"
        )
    gen, counts_cores = GENERATIONS[m.group(1)]
    number = int(m.group(2))
    chips = number // 2 if counts_cores else number
    shapes = _3D if gen == "v5p" else _2D
    if chips not in shapes or (counts_cores and number % 2):
        offered = sorted(c * 2 if counts_cores else c for c in shapes)
        raise ConfigError(
            f"--topology {name}: {m.group(1)} slices come in sizes {offered}; pick one, or give "
            "the shape as e.g. v5p:2x2x4"
        )
    return gen, shapes[chips]


def topology_devices(name: str) -> list[Any]:
    """Compile-only TPU devices for the slice `name` (libtpu must be installed).

    Raises:
      ConfigError: libtpu is missing, or the name is not a slice.
    """
    gen, shape = parse_topology(name)
    try:
        import libtpu  # noqa: F401  (the compiler; no TPU needs to be attached)
    except ImportError:
        raise ConfigError(
            f"--topology {name} compiles for TPU, which needs libtpu: "
            "pip install 'plm-jax[tpu]' (it installs the libtpu that matches jax)"
        ) from None
    # libtpu warns about the missing TPU metadata unless it is told what it compiles for and
    # where; compiling needs no exclusive hold on a TPU, so several processes may load it.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{gen}-{_count(shape)}")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    topology = topologies.get_topology_desc(topology_name=f"{gen}:{shape}", platform="tpu")
    return list(topology.devices)


def _count(shape: str) -> int:
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


def chip_memory(device: Any) -> tuple[int, str] | None:
    """(bytes per device, where the figure comes from), or None when it is not known.

    Attached accelerators report `memory_stats()["bytes_limit"]`; compile-only TPU devices
    have no statistics, so their chip's published HBM is used.
    """
    kind = device.device_kind.lower().strip()
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  (compile-only devices raise; CPU has none)
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]), f"{device.device_kind}: memory_stats bytes_limit"
    if kind in CHIP_HBM:
        return CHIP_HBM[kind], f"{device.device_kind}: published HBM per chip"
    return None


def hbm_bandwidth(device: Any) -> float | None:
    """Bytes/s of one chip's HBM from the published figures, or None when not tabled."""
    kind = device.device_kind.lower().strip()
    if kind in HBM_BANDWIDTH:
        return HBM_BANDWIDTH[kind]
    return next((bw for pattern, bw in _GPU_BANDWIDTH if pattern in kind), None)
