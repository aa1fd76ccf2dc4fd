"""`plm-jax plan` for published model sizes on TPU slices (compile-only; needs the tpu extra).

    python -m benchmarks.plans --output benchmarks/plans.json

Each row compiles the real pretraining step (bf16, scanned layers) for a slice and records the
plan's JSON: memory per chip and fit, FLOPs, collectives, the roofline bound, compile time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from plm_jax.config import load_config
from plm_jax.plan import plan

# (name, topology, overrides): per-device batch x sequence, mesh and remat per row.
ROWS = [
    (
        "gpt2-124m",
        "v5e-8",
        [
            "model.preset=gpt2-124m",
            "model.max_seq_len=1024",
            "train.batch_size=64",
            "mesh.fsdp=8",
            "mesh.data=1",
        ],
    ),
    (
        "llama-3.2-1b",
        "v5p-8",
        [
            "model.preset=llama-3.2-1b",
            "model.max_seq_len=4096",
            "train.batch_size=8",
            "mesh.fsdp=4",
            "mesh.data=1",
            "model.remat=full",
        ],
    ),
    (
        "llama-3-8b",
        "v5p-32",
        [
            "model.preset=llama-3-8b",
            "model.max_seq_len=4096",
            "train.batch_size=32",
            "mesh.fsdp=16",
            "mesh.data=1",
            "model.remat=full",
        ],
    ),
    (
        "llama-3-8b",
        "v6e-16",
        [
            "model.preset=llama-3-8b",
            "model.max_seq_len=8192",
            "train.batch_size=16",
            "mesh.fsdp=16",
            "mesh.data=1",
            "model.remat=full",
        ],
    ),
    (
        "llama-3-70b",
        "v5p-256",
        [
            "model.preset=llama-3-70b",
            "model.max_seq_len=4096",
            "train.batch_size=128",
            "mesh.fsdp=128",
            "mesh.data=1",
            "model.remat=full",
        ],
    ),
]
COMMON = ["model.dtype=bfloat16", "model.use_scan_layers=true"]  # the preset's vocabulary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/plans.json"))
    parser.add_argument("--only", help="a row name to run alone")
    args = parser.parse_args()
    results = json.loads(args.output.read_text()) if args.output.is_file() else []
    for name, topology, overrides in ROWS:
        if args.only and args.only != name:
            continue
        cfg = load_config(None, [*COMMON, *overrides, "run.dir=/tmp/plm_jax_plans"])
        start = time.perf_counter()
        report = plan(cfg, topology=topology)
        row = {
            "name": name,
            "topology": topology,
            "overrides": overrides,
            "date": time.strftime("%Y-%m-%d"),
            "seconds": time.perf_counter() - start,
            **report,
        }
        results = [r for r in results if (r["name"], r["topology"]) != (name, topology)] + [row]
        args.output.write_text(json.dumps(results, indent=1))
        mem = report["memory_per_device"]
        print(
            f"{name} on {topology}: {mem['total'] / 2**30:.1f} GiB of {mem['limit'] / 2**30:.0f}"
            f" ({'fits' if report['fits'] else 'does not fit'}), compiled in "
            f"{report['compile_seconds']:.0f} s",
            flush=True,
        )


if __name__ == "__main__":
    main()
