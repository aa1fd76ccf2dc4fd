"""The collectives a compiled program runs per step, read from its optimized HLO text.

    collectives(hlo_text) -> {"all-gather": {"count": n, "bytes": b}, ...}

Each op counts as often as it runs: an op inside a while loop (scanned layers, gradient
accumulation) counts once per trip, the trip count read from the loop condition's bound.
Bytes are the op's result per device (an all-gather's gathered array, a reduce-scatter's
shard, an all-reduce's array); an asynchronous pair counts once, at its `-done`.
"""

from __future__ import annotations

import re
from collections import defaultdict

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([0-9,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
_LIST_CALLS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_BOUND = re.compile(r"[su](?:32|64)\[\](?:\{[^}]*\})?\s+constant\((\d+)\)")


def _bytes(result_type: str) -> int:
    total = 0.0
    for dtype, dims in _ARRAY.findall(result_type):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return int(total)


def _computations(text: str) -> tuple[dict[str, list[str]], str | None]:
    """{name: body lines} and the entry computation's name."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m:
                current = m.group(1)
                comps[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.strip() == "}":
            current = None
        else:
            comps[current].append(line)
    return comps, entry


def _trip_count(condition: list[str], default: int) -> int:
    bounds = [int(b) for line in condition for b in _TRIP_BOUND.findall(line)]
    return max(bounds) if bounds else default


def collectives(text: str, *, default_trips: int = 1) -> dict[str, dict[str, int]]:
    """Count and result bytes per step of each collective kind in optimized HLO `text`.

    Args:
      text: `compiled.as_text()`.
      default_trips: trips of a while loop whose bound cannot be read from its condition.
    """
    comps, entry = _computations(text)
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, lines in comps.items():
        for line in lines:
            found = dict(_CALLS.findall(line)) if "=" in line else {}
            trips = 1
            if "body" in found:
                trips = _trip_count(comps.get(found.get("condition", ""), []), default_trips)
                calls[name].append((found["body"], trips))
            for key in ("calls", "to_apply"):
                if key in found:
                    calls[name].append((found[key], 1))
            for group in _LIST_CALLS.findall(line):
                for callee in re.findall(r"%?([\w.\-]+)", group):
                    calls[name].append((callee, 1))
    runs: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int, depth: int = 0) -> None:
        if depth > 64 or name not in comps:
            return
        runs[name] += times
        for callee, trips in calls.get(name, []):
            visit(callee, times * trips, depth + 1)

    if entry is not None:
        visit(entry, 1)
    out = {kind: {"count": 0, "bytes": 0} for kind in KINDS}
    for name, times in runs.items():
        for line in comps[name]:
            m = _OP.match(line)
            if not m:
                continue
            result_type, op = m.groups()
            kind = op.removesuffix("-done")
            if kind in out and not op.endswith("-start"):
                out[kind]["count"] += times
                out[kind]["bytes"] += times * _bytes(result_type)
    return out
