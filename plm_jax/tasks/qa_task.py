"""Extractive QA as a fine-tuning task: SQuAD files -> windows -> span heads -> EM/F1.

Training reads every window of `task.train_file` (answers mapped to token spans, or to the
first token when a window does not hold the answer); evaluation runs the model on every window
of the evaluation questions and decodes the best span of each question over its windows
(`qa.decode_predictions`), scored with the official SQuAD exact match and F1.

What it leaves out: windowing and decoding themselves (`qa.py`), the metric formulas
(`squad_metrics.py`) and the training loop (`finetune.py`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from plm_jax.config import Config
from plm_jax.errors import DataError
from plm_jax.tasks.classification import split_holdout
from plm_jax.tasks.data import TaskData
from plm_jax.tasks.qa import QAExample, QAFeature, decode_predictions, make_features, read_squad
from plm_jax.tasks.squad_metrics import squad_evaluate

__all__ = ["load_qa_data", "predict_qa", "qa_metrics"]


def _features(cfg: Config, tokenizer: Any, examples: list[QAExample]) -> list[QAFeature]:
    t = cfg.task
    return make_features(
        examples,
        tokenizer,
        max_seq_len=cfg.model.max_seq_len,
        doc_stride=t.doc_stride,
        max_query_len=t.max_query_len,
    )


def qa_metrics(
    cfg: Config, examples: list[QAExample], features: list[QAFeature], outputs: list[np.ndarray]
) -> dict[str, float]:
    """SQuAD EM/F1 (percent) of the head outputs ([L, 2] per feature, in order)."""
    t = cfg.task
    preds = decode_predictions(
        features,
        [o[:, 0] for o in outputs],
        [o[:, 1] for o in outputs],
        examples,
        n_best=t.n_best,
        max_answer_len=t.max_answer_len,
        null_threshold=t.null_threshold,
        version_2=t.version_2,
    )
    return squad_evaluate(examples, preds.answers, version_2=t.version_2)


def load_qa_data(cfg: Config, tokenizer: Any) -> TaskData:
    """The QA task's windows for training and evaluation.

    Raises:
      DataError: unreadable SQuAD files or no evaluation split possible.
    """
    t = cfg.task
    train = read_squad(t.train_file)
    if t.eval_file:
        held_out = read_squad(t.eval_file)
    elif t.holdout_fraction > 0:
        train, held_out = split_holdout(train, t.holdout_fraction, cfg.run.seed)
    else:
        raise DataError(
            "no evaluation data: set task.eval_file, or task.holdout_fraction > 0 to hold out "
            "part of task.train_file"
        )
    train_features = _features(cfg, tokenizer, train)
    eval_features = _features(cfg, tokenizer, held_out)
    return TaskData(
        [f.to_example() for f in train_features],
        [f.to_example() for f in eval_features],
        None,
        2,
        tokenizer.pad_id,
        lambda outputs: qa_metrics(cfg, held_out, eval_features, outputs),
        held_out,
    )


def predict_qa(run: Any, records: list[dict[str, Any]], outputs_fn) -> list[dict[str, Any]]:
    """Answers for records with `question` and `context` (and optionally `id`).

    Returns each record with `answer` (text, "" for none under SQuAD v2), `answer_start`
    (character offset in the context, -1 for none) and `score`.

    Raises:
      DataError: a record without a non-empty string question or context.
    """
    examples = []
    for n, record in enumerate(records, 1):
        question, context = record.get("question"), record.get("context")
        if not (isinstance(question, str) and question and isinstance(context, str) and context):
            raise DataError(f"input record {n} needs non-empty string fields question and context")
        examples.append(QAExample(str(record.get("id", n)), question, context, (), True))
    features = _features(run.config, run.tokenizer, examples)
    outputs = outputs_fn(run, [f.to_example() for f in features])
    t = run.config.task
    preds = decode_predictions(
        features,
        [o[:, 0] for o in outputs],
        [o[:, 1] for o in outputs],
        examples,
        n_best=t.n_best,
        max_answer_len=t.max_answer_len,
        null_threshold=t.null_threshold,
        version_2=t.version_2,
    )
    results = []
    for record, ex in zip(records, examples, strict=True):
        answer = preds.answers[ex.id]
        best = preds.nbest[ex.id][0] if preds.nbest[ex.id] else None
        found = bool(answer) and best is not None
        results.append(
            {
                **record,
                "answer": answer,
                "answer_start": best.start_char if found else -1,
                "score": float(best.score) if best is not None else None,
            }
        )
    return results
