"""plm_jax's training step against its PyTorch peers, run alternately on the same machine.

    python -m benchmarks.compare [--preset P] [--layers 4 --embed-dim 128 --heads 4 \
        --vocab 4096] --seq-len 128 --batch 16 --steps 10 --rounds 2 [--with-compile] \
        [--malloc-hugetlb]

Each round runs, one after another and each in a fresh subprocess, `benchmarks.train_throughput
--preset P` (plm_jax) and the preset family's PyTorch peers with the same shape:

- GPT-2 style decoders (`tiny`, the quick start's model, and `gpt2-*`): `peers.torch_gpt
  --impl eager|hf` (a plain PyTorch GPT and transformers' `GPT2LMHeadModel`);
- BERT style encoders (`bert-*`): `peers.torch_bert --impl eager|hf` (`BertForMaskedLM`);
- LLaMA style decoders (`llama-*`): `peers.torch_llama --impl eager|hf` (`LlamaForCausalLM`).

`--with-compile` adds `--impl compile` (torch.compile) for the GPT peer. The shape flags
override the preset's sizes (the tiny preset's defaults are the quick start's 4 x 128, 4 heads,
vocab 4096); the other sizes (MLP width, kv heads, head size) are the preset's, resolved as
plm_jax resolves them, and passed to the peer. Subprocesses get this environment minus
`XLA_FLAGS` (plus `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` for all of them with
`--malloc-hugetlb`). plm_jax tunes glibc's malloc itself (`plm_jax.host_malloc`, as the
`plm-jax` command does); the peers run with PyTorch's defaults, unless `--malloc-hugetlb`
gives every system the same setting. Prints one JSON line: each system's tokens/s per round
and median over rounds, and the ratios plm_jax / peer (> 1: plm_jax is faster).

What it leaves out: encoder-decoder presets (`t5-*`) have no peer here; their throughput is
`benchmarks.train_throughput`'s alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
from collections.abc import Sequence
from typing import Any

PROCESS_KEYS = ("cpu_user_s_per_step", "cpu_system_s_per_step", "minor_page_faults_per_step")
# glibc >= 2.35: madvise(MADV_HUGEPAGE) on large allocations. XLA's CPU runtime allocates the
# step's whole temporary buffer per call, so with 4 KiB pages every step page-faults it in.
HUGETLB = "glibc.malloc.hugetlb=1"
SHAPE_FLAGS = ("layers", "embed_dim", "heads", "vocab", "seq_len", "batch", "steps", "warmup")
TINY_SHAPE = {"layers": 4, "embed_dim": 128, "heads": 4, "vocab": 4096}  # the quick start's


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from plm_jax.config import MODEL_PRESETS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare")
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="default: the preset's")
    parser.add_argument("--embed-dim", type=int, default=None, help="default: the preset's")
    parser.add_argument("--heads", type=int, default=None, help="default: the preset's")
    parser.add_argument("--vocab", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--with-compile", action="store_true", help="also torch.compile")
    parser.add_argument(
        "--malloc-hugetlb",
        action="store_true",
        help="run every system with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (transparent huge "
        "pages for large allocations; see docs/performance.md, CPU)",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    try:
        args.peer, args.peer_flags = peer_for(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def peer_for(args: argparse.Namespace) -> tuple[str, list[str]]:
    """Fills args' unset sizes from the preset; returns the peer module and its extra flags.

    Raises:
      ValueError: the preset's family or variant has no PyTorch peer here.
    """
    from benchmarks import common, train_throughput
    from plm_jax.config import MODEL_PRESETS
    from plm_jax.models.sizes import resolve_model_config

    preset = MODEL_PRESETS[args.preset]
    fields = {"layers": "num_layers", "embed_dim": "embed_dim", "heads": "num_heads"}
    fields["vocab"] = "vocab_size"
    for flag, field in fields.items():
        if getattr(args, flag) is None:
            setattr(args, flag, preset[field] if preset else TINY_SHAPE[flag])
    # exactly the config train_throughput builds from the flags `systems` gives it
    plm_args = train_throughput.parse_args(["--preset", args.preset, *shape_flags(args)])
    cfg, _ = common.model_config(plm_args, args.seq_len)
    cfg = resolve_model_config(cfg)
    positions = ["--max-seq-len", str(cfg.max_seq_len)]  # as many parameters as plm_jax
    if cfg.family == "encoder":
        return "torch_bert", ["--mlp-dim", str(cfg.mlp_dim)] + positions
    if cfg.family != "decoder":
        raise ValueError(f"--preset {args.preset}: no PyTorch peer for the {cfg.family} family")
    if (cfg.position, cfg.norm, cfg.mlp) == ("learned", "layernorm", "gelu"):
        return "torch_gpt", positions
    if (cfg.position, cfg.norm, cfg.mlp) == ("rope", "rmsnorm", "swiglu"):
        sizes = {"mlp-dim": cfg.mlp_dim, "kv-heads": cfg.num_kv_heads, "head-dim": cfg.head_dim}
        sizes["rope-theta"] = cfg.rope_theta
        return "torch_llama", [x for k, v in sizes.items() for x in (f"--{k}", str(v))]
    raise ValueError(f"--preset {args.preset}: no PyTorch peer for this decoder variant")


def shape_flags(args: argparse.Namespace) -> list[str]:
    """The `SHAPE_FLAGS` every system gets, as command-line flags."""
    return [
        x for name in SHAPE_FLAGS for x in ("--" + name.replace("_", "-"), str(getattr(args, name)))
    ]


def systems(args: argparse.Namespace) -> dict[str, list[str]]:
    shape = shape_flags(args)
    py = [sys.executable, "-m"]
    plm = py + ["benchmarks.train_throughput", "--preset", args.preset]
    out = {"plm_jax": plm + shape}
    impls = ["eager", "hf"] + (
        ["compile"] if args.with_compile and args.peer == "torch_gpt" else []
    )
    peer = py + [f"benchmarks.peers.{args.peer}"]
    for impl in impls:
        out[f"torch-{impl}"] = peer + ["--impl", impl] + shape + args.peer_flags
    return out


def run_one(cmd: list[str], malloc_hugetlb: bool = False) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if malloc_hugetlb:
        tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
        env["GLIBC_TUNABLES"] = ":".join(tunables + [HUGETLB])
    from benchmarks import common

    return common.run_record(cmd, env)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs every system --rounds times, alternately; prints and returns the summary record."""
    args = parse_args(argv)
    cmds = systems(args)
    per_round: dict[str, list[float]] = {name: [] for name in cmds}
    process: dict[str, dict[str, list]] = {name: {} for name in cmds}
    params: dict[str, int] = {}
    versions: dict[str, Any] = {}
    threads = None
    for r in range(args.rounds):
        for name, cmd in cmds.items():
            print(f"round {r + 1}/{args.rounds}: {name}", file=sys.stderr, flush=True)
            rec = run_one(cmd, args.malloc_hugetlb)
            per_round[name].append(rec["tokens_per_sec"])
            for key in PROCESS_KEYS:
                process[name].setdefault(key, []).append(rec.get(key))
            params[name] = rec["params_total"]
            versions.update(rec.get("versions", {}))
            threads = rec.get("threads", threads)
    median = {name: statistics.median(v) for name, v in per_round.items()}
    record = {
        "benchmark": "compare",
        "preset": args.preset,
        "peer": f"benchmarks.peers.{args.peer}",
        "shape": {name: getattr(args, name) for name in SHAPE_FLAGS},
        "rounds": args.rounds,
        "tokens_per_sec_median": median,
        "tokens_per_sec_rounds": per_round,
        "ratio_plm_jax_over": {
            name: median["plm_jax"] / v for name, v in median.items() if name != "plm_jax"
        },
        "params_total": params,
        "process_per_step_rounds": process,  # CPU seconds and minor page faults per step
        "torch_threads": threads,
        "glibc_tunables": HUGETLB if args.malloc_hugetlb else os.environ.get("GLIBC_TUNABLES", ""),
        "host_cpu_count": os.cpu_count(),
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()
    return record


if __name__ == "__main__":
    main()
