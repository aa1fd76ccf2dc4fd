"""Scaling tables: training throughput and memory against sequence length, model size and remat,
with a least-squares fit of the cost against its expected growth.

    python -m benchmarks.scaling --sweep seq   [--preset gpt2-124m] [--tokens 2048]
    python -m benchmarks.scaling --sweep size  [--seq-len 256 --batch 4]
    python -m benchmarks.scaling --sweep remat [--preset gpt2-124m --seq-len 512 --batch 2]
        [--steps 3] [--warmup 1] [--seq-lens 128,256,...] [--sizes 4x128,12x768,...]
        [--remats none,dots,full] [--scan] [--markdown]

Every point is one `benchmarks.train_throughput` run in a fresh subprocess (so each point's peak
resident memory is its own; `XLA_FLAGS` as in this environment). Prints each point's record
as a JSON line, then one summary line (`"benchmark": "scaling"`): the points' tokens/s, step
time, MFU, XLA's memory estimate and measured peak RSS, and the fit. `--markdown` also prints
the table (to stderr).

The fits (per trained token; F = model FLOPs, metrics.train_flops_per_token with the LM head):

- seq: fixed model and tokens per step, T varied. The weights cost the same per token at every
  T and attention grows linearly in T, so time/token = a + b*T. The fit gives a (the
  per-token cost of the weights, head and everything else that does not grow with T) and b;
  `weights_flops_per_s` = F_weights / a and `attention_flops_per_s` = (attention FLOPs per
  token per unit T) / b are the rates each part runs at.
- size: fixed T, the model varied. Time/token = a + F/r: the cost grows linearly in the model's
  FLOPs (6N plus attention), at the fitted rate r, plus a per-token constant a.
- remat: a table only (the cost of recomputation against its memory saving).

Each fit minimises the points' relative errors and reports its coefficients, R^2 and every
point's relative residual, so a point that does not follow the expected growth (a cache or
memory-bandwidth cliff) stands out.

What it leaves out: the sweeps are of the decoder family (GPT-2 style by default; any
`--preset` works); encoder and encoder-decoder presets run but their fits use the same model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks import common

DEFAULTS = {
    "seq": {"preset": "gpt2-124m", "seq_lens": [128, 256, 512, 1024, 2048], "tokens": 2048},
    "size": {
        "preset": "gpt2-124m",
        "sizes": ["4x128", "6x384", "8x512", "12x768", "24x1024"],
        "seq_len": 256,
        "batch": 4,
    },
    "remat": {
        "preset": "gpt2-124m",
        "remats": ["none", "dots", "dots_no_batch", "full"],
        "seq_len": 512,
        "batch": 2,
    },
}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling")
    parser.add_argument("--sweep", required=True, choices=sorted(DEFAULTS))
    parser.add_argument("--preset", default=None, help="default: gpt2-124m")
    parser.add_argument("--vocab", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seq-lens", type=_ints, default=None, help="seq: comma-separated T")
    parser.add_argument("--tokens", type=int, default=None, help="seq: tokens per step (B*T)")
    parser.add_argument("--sizes", default=None, help="size: comma-separated LAYERSxWIDTH")
    parser.add_argument("--remats", default=None, help="remat: comma-separated policies")
    parser.add_argument("--seq-len", type=int, default=None, help="size, remat: T")
    parser.add_argument("--batch", type=int, default=None, help="size, remat: B")
    parser.add_argument("--scan", action="store_true", help="every point with scanned layers")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--markdown", action="store_true", help="also print the table")
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.sweep].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if isinstance(args.sizes, str):
        args.sizes = args.sizes.split(",")
    if isinstance(args.remats, str):
        args.remats = args.remats.split(",")
    try:
        args.points = points(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def points(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The sweep's points, each the `train_throughput` flags that differ between points.

    Raises:
      ValueError: a size that is not LAYERSxWIDTH, or a T that does not divide --tokens.
    """
    if args.sweep == "seq":
        out = []
        for t in args.seq_lens:
            if t < 1 or args.tokens % t:
                raise ValueError(f"--seq-lens: {t} does not divide --tokens {args.tokens}")
            out.append({"seq_len": t, "batch": args.tokens // t})
        return out
    if args.sweep == "size":
        out = []
        for size in args.sizes:
            layers, _, width = size.partition("x")
            if not (layers.isdigit() and width.isdigit()) or int(width) % 64:
                raise ValueError(f"--sizes: {size!r} is not LAYERSxWIDTH with WIDTH % 64 == 0")
            heads = int(width) // 64  # GPT-2's head size of 64
            fields = {"layers": int(layers), "embed_dim": int(width), "heads": heads}
            out.append({**fields, "seq_len": args.seq_len, "batch": args.batch})
        return out
    return [{"remat": r, "seq_len": args.seq_len, "batch": args.batch} for r in args.remats]


def command(args: argparse.Namespace, point: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.train_throughput", "--preset", args.preset]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.vocab is not None:
        cmd += ["--vocab", str(args.vocab)]
    if args.scan:
        cmd.append("--scan")
    for key, value in point.items():
        cmd += ["--" + key.replace("_", "-"), str(value)]
    return cmd


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
    """y = a + b*x by least squares on the relative error (each point weighted by 1/y, so a
    sweep whose times span orders of magnitude is not fitted to its largest point alone): a,
    b, R^2 and each point's relative residual (fit/y - 1).

    Raises:
      ValueError: fewer than two distinct x.
    """
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(set(xs.tolist())) < 2:
        raise ValueError("a linear fit needs at least two distinct x")
    design = np.stack([np.ones_like(xs), xs], axis=1) / ys[:, None]
    (a, b), *_ = np.linalg.lstsq(design, np.ones_like(ys), rcond=None)
    fitted = a + b * xs
    total = float(np.sum((ys - ys.mean()) ** 2))
    r2 = 1.0 - float(np.sum((ys - fitted) ** 2)) / total if total > 0 else 1.0
    return {
        "a": float(a),
        "b": float(b),
        "r2": r2,
        "relative_residuals": [float(v) for v in fitted / ys - 1.0],
    }


def fit(sweep: str, records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The sweep's fit of seconds per token (see the module docstring); None for remat."""
    time_per_token = [1.0 / r["tokens_per_sec"] for r in records]
    if sweep == "seq":
        lengths = [r["seq_len"] for r in records]
        out = linear_fit(lengths, time_per_token)
        first = records[0]
        # attention FLOPs per token are linear in T: (noncausal - causal) = 6*L*N*H*T
        attention_per_t = (first["flops_per_token_noncausal"] - first["flops_per_token"]) / (
            first["seq_len"]
        )
        weights = first["flops_per_token_with_head"] - attention_per_t * first["seq_len"]
        out["model"] = "seconds/token = a + b*T"
        out["weights_flops_per_token"] = weights
        out["weights_flops_per_s"] = weights / out["a"] if out["a"] > 0 else None
        out["attention_flops_per_token_per_t"] = attention_per_t
        out["attention_flops_per_s"] = attention_per_t / out["b"] if out["b"] > 0 else None
        return out
    if sweep == "size":
        flops = [r["flops_per_token_with_head"] for r in records]
        out = linear_fit(flops, time_per_token)
        out["model"] = "seconds/token = a + F/r, F = model FLOPs per token with the head"
        out["flops_per_s"] = 1.0 / out["b"] if out["b"] > 0 else None
        return out
    return None


def row(record: dict[str, Any]) -> dict[str, Any]:
    memory = record.get("compiled_memory_bytes") or {}
    return {
        "layers": record["model"]["num_layers"],
        "embed_dim": record["model"]["embed_dim"],
        "params_total": record["params_total"],
        "seq_len": record["seq_len"],
        "batch": record["batch"],
        "remat": record["remat"],
        "scan_layers": record.get("scan_layers"),
        "tokens_per_sec": record["tokens_per_sec"],
        "step_time_median_s": record["step_time_median_s"],
        "mfu": record["mfu"],
        "flops_per_token_with_head": record["flops_per_token_with_head"],
        "xla_temp_bytes": memory.get("temp"),
        "xla_total_bytes": memory.get("total_excl_alias"),
        "host_max_rss_bytes": record.get("host_max_rss_bytes"),
        "peak_memory_bytes": record.get("peak_memory_bytes"),
        "compile_s": record["compile_s"],
    }


def markdown(summary: dict[str, Any]) -> str:
    rows, fitted = summary["rows"], summary["fit"]
    head = "| layers x width | params | T | B | remat | tok/s | step s | MFU | XLA temp GB "
    head += "| peak RSS GB | fit residual |"
    lines = [head, "|" + "---|" * 11]
    residuals = fitted["relative_residuals"] if fitted else [None] * len(rows)
    for r, res in zip(rows, residuals, strict=True):
        gb = lambda b: f"{b / 1e9:.2f}" if b else "-"  # noqa: E731
        lines.append(
            f"| {r['layers']} x {r['embed_dim']} | {r['params_total'] / 1e6:.1f}M | {r['seq_len']} "
            f"| {r['batch']} | {r['remat']} | {r['tokens_per_sec']:,.0f} "
            f"| {r['step_time_median_s']:.3f} | {r['mfu']:.3f} | {gb(r['xla_temp_bytes'])} "
            f"| {gb(r['host_max_rss_bytes'])} | {'' if res is None else f'{res:+.1%}'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the sweep's points one after another; prints their records and the summary."""
    args = parse_args(argv)
    records = []
    for i, point in enumerate(args.points):
        print(f"point {i + 1}/{len(args.points)}: {point}", file=sys.stderr, flush=True)
        record = common.run_record(command(args, point), dict(os.environ))
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()
        records.append(record)
    summary = {
        "benchmark": "scaling",
        "sweep": args.sweep,
        "preset": args.preset,
        "scan_layers": args.scan,
        "steps": args.steps,
        "warmup": args.warmup,
        "rows": [row(r) for r in records],
        "fit": fit(args.sweep, records),
        "device_kind": records[0].get("device_kind"),
        "peak_flops": records[0].get("peak_flops"),
        "versions": records[0].get("versions"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if args.markdown:
        print(markdown(summary), file=sys.stderr, flush=True)
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main()
