"""Shared pieces of the benchmark scripts: model arguments, environment facts, the JSON line.

Every script prints exactly one JSON line on stdout (its record) and logs to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import jax

from plm_jax import xla_flags
from plm_jax.config import MODEL_PRESETS, ModelConfig

TINY_DEFAULT_VOCAB = 4096

log = logging.getLogger("benchmarks")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """--preset, --vocab, --layers, --embed-dim, --heads, --dtype, --remat, --scan,
    --attention."""
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument(
        "--vocab", type=int, default=None, help=f"vocab size (tiny: {TINY_DEFAULT_VOCAB})"
    )
    parser.add_argument("--layers", type=int, default=None, help="override num_layers")
    parser.add_argument("--embed-dim", type=int, default=None, help="override embed_dim")
    parser.add_argument("--heads", type=int, default=None, help="override num_heads")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--remat", default="none", choices=["none", "full", "dots", "dots_no_batch"]
    )
    parser.add_argument("--scan", action="store_true", help="scan over layers")
    parser.add_argument(
        "--attention",
        default="xla",
        choices=["xla", "cudnn"],
        help="model.attention: XLA (anywhere) or cuDNN flash attention (GPU, bf16/f16 compute)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--peak-matmul-size",
        type=int,
        default=2048,
        help="CPU only: size of the f32 matmul that measures the host's peak FLOP/s",
    )


def model_config(args: argparse.Namespace, min_seq_len: int) -> tuple[ModelConfig, dict[str, Any]]:
    """The preset's `ModelConfig` with the command-line overrides, and the overrides applied.

    `max_seq_len` is raised to `min_seq_len` when the preset's is shorter.
    """
    base = ModelConfig(**{**MODEL_PRESETS[args.preset], "preset": args.preset})
    overrides: dict[str, Any] = {}
    vocab = args.vocab if args.vocab is not None else (base.vocab_size or TINY_DEFAULT_VOCAB)
    if vocab != base.vocab_size:
        overrides["vocab_size"] = vocab
    for field, value in (
        ("num_layers", args.layers),
        ("embed_dim", args.embed_dim),
        ("num_heads", args.heads),
    ):
        if value is not None and value != getattr(base, field):
            overrides[field] = value
    if min_seq_len > base.max_seq_len:
        overrides["max_seq_len"] = min_seq_len
    settings = {
        "dtype": args.dtype,
        "remat": args.remat,
        "use_scan_layers": bool(args.scan),
        "attention": args.attention,
    }
    overrides.update({k: v for k, v in settings.items() if v != getattr(base, k)})
    return dataclasses.replace(base, **overrides), overrides


def add_xla_flag_args(parser: argparse.ArgumentParser) -> None:
    """--xla-gpu-flags / --no-xla-gpu-flags."""
    parser.add_argument(
        "--xla-gpu-flags",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on an NVIDIA GPU, add plm_jax.xla_flags.GPU_FLAGS to XLA_FLAGS (flags already "
        "in XLA_FLAGS win); no effect elsewhere",
    )


def apply_xla_flags(args: argparse.Namespace) -> list[str]:
    """Adds the GPU flags when asked for; call before jax starts its backend. Returns them."""
    if not args.xla_gpu_flags:
        return []
    return xla_flags.apply_gpu_flags(validate=True)


class CompileCounter:
    """Counts XLA backend compilations while active (jax.monitoring's compile events).

    with CompileCounter() as compiles:
        ...
    compiles.count
    """

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        self.count = 0
        self._active = False

    def _on_event(self, event: str, duration: float, **kwargs: Any) -> None:
        if self._active and event == self.EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        self._active = True
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._active = False  # a jax without `unregister_...` keeps calling a silent listener
        unregister = getattr(jax.monitoring, "unregister_event_duration_listener", None)
        if unregister is not None:
            unregister(self._on_event)


@contextmanager
def process_times() -> Iterator[dict[str, float]]:
    """This process's CPU seconds (user, system) and minor page faults while active.

    with process_times() as used:
        ...
    used["minor_page_faults"]

    On CPU, system time is mostly page faults: XLA allocates a step's temporary buffer on
    every call, and the kernel maps and zeroes it page by page (docs/performance.md, CPU).
    """
    import resource

    used: dict[str, float] = {}
    before = resource.getrusage(resource.RUSAGE_SELF)
    try:
        yield used
    finally:
        after = resource.getrusage(resource.RUSAGE_SELF)
        used["cpu_user_s"] = after.ru_utime - before.ru_utime
        used["cpu_system_s"] = after.ru_stime - before.ru_stime
        used["minor_page_faults"] = after.ru_minflt - before.ru_minflt


@contextmanager
def donation_warnings() -> Iterator[list[str]]:
    """Collects the messages of jax's "Some donated buffers were not usable" warnings (a
    donated input that XLA could not reuse costs a copy and memory every step)."""
    found: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield found
    for w in caught:
        message = str(w.message)
        if "donated" in message:
            found.append(message.split("\n")[0])
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def model_summary(cfg: ModelConfig) -> dict[str, Any]:
    fields = ("num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim", "mlp_dim")
    more = ("vocab_size", "max_seq_len", "position", "mlp", "norm", "tie_embeddings")
    return {f: getattr(cfg, f) for f in fields + more}


def device_info(devices: list[jax.Device]) -> dict[str, Any]:
    return {
        "device_kind": devices[0].device_kind,
        "device_platform": devices[0].platform,
        "device_count": len(devices),
        "host_cpu_count": os.cpu_count(),
    }


def peak_memory_bytes(devices: list[jax.Device]) -> int | None:
    """Largest `peak_bytes_in_use` over the devices, or None where jax does not report it."""
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def run_record(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Runs a benchmark command in a subprocess; returns the JSON record on its last stdout line.

    Raises:
      RuntimeError: the command failed (its exit code and the end of its stderr).
    """
    import subprocess

    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def max_rss_bytes() -> int:
    """This process's peak resident memory so far (bytes): on CPU, where the device memory
    is host memory, the measured counterpart of `compiled_memory`'s estimate (it includes the
    Python and jax runtime, a few hundred MB)."""
    import resource

    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return int(kib) * 1024


def compiled_memory(compiled: Any) -> dict[str, int] | None:
    """XLA's per-device memory estimate of a compiled program (bytes), or None."""
    try:
        memory = compiled.memory_analysis()
    except Exception:
        memory = None
    if memory is None:
        return None
    names = ("argument", "output", "temp", "alias", "generated_code")
    out = {n: int(getattr(memory, f"{n}_size_in_bytes", 0) or 0) for n in names}
    out["total_excl_alias"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    return {
        "versions": {
            "jax": jax.__version__,
            "jaxlib": _version("jaxlib"),
            "flax": _version("flax"),
            "optax": _version("optax"),
            "python": platform.python_version(),
        },
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def emit(record: dict[str, Any]) -> dict[str, Any]:
    """Prints the record as one JSON line on stdout and returns it."""
    sys.stdout.write(json.dumps(record, allow_nan=False) + "\n")
    sys.stdout.flush()
    return record


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
