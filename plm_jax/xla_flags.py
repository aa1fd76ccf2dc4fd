"""XLA GPU flags for training throughput, added to `XLA_FLAGS` before jax starts its backend.

    from plm_jax import xla_flags
    xla_flags.apply_gpu_flags()      # before the first jax computation; a no-op off GPU
    import jax ...

XLA reads `XLA_FLAGS` once, when the first backend (CPU or GPU) is created, and an unknown flag
aborts the process (`Unknown flags in XLA_FLAGS: ...`). So this module imports no jax, changes
the environment only when jax will run on an NVIDIA GPU, never overrides a flag the user set,
and can check that this jaxlib knows each flag before adding it (`validate=True`, one
subprocess on the CPU backend: XLA parses every flag, GPU ones included, on any platform).

    python -m plm_jax.xla_flags            # print the flags that would be added here
    python -m plm_jax.xla_flags --check    # exit 1 unless this jaxlib knows every flag

What it leaves out: flags whose benefit depends on the workload (`xla_gpu_enable_triton_gemm`,
command buffers, combine thresholds); benchmarks/gpu.sh measures those as variants, and
docs/performance.md lists them. `plm-jax pretrain` and `finetune` call `apply_gpu_flags` first.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from pathlib import Path

__all__ = ["GPU_FLAGS", "apply_gpu_flags", "compose_xla_flags", "is_gpu_platform", "set_flags"]

log = logging.getLogger(__name__)

# name -> value. Each exists in jaxlib 0.10.2 (tests/test_gpu_path.py parses them with this
# jaxlib); defaults quoted are XLA's in that release.
GPU_FLAGS: dict[str, str] = {
    # Default false. Schedules asynchronous work (collectives, host copies, async computations)
    # so it overlaps with compute. Recommended by the JAX "GPU performance tips" page and set
    # in NVIDIA's JAX-Toolbox containers.
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    # Default false (reduce-scatter pipelining is already on). Moves the FSDP all-gather of the
    # next scanned layer's weights, and data-parallel all-reduces, across loop iterations so
    # they overlap with the current layer's compute. No effect on one GPU (no collectives).
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
}

# Platform names in JAX_PLATFORMS that select an NVIDIA GPU.
_CUDA_PLATFORMS = {"cuda", "gpu"}
_VALIDATED: dict[tuple[str, ...], list[str]] = {}


def flag_names(xla_flags: str) -> set[str]:
    """The flag names set in an `XLA_FLAGS` string: `--name=value`, `--name` and `--noname`
    (the last also counts as setting `name`)."""
    try:
        tokens = shlex.split(xla_flags)
    except ValueError:  # unbalanced quotes: XLA will complain itself; split on blanks
        tokens = xla_flags.split()
    names = set()
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            name = token[2:].split("=", 1)[0]
            names.add(name)
            if name.startswith("no"):
                names.add(name[2:])
    return names


def compose_xla_flags(existing: str, flags: Mapping[str, str]) -> tuple[str, list[str]]:
    """`existing` with `--name=value` appended for each flag it does not set already.

    The user's string is kept as written (flags, order, quoting); ours go after it.

    Returns:
      (the new XLA_FLAGS string, the flags appended, as `--name=value`).
    """
    present = flag_names(existing)
    added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join([existing.strip(), *added]).strip(), added


def _cuda_plugin_installed() -> bool:
    """Whether a jax CUDA PJRT plugin is installed (found the way jax finds it: the
    `jax_plugins` namespace package, or the `jax_plugins` entry-point group), without
    importing it."""
    import importlib.util
    from importlib.metadata import entry_points

    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        try:
            if any("cuda" in p.name for p in Path(location).iterdir()):
                return True
        except OSError:
            continue
    return any("cuda" in ep.name or "cuda" in ep.value for ep in entry_points(group="jax_plugins"))


def _nvidia_device_present() -> bool:
    """Whether the NVIDIA driver shows a device (its /proc entry or device files)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir() and any(gpus.iterdir()):
        return True
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


def is_gpu_platform(environ: Mapping[str, str] | None = None) -> bool:
    """Whether jax, once started in this environment, will run on an NVIDIA GPU.

    Decided without starting jax: `JAX_PLATFORMS` (when set) names `cuda` or `gpu`,
    `CUDA_VISIBLE_DEVICES` (when set) is not empty or -1, a jax CUDA plugin is installed, and
    the NVIDIA driver shows a device.
    """
    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS", "").strip().lower()
    if platforms and not _CUDA_PLATFORMS & {p.strip() for p in platforms.split(",")}:
        return False
    if env.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return False
    return _cuda_plugin_installed() and _nvidia_device_present()


def backends_started() -> bool:
    """Whether jax has created its backends already (after which XLA_FLAGS is ignored)."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # private API; assume not started
        return False


def _parses(flags: Sequence[str], timeout_s: float) -> bool:
    """Whether this jaxlib's XLA accepts `flags`: a subprocess starts the CPU backend with
    only these in XLA_FLAGS (an unknown flag aborts it)."""
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    code = "import jax; jax.devices('cpu')"
    try:
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, timeout=timeout_s
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("could not check XLA flags %s: %s", flags, e)
        return False
    return result.returncode == 0


def unknown_flags(flags: Sequence[str], *, timeout_s: float = 120.0) -> list[str]:
    """The flags (`--name=value`) this jaxlib does not accept: one subprocess for all, then
    one per flag if that fails. A flag that cannot be checked counts as unknown."""
    key = tuple(flags)
    if key not in _VALIDATED:
        if not flags or _parses(flags, timeout_s):
            _VALIDATED[key] = []
        else:
            _VALIDATED[key] = [f for f in flags if not _parses([f], timeout_s)]
    return list(_VALIDATED[key])


def set_flags(
    flags: Mapping[str, str],
    environ: MutableMapping[str, str] | None = None,
    *,
    validate: bool = False,
) -> list[str]:
    """Appends `flags` the user has not set to `environ["XLA_FLAGS"]` (default `os.environ`).

    Args:
      flags: name -> value, names without the leading `--`.
      environ: the environment to change.
      validate: first drop (with a warning) flags this jaxlib does not know; see
        `unknown_flags`.

    Returns:
      The flags appended, as `--name=value`.
    """
    env = os.environ if environ is None else environ
    existing = env.get("XLA_FLAGS", "")
    _, added = compose_xla_flags(existing, flags)
    if validate and added:
        unknown = unknown_flags(added)
        if unknown:
            log.warning("XLA flags left out, unknown to this jaxlib: %s", " ".join(unknown))
        added = [f for f in added if f not in unknown]
    if added:
        env["XLA_FLAGS"] = " ".join([existing.strip(), *added]).strip()
    return added


def apply_gpu_flags(
    environ: MutableMapping[str, str] | None = None,
    *,
    flags: Mapping[str, str] = GPU_FLAGS,
    validate: bool = False,
    force: bool = False,
) -> list[str]:
    """Adds `GPU_FLAGS` to XLA_FLAGS when jax will run on an NVIDIA GPU; call before jax
    starts its backend (the first computation, `jax.devices()`, ...).

    Args:
      environ: the environment to change (default `os.environ`).
      flags: the flags to add (default `GPU_FLAGS`).
      validate: drop flags this jaxlib does not know (one subprocess, about a second).
      force: add them whatever the platform (tests; composing a GPU job's environment).

    Returns:
      The flags appended (`--name=value`); empty off GPU, when the user set them all, or when
      jax's backends already started (then a warning says so and nothing changes).
    """
    if not force and not is_gpu_platform(environ):
        return []
    if environ is None and backends_started():
        log.warning("jax backends already started: XLA_FLAGS unchanged; call apply_gpu_flags first")
        return []
    added = set_flags(flags, environ, validate=validate)
    if added:
        log.info("XLA flags added for GPU: %s", " ".join(added))
    return added


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plm_jax.xla_flags", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 unless this jaxlib knows every flag"
    )
    args = parser.parse_args(argv)
    flags = [f"--{name}={value}" for name, value in GPU_FLAGS.items()]
    report = {"flags": flags, "is_gpu_platform": is_gpu_platform()}
    if args.check:
        report["unknown"] = unknown_flags(flags)
    print(json.dumps(report))
    return 1 if report.get("unknown") else 0


if __name__ == "__main__":
    sys.exit(main())
