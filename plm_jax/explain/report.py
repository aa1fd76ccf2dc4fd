"""The files of an explanation: `report.html` (self-contained: figures embedded as base64 PNG
data URIs, inline CSS, no script and no link to anything), the same figures as PNG files,
`explain.json` (every number but the attention weights) and `explain.npz` (arrays for
scripts: `attention/<site>`, `lens_logits`, `integrated`, `gradient_x_input`,
`ablation/<stack>/<part>`).

What it leaves out: computing anything (`run.py`, `methods.py`).
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from plm_jax.errors import ConfigError
from plm_jax.explain import figures

__all__ = ["REPORT_FILE", "to_dict", "write_report"]

REPORT_FILE = "report.html"
STYLE = (
    "body{font-family:sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
    "font-size:13px;text-align:left}img{max-width:100%}.note{color:#555}"
    ".tok{display:inline-block;margin:1px;padding:1px 3px;border-radius:3px;font-family:monospace}"
)
KIND_TEXT = {
    "next_token": "the next token after the text",
    "masked_token": "the token at the mask",
    "translated_token": "the next decoder token",
    "class": "the class",
    "none": "nothing (no output head)",
}


def to_dict(e: Any) -> dict[str, Any]:
    """The JSON-ready numbers of an `Explanation` (attention weights go to the NPZ)."""
    out: dict[str, Any] = {
        "source": e.source,
        "kind": e.kind,
        "tokens": e.pieces,
        "target": e.target,
        "target_name": e.target_name,
        "top": e.top,
        "truncation": e.truncation,
        "notes": e.notes,
        "methods": list(e.methods),
        "attention_shapes": {k: list(v.shape) for k, v in e.attention.items()},
        "logit_lens": e.lens,
    }
    if e.attributions is not None:
        a = e.attributions
        out["attributions"] = {
            "integrated_gradients": a.integrated.tolist(),
            "gradient_x_input": a.gradient_x_input.tolist(),
            "score": a.score,
            "baseline_score": a.baseline_score,
            "sum": float(a.integrated.sum()),
            "completeness_error": a.completeness_error,
            "relative_error": a.relative_error,
            "baseline": a.baseline,
            "steps": a.steps,
        }
    if e.ablations is not None:
        out["ablations"] = {
            k: ({p: t.tolist() for p, t in v.items()} if isinstance(v, dict) else v)
            for k, v in e.ablations.items()
        }
    return out


def _arrays(e: Any) -> dict[str, np.ndarray]:
    arrays = {f"attention/{k}": v for k, v in e.attention.items()}
    if e.lens_logits is not None:
        arrays["lens_logits"] = e.lens_logits
    if e.attributions is not None:
        arrays["integrated"] = e.attributions.integrated
        arrays["gradient_x_input"] = e.attributions.gradient_x_input
    for stack, parts in (e.ablations or {}).items():
        if isinstance(parts, dict):
            arrays.update({f"ablation/{stack}/{p}": t for p, t in parts.items()})
    return arrays


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _tokens(pieces: list[str], values: np.ndarray) -> str:
    """The text's tokens shaded by attribution (blue: toward the target, red: against)."""
    scale = max(float(np.abs(values).max()), 1e-12)
    spans = []
    for piece, v in zip(pieces, values, strict=True):
        alpha = min(abs(float(v)) / scale, 1.0)
        rgb = "36,113,163" if v >= 0 else "192,57,43"
        spans.append(
            f'<span class="tok" style="background:rgba({rgb},{alpha:.2f})" '
            f'title="{float(v):+.4f}">{html.escape(piece)}</span>'
        )
    return "<p>" + "".join(spans) + "</p>"


def _sections(e: Any, per_head: bool, files: dict[str, bytes]) -> list[str]:
    parts = []
    target = e.target_name
    for site, weights in e.attention.items():
        stack = site.split(".")[0]
        queries = e.stack_pieces[stack]
        keys = e.stack_pieces["encoder"] if site.endswith("cross") else queries
        png = figures.attention_figure(weights, queries, keys, site, per_head=per_head)
        files[f"attention_{site.replace('.', '_')}.png"] = png
        parts.append(f"<h2>Attention: {html.escape(site)}</h2>" + _img(png, f"attention {site}"))
        parts.append('<p class="note">Rows: queries; columns: keys; colour: weight 0-1.</p>')
    if e.lens:
        probs = np.array([row["target_prob"] for row in e.lens])
        ranks = np.array([row["target_rank"] for row in e.lens])
        png = figures.lens_figure(probs, ranks, target)
        files["logit_lens.png"] = png
        rows = [
            [
                "embeddings" if i == 0 else f"after layer {i}",
                f"{row['target_prob']:.4g}",
                row["target_rank"] + 1,
                ", ".join(f"{name} {p:.3f}" for name, p in row["top"]),
            ]
            for i, row in enumerate(e.lens)
        ]
        parts.append("<h2>Logit lens</h2>" + _img(png, "logit lens"))
        parts.append(_table(["stream", f"P({target})", "rank", "top outputs"], rows))
        parts.append(
            '<p class="note">Each residual stream read through the model\'s final norm and '
            "output head; the last row is the model's own output.</p>"
        )
    if e.attributions is not None:
        a = e.attributions
        title = f"attributions to log P({target})"
        png = figures.attribution_figure(e.pieces, a.integrated, a.gradient_x_input, title)
        files["attributions.png"] = png
        parts.append("<h2>Token attributions</h2>" + _tokens(e.pieces, a.integrated))
        parts.append(_img(png, "token attributions"))
        parts.append(
            f"<p>Integrated gradients: baseline {html.escape(a.baseline)} token embeddings, "
            f"{a.steps} Gauss-Legendre steps. Sum {a.integrated.sum():+.5f}; score "
            f"{a.score:+.5f} at the input and {a.baseline_score:+.5f} at the baseline "
            f"(difference {a.score - a.baseline_score:+.5f}); completeness error "
            f"{a.completeness_error:.2e} ({100 * a.relative_error:.3f}%).</p>"
        )
    if e.ablations is not None:
        ab = e.ablations
        tables = {
            f"{stack} {part}": table
            for stack, stack_parts in ab.items()
            if isinstance(stack_parts, dict)
            for part, table in stack_parts.items()
        }
        png = figures.ablation_figure(tables, f"{ab['mode']} ablation: change in log P({target})")
        files["ablations.png"] = png
        parts.append("<h2>Ablations</h2>" + _img(png, "ablations"))
        rows = sorted(
            (
                (name, f"layer {idx[0]}" + (f" head {idx[1]}" if len(idx) > 1 else ""), v)
                for name, table in tables.items()
                for idx, v in np.ndenumerate(table)
            ),
            key=lambda r: -abs(r[2]),
        )[:10]
        parts.append(
            f"<p>{html.escape(ab['mode'])} ablation; clean log P({html.escape(target)}) = "
            f"{ab['clean']:+.5f}. Largest changes:</p>"
            + _table(["part", "where", "change"], [[n, w, f"{v:+.5f}"] for n, w, v in rows])
        )
    return parts


def write_report(e: Any, output: str | Path, *, per_head: bool = True) -> Path:
    """Writes report.html, the PNGs, explain.json and explain.npz into `output`.

    Returns:
      The path of report.html.

    Raises:
      ConfigError: `output` is an existing file.
    """
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {str(out)!r} is a file; give a directory for the report")
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {}
    sections = _sections(e, per_head, files)
    head = [
        f"<h1>Explanation of {html.escape(KIND_TEXT[e.kind])}</h1>",
        f"<p>Model: <code>{html.escape(e.source)}</code></p>",
        f"<p>Tokens ({len(e.pieces)}): "
        + " ".join(f"<code>{html.escape(p)}</code>" for p in e.pieces)
        + "</p>",
    ]
    if e.kind != "none":
        shown = ", ".join(f"{html.escape(n)} {p:.3f}" for n, p in e.top)
        head.append(f"<p>Explained output: <b>{html.escape(e.target_name)}</b>. Top: {shown}</p>")
    for note in ([e.truncation] if e.truncation else []) + e.notes:
        head.append(f'<p class="note">{html.escape(note)}</p>')
    page = (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>plm-jax explain</title>'
        f"<style>{STYLE}</style></head><body>{''.join(head + sections)}</body></html>"
    )
    for name, png in files.items():
        (out / name).write_bytes(png)
    (out / "explain.json").write_text(json.dumps(to_dict(e), indent=1))
    np.savez_compressed(out / "explain.npz", **_arrays(e))
    path = out / REPORT_FILE
    path.write_text(page, encoding="utf-8")
    return path
