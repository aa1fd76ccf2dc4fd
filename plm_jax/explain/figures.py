"""The report's figures as PNG bytes (matplotlib, the Agg backend: no display needed).

    attention_figure   a grid of heatmaps: one row per layer, one column per head and a mean
    lens_figure        the target's probability and rank read from every layer
    attribution_figure integrated gradients and gradient x input per token
    ablation_figure    the score change of each ablated head (layer x head) and sublayer

Figures are sized for a page (at most about 1400 px wide at 100 dpi). Token labels are drawn
when the sequence is short enough to read them (`MAX_LABELS`).

What it leaves out: the numbers (`methods.py`) and the page (`report.py`).
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["ablation_figure", "attention_figure", "attribution_figure", "lens_figure"]

MAX_LABELS = 40  # longer sequences get no per-token tick labels
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _short(pieces: list[str]) -> list[str]:
    return [p if len(p) <= 12 else p[:11] + "…" for p in pieces]


def attention_figure(
    weights: np.ndarray, queries: list[str], keys: list[str], title: str, *, per_head: bool
) -> bytes:
    """weights: [layers, N, L, S] -> PNG: rows = layers, columns = heads then their mean
    (only the mean with `per_head=False`)."""
    plt = _pyplot()
    layers, heads = weights.shape[:2]
    columns = heads + 1 if per_head else 1
    cell = min(1.8, 14.0 / columns)
    fig, axes = plt.subplots(
        layers, columns, figsize=(cell * columns + 1, cell * layers + 0.6), squeeze=False
    )
    labels = len(keys) <= MAX_LABELS and columns <= 4
    for layer in range(layers):
        maps = [*(weights[layer] if per_head else []), weights[layer].mean(0)]
        for col, m in enumerate(maps):
            ax = axes[layer, col]
            ax.imshow(m, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if labels:
                ax.set_xticks(range(len(keys)), _short(keys), rotation=90, fontsize=6)
                ax.set_yticks(range(len(queries)), _short(queries), fontsize=6)
            if layer == 0:
                ax.set_title("mean" if col == len(maps) - 1 else f"head {col}", fontsize=8)
            if col == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def lens_figure(probs: np.ndarray, ranks: np.ndarray, target: str) -> bytes:
    """probs, ranks: [layers + 1] -> PNG of the target's probability (log scale) and rank."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3))
    x = np.arange(len(probs))
    names = ["emb", *(str(i + 1) for i in range(len(probs) - 1))]
    left.semilogy(x, np.maximum(probs, 1e-12), marker="o")
    left.set_title(f"P({target}) read from each layer", fontsize=9)
    right.plot(x, ranks + 1, marker="o")
    right.set_yscale("log")
    right.invert_yaxis()
    right.set_title(f"rank of {target} (1 = top)", fontsize=9)
    for ax in (left, right):
        ax.set_xticks(x, names, fontsize=7)
        ax.set_xlabel("after layer", fontsize=8)
    return _png(fig)


def attribution_figure(
    pieces: list[str], integrated: np.ndarray, gradient_x_input: np.ndarray, title: str
) -> bytes:
    """Per-token bars of both attributions (positive: toward the target)."""
    plt = _pyplot()
    height = max(2.0, 0.22 * len(pieces) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(9, height), sharey=True)
    y = np.arange(len(pieces))
    for ax, values, name in (
        (axes[0], integrated, "integrated gradients"),
        (axes[1], gradient_x_input, "gradient x input"),
    ):
        colors = ["#c0392b" if v < 0 else "#2471a3" for v in values]
        ax.barh(y, values, color=colors)
        ax.axvline(0.0, color="black", linewidth=0.5)
        ax.set_title(name, fontsize=9)
    axes[0].set_yticks(y, _short(pieces) if len(pieces) <= 4 * MAX_LABELS else [], fontsize=7)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    return _png(fig)


def ablation_figure(tables: dict[str, np.ndarray], title: str) -> bytes:
    """tables: name -> [layers, N] head table or [layers] sublayer row of score changes."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(3.2 * len(tables) + 1, 3.2), squeeze=False)
    limit = max(max(float(np.abs(t).max()) for t in tables.values()), 1e-9)
    image = None
    for ax, (name, table) in zip(axes[0], tables.items(), strict=True):
        grid = table if table.ndim == 2 else table[:, None]
        image = ax.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xlabel("head" if table.ndim == 2 else "", fontsize=8)
        ax.set_xticks(range(grid.shape[1]) if table.ndim == 2 else [])
        ax.set_yticks(range(grid.shape[0]))
        ax.tick_params(labelsize=7)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="change in log P(target)")
    fig.suptitle(title, fontsize=10)
    return _png(fig)
