"""`plm-jax plot`: the training curves of one or several runs, one panel per metric.

Reads each run's `metrics.jsonl` (`metrics.read_metrics`) and draws, for every metric asked
for, one line per run that logged it, against the step or against the number of input tokens
trained on so far (the running sum of `train/input_tokens`, so runs with different batch sizes
line up). Null values (NaN/Inf written as null) are left out of a curve. The figure is drawn
with matplotlib's Agg backend (no display needed) and saved as PNG, SVG or PDF by the output
file's suffix.

What it leaves out: smoothing, live updating (use TensorBoard or W&B for those) and metrics
that are not numbers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from plm_jax.errors import ConfigError, DataError
from plm_jax.metrics import read_metrics

__all__ = ["DEFAULT_METRICS", "Curve", "PlotResult", "plot_runs"]

DEFAULT_METRICS = ("train/loss", "eval/loss", "perf/tokens_per_sec")
SUFFIXES = (".png", ".svg", ".pdf")
TOKENS_KEY = "train/input_tokens"


@dataclasses.dataclass(frozen=True)
class Curve:
    """One drawn line: a run's values of a metric."""

    run: str
    metric: str
    x: list[float]
    y: list[float]


@dataclasses.dataclass
class PlotResult:
    """What `plot_runs` drew: the file, the figure and its curves (in panel order)."""

    path: Path
    figure: Any
    curves: list[Curve]


def plot_runs(
    runs: Sequence[str | Path],
    *,
    output: str | Path,
    metrics: Sequence[str] | None = None,
    x_axis: Literal["step", "tokens"] = "step",
    labels: Sequence[str] | None = None,
) -> PlotResult:
    """Draws the curves of `metrics` for each run into `output`.

    Args:
      runs: run directories (or their metrics.jsonl files).
      output: the image file (.png, .svg or .pdf); its directory is created.
      metrics: metric names; None: those of `DEFAULT_METRICS` any run logged.
      x_axis: "step", or "tokens" (input tokens trained on so far).
      labels: a legend label per run (default: the run directory's name).

    Returns:
      The saved path, the matplotlib figure (one axes per metric) and the curves.

    Raises:
      ConfigError: matplotlib missing, no runs, a bad output suffix, a metric no run logged,
        or labels that do not match the runs.
      DataError: a run without metrics.jsonl.
    """
    plt = _pyplot()
    output = Path(output)
    if output.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"--output {str(output)!r}: use a file ending in {', '.join(SUFFIXES)}")
    if not runs:
        raise ConfigError("give at least one run directory to plot")
    if labels is not None and len(labels) != len(runs):
        raise ConfigError(f"{len(labels)} labels for {len(runs)} runs; give one label per run")
    records = {_label(run, labels, i): _records(Path(run)) for i, run in enumerate(runs)}
    logged = sorted({k for rs in records.values() for r in rs for k in r if k != "step"})
    chosen = list(metrics) if metrics else [m for m in DEFAULT_METRICS if m in logged]
    missing = [m for m in chosen if m not in logged]
    if missing or not chosen:
        shown = ", ".join(logged) or "none"
        raise ConfigError(
            f"metric(s) {missing or list(DEFAULT_METRICS)} are in none of the runs; "
            f"they logged: {shown}"
        )
    if x_axis == "tokens" and not any(TOKENS_KEY in r for rs in records.values() for r in rs):
        raise ConfigError(f"--x tokens needs {TOKENS_KEY} in metrics.jsonl; use --x step")
    fig, axes = plt.subplots(
        len(chosen), 1, figsize=(7, 2.6 * len(chosen)), sharex=True, squeeze=False
    )
    curves = []
    for ax, metric in zip(axes[:, 0], chosen, strict=True):
        for run, rs in records.items():
            curve = _curve(run, metric, rs, x_axis)
            if curve.x:
                ax.plot(curve.x, curve.y, label=run, marker="." if len(curve.x) < 30 else None)
                curves.append(curve)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("step" if x_axis == "step" else "input tokens")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return PlotResult(output, fig, curves)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "plm-jax plot needs matplotlib; `pip install matplotlib` (or 'plm-jax[plot]')"
        ) from None
    matplotlib.use("Agg")  # files only: no display, the same output everywhere
    import matplotlib.pyplot as plt

    return plt


def _label(run: str | Path, labels: Sequence[str] | None, i: int) -> str:
    if labels is not None:
        return labels[i]
    path = Path(run)
    return (path.parent if path.suffix == ".jsonl" else path).resolve().name


def _records(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl" if run.is_dir() else run
    if not path.is_file():
        raise DataError(
            f"{str(run)!r} has no metrics.jsonl; give a run directory (runs/NAME) that has logged "
            "at least one step"
        )
    return read_metrics(path)


def _curve(run: str, metric: str, records: list[dict[str, Any]], x_axis: str) -> Curve:
    xs, ys, tokens = [], [], 0.0
    seen_tokens: dict[int, float] = {}
    for r in records:
        if r.get(TOKENS_KEY) is not None:
            tokens += float(r[TOKENS_KEY])
            seen_tokens[int(r["step"])] = tokens
        value = r.get(metric)
        if value is None or not math.isfinite(float(value)):
            continue
        step = int(r["step"])
        xs.append(float(step) if x_axis == "step" else seen_tokens.get(step, tokens))
        ys.append(float(value))
    return Curve(run, metric, xs, ys)
