"""glibc malloc settings that stop a CPU train step from page-faulting its buffers every step.

XLA's CPU runtime allocates each step's temporary buffer (hundreds of MB: 224 MB at the quick
start's shape) with `posix_memalign` and frees it when the step ends. glibc serves an
allocation that large from a fresh `mmap` (always, from the per-thread arenas XLA's threads
use) and returns it with `munmap`, so every step the kernel maps and zeroes the buffer page by
page again: about 56,000 minor page faults and 0.2 s of system time per quick-start step,
about a quarter of the process's CPU time (docs/performance.md, "CPU").

`tune()` sets, through `mallopt`, one arena for all threads (`M_ARENA_MAX=1`), no `mmap` for
large blocks (`M_MMAP_MAX=0`) and no trimming of the heap's top (`M_TRIM_THRESHOLD`), so a freed
step buffer stays in the heap and the next step reuses its pages. Most steps then fault no
page; about one in six maps the buffer again, where the small allocations made between steps
have fragmented the heap. The quick-start step runs about 30% faster. The cost: the process
keeps its peak heap (a training process reaches it every step anyway). It must run before jax
starts its backend (before XLA's threads first allocate): the `plm-jax` command line and the
benchmarks call it first thing.

What it leaves out: processes that will run on an accelerator (`JAX_PLATFORMS` naming another
platform first, or, with `JAX_PLATFORMS` unset, a GPU/TPU plugin installed: their step buffers
are device memory, and one arena would only serialise the host threads' allocations), other C
libraries (musl, macOS), and processes where the user already set glibc's malloc through the
environment (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`, or
`glibc.malloc.*` in `GLIBC_TUNABLES`): those are left as they are. `PLM_JAX_MALLOC=default`
turns it off.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform

__all__ = ["DISABLE_ENV", "SETTINGS", "tune"]

DISABLE_ENV = "PLM_JAX_MALLOC"  # "default": leave glibc's malloc as it is
# mallopt parameters (glibc's malloc.h) and the values tune() sets
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = {
    "M_ARENA_MAX": (M_ARENA_MAX, 1),
    "M_MMAP_MAX": (M_MMAP_MAX, 0),
    "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1),  # an int; glibc reads -1 as SIZE_MAX: never trim
}
USER_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
ACCELERATOR_PLUGINS = ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin", "libtpu")

_applied: dict[str, int] | None = None


def tune() -> dict[str, int] | None:
    """Applies `SETTINGS` with `mallopt`, once per process.

    Returns:
      The settings applied (also on a repeated call), or None where nothing was changed: an
      accelerator process, not glibc, `PLM_JAX_MALLOC=default`, or glibc's malloc already
      configured by the environment.
    """
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(DISABLE_ENV, "").lower() == "default":
        return None
    if any(name in os.environ for name in USER_ENV):
        return None
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if not cpu_process():
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = {}
    for name, (param, value) in SETTINGS.items():
        if mallopt(param, value) == 1:
            applied[name] = value
    _applied = applied
    return applied


def cpu_process() -> bool:
    """Whether jax will run this process on the CPU, judged before its backend starts: the
    first of `JAX_PLATFORMS` is cpu, or it is unset and no accelerator plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(_installed(name) for name in ACCELERATOR_PLUGINS)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
