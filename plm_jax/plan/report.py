"""The plan as a few lines of text (`plm-jax plan`) or one JSON object (`--json`)."""

from __future__ import annotations

from typing import Any

GIB = 2**30


def _gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _flops(n: float | None) -> str:
    return "?" if n is None else f"{n / 1e12:.3g} TFLOP"


def format_plan(report: dict[str, Any]) -> str:
    """Human-readable lines for `report` (see `plm_jax.plan.planner`)."""
    m, d, b = report["model"], report["devices"], report["batch"]
    mem, fl, roof = report["memory_per_device"], report["flops_per_device"], report["roofline"]
    mesh = " ".join(f"{k}={v}" for k, v in d["mesh"].items())
    lines = [
        f"model: {m['family']}, {m['parameters']:,} parameters, {m['layers']} layers x "
        f"{m['embed_dim']}, {m['dtype']}, remat={m['remat']}, "
        f"{'scanned' if m['use_scan_layers'] else 'unrolled'} layers, "
        f"attention={m['attention']} ({m['attention_kernel']} kernel)",
        f"devices: {d['count']} x {d['kind']} ({d['platform']}), mesh {mesh}",
        f"batch: {b['global']} x {b['seq_len']} = {b['tokens_per_step']:,} tokens per step, "
        f"{b['per_device']:g} rows per device, grad_accum {b['grad_accum']}",
        "memory per device (compiler estimate): "
        f"parameters {_gib(mem['parameters'])}, optimizer state {_gib(mem['optimizer_state'])}, "
        f"batch {_gib(mem['batch'])}, temporaries {_gib(mem['temporaries'])}, "
        f"new outputs {_gib(mem['outputs_not_aliased'])}; total {_gib(mem['total'])}",
    ]
    if "eval_step_per_device" in report:
        ev = report["eval_step_per_device"]
        lines.append(
            f"eval step beside the train state: temporaries {_gib(ev['temporaries'])}, "
            f"total {_gib(ev['total'])}"
        )
    if "compiler_refused" in report:
        lines.append(f"the compiler refused the program: {report['compiler_refused']}")
    if mem["limit"] is None:
        lines.append(f"limit: {mem['limit_source']}; fit not judged")
    else:
        verdict = "fits" if report["fits"] else "DOES NOT FIT"
        lines.append(
            f"limit: {_gib(mem['limit'])} ({mem['limit_source']}), {_gib(mem['usable'])} usable; "
            f"headroom {_gib(mem['headroom'])}: {verdict}"
        )
    xla = _flops(fl["xla"]) + (
        " (a scanned layer counted once)" if fl["xla_counts_scanned_layer_once"] else ""
    )
    lines.append(
        f"FLOPs per device per step: model {_flops(fl['model'])} ({fl['model_formula']}); "
        f"computed incl. masked attention and head {_flops(fl['computed_formula'])}; XLA {xla}"
    )
    coll = report["collectives_per_step"]
    used = [f"{k} {v['count']} ({_gib(v['bytes'])})" for k, v in coll.items() if v["count"]]
    lines.append("collectives per step: " + (", ".join(used) if used else "none"))
    if "step_seconds" in roof:
        mfu = f", MFU <= {roof['mfu']:.1%}" if "mfu" in roof else ""
        memory = (
            f", memory traffic {roof['memory_seconds'] * 1e3:.2f} ms"
            if "memory_seconds" in roof
            else f"; memory traffic not counted: {roof['memory_seconds_why_not']}"
        )
        lines.append(
            f"roofline bound (not a measurement): step >= {roof['step_seconds'] * 1e3:.2f} ms "
            f"(compute {roof['compute_seconds'] * 1e3:.2f} ms{memory}), "
            f"<= {roof['tokens_per_sec_per_device']:,.0f} tokens/s per device{mfu}"
        )
    else:
        lines.append(f"roofline: {roof['why_not']}")
    lines.append(f"compiled in {report['compile_seconds']:.1f} s")
    for t in report.get("tried", []):
        setting = ", ".join(f"{k}={v}" for k, v in t.items() if k not in ("total", "fits"))
        lines.append(
            f"  tried {setting}: {_gib(t['total'])}, {'fits' if t['fits'] else 'does not fit'}"
        )
    return "\n".join(lines)
