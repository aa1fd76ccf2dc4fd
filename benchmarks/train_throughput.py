"""Training throughput of one `train_step`: tokens/s, step time, MFU, compile time, memory.

    python -m benchmarks.train_throughput --preset tiny --layers 4 --embed-dim 128 --heads 4 \
        --vocab 4096 --seq-len 128 --batch 16 --steps 10

The state is created sharded with `init_train_state` on a mesh of all devices, the step is
jitted as `plm_jax.train.loop.compile_steps` does (state donated, explicit in/out shardings),
and the batch is synthetic: random ids, every weight 1 (no padding), one segment per row.
Compile time is `lower().compile()`; then `--warmup` untimed steps, then `--steps` steps each
timed to `jax.block_until_ready`. The steps call the jitted function, so the record can say
whether any step after the first compiled again (`recompiled_after_first_step`) and whether
jax warned that donated buffers were unusable (`donation_warnings`). Prints one JSON line
(see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import common
from plm_jax import host_malloc, metrics
from plm_jax.config import MeshConfig, TrainConfig
from plm_jax.sharding import batch_sharding, make_mesh, use_mesh
from plm_jax.train.optimizer import lr_schedule, make_optimizer
from plm_jax.train.state import init_train_state, model_graphdef
from plm_jax.train.step import train_step

log = logging.getLogger("benchmarks.train_throughput")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_throughput")
    common.add_model_args(parser)
    common.add_xla_flag_args(parser)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True, help="global batch, in sequences")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    parser.add_argument(
        "--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1: the remaining devices)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    try:
        args.mesh_sizes = tuple(int(s) for s in args.mesh.split(","))
    except ValueError:
        args.mesh_sizes = ()
    if len(args.mesh_sizes) != 3:
        parser.error(f"--mesh {args.mesh!r}: give three integers data,fsdp,tensor")
    return args


def synthetic_batch(batch: int, seq_len: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random next-token pairs, no padding: weights 1, segment ids 1, positions arange."""
    ids = np.random.default_rng(seed).integers(0, vocab, (batch, seq_len + 1), dtype=np.int32)
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "weights": np.ones((batch, seq_len), np.float32),
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
    }


def _run_steps(
    step: Any, state: Any, batch: dict[str, jax.Array], warmup: int, steps: int
) -> tuple[Any, Any, list[float], list[int], dict[str, float]]:
    """Runs `warmup` untimed then `steps` timed calls of the jitted step.

    Returns:
      (state, last metrics, the timed steps' seconds, XLA compilations during each call, the
      process's CPU seconds and minor page faults per timed step).
    """
    times, compiles = [], []
    out = None
    for _ in range(warmup):
        state, out, _, count = _one_step(step, state, batch)
        compiles.append(count)
    with common.process_times() as used:
        for _ in range(steps):
            state, out, seconds, count = _one_step(step, state, batch)
            compiles.append(count)
            times.append(seconds)
    per_step = {f"{k}_per_step": v / steps for k, v in used.items()}
    return state, out, times, compiles, per_step


def _one_step(step: Any, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, Any, float, int]:
    with common.CompileCounter() as counter:
        start = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready((state, out))
        seconds = time.perf_counter() - start
    return state, out, seconds, counter.count


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints its record as one JSON line and returns it."""
    common.setup_logging()
    args = parse_args(argv)
    flags_added = common.apply_xla_flags(args)  # before jax.devices() starts the backend
    malloc = host_malloc.tune()  # as the plm-jax command does, before the backend starts
    model_cfg, overrides = common.model_config(args, min_seq_len=args.seq_len)
    devices = jax.devices()
    data, fsdp, tensor = args.mesh_sizes
    mesh_cfg = MeshConfig(data=data, fsdp=fsdp, tensor=tensor)
    mesh = make_mesh(mesh_cfg, devices)
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    if args.batch % rows:
        raise SystemExit(f"--batch {args.batch} must be divisible by data*fsdp = {rows}")
    train_cfg = TrainConfig(
        steps=args.warmup + args.steps + 1, batch_size=args.batch, warmup_steps=1
    )
    tx, schedule = make_optimizer(train_cfg), lr_schedule(train_cfg)
    rules = mesh_cfg.rules

    log.info("initialising %s on mesh %s", args.preset, dict(mesh.shape))
    with use_mesh(mesh, rules):
        state, shardings = init_train_state(model_cfg, tx, mesh, args.seed, rules)
    batch_sh = batch_sharding(mesh)
    batch = {
        k: jax.device_put(v, batch_sh)
        for k, v in synthetic_batch(
            args.batch, args.seq_len, model_cfg.vocab_size, args.seed
        ).items()
    }
    graphdef, _ = model_graphdef(model_cfg)
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(
        partial(
            train_step,
            graphdef=graphdef,
            tx=tx,
            schedule=schedule,
            grad_accum=1,
            use_dropout=model_cfg.dropout > 0,
        ),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    measured_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    with common.donation_warnings() as donation, use_mesh(mesh, rules):
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()  # also fills `step`'s cache
        compile_s = time.perf_counter() - start
        log.info("compiled in %.2f s", compile_s)
        run = _run_steps(step, state, batch, args.warmup, args.steps)
        state, out, times, compiles, process = run
    last = jax.device_get(out)
    # Executables in the jitted step's cache: 1 unless some call compiled another variant.
    cache_size = step._cache_size() if hasattr(step, "_cache_size") else None  # private API

    real_tokens = float(last["train/tokens"])  # sum of weights: every target is real here
    padded_tokens = float(args.batch * args.seq_len)
    median = statistics.median(times)
    tokens_per_sec = real_tokens / median
    flops = metrics.train_flops_per_token(model_cfg, model_cfg.vocab_size, args.seq_len)
    peak, peak_source = metrics.peak_flops(devices, cpu_matmul_size=args.peak_matmul_size)
    breakdown = metrics.param_breakdown(model_cfg, model_cfg.vocab_size)
    record = {
        "benchmark": "train_throughput",
        "preset": args.preset,
        "overrides": overrides,
        "model": common.model_summary(model_cfg),
        "params_total": breakdown["total"],
        "params_nonembedding": breakdown["nonembedding"],
        "params_measured": measured_params,
        **common.device_info(devices),
        "mesh": dict(mesh.shape),
        "dtype": args.dtype,
        "remat": args.remat,
        "scan_layers": bool(args.scan),
        "attention": args.attention,
        "xla_gpu_flags": bool(args.xla_gpu_flags),
        "xla_gpu_flags_added": flags_added,
        "host_malloc": malloc,  # glibc settings applied (plm_jax/host_malloc.py) or None
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "real_tokens_per_step": real_tokens,
        "padded_tokens_per_step": padded_tokens,
        "tokens_per_sec": tokens_per_sec,
        "padded_tokens_per_sec": padded_tokens / median,
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "step_time_stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "flops_per_token": flops["flops_per_token"],
        "flops_per_token_noncausal": flops["flops_per_token_noncausal"],
        "flops_per_token_with_head": flops["flops_per_token_with_head"],
        "flops_formula": flops["formula"],
        "mfu": metrics.mfu(tokens_per_sec, flops["flops_per_token"], peak),
        "mfu_noncausal": metrics.mfu(tokens_per_sec, flops["flops_per_token_noncausal"], peak),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "compile_s": compile_s,
        **process,  # cpu_user_s, cpu_system_s, minor_page_faults per timed step
        "compiles_first_step": compiles[0],
        "compiles_after_first_step": sum(compiles[1:]),
        "recompiled_after_first_step": sum(compiles[1:]) > 0 or (cache_size or 0) > 1,
        "train_step_cache_size": cache_size,
        "donation_warnings": donation,
        "peak_memory_bytes": common.peak_memory_bytes(devices),
        "compiled_memory_bytes": common.compiled_memory(compiled),
        "host_max_rss_bytes": common.max_rss_bytes(),
        "final_loss": float(last["train/loss"]),
        **common.environment(),
    }
    return common.emit(record)


if __name__ == "__main__":
    main()
