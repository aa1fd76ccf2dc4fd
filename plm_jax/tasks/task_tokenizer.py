"""A tokenizer for a fine-tuning run that has none: trained on the task's own training text.

    ensure_task_tokenizer  with neither `init_from` nor `tokenizer.path`, the run's tokenizer is
                           `RUN_DIR/tokenizer`: loaded when a previous segment trained it,
                           otherwise trained now on every string of the training file (both
                           sides for translation; labels and ids left out)
    task_texts             those strings, file by file, without loading the task

What this module leaves out: reading examples for training (each task's own reader) and the
pretraining tokenizer (`data/pipeline.py`), whose SentencePiece settings it shares.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from plm_jax.config import Config
from plm_jax.data.pipeline import train_tokenizer_from_config
from plm_jax.distributed import primary_first
from plm_jax.errors import DataError

log = logging.getLogger(__name__)

_NOT_TEXT = ("id",)  # keys whose strings are identifiers, not language
_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def task_texts(cfg: Config) -> Iterator[str]:
    """Every string of the task's training data, except the label field and ids.

    Raises:
      DataError: a training file that is missing or not valid JSON / JSON lines.
    """
    task = cfg.task
    if task.source_file or task.target_file:
        for name in (task.source_file, task.target_file):
            yield from _lines(Path(name))
        return
    path = Path(task.train_file)
    if not path.is_file():
        raise DataError(f"task.train_file={task.train_file!r} does not exist; point it at a file")
    skip = {task.label_field, *_NOT_TEXT}
    if path.suffix == ".json":  # SQuAD-style: one JSON document
        yield from _strings(_load(path.read_text(encoding="utf-8"), path), skip)
        return
    if path.suffix in _DELIMITERS:  # a header row names the columns
        with path.open(encoding="utf-8", newline="") as f:
            try:
                for row in csv.DictReader(f, delimiter=_DELIMITERS[path.suffix]):
                    yield from _strings(row, skip)
            except csv.Error as e:
                raise DataError(f"{path}: not valid {path.suffix[1:].upper()} ({e})") from None
        return
    for lineno, line in enumerate(_lines(path), 1):
        yield from _strings(_load(line, f"{path}:{lineno}"), skip)


def _lines(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise DataError(f"task file {str(path)!r} does not exist; point the task at a file")
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield line.rstrip("\n")


def _load(text: str, where: Any) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None


def _strings(value: Any, skip: set[str]) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, child in value.items():
            if key not in skip:
                yield from _strings(child, skip)
    elif isinstance(value, list):
        for child in value:
            yield from _strings(child, skip)


def ensure_task_tokenizer(cfg: Config, *, show_progress: bool = True) -> Config:
    """`cfg` with `tokenizer.path` set: as given, or the run's own (trained now if missing)."""
    if cfg.tokenizer.path:
        return cfg
    output = cfg.run_dir / "tokenizer"
    with primary_first("training the tokenizer", cfg.distributed.prepare_timeout):
        if not (output / "tokenizer.model").is_file():
            tokenizer = train_tokenizer_from_config(
                cfg.data, cfg, output, show_progress=show_progress, documents=task_texts(cfg)
            )
            log.info(
                "no init_from and no tokenizer.path: trained a %d-piece SentencePiece tokenizer "
                "on the task's training text into %s (tokenizer.vocab_size sets its size)",
                tokenizer.vocab_size,
                output,
            )
    path = str(output.absolute())
    return dataclasses.replace(cfg, tokenizer=dataclasses.replace(cfg.tokenizer, path=path))
