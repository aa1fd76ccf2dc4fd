"""Extractive question answering data: read SQuAD files, cut contexts into windows, decode spans.

Holds `read_squad` (SQuAD v1.1/v2.0 JSON, or JSON lines as Hugging Face datasets writes them),
`make_features` (question + context windows with start/end token targets: the question cut to
`max_query_len` tokens as in BERT's run_squad.py, the windows as in Hugging Face's run_qa.py)
and `decode_predictions` (the best answer span per question from the model's start/end logits,
mapped back to the original context characters). It leaves out the model head, the training
loop, batching (`plm_jax.tasks.batching`, fed by `QAFeature.to_example`) and scoring
(`plm_jax.tasks.squad_metrics`).

Windows. A context longer than fits beside the question is cut into overlapping windows of
context tokens. `doc_stride` is the number of context tokens two consecutive windows share (the
`stride` of Hugging Face tokenizers, which run_qa.py passes as `doc_stride`), not the distance
between window starts. With C context tokens per window, window k starts at context token
`k * (C - doc_stride)`, and the last window is the first that reaches the context's end.

Targets. A window's `start`/`end` are the token positions of the first answer when its tokens lie
wholly inside the window, else 0/0: position 0 (the [CLS] or <s> token) means "no answer here".
Unanswerable questions get 0/0 in every window. A tokenizer that adds no special tokens (a GPT-2
tokenizer.json without a post-processor) has its first question token there instead, as in
run_qa.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plm_jax.errors import ConfigError, DataError

if TYPE_CHECKING:
    from plm_jax.hf_tokenizer import HfTokenizer
    from plm_jax.tokenizer import Tokenizer

__all__ = [
    "QAExample",
    "QAFeature",
    "QAPredictions",
    "SpanCandidate",
    "decode_predictions",
    "make_features",
    "read_squad",
]

_FORMATS = (
    'SQuAD JSON ({"data": [{"paragraphs": [{"context", "qas"}]}]}) or JSON lines with '
    '"id", "question", "context" and "answers"'
)


@dataclass(frozen=True)
class QAExample:
    """One question about one context.

    Attributes:
      id: the question id (unique in its file).
      question: the question text, as written.
      context: the passage the answer is taken from.
      answers: (text, start) pairs with `context[start : start + len(text)] == text`; empty for
        an unanswerable question. Training uses the first.
      is_impossible: True when the question has no answer in the context (SQuAD v2.0).
    """

    id: str
    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    is_impossible: bool


@dataclass(frozen=True)
class QAFeature:
    """One window of one example: `frame_pair(question, context window)`, with its targets.

    Attributes:
      example_index: the example's index in the list given to `make_features`.
      ids: token ids, at most max_seq_len of them, without padding.
      token_types: the tokenizer's segment type ids, one per token.
      context_start: the position of the window's first context token in `ids`.
      window_start: the index of that token among all of the context's tokens.
      offsets: per position, the (start, end) characters of the context the token covers, or
        None for question and special tokens; context tokens are `ids[context_start:][:n]`
        where n counts the non-None offsets.
      start, end: positions of the answer's first and last token (inclusive), or 0/0.
    """

    example_index: int
    ids: list[int]
    token_types: list[int]
    context_start: int
    window_start: int
    offsets: list[tuple[int, int] | None]
    start: int
    end: int

    def to_example(self) -> dict[str, Any]:
        """The fields `plm_jax.tasks.batching.BucketBatcher` batches: ids, token types, targets."""
        return {
            "ids": self.ids,
            "token_types": self.token_types,
            "start": self.start,
            "end": self.end,
        }


@dataclass(frozen=True)
class SpanCandidate:
    """One candidate answer span.

    Attributes:
      text: `context[start_char:end_char]`.
      score: start_logit + end_logit.
      start_logit, end_logit: the logits of the span's first and last token.
      start_char, end_char: the span in the original context, end exclusive.
      feature_index: the window the span was read from.
    """

    text: str
    score: float
    start_logit: float
    end_logit: float
    start_char: int
    end_char: int
    feature_index: int


@dataclass(frozen=True)
class QAPredictions:
    """What `decode_predictions` returns.

    Attributes:
      answers: {question id: predicted answer}; "" means "no answer".
      nbest: {question id: the best spans, best first, at most n_best, distinct char spans}.
      null_score_diffs: {question id: null score - best span score}, the quantity compared to
        `null_threshold` in v2 (+inf when no valid span exists); the official v2 evaluation
        script takes it as its "na_prob" to tune the threshold.
    """

    answers: dict[str, str]
    nbest: dict[str, list[SpanCandidate]]
    null_score_diffs: dict[str, float]


# ---------------------------------------------------------------------------------------------
# Reading.


def read_squad(path: str | Path) -> list[QAExample]:
    """Reads a SQuAD v1.1/v2.0 JSON file or its JSON-lines equivalent.

    JSON lines hold one object per line: "id", "question", "context", "answers" (Hugging Face's
    `{"text": [...], "answer_start": [...]}` or a list of `{"text", "answer_start"}`), and
    optionally "is_impossible". A question with no answers is unanswerable; SQuAD v2.0's
    "is_impossible" must agree with that. Blank lines are skipped; other fields are ignored.

    Args:
      path: the file; the format is read from its content, not its name.

    Returns:
      The examples in file order.

    Raises:
      DataError: the file is missing, empty, not UTF-8, not valid JSON, or holds no questions;
        a record lacks a field or has one of the wrong type; an answer_start does not point at
        its answer text in the context; is_impossible contradicts the answers; an id repeats.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"question answering file {str(path)!r} does not exist; check the path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 ({e.reason}); convert it to UTF-8") from None
    if not text.strip():
        raise DataError(f"{path} is empty; it should hold {_FORMATS}")
    try:
        document = json.loads(text)
    except ValueError as e:
        if not _is_json_object(text.lstrip().split("\n", 1)[0]):
            raise DataError(
                f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); it "
                f"should hold {_FORMATS}"
            ) from None
        document = None  # JSON lines
    if isinstance(document, dict) and "data" in document:
        records = _squad_records(document, path)
    elif document is None or isinstance(document, dict):
        records = _jsonl_records(text, path)
    else:
        raise DataError(f"{path} holds a JSON {type(document).__name__}; it should hold {_FORMATS}")
    examples: list[QAExample] = []
    seen: dict[str, str] = {}
    for where, record in records:
        example = _example(record, where)
        if example.id in seen:
            raise DataError(
                f"{where}: question id {example.id!r} was already used at {seen[example.id]}; "
                "give every question a unique id"
            )
        seen[example.id] = where
        examples.append(example)
    if not examples:
        raise DataError(f"{path} holds no questions; it should hold {_FORMATS}")
    return examples


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _squad_records(document: dict[str, Any], path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, flat record) for every question of a SQuAD JSON document."""
    records = []
    for a, article in enumerate(_list(document, "data", f"{path}")):
        for p, paragraph in enumerate(_list(article, "paragraphs", f"{path}: data[{a}]")):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or "context" not in paragraph:
                raise DataError(f"{where} has no 'context' field; every paragraph needs one")
            for q, qa in enumerate(_list(paragraph, "qas", where)):
                if not isinstance(qa, dict):
                    raise DataError(f"{where}.qas[{q}] is not an object; each question is one")
                records.append((f"{where}.qas[{q}]", {**qa, "context": paragraph["context"]}))
    return records


def _list(node: Any, key: str, where: str) -> list[Any]:
    value = node.get(key) if isinstance(node, dict) else None
    if not isinstance(value, list):
        raise DataError(
            f"{where} has no {key!r} list; SQuAD files nest data -> paragraphs -> qas as lists"
        )
    return value


def _jsonl_records(text: str, path: Path) -> list[tuple[str, dict[str, Any]]]:
    records = []
    for lineno, line in enumerate(text.split("\n"), start=1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise DataError(
                f"{path} line {lineno} is not valid JSON ({e.msg} at column {e.colno}); each "
                "line must be one JSON object"
            ) from None
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {lineno} is a JSON {type(record).__name__}, not an object; each "
                "line must be one JSON object"
            )
        records.append((f"{path} line {lineno}", record))
    return records


def _example(record: dict[str, Any], where: str) -> QAExample:
    """A checked QAExample from a flat record (id, question, context, answers, is_impossible)."""
    missing = [k for k in ("id", "question", "context", "answers") if k not in record]
    if missing:
        raise DataError(f"{where} lacks {', '.join(map(repr, missing))}; add the field")
    qid = record["id"]
    if not isinstance(qid, str | int) or isinstance(qid, bool):
        raise DataError(f"{where}: id {qid!r} must be a string (or an integer)")
    where = f"{where} (id {str(qid)!r})"
    for key in ("question", "context"):
        if not isinstance(record[key], str):
            raise DataError(f"{where}: {key} must be a string, got {type(record[key]).__name__}")
    context = record["context"]
    answers = tuple(_answer(raw, context, where) for raw in _answer_list(record["answers"], where))
    flag = record.get("is_impossible")
    if flag is not None and not isinstance(flag, bool):
        raise DataError(f"{where}: is_impossible={flag!r} must be true or false")
    if flag is not None and flag == bool(answers):
        raise DataError(
            f"{where}: is_impossible is {str(flag).lower()} but it has {len(answers)} answers; "
            "an unanswerable question has an empty answers list, an answerable one at least one"
        )
    return QAExample(str(qid), record["question"], context, answers, not answers)


def _answer_list(raw: Any, where: str) -> list[Any]:
    """`answers` as a list of {"text", "answer_start"} objects (either format)."""
    if isinstance(raw, Mapping):  # Hugging Face datasets: {"text": [...], "answer_start": [...]}
        texts, starts = raw.get("text"), raw.get("answer_start")
        if not isinstance(texts, list) or not isinstance(starts, list) or len(texts) != len(starts):
            raise DataError(
                f"{where}: answers must hold equally long 'text' and 'answer_start' lists"
            )
        return [{"text": t, "answer_start": s} for t, s in zip(texts, starts, strict=True)]
    if not isinstance(raw, list):
        raise DataError(
            f"{where}: answers must be a list of {{'text', 'answer_start'}} objects or "
            f"{{'text': [...], 'answer_start': [...]}}, got {type(raw).__name__}"
        )
    return raw


def _answer(raw: Any, context: str, where: str) -> tuple[str, int]:
    if not isinstance(raw, dict) or "text" not in raw or "answer_start" not in raw:
        raise DataError(f"{where}: an answer lacks 'text' or 'answer_start'; give both")
    text, start = raw["text"], raw["answer_start"]
    if not isinstance(text, str) or not text:
        raise DataError(
            f"{where}: answer text {text!r} must be a non-empty string; give an unanswerable "
            "question an empty answers list"
        )
    if not isinstance(start, int) or isinstance(start, bool):
        raise DataError(f"{where}: answer_start={start!r} must be an integer character index")
    if context[start : start + len(text)] != text or start < 0:
        found = context.find(text)
        hint = f"the text occurs at {found}" if found >= 0 else "the text is not in the context"
        raise DataError(
            f"{where}: answer_start={start} does not point at the answer {text!r} "
            f"(context[{start}:{start + len(text)}] is {context[max(start, 0) :][: len(text)]!r}); "
            f"{hint}. Fix answer_start to the answer's character index in the context"
        )
    return text, start


# ---------------------------------------------------------------------------------------------
# Windowing.


def make_features(
    examples: Sequence[QAExample],
    tokenizer: Tokenizer | HfTokenizer,
    *,
    max_seq_len: int,
    doc_stride: int,
    max_query_len: int,
) -> list[QAFeature]:
    """Cuts every example into windows of `frame_pair(question, context window)`.

    The question, with leading whitespace removed (as run_qa.py does), is cut to
    `max_query_len` tokens. Each window holds as many context tokens as fit in `max_seq_len`
    after the question and the special tokens; consecutive windows share `doc_stride` context
    tokens (see the module docstring). An empty context gives one window without context.

    Args:
      examples: from `read_squad`.
      tokenizer: a `Tokenizer` or `HfTokenizer` (needs encode_with_offsets and frame_pair).
      max_seq_len: the most tokens per feature.
      doc_stride: context tokens shared by consecutive windows, >= 0.
      max_query_len: the most question tokens.

    Returns:
      Features in example order, each example's windows left to right.

    Raises:
      ConfigError: a length is out of range, or max_seq_len leaves no more than doc_stride
        context tokens beside a question of max_query_len tokens.
      DataError: a text is not valid Unicode.
    """
    num_special = len(tokenizer.frame_pair([], [])[0])
    if max_query_len < 1 or doc_stride < 0:
        raise ConfigError(
            f"max_query_len={max_query_len} must be >= 1 and doc_stride={doc_stride} >= 0"
        )
    if max_seq_len - max_query_len - num_special <= doc_stride:
        raise ConfigError(
            f"max_seq_len={max_seq_len} leaves {max_seq_len - max_query_len - num_special} "
            f"context tokens per window beside max_query_len={max_query_len} question tokens "
            f"and {num_special} special tokens, not more than doc_stride={doc_stride}; raise "
            "max_seq_len or lower max_query_len or doc_stride"
        )
    features = []
    for index, example in enumerate(examples):
        question = tokenizer.encode(example.question.lstrip())[:max_query_len]
        context, spans = tokenizer.encode_with_offsets(example.context)
        capacity = max_seq_len - len(question) - num_special
        answer = _answer_tokens(example, spans)
        window_start = 0
        while True:
            window = context[window_start : window_start + capacity]
            ids, types, b_start = tokenizer.frame_pair(question, window)
            window_end = window_start + len(window)  # one past the window's last context token
            offsets: list[tuple[int, int] | None] = [None] * len(ids)
            offsets[b_start : b_start + len(window)] = spans[window_start:window_end]
            start = end = 0
            if answer is not None and window_start <= answer[0] <= answer[1] < window_end:
                start, end = (b_start + t - window_start for t in answer)
            features.append(
                QAFeature(index, ids, types, b_start, window_start, offsets, start, end)
            )
            if window_start + capacity >= len(context):
                break
            window_start += capacity - doc_stride
    return features


def _answer_tokens(example: QAExample, spans: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The first and last context token overlapping the first answer, or None."""
    if not example.answers:
        return None
    text, start_char = example.answers[0]
    end_char = start_char + len(text)
    inside = [t for t, (s, e) in enumerate(spans) if s < end_char and e > start_char]
    return (inside[0], inside[-1]) if inside else None  # None: the answer is only whitespace


# ---------------------------------------------------------------------------------------------
# Decoding.


def decode_predictions(
    features: Sequence[QAFeature],
    start_logits: Any,
    end_logits: Any,
    examples: Sequence[QAExample],
    *,
    n_best: int = 20,
    max_answer_len: int = 30,
    null_threshold: float = 0.0,
    version_2: bool = False,
) -> QAPredictions:
    """The best answer span of every example, over all its windows.

    A span is valid when start <= end, it has at most `max_answer_len` tokens and both ends are
    context tokens of one window; its score is start_logit + end_logit. Every valid span is
    scored (not only the top-n starts and ends as in run_qa.py), so the n-best list is exact.
    The same characters read from two overlapping windows count once, with the higher score.
    With `version_2`, the null score is the lowest start+end logit at position 0 over the
    example's windows (as run_qa.py does), and the answer is "" when null score - best span
    score > `null_threshold`. An example without any valid span gets "".

    Args:
      features: from `make_features(examples, ...)`, every example with at least one window.
      start_logits, end_logits: `[F, L]` arrays (or F rows), L >= each feature's length;
        positions past a feature's length (padding) are ignored.
      examples: the examples the features were made from.
      n_best: spans kept per example.
      max_answer_len: the most tokens in an answer.
      null_threshold: v2 only; higher predicts "no answer" less often.
      version_2: allow "no answer" (SQuAD v2.0).

    Returns:
      A `QAPredictions`: answers, n-best lists and null score differences by question id.

    Raises:
      ConfigError: n_best or max_answer_len is below 1.
      ValueError: the logits do not match the features, or a feature or example is unmatched.
    """
    if n_best < 1 or max_answer_len < 1:
        raise ConfigError(f"n_best={n_best} and max_answer_len={max_answer_len} must be >= 1")
    if len(start_logits) != len(features) or len(end_logits) != len(features):
        raise ValueError(
            f"got {len(start_logits)} start and {len(end_logits)} end logit rows for "
            f"{len(features)} features; give one row per feature, in order"
        )
    windows: list[list[int]] = [[] for _ in examples]
    for f, feature in enumerate(features):
        if not 0 <= feature.example_index < len(examples):
            raise ValueError(f"feature {f} names example {feature.example_index}, not given")
        windows[feature.example_index].append(f)
    if not all(windows):
        missing = next(i for i, w in enumerate(windows) if not w)
        raise ValueError(f"example {missing} has no features; pass the examples they came from")
    out = QAPredictions({}, {}, {})
    for example, feature_ids in zip(examples, windows, strict=True):
        candidates: dict[tuple[int, int], SpanCandidate] = {}
        null_score = np.inf
        for f in feature_ids:
            starts = _row(start_logits, f, len(features[f].ids))
            ends = _row(end_logits, f, len(features[f].ids))
            null_score = min(null_score, float(starts[0] + ends[0]))
            spans = _window_spans(
                features[f], f, starts, ends, example.context, n_best, max_answer_len
            )
            for span in spans:
                key = (span.start_char, span.end_char)
                if key not in candidates or candidates[key].score < span.score:
                    candidates[key] = span
        best = sorted(candidates.values(), key=lambda c: -c.score)[:n_best]
        diff = null_score - best[0].score if best else np.inf
        is_null = not best or (version_2 and diff > null_threshold)
        out.answers[example.id] = "" if is_null else best[0].text
        out.nbest[example.id] = best
        out.null_score_diffs[example.id] = float(diff)
    return out


def _row(logits: Any, f: int, length: int) -> np.ndarray:
    row = np.asarray(logits[f], dtype=np.float64)
    if row.ndim != 1 or row.shape[0] < length:
        raise ValueError(
            f"logits row {f} has shape {row.shape}, shorter than feature {f}'s {length} tokens"
        )
    return row[:length]


def _window_spans(
    feature: QAFeature,
    f: int,
    starts: np.ndarray,
    ends: np.ndarray,
    context: str,
    n_best: int,
    max_answer_len: int,
) -> list[SpanCandidate]:
    """The n_best valid spans of one window, best first."""
    lo = feature.context_start
    n = sum(o is not None for o in feature.offsets)
    width = min(max_answer_len, n)
    if width < 1:
        return []
    # scores[i, k]: the span of context tokens i .. i + k; -inf where it runs past the window.
    scores = np.full((n, width), -np.inf)
    for k in range(width):
        scores[: n - k, k] = starts[lo : lo + n - k] + ends[lo + k : lo + n]
    order = np.argsort(-scores, axis=None, kind="stable")[:n_best]
    spans = []
    for i, k in zip(*np.unravel_index(order, scores.shape), strict=True):
        if not np.isfinite(scores[i, k]):
            break
        first, last = feature.offsets[lo + i], feature.offsets[lo + i + k]
        spans.append(
            SpanCandidate(
                text=context[first[0] : last[1]],
                score=float(scores[i, k]),
                start_logit=float(starts[lo + i]),
                end_logit=float(ends[lo + i + k]),
                start_char=first[0],
                end_char=last[1],
                feature_index=f,
            )
        )
    return spans
