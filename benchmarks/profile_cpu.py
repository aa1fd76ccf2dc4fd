"""Where the time of one `train_step` goes on CPU: per-op times from a jax profiler trace,
grouped by what the op does.

    python -m benchmarks.profile_cpu --layers 4 --embed-dim 128 --heads 4 --vocab 4096 \
        --seq-len 128 --batch 16 --steps 3 [--stages]

Builds and jits the step as `benchmarks.train_throughput` does (one device, state donated,
synthetic batch without padding), runs `--warmup` steps, then traces `--steps` steps with
`jax.profiler`. XLA's CPU runtime records one trace event per executed thunk (a loop fusion, a
YNNPACK matmul fusion, a copy, a scatter...), named after its HLO instruction. Each name is
looked up in the compiled HLO text (`parse_hlo`), and `classify` puts it in a category from its
opcode, the JAX name stack in its metadata (`transpose(jvp(...))` marks the backward pass,
einsum strings name the matmul), the op names fused into it and its shapes.

Times are per step: a category's summed thunk durations divided by `--steps`. The runtime runs
independent thunks on its threads at once, so the sum can exceed the step's wall time; shares
are of the sum. Matmuls that XLA gives to Eigen rather than YNNPACK (some weight gradients)
run asynchronously: their trace event covers only the launch, so their time is missing from
the sum. `large_fusions_ms` is the time in fusions of more than `LARGE_FUSION` instructions,
elementwise chains that XLA fused into several consumers and so computes more than once.

`--stages` also times the forward loss, forward + backward, and the whole step, each jitted on
its own, and the same three stages of the PyTorch eager peer (`benchmarks.peers.torch_gpt`),
for a side-by-side table. Tables go to stderr, one JSON line to stdout.

What it leaves out: GPU traces (use the TensorBoard profile there), and exact attribution of
fusions that mix categories (a fusion counts once, under the first rule that matches).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from benchmarks import common
from benchmarks.train_throughput import synthetic_batch
from plm_jax import host_malloc
from plm_jax.config import MeshConfig, TrainConfig
from plm_jax.models.sizes import resolve_model_config
from plm_jax.sharding import batch_sharding, make_mesh, use_mesh
from plm_jax.train.optimizer import lr_schedule, make_optimizer
from plm_jax.train.state import init_train_state, model_graphdef
from plm_jax.train.step import train_step

CATEGORIES = (
    "matmul fwd: LM head",
    "matmul bwd: LM head",
    "matmul fwd: attention q/k/v/o projections",
    "matmul bwd: attention q/k/v/o projections",
    "matmul fwd: attention scores QK^T, PV",
    "matmul bwd: attention scores QK^T, PV",
    "matmul fwd: MLP",
    "matmul bwd: MLP",
    "cross-entropy / log-softmax over vocab",
    "attention softmax + mask",
    "embedding gather / scatter-add",
    "layernorm",
    "gelu",
    "other elementwise (residual, bias, rope)",
    "copies / transposes",
    "optimizer (clip, AdamW) + grad norm",
    "other",
)


LARGE_FUSION = 100  # fused instructions; see "large_fusions_ms"


@dataclass(frozen=True)
class HloOp:
    """One top-level instruction of the compiled program."""

    name: str
    opcode: str
    shape: str
    op_name: str
    fused_ops: tuple[str, ...]  # opcodes and op names inside a fusion's computation


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][\w-]*)\((.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_DIMS = re.compile(r"\[([\d,]*)\]")


def parse_hlo(text: str) -> dict[str, HloOp]:
    """Instruction name -> `HloOp` for every instruction outside fused computations."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        if line.endswith("{") and not line.startswith(" "):
            header = line.split()[1] if line.startswith("ENTRY") else line.split()[0]
            current = header.lstrip("%")
            computations[current] = []
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, shape, opcode, rest = m.groups()
            op = _OP_NAME.search(rest)
            calls = _CALLS.search(rest)
            computations[current].append(
                (
                    name,
                    shape,
                    opcode,
                    (op.group(1) if op else "") + "|" + (calls.group(1) if calls else ""),
                )
            )
    fused = {
        c for instrs in computations.values() for *_, x in instrs for c in [x.split("|")[1]] if c
    }
    ops: dict[str, HloOp] = {}
    for comp, instrs in computations.items():
        if comp in fused:
            continue
        for name, shape, opcode, extra in instrs:
            op_name, called = extra.split("|")
            inner: tuple[str, ...] = ()
            if called in computations:
                inner = tuple(f"{o}:{x.split('|')[0]}" for _, _, o, x in computations[called])
            ops[name] = HloOp(name, opcode, shape, op_name, inner)
    return ops


def _dims(shape: str) -> list[tuple[int, ...]]:
    return [tuple(int(d) for d in m.split(",") if d) for m in _DIMS.findall(shape)]


def classify(op: HloOp, *, batch: int, seq_len: int, vocab: int) -> str:
    """The category (one of `CATEGORIES`) of one executed instruction."""
    names = [op.op_name] + [f.split(":", 1)[1] for f in op.fused_ops]
    opcodes = {op.opcode} | {f.split(":", 1)[0] for f in op.fused_ops}
    text = " ".join(names)
    if not any(k in text for k in ("closed_call", "jvp(", "transpose(")):
        if op.opcode in ("parameter", "constant", "tuple", "get-tuple-element"):
            return "other"
        return "optimizer (clip, AdamW) + grad norm"
    direction = "bwd" if "transpose(jvp" in text else "fwd"
    is_copy = op.opcode in ("copy", "transpose") or re.match(
        r"(copy|transpose|bitcast_copy|bitcast_transpose)", op.name
    )
    if is_copy:
        return "copies / transposes"
    if "dot" in opcodes or "convolution" in opcodes:
        if re.search(r"D,(VD|DV)->\w*V\b", text):
            return f"matmul {direction}: LM head"
        if re.search(r"\w*TNH,\w*SNH->|NTS,\w*SNH->|NLS,\w*SNH->|LNH,\w*SNH->", text):
            return f"matmul {direction}: attention scores QK^T, PV"
        if re.search(r"DNH|DKH|NHD", text):
            return f"matmul {direction}: attention q/k/v/o projections"
        if re.search(r"DF->|FD->", text):
            return f"matmul {direction}: MLP"
    if "take_along_axis" in text or "logsumexp" in text:
        return "cross-entropy / log-softmax over vocab"
    for dims in _dims(op.shape):
        tokens = batch * seq_len in dims or (batch in dims and seq_len in dims)
        if vocab in dims and tokens:
            return "cross-entropy / log-softmax over vocab"
    if "_take" in text:
        return "embedding gather / scatter-add"
    if "vmap(" in text:
        return "attention softmax + mask"
    for dims in _dims(op.shape):
        if len(dims) >= 4 and dims[-1] == dims[-2] == seq_len:  # [B, N, L, S] scores
            return "attention softmax + mask"
    if "rsqrt" in text:
        return "layernorm"
    if "tanh" in text or "erf" in text:
        return "gelu"
    if op.opcode in ("parameter", "constant", "tuple", "get-tuple-element", "bitcast"):
        return "other"
    return "other elementwise (residual, bias, rope)"


def thunk_times(trace_dir: str) -> collections.Counter:
    """Summed microseconds per event name over the traced steps, on XLA's runtime threads
    (its Eigen pool and the PjRt client's threads)."""
    (path,) = glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    times: collections.Counter = collections.Counter()
    for e in events:
        thread = threads.get((e.get("pid"), e.get("tid")), "")
        if e.get("ph") == "X" and thread.startswith("tf_XLA"):
            times[e["name"]] += e.get("dur", 0.0)
    return times


def build_step(args: argparse.Namespace):
    """(jitted step, state, batch, model config) as `benchmarks.train_throughput` builds them."""
    model_cfg, _ = common.model_config(args, min_seq_len=args.seq_len)
    mesh_cfg = MeshConfig(data=1, fsdp=1, tensor=1)
    mesh = make_mesh(mesh_cfg, jax.devices()[:1])
    train_cfg = TrainConfig(
        steps=args.warmup + args.steps + 10, batch_size=args.batch, warmup_steps=1
    )
    tx, schedule = make_optimizer(train_cfg), lr_schedule(train_cfg)
    with use_mesh(mesh, mesh_cfg.rules):
        state, shardings = init_train_state(model_cfg, tx, mesh, args.seed, mesh_cfg.rules)
    batch_sh = batch_sharding(mesh)
    data = synthetic_batch(args.batch, args.seq_len, model_cfg.vocab_size, args.seed)
    batch = {k: jax.device_put(v, batch_sh) for k, v in data.items()}
    graphdef, _ = model_graphdef(model_cfg)
    step = jax.jit(
        partial(
            train_step, graphdef=graphdef, tx=tx, schedule=schedule, grad_accum=1, use_dropout=False
        ),
        in_shardings=(shardings, batch_sh),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )
    return step, state, batch, model_cfg, mesh, mesh_cfg.rules


def profile_jax(args: argparse.Namespace) -> dict[str, Any]:
    """Traces `args.steps` steps; returns per-category and per-op milliseconds per step."""
    step, state, batch, cfg, mesh, rules = build_step(args)
    with use_mesh(mesh, rules):
        compiled = step.lower(state, batch).compile()
        ops = parse_hlo(compiled.as_text())
        for _ in range(args.warmup):
            state, out = step(state, batch)
            jax.block_until_ready((state, out))
        walls = []
        with tempfile.TemporaryDirectory() as tmp:
            trace_dir = args.trace_dir or tmp
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            for _ in range(args.steps):
                start = time.perf_counter()
                state, out = step(state, batch)
                jax.block_until_ready((state, out))
                walls.append(time.perf_counter() - start)
            jax.profiler.stop_trace()
            times = thunk_times(trace_dir)
    shape = dict(batch=args.batch, seq_len=args.seq_len, vocab=cfg.vocab_size)
    by_cat: collections.Counter = collections.Counter()
    per_op = []
    for name, us in times.items():
        if name not in ops:
            continue  # the executor's own events ("ThunkExecutor::Execute", "end: ...")
        category = classify(ops[name], **shape)
        by_cat[category] += us / args.steps / 1e3
        per_op.append((us / args.steps / 1e3, name, category, ops[name].shape, ops[name].op_name))
    per_op.sort(reverse=True)
    return {
        "wall_ms_per_step": 1e3 * statistics.median(walls),
        "thunk_ms_per_step": sum(by_cat.values()),
        "categories_ms": {c: round(by_cat.get(c, 0.0), 3) for c in CATEGORIES},
        "top_ops": [
            {
                "ms": round(ms, 3),
                "name": n,
                "category": c,
                "shape": s,
                "op_name": o[-90:],
                "fused_instructions": len(ops[n].fused_ops),
            }
            for ms, n, c, s, o in per_op[: args.top]
        ],
        "num_thunks_per_step": sum(1 for n in times if n in ops),
        # Fusions of many elementwise instructions: chains XLA fused into several consumers
        # and so recomputes in each (docs/performance.md, "CPU").
        "large_fusions_ms": round(
            sum(ms for ms, n, *_ in per_op if len(ops[n].fused_ops) > LARGE_FUSION), 3
        ),
    }


def jax_stages(args: argparse.Namespace) -> dict[str, float]:
    """Median ms of the forward loss, forward + backward, and the whole step, each jitted on
    its own (so backward = second - first, optimizer and the rest = third - second)."""
    from plm_jax.train.step import _forward_loss

    step, state, batch, cfg, mesh, rules = build_step(args)
    graphdef, _ = model_graphdef(cfg)

    def loss(params, batch):
        return _forward_loss(params, graphdef, batch, None)

    forward = jax.jit(loss)
    backward = jax.jit(jax.value_and_grad(loss))
    with use_mesh(mesh, rules):
        fwd = _median_ms(lambda: forward(state.params, batch), args)
        fwd_bwd = _median_ms(lambda: backward(state.params, batch), args)
        holder = [state]

        def run_step():
            holder[0], out = step(holder[0], batch)
            return holder[0], out

        whole = _median_ms(run_step, args)
    return _stages(fwd, fwd_bwd, whole)


def _median_ms(fn, args: argparse.Namespace) -> float:
    for _ in range(args.warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _stages(fwd: float, fwd_bwd: float, whole: float) -> dict[str, float]:
    return {
        "forward + loss": round(fwd, 1),
        "backward": round(fwd_bwd - fwd, 1),
        "clip + optimizer (+ rest)": round(whole - fwd_bwd, 1),
        "step": round(whole, 1),
    }


def torch_stages(args: argparse.Namespace, cfg) -> dict[str, float]:
    """The eager PyTorch peer's step (`benchmarks.peers.torch_gpt`), timed per stage: forward
    and loss, backward, clip and AdamW (eager CPU ops are synchronous)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.peers import torch_gpt

    torch.manual_seed(args.seed)
    shape = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.vocab_size, args.seq_len)
    model = torch_gpt.GPT(*shape)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=torch_gpt.LR, betas=(0.9, 0.95), eps=1e-8, fused=False)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step() -> tuple[float, float, float]:
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size).float(), targets.reshape(-1))
        loss.item()
        t_fwd = time.perf_counter()
        loss.backward()
        t_bwd = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return t_fwd - start, t_bwd - start, time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    runs = [step() for _ in range(args.steps)]
    fwd, fwd_bwd, whole = (1e3 * statistics.median(r[i] for r in runs) for i in range(3))
    return _stages(fwd, fwd_bwd, whole) | {"threads": torch.get_num_threads()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_cpu")
    common.add_model_args(parser)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--top", type=int, default=15, help="slowest single ops to list")
    parser.add_argument(
        "--stages",
        action="store_true",
        help="also time forward, backward and optimizer separately, for plm_jax and the "
        "PyTorch eager peer",
    )
    parser.add_argument("--trace-dir", default="", help="keep the jax trace here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")
    return args


def table(rec: dict[str, Any]) -> str:
    """A Markdown table: plm_jax's ms per step and share per category."""
    total = rec["thunk_ms_per_step"]
    lines = ["| category | plm_jax ms/step | share |", "|---|---|---|"]
    for c in CATEGORIES:
        ms = rec["categories_ms"][c]
        lines.append(f"| {c} | {ms:.1f} | {100 * ms / total:.1f}% |")
    big = rec["large_fusions_ms"]
    lines += [
        f"| **sum of traced ops** | {total:.1f} | 100% |",
        f"| (of which fusions > {LARGE_FUSION} instructions) | {big:.1f} | "
        f"{100 * big / total:.1f}% |",
        f"| wall time per step (median) | {rec['wall_ms_per_step']:.1f} | |",
    ]
    return "\n".join(lines)


def stages_table(jax_ms: dict[str, float], torch_ms: dict[str, float]) -> str:
    lines = ["| stage | plm_jax ms | torch eager ms | plm_jax / torch |", "|---|---|---|---|"]
    for stage, ms in jax_ms.items():
        other = torch_ms[stage]
        lines.append(f"| {stage} | {ms:.1f} | {other:.1f} | {ms / other:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Profiles, prints the table(s) on stderr and the record as one JSON line; returns it."""
    common.setup_logging()
    args = parse_args(argv)
    host_malloc.tune()  # profile the step users run (plm-jax applies it too)
    cfg, _ = common.model_config(args, min_seq_len=args.seq_len)
    cfg = resolve_model_config(cfg)
    rec = profile_jax(args)
    print(table(rec), file=sys.stderr)
    print("\nslowest plm_jax ops (ms/step, fused instructions, shape):", file=sys.stderr)
    for op in rec["top_ops"]:
        print(
            f"  {op['ms']:8.2f}  {op['category']:<42} {op['name']:<30} "
            f"{op['fused_instructions']:4d} {op['shape'][:36]}",
            file=sys.stderr,
        )
    stages = None
    if args.stages:
        stages = {"plm_jax": jax_stages(args), "torch_eager": torch_stages(args, cfg)}
        print("\n" + stages_table(stages["plm_jax"], stages["torch_eager"]), file=sys.stderr)
    record = {
        "benchmark": "profile_cpu",
        "model": common.model_summary(cfg),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "plm_jax": rec,
        "stages_ms": stages,
        **common.environment(),
    }
    return common.emit(record)


if __name__ == "__main__":
    main()
