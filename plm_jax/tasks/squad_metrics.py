"""SQuAD exact match and F1, as the official v1.1 and v2.0 evaluation scripts define them.

Holds `normalize_answer`, the per-question scores `exact_match` and `f1_score` (the maximum over
the gold answers) and `squad_evaluate` (percentages over a question set, with the HasAns/NoAns
breakdown of v2.0). It leaves out decoding answers from logits (`plm_jax.tasks.qa`) and the v2.0
script's search for the best no-answer threshold.

Normalisation (both scripts): lowercase, drop ASCII punctuation (`string.punctuation`), drop the
words "a", "an" and "the", and collapse whitespace. F1 is over whitespace tokens of normalised
text, counting repeated tokens (bag-of-words overlap).

v1.1 and v2.0 differ only where a text normalises to nothing:
- v2.0 drops gold answers that normalise to "" and, when none is left (an unanswerable
  question), scores against [""]; F1 with an empty prediction or gold is 1 if both are empty,
  else 0.
- v1.1 keeps every gold answer and scores F1 0 whenever no token is shared (so "" vs "" is 0).
A question with no gold answers is scored as unanswerable in both modes: 1 for an empty
prediction, else 0.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from plm_jax.errors import DataError

if TYPE_CHECKING:
    from plm_jax.tasks.qa import QAExample

__all__ = ["exact_match", "f1_score", "normalize_answer", "squad_evaluate"]

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Lowercase, strip punctuation and the articles a/an/the, and collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _golds(gold_answers: Sequence[str], version_2: bool) -> list[str]:
    if version_2:
        gold_answers = [g for g in gold_answers if normalize_answer(g)]
    return list(gold_answers) or [""]


def exact_match(prediction: str, gold_answers: Sequence[str], *, version_2: bool = False) -> float:
    """1.0 if `prediction` equals some gold answer after normalisation, else 0.0.

    Args:
      prediction: the predicted answer; "" means "no answer".
      gold_answers: the reference answers; empty for an unanswerable question.
      version_2: use the v2.0 script's gold filtering (see the module docstring).
    """
    guess = normalize_answer(prediction)
    return float(any(guess == normalize_answer(g) for g in _golds(gold_answers, version_2)))


def f1_score(prediction: str, gold_answers: Sequence[str], *, version_2: bool = False) -> float:
    """The best token-overlap F1 (in [0, 1]) of `prediction` against any gold answer.

    Args:
      prediction: the predicted answer; "" means "no answer".
      gold_answers: the reference answers; empty for an unanswerable question.
      version_2: use the v2.0 script's gold filtering and empty-text rule (module docstring).
    """
    guess = normalize_answer(prediction).split()
    best = 0.0
    for gold_text in _golds(gold_answers, version_2):
        gold = normalize_answer(gold_text).split()
        if (version_2 or not gold_answers) and (not gold or not guess):
            best = max(best, float(gold == guess))
            continue
        common = sum((collections.Counter(guess) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(guess), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def squad_evaluate(
    examples: Sequence[QAExample], predictions: Mapping[str, str], *, version_2: bool = False
) -> dict[str, float]:
    """Exact match and F1 in percent over `examples`, as the official scripts report them.

    Args:
      examples: the questions with their gold answers (`plm_jax.tasks.qa.read_squad`).
      predictions: {question id: predicted answer}, "" for "no answer"; extra ids are ignored.
      version_2: score as SQuAD v2.0 and add the HasAns/NoAns breakdown.

    Returns:
      {"exact_match", "f1", "total"}; with `version_2` also "HasAns_exact_match",
      "HasAns_f1", "HasAns_total" when some question has an answer, and the "NoAns_" three
      when some has none (as the v2.0 script omits an empty group).

    Raises:
      DataError: there are no examples, or a question has no prediction.
    """
    if not examples:
        raise DataError("no questions to evaluate; pass the examples the predictions are for")
    missing = [e.id for e in examples if e.id not in predictions]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(examples)} questions have no prediction (first: "
            f"{missing[0]!r}); predict every question, with '' for no answer"
        )
    groups: dict[str, list[tuple[float, float]]] = {"": [], "HasAns_": [], "NoAns_": []}
    for example in examples:
        golds = [text for text, _ in example.answers]
        prediction = predictions[example.id]
        scores = (
            exact_match(prediction, golds, version_2=version_2),
            f1_score(prediction, golds, version_2=version_2),
        )
        groups[""].append(scores)
        groups["HasAns_" if golds else "NoAns_"].append(scores)
    out: dict[str, float] = {}
    for prefix, scores in groups.items():
        if scores and (prefix == "" or version_2):
            out[f"{prefix}exact_match"] = 100.0 * sum(em for em, _ in scores) / len(scores)
            out[f"{prefix}f1"] = 100.0 * sum(f1 for _, f1 in scores) / len(scores)
            out[f"{prefix}total"] = float(len(scores))
    return out
