"""What the PyTorch peers share: the command line, the optimizer, the timed loop and the record.

Every peer (`torch_gpt`, `torch_bert`, `torch_llama`) builds its model and a `forward(ids) ->
logits [B, T, V]`, then calls `run_benchmark`, which trains it as plm_jax's
`benchmarks.train_throughput` does: float32, a synthetic batch of random ids (inputs the first
T of T+1 random ids, targets the last T, so every position has a target), mean cross-entropy
over all B*T tokens, `clip_grad_norm_(1.0)`, AdamW(fused=False, betas 0.9/0.95, eps 1e-8,
lr 3e-4 constant) with weight decay 0.1 on 2-D parameters only (matrices and embeddings).
`--warmup` untimed steps (for `--impl compile` the first one compiles and is reported as
`compile_s`), then `--steps` steps timed by wall clock, with the process's CPU time and minor
page faults from `getrusage`. Prints one JSON line with train_throughput's key names where they
apply.

What it leaves out: the model definitions (in each peer), learning-rate warmup and decay (the
rate is constant; plm_jax's schedule costs nothing per step), and any accelerator: the peers
run on the CPU in float32.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "INIT_STD",
    "LR",
    "Timing",
    "make_optimizer",
    "make_step",
    "make_parser",
    "parse_args",
    "random_batch",
    "run_benchmark",
    "time_steps",
]

INIT_STD = 0.02
LR = 3e-4

Forward = Callable[[torch.Tensor], torch.Tensor]  # ids [B, T] -> logits [B, T, V]


def make_parser(prog: str, impls: Sequence[str]) -> argparse.ArgumentParser:
    """The flags every peer takes (train_throughput's names); a peer adds its own sizes.

    Args:
      prog: the program name for `--help` (`python -m benchmarks.peers.NAME`).
      impls: the `--impl` choices, the first one the default.

    Returns:
      A parser with --layers --embed-dim --heads --vocab --seq-len --batch --steps --warmup
      --impl --seed.
    """
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impl", default=impls[0], choices=list(impls))
    parser.add_argument("--seed", type=int, default=0)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parses `argv` and checks the step counts (exits with a usage error when they are bad)."""
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.impl == "compile" and args.warmup < 1:
        parser.error("--impl compile needs --warmup >= 1 (the first step compiles)")
    return args


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW as plm_jax's `make_optimizer` with the benchmark's constant rate: weight decay 0.1
    on parameters with 2 or more dimensions, none on biases and norm scales.

    Shared (tied) parameters appear once in `model.parameters()`, so once in the optimizer.
    """
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.95),
        eps=1e-8,
        fused=False,
    )


def random_batch(
    batch: int, seq_len: int, vocab: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both [B, T] int64: the first and last T of B rows of T+1 random ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()


def make_step(
    model: nn.Module,
    forward: Forward,
    opt: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> Callable[[], float]:
    """One training step on a fixed batch: mean cross-entropy of `forward(inputs)` [B, T, V]
    against `targets` [B, T] over all B*T tokens, backward, `clip_grad_norm_(1.0)` over
    `model`'s parameters, `opt.step()`. The step returns the loss (a Python float)."""

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = forward(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()  # synchronises (CPU: already synchronous)

    return step


@dataclasses.dataclass(frozen=True)
class Timing:
    """What `time_steps` measured: each timed step's seconds, the last loss, the first warm-up
    step's seconds when it compiled, and the process's CPU use per timed step."""

    times: list[float]
    final_loss: float
    compile_s: float | None
    cpu_user_s_per_step: float
    cpu_system_s_per_step: float
    minor_page_faults_per_step: float


def time_steps(
    step: Callable[[], float], warmup: int, steps: int, *, first_compiles: bool = False
) -> Timing:
    """Runs `warmup` untimed then `steps` timed calls of `step` (which returns the loss as a
    Python float, so each call has finished when it returns).

    Args:
      step: one training step.
      warmup: untimed steps first.
      steps: timed steps (>= 1).
      first_compiles: the first warm-up step compiles; its time is reported as `compile_s`.

    Returns:
      The `Timing` of the timed steps.
    """
    compile_s = None
    for i in range(warmup):
        start = time.perf_counter()
        step()
        if i == 0 and first_compiles:
            compile_s = time.perf_counter() - start
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return Timing(
        times=times,
        final_loss=loss,
        compile_s=compile_s,
        cpu_user_s_per_step=(after.ru_utime - before.ru_utime) / steps,
        cpu_system_s_per_step=(after.ru_stime - before.ru_stime) / steps,
        minor_page_faults_per_step=(after.ru_minflt - before.ru_minflt) / steps,
    )


def run_benchmark(
    args: argparse.Namespace,
    model: nn.Module,
    forward: Forward,
    model_summary: dict[str, Any],
) -> dict[str, Any]:
    """Trains `model` through `forward` on a random batch, prints the record as one JSON line
    and returns it.

    Args:
      args: the parsed flags (`make_parser`'s, at least).
      model: the module whose parameters are trained (`forward` may be a compiled wrapper).
      forward: ids [B, T] int64 -> logits [B, T, V].
      model_summary: the record's `model` entry (sizes, train_throughput's names).

    Returns:
      The record: train_throughput's keys where they apply, plus `impl`, `system`, `threads`,
      and for `--impl hf` the transformers version and `attn_implementation`.
    """
    model.train()
    params_total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors once
    inputs, targets = random_batch(args.batch, args.seq_len, args.vocab, args.seed)
    step = make_step(model, forward, make_optimizer(model), inputs, targets)
    timing = time_steps(step, args.warmup, args.steps, first_compiles=args.impl == "compile")
    times = timing.times
    tokens = float(args.batch * args.seq_len)
    median = statistics.median(times)
    record = {
        "benchmark": "train_throughput",
        "system": f"torch-{args.impl}",
        "impl": args.impl,
        "model": model_summary,
        "params_total": params_total,
        "dtype": "float32",
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "real_tokens_per_step": tokens,
        "padded_tokens_per_step": tokens,
        "tokens_per_sec": tokens / median,
        "padded_tokens_per_sec": tokens / median,
        "step_time_median_s": median,
        "step_time_min_s": min(times),
        "step_time_max_s": max(times),
        "step_time_stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
        "compile_s": timing.compile_s,
        "cpu_user_s_per_step": timing.cpu_user_s_per_step,
        "cpu_system_s_per_step": timing.cpu_system_s_per_step,
        "minor_page_faults_per_step": timing.minor_page_faults_per_step,
        "final_loss": timing.final_loss,
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if args.impl == "hf":
        import transformers

        record["versions"]["transformers"] = transformers.__version__
        record["attn_implementation"] = model.config._attn_implementation
    sys.stdout.write(json.dumps(record, allow_nan=False) + "\n")
    sys.stdout.flush()
    return record
