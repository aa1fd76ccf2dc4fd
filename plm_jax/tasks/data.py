"""A fine-tuning task's data, encoded for its model, and how its outputs are scored.

`load_task_data(cfg, tokenizer)` reads `task.train_file` and `task.eval_file` (or holds out
`task.holdout_fraction` of the training file, seeded by `run.seed`), encodes them with the
model's special tokens, and returns a `TaskData` whose `metrics(outputs)` turns the head outputs
of the evaluation examples (in order) into the task's metrics.

What it leaves out: reading formats (`classification.py`, `qa.py`), batching (`batching.py`)
and the metric formulas (`metrics.py`, `squad_metrics.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from plm_jax.config import Config
from plm_jax.errors import DataError
from plm_jax.tasks.classification import (
    ClassificationExample,
    LabelSet,
    encode_examples,
    read_classification,
    split_holdout,
)
from plm_jax.tasks.metrics import classification_metrics, regression_metrics

__all__ = ["TaskData", "load_task_data", "score_classification", "score_regression"]


@dataclasses.dataclass
class TaskData:
    """Encoded examples (dicts for `BucketBatcher`) and the scoring of eval outputs.

    Attributes:
      train, eval: encoded examples.
      labels: the class names (classification), else None.
      num_outputs: the head's width (classes; 1 for regression; 2 for QA).
      pad_id: the tokenizer's padding id.
      metrics: `[outputs per eval example] -> {name: value}`.
      raw_eval: the evaluation examples as read (for QA decoding and predictions).
    """

    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    labels: LabelSet | None
    num_outputs: int
    pad_id: int
    metrics: Callable[[list[np.ndarray]], dict[str, float]]
    raw_eval: list[Any] = dataclasses.field(default_factory=list)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def score_classification(
    outputs: list[np.ndarray], golds: list[int], num_classes: int
) -> dict[str, float]:
    """Accuracy, macro-F1, MCC (and binary F1) of argmax predictions, plus the mean loss."""
    logits = np.stack(outputs).astype(np.float64)
    gold = np.asarray(golds)
    out = classification_metrics(logits.argmax(-1), gold, num_classes)
    out["loss"] = float(-_log_softmax(logits)[np.arange(len(gold)), gold].mean())
    return out


def score_regression(outputs: list[np.ndarray], golds: list[float]) -> dict[str, float]:
    """Pearson, Spearman and mean squared error (also reported as the loss)."""
    out = regression_metrics(np.asarray(outputs, np.float64), np.asarray(golds, np.float64))
    out["loss"] = out["mse"]
    return out


def _read(cfg: Config, path: str) -> list[ClassificationExample]:
    t = cfg.task
    return read_classification(
        path,
        text_field=t.text_field,
        pair_field=t.pair_field,
        label_field=t.label_field,
        regression=t.name == "regression",
    )


def load_task_data(cfg: Config, tokenizer: Any, *, labels: LabelSet | None = None) -> TaskData:
    """Reads, splits and encodes the task's files (see the module docstring).

    Args:
      cfg: the run's config (`task`, `model.max_seq_len`, `run.seed`).
      tokenizer: the model's tokenizer.
      labels: a saved label set (when evaluating a trained model); None builds it from the
        training file.

    Raises:
      DataError: unreadable files, unknown labels, no held-out split possible.
    """
    t = cfg.task
    if t.name == "qa":
        from plm_jax.tasks.qa_task import load_qa_data

        return load_qa_data(cfg, tokenizer)
    train = _read(cfg, t.train_file)
    if t.eval_file:
        held_out = _read(cfg, t.eval_file)
    elif t.holdout_fraction > 0:
        train, held_out = split_holdout(train, t.holdout_fraction, cfg.run.seed)
    else:
        raise DataError(
            "no evaluation data: set task.eval_file, or task.holdout_fraction > 0 to hold out "
            "part of task.train_file"
        )
    max_len = cfg.model.max_seq_len
    if t.name == "regression":
        enc_train = encode_examples(train, tokenizer, None, max_seq_len=max_len)
        enc_eval = encode_examples(held_out, tokenizer, None, max_seq_len=max_len)
        golds = [e["label"] for e in enc_eval]
        return TaskData(
            enc_train,
            enc_eval,
            None,
            1,
            tokenizer.pad_id,
            lambda outs: score_regression(outs, golds),
            held_out,
        )
    labels = labels or LabelSet.from_examples(train)
    enc_train = encode_examples(train, tokenizer, labels, max_seq_len=max_len)
    enc_eval = encode_examples(held_out, tokenizer, labels, max_seq_len=max_len)
    golds = [e["label"] for e in enc_eval]
    n = labels.num_classes
    return TaskData(
        enc_train,
        enc_eval,
        labels,
        n,
        tokenizer.pad_id,
        lambda outs: score_classification(outs, golds, n),
        held_out,
    )
