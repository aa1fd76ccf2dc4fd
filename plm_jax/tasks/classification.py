"""Sequence-classification data: read labelled examples, map labels to ids, tokenize, hold out.

Holds `read_classification` (JSONL, CSV or TSV files of text, optional text pair and label),
`LabelSet` (the sorted class names, saved with the model), `encode_examples` (token ids with the
model's special tokens, pairs truncated longest-first) and `split_holdout` (a seeded held-out
split). It leaves out batching (`plm_jax.tasks.batching`), metrics (`plm_jax.tasks.metrics`), and
the model heads and training loop.

Labels. For classification a label is kept as a string, so the JSON number 1, the JSON string "1"
and the CSV cell 1 are one class; JSON booleans become "true"/"false" as written. For regression
(`regression=True`) labels are floats.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from plm_jax.errors import ConfigError, DataError

__all__ = [
    "ClassificationExample",
    "LabelSet",
    "encode_examples",
    "read_classification",
    "split_holdout",
]

log = logging.getLogger(__name__)

_JSONL_SUFFIXES = (".jsonl", ".ndjson")
_DELIMITERS = {".csv": ",", ".tsv": "\t"}
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class ClassificationExample:
    """One labelled example.

    Attributes:
      text: the first (or only) segment; never empty.
      text_pair: the second segment, or None for single-text tasks.
      label: the class name (str), or the target value (float) for regression.
    """

    text: str
    text_pair: str | None
    label: str | float


def read_classification(
    path: str | Path,
    *,
    text_field: str = "text",
    pair_field: str = "text_pair",
    label_field: str = "label",
    regression: bool = False,
) -> list[ClassificationExample]:
    """Reads labelled examples from a .jsonl (one object a line), .csv or .tsv (header row) file.

    Args:
      path: the file; its extension picks the format.
      text_field: the field (column) holding the text.
      pair_field: the field holding the second text; examples without it have `text_pair=None`.
      label_field: the field holding the label.
      regression: parse labels as floats instead of class names.

    Returns:
      The examples, in file order.

    Raises:
      DataError: the file is missing, of an unknown format, empty, not UTF-8, or a line is not
        valid JSON, lacks the text or label, has an empty text, or (with `regression`) a label
        that is not a finite number. The message names the file and line.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _JSONL_SUFFIXES and suffix not in _DELIMITERS:
        raise DataError(
            f"{path}: unknown task data format {suffix or '(no extension)'!r}; "
            "give a .jsonl, .csv or .tsv file"
        )
    if not path.is_file():
        raise DataError(f"task data file {str(path)!r} does not exist; check the path")
    if suffix in _JSONL_SUFFIXES:
        records = _jsonl_records(path)
    else:
        records = _csv_records(path, _DELIMITERS[suffix], (text_field, label_field))
    fields = (text_field, pair_field, label_field)
    examples = [_example(rec, f"{path}:{line}", fields, regression) for line, rec in records]
    if not examples:
        raise DataError(f"{path} holds no examples (it is empty); point it at labelled data")
    return examples


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 ({e.reason}); convert the file to UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e}); each line must be one JSON object"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: a JSON {type(record).__name__}, not an object; each line "
                    "must be one JSON object"
                )
            yield lineno, record


def _csv_records(
    path: Path, delimiter: str, required: Sequence[str]
) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        try:
            header = reader.fieldnames
            if header is None:
                return  # an empty file: the caller reports it
            for name in required:
                if name not in header:
                    raise DataError(
                        f"{path}:1: the header has no column {name!r} (columns: {header}); "
                        "set the field name to the column that holds it"
                    )
            for row in reader:
                if any(v for v in row.values()):  # blank lines and all-empty rows are skipped
                    yield reader.line_num, row
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e}); fix the row") from None
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{reader.line_num + 1}: not valid UTF-8 ({e.reason}); convert the file "
                "to UTF-8"
            ) from None


def _example(
    record: Mapping[str, Any], where: str, fields: tuple[str, str, str], regression: bool
) -> ClassificationExample:
    text_field, pair_field, label_field = fields
    text = _text(record, text_field, where, required=True)
    text_pair = _text(record, pair_field, where, required=False)
    raw = record.get(label_field)
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raise DataError(
            f"{where}: no {label_field!r} label; every example needs one (set label_field to the "
            "field holding it)"
        )
    label = _regression_target(raw, where) if regression else _label_name(raw, where)
    return ClassificationExample(text, text_pair, label)


def _text(record: Mapping[str, Any], field: str, where: str, *, required: bool) -> str | None:
    value = record.get(field)
    if value is None:
        if not required:
            return None
        keys = sorted(k for k in record if k is not None)
        raise DataError(
            f"{where}: no {field!r} field (keys: {keys}); set text_field to the field holding "
            "the text"
        )
    if not isinstance(value, str):
        raise DataError(f"{where}: {field!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise DataError(f"{where}: {field!r} is empty; fill in the text or remove the line")
    return value


def _label_name(raw: Any, where: str) -> str:
    """The class name of a label value: numbers as written, so 1 and "1" are one class."""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, int | float):
        return str(raw)
    raise DataError(f"{where}: label {raw!r} is a {type(raw).__name__}; give a string or number")


def _regression_target(raw: Any, where: str) -> float:
    value = math.nan
    if isinstance(raw, int | float | str) and not isinstance(raw, bool):
        with contextlib.suppress(ValueError):  # not a number: reported below
            value = float(raw)
    if not math.isfinite(value):
        raise DataError(
            f"{where}: label {raw!r} is not a finite number; regression needs numeric labels "
            "(read the file without regression=True for class labels)"
        )
    return value


class LabelSet:
    """The class names of a task in a fixed order; class id i is `labels[i]`.

    Integer class names ("0", "1", "-1", "10") sort numerically; any other set sorts as strings,
    so the same training data always gives the same ids. Save `to_dict()` with the model.

    Args:
      labels: distinct class names, in id order.

    Raises:
      DataError: fewer than two labels, or a repeated one.
    """

    def __init__(self, labels: Sequence[str]):
        labels = tuple(labels)
        if len(labels) < 2:
            raise DataError(
                f"the training data holds {len(labels)} distinct label(s) {list(labels)}; "
                "classification needs at least two (check label_field)"
            )
        if len(set(labels)) != len(labels) or not all(isinstance(x, str) for x in labels):
            raise DataError(f"labels must be distinct strings, got {list(labels)}")
        self.labels = labels
        self._ids = {name: i for i, name in enumerate(labels)}

    @classmethod
    def from_examples(cls, examples: Sequence[ClassificationExample]) -> LabelSet:
        """The sorted distinct labels of the training examples.

        Raises:
          ConfigError: the examples were read for regression (float labels).
          DataError: they hold fewer than two distinct labels.
        """
        names = {ex.label for ex in examples}
        if any(not isinstance(name, str) for name in names):
            raise ConfigError(
                "these examples have regression targets (read with regression=True); "
                "regression needs no LabelSet, pass label_set=None"
            )
        if all(_INTEGER.fullmatch(name) for name in names):
            return cls(sorted(names, key=lambda name: (int(name), name)))
        return cls(sorted(names))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def encode(self, label: str | int | bool) -> int:
        """The class id of `label` (a name, or a number read as its string form).

        Raises:
          DataError: the label does not occur in the training data.
        """
        name = label.strip() if isinstance(label, str) else _label_name(label, "label")
        try:
            return self._ids[name]
        except KeyError:
            raise DataError(
                f"label {name!r} does not occur in the training data (labels: "
                f"{list(self.labels)}); fix the evaluation data or add the class to training"
            ) from None

    def decode(self, class_id: int) -> str:
        """The name of class id `class_id`."""
        return self.labels[class_id]

    def to_dict(self) -> dict[str, list[str]]:
        """A JSON-able form: `{"labels": [...]}`."""
        return {"labels": list(self.labels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelSet:
        """Inverse of `to_dict`.

        Raises:
          DataError: `data` is not a dict with a "labels" list of distinct strings.
        """
        labels = data.get("labels") if isinstance(data, Mapping) else None
        if not isinstance(labels, list):
            raise DataError(
                f"saved label set {data!r} has no 'labels' list; the file is corrupt or not a "
                "label set written by LabelSet.to_dict"
            )
        return cls(labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self.labels == other.labels

    def __hash__(self) -> int:
        return hash(self.labels)

    def __repr__(self) -> str:
        return f"LabelSet({list(self.labels)})"


def encode_examples(
    examples: Sequence[ClassificationExample],
    tokenizer: Any,
    label_set: LabelSet | None,
    *,
    max_seq_len: int,
) -> list[dict[str, Any]]:
    """Token ids with the model's special tokens (`tokenizer.encode_pair`) and label ids.

    An input longer than `max_seq_len` is truncated longest-first, as Hugging Face's
    `truncation="longest_first"`: tokens are removed from the end of the longer segment (the
    second on a tie) until it fits; the special tokens are always kept. The number of truncated
    examples is logged as a warning; it is `sum(e["truncated"] for e in encoded)`.

    Args:
      examples: from `read_classification`.
      tokenizer: a `plm_jax.tokenizer.Tokenizer` or `plm_jax.hf_tokenizer.HfTokenizer`.
      label_set: the training labels, or None for regression.
      max_seq_len: the longest input, special tokens included.

    Returns:
      One dict per example: "ids" (list[int]), "token_types" (list[int], 0 on the first segment,
      1 on the second), "label" (int class id, or float for regression) and "truncated" (bool).

    Raises:
      ConfigError: `max_seq_len` leaves no room for text after the special tokens, or
        `label_set` does not match the kind of labels (classification vs regression).
      DataError: a label does not occur in `label_set`, or a text is not valid Unicode.
    """
    encoded = []
    for ex in examples:
        ids, types = tokenizer.encode_pair(ex.text, ex.text_pair)
        truncated = len(ids) > max_seq_len
        if truncated:
            ids, types = _truncate(tokenizer, ex, ids, types, max_seq_len)
        label = _label_id(ex.label, label_set)
        encoded.append({"ids": ids, "token_types": types, "label": label, "truncated": truncated})
    num_truncated = sum(e["truncated"] for e in encoded)
    if num_truncated:
        log.warning(
            "%d of %d examples are longer than max_seq_len=%d and were truncated (longest first)",
            num_truncated,
            len(encoded),
            max_seq_len,
        )
    return encoded


def _label_id(label: str | float, label_set: LabelSet | None) -> int | float:
    if label_set is None:
        if isinstance(label, str):
            raise ConfigError(
                f"example label {label!r} is a class name but label_set is None; build one with "
                "LabelSet.from_examples(train_examples), or read the data with regression=True"
            )
        return float(label)
    if not isinstance(label, str):
        raise ConfigError(
            "these examples have regression targets (read with regression=True); pass "
            "label_set=None"
        )
    return label_set.encode(label)


def _truncate(
    tokenizer: Any, ex: ClassificationExample, ids: list[int], types: list[int], max_seq_len: int
) -> tuple[list[int], list[int]]:
    """`ids`/`types` with segment tokens removed longest-first so they fit `max_seq_len`."""
    a = list(tokenizer.encode(ex.text))
    b = list(tokenizer.encode(ex.text_pair)) if ex.text_pair is not None else []
    num_special = len(ids) - len(a) - len(b)
    budget = max_seq_len - num_special
    if budget < (1 if ex.text_pair is None else 2):
        raise ConfigError(
            f"max_seq_len={max_seq_len} leaves no room for text after the tokenizer's "
            f"{num_special} special tokens; raise max_seq_len"
        )
    start_a, start_b = _segment_starts(ids, a, b, num_special)
    keep_a, keep_b = _longest_first(len(a), len(b), budget)
    end_a, end_b = start_a + len(a), start_b + len(b)
    # prefix specials, kept head of A, specials between, kept head of B, suffix specials
    spans = [(0, start_a), (start_a, start_a + keep_a), (end_a, start_b)]
    spans += [(start_b, start_b + keep_b), (end_b, len(ids))]
    new_ids = [t for lo, hi in spans for t in ids[lo:hi]]
    new_types = [t for lo, hi in spans for t in types[lo:hi]]
    return new_ids, new_types


def _segment_starts(
    ids: list[int], a: list[int], b: list[int], num_special: int
) -> tuple[int, int]:
    """Where segments `a` and `b` start in `ids`, the special tokens being the rest."""
    for start_a in range(num_special + 1):
        if ids[start_a : start_a + len(a)] != a:
            continue
        end_a = start_a + len(a)
        for start_b in range(end_a, end_a + num_special - start_a + 1):
            if ids[start_b : start_b + len(b)] == b:
                return start_a, start_b
    raise RuntimeError(
        "tokenizer.encode_pair does not contain tokenizer.encode of each segment; cannot "
        "truncate without re-tokenizing"
    )


def _longest_first(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
    """Segment lengths after removing one token at a time from the longer (B on a tie)."""
    if len_a + len_b <= budget:
        return len_a, len_b
    shorter = min(len_a, len_b)
    if 2 * shorter <= budget:  # the shorter segment fits whole; the longer gets the rest
        return (len_a, budget - len_a) if len_a == shorter else (budget - len_b, len_b)
    return (budget + 1) // 2, budget // 2


def split_holdout(
    examples: Sequence[Any], fraction: float, seed: int
) -> tuple[list[Any], list[Any]]:
    """A seeded random split, e.g. a held-out 10% test set from a task without one.

    Args:
      examples: any sequence.
      fraction: share of examples held out, in (0, 1); the count is rounded, at least 1.
      seed: the shuffle seed; the same seed and examples give the same split.

    Returns:
      (kept, held_out), each in the examples' original order.

    Raises:
      ConfigError: `fraction` is not in (0, 1).
      DataError: there are too few examples to leave at least one on each side.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"holdout fraction={fraction} must be in (0, 1), e.g. 0.1")
    n = len(examples)
    num_held = max(1, round(n * fraction))
    if num_held >= n:
        raise DataError(
            f"cannot hold out {fraction:.0%} of {n} examples and keep any for training; "
            "add data or lower the fraction"
        )
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).permutation(n)[:num_held]] = True
    kept = [ex for ex, h in zip(examples, held, strict=True) if not h]
    return kept, [ex for ex, h in zip(examples, held, strict=True) if h]
