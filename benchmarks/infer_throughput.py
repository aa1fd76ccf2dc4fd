"""Inference throughput: prefill tokens/s (one forward) and KV-cache decode tokens/s.

    python -m benchmarks.infer_throughput --preset tiny --layers 4 --embed-dim 128 --heads 4 \
        --vocab 4096 --batch 4 --prompt-len 32 --new-tokens 32

Prefill: one jitted forward over a [B, P] batch of random ids; compile time, then `--repeats`
calls timed to `jax.block_until_ready`; prefill tokens/s = B*P / median time.
Decode: `plm_jax.infer.generate_ids` with greedy decoding and no eos (every row produces N
tokens); a first call compiles, a second is timed; decode tokens/s = B*N / its time. That time
includes the prompt's prefill inside `generate_ids` (over the prompt's power-of-two bucket), so
`decode_tokens_per_sec_net` also reports B*N / (time - prefill median) as an estimate of the
decode loop alone. The model is unsharded, on the first device. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from plm_jax import host_malloc, metrics
from plm_jax.infer import generate_ids
from plm_jax.models import Decoder

log = logging.getLogger("benchmarks.infer_throughput")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.infer_throughput")
    common.add_model_args(parser)
    common.add_xla_flag_args(parser)
    parser.add_argument("--batch", type=int, required=True, help="prompts per batch")
    parser.add_argument("--prompt-len", type=int, required=True, help="tokens per prompt")
    parser.add_argument("--new-tokens", type=int, required=True, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=5, help="timed prefill calls")
    args = parser.parse_args(argv)
    if min(args.batch, args.prompt_len, args.new_tokens, args.repeats) < 1:
        parser.error("--batch, --prompt-len, --new-tokens and --repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints its record as one JSON line and returns it."""
    common.setup_logging()
    args = parse_args(argv)
    flags_added = common.apply_xla_flags(args)  # before jax.devices() starts the backend
    malloc = host_malloc.tune()  # as the plm-jax command does, before the backend starts
    model_cfg, overrides = common.model_config(args, min_seq_len=args.prompt_len + args.new_tokens)
    device = jax.devices()[0]
    with jax.default_device(device):
        model = Decoder(model_cfg, rngs=nnx.Rngs(params=args.seed))
    vocab = model.cfg.vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, vocab, (args.batch, args.prompt_len), dtype=np.int32)

    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, tokens):
        return nnx.merge(graphdef, params)(tokens).logits

    tokens = jax.device_put(prompts, device)
    start = time.perf_counter()
    compiled = forward.lower(params, tokens).compile()
    prefill_compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, tokens))  # warm-up
    prefill_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, tokens))
        prefill_times.append(time.perf_counter() - start)
    prefill_s = statistics.median(prefill_times)
    log.info("prefill compiled in %.2f s, median %.4f s", prefill_compile_s, prefill_s)

    prompt_ids = prompts.tolist()
    start = time.perf_counter()
    first = generate_ids(model, prompt_ids, max_new_tokens=args.new_tokens)
    generate_first_s = time.perf_counter() - start  # compile + run
    start = time.perf_counter()
    second = generate_ids(model, prompt_ids, max_new_tokens=args.new_tokens)
    decode_s = time.perf_counter() - start
    generated = sum(len(ids) for ids in second)
    if generated != args.batch * args.new_tokens or first != second:
        raise RuntimeError("greedy generation did not produce the same B*N tokens twice")
    log.info("generate: first call %.2f s, timed call %.4f s", generate_first_s, decode_s)

    prefill_tps = args.batch * args.prompt_len / prefill_s
    # Forward-only FLOPs: a third of the training count (forward + backward = 3x forward).
    flops = metrics.train_flops_per_token(model_cfg, vocab, args.prompt_len)
    forward_flops = flops["flops_per_token"] / 3
    peak, peak_source = metrics.peak_flops([device], cpu_matmul_size=args.peak_matmul_size)
    breakdown = metrics.param_breakdown(model_cfg, vocab)
    record = {
        "benchmark": "infer_throughput",
        "preset": args.preset,
        "overrides": overrides,
        "model": common.model_summary(model_cfg),
        "params_total": breakdown["total"],
        "params_nonembedding": breakdown["nonembedding"],
        "params_measured": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
        **common.device_info([device]),
        "dtype": args.dtype,
        "attention": args.attention,
        "xla_gpu_flags": bool(args.xla_gpu_flags),
        "xla_gpu_flags_added": flags_added,
        "host_malloc": malloc,  # glibc settings applied (plm_jax/host_malloc.py) or None
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "prefill_tokens_per_sec": prefill_tps,
        "prefill_time_median_s": prefill_s,
        "prefill_time_min_s": min(prefill_times),
        "prefill_time_max_s": max(prefill_times),
        "prefill_compile_s": prefill_compile_s,
        "prefill_flops_per_token": forward_flops,
        "prefill_flops_formula": "(" + flops["formula"] + ") / 3, T = prompt_len",
        "prefill_mfu": metrics.mfu(prefill_tps, forward_flops, peak),
        "decode_tokens_per_sec": args.batch * args.new_tokens / decode_s,
        "decode_tokens_per_sec_net": args.batch * args.new_tokens / max(decode_s - prefill_s, 1e-9),
        "decode_time_s": decode_s,
        "decode_time_per_token_s": decode_s / args.new_tokens,
        "generate_first_call_s": generate_first_s,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "peak_memory_bytes": common.peak_memory_bytes([device]),
        "prefill_compiled_memory_bytes": common.compiled_memory(compiled),
        **common.environment(),
    }
    return common.emit(record)


if __name__ == "__main__":
    main()
