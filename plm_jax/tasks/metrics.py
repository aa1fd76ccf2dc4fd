"""Evaluation metrics for classification and regression fine-tuning, in numpy.

Holds accuracy, macro-F1, binary F1, Matthews correlation (the multi-class form), Pearson and
Spearman correlation, MSE, and the two bundles `classification_metrics` / `regression_metrics`
that an evaluation loop reports. Inputs are host arrays of real examples only: drop the weight-0
padding rows of a batch (`example_index == -1`) before calling. It leaves out computing
predictions (the model heads) and logging (the loop, which namespaces keys as `eval/...`).

The definitions follow scikit-learn and SciPy (which are not dependencies): macro-F1 averages
over the classes present in the predictions or the gold labels; Matthews correlation is
sklearn's multi-class generalisation (Gorodkin 2004). Where a correlation is undefined (a
constant input) it is reported as 0.0 rather than NaN, so a collapsed model reads as "no
correlation" and does not trip NaN checks on logged metrics.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "accuracy",
    "binary_f1",
    "classification_metrics",
    "macro_f1",
    "matthews_corrcoef",
    "mean_squared_error",
    "pearson",
    "regression_metrics",
    "spearman",
]


def _pair(preds: Any, golds: Any, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(preds, dtype=dtype).reshape(-1)
    g = np.asarray(golds, dtype=dtype).reshape(-1)
    if p.shape != g.shape:
        raise ValueError(f"{p.size} predictions for {g.size} gold labels; they must match")
    if p.size == 0:
        raise ValueError("no examples to score")
    return p, g


def accuracy(preds: Any, golds: Any) -> float:
    """Fraction of `preds` equal to `golds` (two `[N]` int arrays)."""
    p, g = _pair(preds, golds, np.int64)
    return float(np.mean(p == g))


def _f1_per_class(p: np.ndarray, g: np.ndarray, classes: np.ndarray) -> np.ndarray:
    tp = np.array([np.sum((p == c) & (g == c)) for c in classes], dtype=np.float64)
    num_pred = np.array([np.sum(p == c) for c in classes], dtype=np.float64)
    num_gold = np.array([np.sum(g == c) for c in classes], dtype=np.float64)
    # A class never predicted has precision 0 (sklearn's zero_division=0); same for recall.
    precision = np.divide(tp, num_pred, out=np.zeros_like(tp), where=num_pred > 0)
    recall = np.divide(tp, num_gold, out=np.zeros_like(tp), where=num_gold > 0)
    denom = precision + recall
    return np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)


def macro_f1(preds: Any, golds: Any) -> float:
    """Unweighted mean of per-class F1 over the classes in `preds` or `golds`.

    A class absent from both is ignored; a class with no predictions has precision 0 (and F1 0).
    """
    p, g = _pair(preds, golds, np.int64)
    return float(np.mean(_f1_per_class(p, g, np.union1d(p, g))))


def binary_f1(preds: Any, golds: Any, positive: int = 1) -> float:
    """F1 of the class `positive` (GLUE's F1 for MRPC and QQP)."""
    p, g = _pair(preds, golds, np.int64)
    return float(_f1_per_class(p, g, np.array([positive]))[0])


def matthews_corrcoef(preds: Any, golds: Any) -> float:
    """Matthews correlation coefficient, multi-class (sklearn's definition); 0.0 if undefined.

    With confusion matrix C (rows gold, columns predicted), t = row sums, p = column sums,
    c = trace and s = N: `(c*s - t.p) / sqrt((s^2 - p.p) * (s^2 - t.t))`.
    """
    p, g = _pair(preds, golds, np.int64)
    classes, index = np.unique(np.concatenate([g, p]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), dtype=np.float64)  # float64: the products overflow int32
    np.add.at(confusion, (index[: len(g)], index[len(g) :]), 1.0)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    correct, n = np.trace(confusion), confusion.sum()
    cov_tp = correct * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    if cov_pp * cov_tt == 0:
        return 0.0
    return float(cov_tp / np.sqrt(cov_tt * cov_pp))


def pearson(preds: Any, golds: Any) -> float:
    """Pearson correlation of two `[N]` float arrays; 0.0 when either is constant."""
    p, g = _pair(preds, golds, np.float64)
    dp, dg = p - p.mean(), g - g.mean()
    denom = np.sqrt((dp @ dp) * (dg @ dg))
    if denom == 0:
        return 0.0
    return float(np.clip((dp @ dg) / denom, -1.0, 1.0))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`; tied values share the mean of their ranks (SciPy's "average")."""
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Each run of equal values [lo, hi) gets rank (lo + 1 + hi) / 2.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    run_ranks = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def spearman(preds: Any, golds: Any) -> float:
    """Spearman rank correlation: Pearson of average ranks (ties share ranks); 0.0 if undefined."""
    p, g = _pair(preds, golds, np.float64)
    return pearson(_average_ranks(p), _average_ranks(g))


def mean_squared_error(preds: Any, golds: Any) -> float:
    """Mean of `(preds - golds)^2`."""
    p, g = _pair(preds, golds, np.float64)
    return float(np.mean((p - g) ** 2))


def classification_metrics(preds: Any, golds: Any, num_classes: int) -> dict[str, float]:
    """Metrics of predicted class ids against gold class ids.

    Args:
      preds: `[N]` predicted class ids (argmax of the logits) of the real examples.
      golds: `[N]` gold class ids.
      num_classes: the number of classes; ids must lie in [0, num_classes).

    Returns:
      {"accuracy", "macro_f1", "mcc"}, plus "f1" (of class 1) when `num_classes == 2`.

    Raises:
      ValueError: the arrays differ in length, are empty, or hold an id outside the classes.
    """
    p, g = _pair(preds, golds, np.int64)
    for name, ids in (("prediction", p), ("gold label", g)):
        if ids.min() < 0 or ids.max() >= num_classes:
            raise ValueError(f"a {name} id is outside [0, {num_classes}): {ids.min()}..{ids.max()}")
    out = {"accuracy": accuracy(p, g), "macro_f1": macro_f1(p, g), "mcc": matthews_corrcoef(p, g)}
    if num_classes == 2:
        out["f1"] = binary_f1(p, g)
    return out


def regression_metrics(preds: Any, golds: Any) -> dict[str, float]:
    """{"pearson", "spearman", "mse"} of `[N]` predicted values against gold values.

    Raises:
      ValueError: the arrays differ in length or are empty.
    """
    return {
        "pearson": pearson(preds, golds),
        "spearman": spearman(preds, golds),
        "mse": mean_squared_error(preds, golds),
    }
