"""`explain`: every requested method on one text, as an `Explanation` (and a report on disk).

    explain_model(model, tokenizer, text)          a pretrained or converted model
    explain_task(task_run, text)                   a fine-tuned classifier (`load_task_run`)
    explain_path("runs/NAME", text, output=DIR)    either, from a run or checkpoint path

What it leaves out: the arithmetic (`methods.py`), the figures and page (`report.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from plm_jax.errors import ConfigError
from plm_jax.explain.methods import BASELINES, Attributions, Probe
from plm_jax.explain.subject import ClassHead, Subject, class_subject, lm_subject, top_k
from plm_jax.explain.trace import ABLATION_MODES

__all__ = [
    "METHODS",
    "Explanation",
    "explain_model",
    "explain_path",
    "explain_task",
    "parse_methods",
]

METHODS = ("attention", "logit-lens", "attributions", "ablations")
TOP_K = 5


@dataclasses.dataclass
class Explanation:
    """The numbers of one explained text.

    Attributes:
      source: what was explained (a path or a model description).
      kind: the readout (`subject.Readout.kind`).
      pieces: the attributed tokens; stack_pieces: each stack's tokens (attention axes).
      target, target_name: the explained output; top: the model's top (name, probability).
      truncation: what a long text lost, or None. notes: other sentences for the reader.
      methods: the methods that ran.
      attention: site -> [layers, N, L, S] weights.
      lens: [layers + 1] dicts of the layer's top-k (name, probability), the target's
        probability and its rank (0 = top); lens_logits: [layers + 1, V or C] float32.
      attributions: `methods.Attributions`, or None.
      ablations: {"mode", "clean", stack: {part: [layers, N] or [layers]}}, or None.
    """

    source: str
    kind: str
    pieces: list[str]
    stack_pieces: dict[str, list[str]]
    target: int
    target_name: str
    top: list[tuple[str, float]]
    truncation: str | None
    notes: list[str]
    methods: tuple[str, ...]
    attention: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    lens: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    lens_logits: np.ndarray | None = None
    attributions: Attributions | None = None
    ablations: dict[str, Any] | None = None


def parse_methods(methods: str | Sequence[str] | None) -> tuple[str, ...]:
    """Method names from "all", a comma-separated string or a list.

    Raises:
      ConfigError: an unknown method.
    """
    if methods is None or methods == "all":
        return METHODS
    names = methods.split(",") if isinstance(methods, str) else list(methods)
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        if name not in METHODS:
            raise ConfigError(
                f"--method {name!r} is not a method; choose from {', '.join(METHODS)} "
                "(comma-separated), or all"
            )
    if not names:
        raise ConfigError(f"--method is empty; choose from {', '.join(METHODS)}, or all")
    return tuple(dict.fromkeys(names))


def _check_options(baseline: str, steps: int, ablation: str) -> None:
    if baseline not in BASELINES:
        raise ConfigError(f"--baseline {baseline!r} is not one of {list(BASELINES)}")
    if not 2 <= steps <= 1024:
        raise ConfigError(f"--steps {steps} must be between 2 and 1024 (64 is the default)")
    if ablation not in ABLATION_MODES:
        raise ConfigError(f"--ablation {ablation!r} is not one of {list(ABLATION_MODES)}")


def _run(
    probe: Probe,
    subject: Subject,
    *,
    source: str,
    methods: tuple[str, ...],
    requested: bool,
    baseline: str,
    steps: int,
    pad_id: int,
) -> Explanation:
    notes = []
    if subject.readout.kind == "none":
        dropped = [m for m in methods if m != "attention"]
        if dropped and requested:
            raise ConfigError(
                f"--method {','.join(dropped)} needs an output head, and this encoder has none "
                "(no MLM head): use --method attention, or a fine-tuned classifier"
            )
        if dropped:
            notes.append("this encoder has no output head: attention maps only")
        methods = tuple(m for m in methods if m == "attention")
    attention, lens_logits = probe.lens(subject.inputs)
    has_output = subject.readout.kind != "none"
    output = lens_logits[-1]
    target = subject.target
    if target is None and has_output:
        target = int(np.argmax(output))
        notes.append("target: the model's most likely output (give --target to choose)")
    top = [(subject.output_name(i), p) for i, p in top_k(output, TOP_K)] if has_output else []
    result = Explanation(
        source=source,
        kind=subject.readout.kind,
        pieces=subject.pieces,
        stack_pieces=subject.stack_pieces,
        target=-1 if target is None else target,
        target_name=subject.output_name(target) if has_output else "",
        top=top,
        truncation=subject.truncation,
        notes=notes,
        methods=methods,
    )
    if "attention" in methods:
        result.attention = attention
    if "logit-lens" in methods:
        result.lens_logits = lens_logits
        for logits in lens_logits:
            logp = logits.astype(np.float64) - logits.max()
            logp -= np.log(np.exp(logp).sum())
            result.lens.append(
                {
                    "top": [(subject.output_name(i), p) for i, p in top_k(logits, TOP_K)],
                    "target_prob": float(np.exp(logp[target])),
                    "target_rank": int((logp > logp[target]).sum()),
                }
            )
    if "attributions" in methods:
        result.attributions = probe.attributions(
            subject.inputs, target, baseline=baseline, steps=steps, pad_id=pad_id
        )
    if "ablations" in methods:
        result.ablations = {"mode": probe.mode, **probe.ablations(subject.inputs, target)}
    return result


def explain_model(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    target: str | None = None,
    prefix: str = "",
    methods: str | Sequence[str] | None = None,
    baseline: str = "pad",
    steps: int = 64,
    ablation: str = "zero",
    source: str = "model",
) -> Explanation:
    """Explains a pretrained or converted model's output on `text` (see `lm_subject`).

    Args:
      model, tokenizer: the model (any family) and its tokenizer.
      text: the text (a decoder explains its next token; an MLM encoder its mask token; an
        encoder-decoder the next decoder token after `prefix`).
      target: the explained token, or None for the most likely one.
      prefix: encoder-decoders: the decoder's output so far.
      methods: `METHODS` names, comma-separated or a list; None or "all" for every one.
      baseline, steps: integrated gradients' baseline ("pad" or "zero") and node count.
      ablation: "zero" or "mean".
      source: a description for the report.

    Raises:
      ConfigError, DataError: bad options, target or text (one line each).
    """
    requested = methods not in (None, "all")
    names = parse_methods(methods)
    _check_options(baseline, steps, ablation)
    subject = lm_subject(model, tokenizer, text, target=target, prefix=prefix)
    probe = Probe(model, None, subject.readout, ablation)
    return _run(
        probe,
        subject,
        source=source,
        methods=names,
        requested=requested,
        baseline=baseline,
        steps=steps,
        pad_id=tokenizer.pad_id,
    )


def explain_task(
    run: Any,
    text: str,
    *,
    target: str | None = None,
    methods: str | Sequence[str] | None = None,
    baseline: str = "pad",
    steps: int = 64,
    ablation: str = "zero",
) -> Explanation:
    """Explains a fine-tuned classifier's label for `text` (`run`: a `TaskRun`); the score is
    log P(label). Options as in `explain_model`.

    Raises:
      ConfigError: a task other than classification, a label it does not have, bad options.
    """
    from flax import nnx

    task = run.config.task.name
    if task != "classification":
        raise ConfigError(
            f"explain covers classifiers among fine-tuned runs; {run.path} is a {task!r} run"
        )
    requested = methods not in (None, "all")
    names = parse_methods(methods)
    _check_options(baseline, steps, ablation)
    task_model = nnx.merge(run.graphdef, run.params)
    backbone = task_model.backbone
    subject = class_subject(
        backbone.cfg.family,
        backbone.cfg.max_seq_len,
        run.tokenizer,
        run.labels,
        text,
        target,
    )
    head = ClassHead(task_model.head_w[...], task_model.head_b[...], task_model.pooling)
    probe = Probe(backbone, head, subject.readout, ablation)
    return _run(
        probe,
        subject,
        source=str(run.path),
        methods=names,
        requested=requested,
        baseline=baseline,
        steps=steps,
        pad_id=run.tokenizer.pad_id,
    )


def _task_name(path: str | Path) -> str:
    """The run's `task.name` ("" for pretraining and converted runs)."""
    from plm_jax.checkpoint import locate_checkpoint

    run_dir, _ = locate_checkpoint(path)
    config = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ""
    task = data.get("task") if isinstance(data, dict) else None
    return str(task.get("name") or "") if isinstance(task, dict) else ""


def explain_path(
    path: str | Path,
    text: str,
    *,
    output: str | Path | None = None,
    per_head: bool = True,
    **kwargs: Any,
) -> Explanation:
    """Loads a run or checkpoint (fine-tuned or not), explains `text`, and writes the report
    to `output` when given (see `report.write_report`). kwargs: as `explain_model`.

    Raises:
      DataError: a missing or incomplete run; ConfigError, DataError: see the explainers.
    """
    if _task_name(path):
        from plm_jax.tasks.predict import load_task_run

        if kwargs.pop("prefix", ""):
            raise ConfigError("--prefix is for encoder-decoders, not fine-tuned classifiers")
        explanation = explain_task(load_task_run(path), text, **kwargs)
    else:
        import plm_jax

        lm = plm_jax.load(path)
        explanation = explain_model(lm.model, lm.tokenizer, text, source=str(lm.path), **kwargs)
    if output is not None:
        from plm_jax.explain.report import write_report

        write_report(explanation, output, per_head=per_head)
    return explanation
