"""Will the compiled train step fit? Checked before the first step, from the compiler's numbers.

    step_bytes        what one execution of a compiled step needs on each device: its
                      arguments (the train state and a batch), outputs that do not reuse a
                      donated argument, and XLA's temporaries
    memory_limit      what the devices can give: `memory_stats()["bytes_limit"]` on a GPU/TPU;
                      on CPU the host's available memory (/proc/meminfo), shared by every
                      local CPU device
    check_step_fits   raises `DoesNotFit` (one line, exit 2) naming the estimate, the limit and
                      the settings that would fit, with the compiler's estimate for the first
                      `train.grad_accum` that fits when a few recompilations find one

A run that cannot fit therefore stops with a message instead of being killed by the kernel.
What this module leaves out: host memory of the data pipeline, and memory that other processes
take after the check.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from plm_jax.errors import UserError

log = logging.getLogger(__name__)

GIB = 2**30
# Headroom for what the compiler does not count: the runtime, the data pipeline, fragmentation.
HEADROOM = 0.9


class DoesNotFit(UserError):
    """The compiled step needs more memory than the devices have."""


def step_bytes(compiled: Any) -> int | None:
    """Bytes one device holds while the step runs, from `compiled.memory_analysis()`."""
    memory = compiled.memory_analysis()
    if memory is None:
        return None

    def size(name: str) -> int:
        return int(getattr(memory, name, 0) or 0)

    outputs = max(size("output_size_in_bytes") - size("alias_size_in_bytes"), 0)
    return size("argument_size_in_bytes") + outputs + size("temp_size_in_bytes")


def memory_limit(devices: list) -> tuple[int, int, str] | None:
    """(bytes available to the step on one device, devices sharing them, description)."""
    device = devices[0]
    if device.platform == "cpu":
        available = _meminfo_available()
        if available is None:
            return None
        local = sum(d.process_index == jax.process_index() for d in devices)
        return available, local, f"available host memory shared by {local} CPU device(s)"
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001  (a backend without memory statistics)
        stats = {}
    if "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]), 1, f"{device.device_kind} memory per device"


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_step_fits(
    compiled: Any,
    devices: list,
    *,
    grad_accum: int,
    accum_choices: list[int],
    recompile: Callable[[int], Any],
    what: str = "the train step",
) -> None:
    """Raises `DoesNotFit` when `compiled` needs more than the devices have.

    On CPU the state already sits in host memory (counted as used by /proc/meminfo), so only
    the step's temporaries and fresh outputs must fit in what is available.

    Args:
      compiled: the compiled step at the run's settings.
      devices: the mesh's devices.
      grad_accum: the run's `train.grad_accum`.
      accum_choices: larger `train.grad_accum` values the batch divides into, smallest first.
      recompile: compiles the step at another `grad_accum` (for the suggestion).
      what: the step, for the message.
    """
    limit = memory_limit(devices)
    need = _need(compiled, devices)
    if limit is None or need is None:
        return
    available, sharing, described = limit
    budget = HEADROOM * available
    log.info(
        "%s needs %.2f GiB per device (compiler estimate); %s: %.2f GiB",
        what,
        need / GIB,
        described,
        available / GIB,
    )
    if need * sharing <= budget:
        return
    fits = ""
    for accum in accum_choices[:4]:  # each try is one more compilation
        smaller = _need(recompile(accum), devices)
        if smaller is not None and smaller * sharing <= budget:
            fits = f"; train.grad_accum={accum} fits (compiler estimate {smaller / GIB:.2f} GiB)"
            break
    total = f" x {sharing} devices = {need * sharing / GIB:.2f} GiB" if sharing > 1 else ""
    raise DoesNotFit(
        f"{what} does not fit in memory: it needs {need / GIB:.2f} GiB per device{total} "
        f"(compiler estimate at train.grad_accum={grad_accum}) but the {described} is "
        f"{available / GIB:.2f} GiB ({HEADROOM:.0%} usable){fits}; lower train.batch_size or "
        "model.max_seq_len, raise train.grad_accum, or set model.remat=full "
        "(with model.use_scan_layers=true on CPU)"
    )


def _need(compiled: Any, devices: list) -> int | None:
    """The step's bytes per device; on CPU without the arguments, already in host memory."""
    total = step_bytes(compiled)
    if total is None or devices[0].platform != "cpu":
        return total
    memory = compiled.memory_analysis()
    return total - int(getattr(memory, "argument_size_in_bytes", 0) or 0)
