"""Downstream evaluation while pretraining: multiple-choice accuracy every `train.eval_every`.

`train.evals` names the tasks. Each entry is either

- a local multiple-choice JSONL file, one example per line:
  `{"context": "Question: ...\\nAnswer:", "choices": ["yes", "no"], "label": 0}`, scored as the
  harness scores multiple choice: log P(" " + choice | context) for each choice; or
- the name of an lm-evaluation-harness task with `output_type: multiple_choice` (a harness task
  such as `piqa`, or a local YAML task in `train.evals_include_path`; needs the `eval` extra).
  The harness builds the prompts (zero-shot); plm_jax scores them.

Each task keeps its first `train.evals_limit` examples, tokenized once at setup, so every
evaluation, and a resumed run's, scores the same sample: a resumed run logs the values the
uninterrupted run logged. Every evaluation logs `eval/<task>/acc` (argmax of the
log-likelihoods), `eval/<task>/acc_norm` (argmax per character of the choice, the harness's
acc_norm) and `perf/evals_seconds` (the time all tasks took); `<task>` is the task name or the
JSONL file's stem. The scores use the train state's parameters where they live (sharded over
the run's mesh), so they match `plm-jax lm-eval` on the saved checkpoint up to float rounding.

What it leaves out: generative and perplexity tasks (`plm-jax lm-eval` runs those on a
checkpoint), few-shot prompts, and encoders and encoder-decoders (`validate` refuses them).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from plm_jax.config import Config
from plm_jax.errors import ConfigError, DataError
from plm_jax.evals.scoring import (
    Forward,
    TokenRequest,
    encode_request,
    loglikelihoods,
    starts_with_bos,
    token_scores,
)
from plm_jax.sharding import batch_sharding, shard_batch, use_mesh
from plm_jax.train.state import model_graphdef

__all__ = ["ChoiceTask", "DownstreamEvals", "load_jsonl_task"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    """A multiple-choice task, tokenized.

    Attributes:
      name: the metric namespace (`eval/<name>/acc`).
      requests: one request per (example, choice), example by example.
      choice_counts: the number of choices of each example.
      choice_chars: the length in characters of each choice (for acc_norm).
      labels: the index of each example's correct choice.
    """

    name: str
    requests: list[TokenRequest]
    choice_counts: list[int]
    choice_chars: list[int]
    labels: list[int]

    def metrics(self, scores: list[tuple[float, bool]]) -> dict[str, float]:
        """acc and acc_norm from the log-likelihood of each request."""
        lls = np.array([s[0] for s in scores], np.float64)
        chars = np.maximum(np.array(self.choice_chars, np.float64), 1.0)
        acc = acc_norm = 0
        start = 0
        for count, label in zip(self.choice_counts, self.labels, strict=True):
            span = slice(start, start + count)
            acc += int(np.argmax(lls[span]) == label)
            acc_norm += int(np.argmax(lls[span] / chars[span]) == label)
            start += count
        n = max(len(self.labels), 1)
        return {f"eval/{self.name}/acc": acc / n, f"eval/{self.name}/acc_norm": acc_norm / n}


def load_jsonl_task(path: Path, tokenizer: Any, *, limit: int, add_bos: bool) -> ChoiceTask:
    """The first `limit` examples of a local multiple-choice JSONL file.

    Raises:
      DataError: the file is missing or not UTF-8, a line is not a JSON object with a string
        `context`, a list of at least two strings `choices` and an integer `label` indexing
        them, or the file holds no examples.
    """
    if not path.is_file():
        raise DataError(
            f"train.evals: {str(path)!r} does not exist; give a multiple-choice JSONL file or "
            "an lm-eval task name"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"train.evals: {str(path)!r} is not UTF-8 text ({e.reason})") from None
    examples = []
    for n, line in enumerate(lines, 1):
        if len(examples) == limit:
            break
        if line.strip():
            examples.append(_choice_example(path, n, line))
    if not examples:
        raise DataError(f"train.evals: {str(path)!r} holds no examples")
    return _tokenize(path.stem, examples, tokenizer, add_bos=add_bos)


def _choice_example(path: Path, n: int, line: str) -> tuple[str, list[str], int]:
    try:
        record = json.loads(line)
    except ValueError:
        raise DataError(f"{path}:{n} is not valid JSON; one object per line") from None
    context = record.get("context") if isinstance(record, dict) else None
    choices = record.get("choices") if isinstance(record, dict) else None
    label = record.get("label") if isinstance(record, dict) else None
    if not (
        isinstance(context, str)
        and isinstance(choices, list)
        and len(choices) >= 2
        and all(isinstance(c, str) and c for c in choices)
        and isinstance(label, int)
        and not isinstance(label, bool)
        and 0 <= label < len(choices)
    ):
        raise DataError(
            f'{path}:{n} needs {{"context": str, "choices": [str, str, ...], "label": int}} '
            "with at least two non-empty choices and a label indexing them"
        )
    return context, choices, label


def _tokenize(
    name: str, examples: list[tuple[str, list[str], int]], tokenizer: Any, *, add_bos: bool
) -> ChoiceTask:
    """Requests as the harness builds them for multiple choice: continuation " " + choice."""
    requests, counts, chars, labels = [], [], [], []
    for context, choices, label in examples:
        for choice in choices:
            requests.append(encode_request(tokenizer, context, " " + choice, add_bos=add_bos))
            chars.append(len(choice))
        counts.append(len(choices))
        labels.append(label)
    return ChoiceTask(name, requests, counts, chars, labels)


def load_harness_tasks(
    names: list[str], include_path: str, tokenizer: Any, *, limit: int, add_bos: bool
) -> list[ChoiceTask]:
    """Zero-shot multiple-choice harness tasks, through the harness's own request building.

    Raises:
      ConfigError: lm-eval is not installed, a task is unknown or is not multiple choice.
    """
    # harness.py raises ConfigError (one line) when lm-eval is not installed.
    from plm_jax.evals.harness import get_task_dict, make_task_manager

    manager = make_task_manager(names, include_path or None)
    tasks = []
    for name, task in _flatten_tasks(get_task_dict(names, manager)):
        if task.OUTPUT_TYPE != "multiple_choice":
            raise ConfigError(
                f"train.evals: lm-eval task {name!r} has output_type {task.OUTPUT_TYPE!r}; "
                "training evaluates multiple_choice tasks only (run the others with "
                "plm-jax lm-eval on a checkpoint)"
            )
        task.set_config(key="num_fewshot", value=0)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        by_doc: dict[int, list[Any]] = {}
        for instance in task.instances:
            by_doc.setdefault(instance.doc_id, []).append(instance)
        requests, counts, chars, labels = [], [], [], []
        for doc_id in sorted(by_doc):
            group = sorted(by_doc[doc_id], key=lambda i: i.idx)
            doc = group[0].doc
            choices = task.doc_to_choice(doc)
            gold = task.doc_to_target(doc)
            labels.append(choices.index(gold) if isinstance(gold, str) else int(gold))
            for instance, choice in zip(group, choices, strict=True):
                context, continuation = instance.args
                requests.append(encode_request(tokenizer, context, continuation, add_bos=add_bos))
                chars.append(len(choice))
            counts.append(len(group))
        tasks.append(ChoiceTask(name, requests, counts, chars, labels))
    return tasks


def _flatten_tasks(tree: dict) -> list[tuple[str, Any]]:
    """(name, Task) pairs of a harness task dict, groups opened."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out.extend(_flatten_tasks(value))
        else:
            out.append((getattr(key, "group_name", None) or str(key), value))
    return out


@dataclasses.dataclass
class DownstreamEvals:
    """The tokenized tasks of `train.evals` and the scorer that runs them on a train state."""

    tasks: list[ChoiceTask]
    max_seq_len: int
    batch_size: int
    _forward: Any = None  # the jitted scorer, built at the first evaluation

    @classmethod
    def from_config(cls, cfg: Config, tokenizer: Any) -> DownstreamEvals | None:
        """The run's downstream tasks, or None when `train.evals` is empty.

        Raises:
          ConfigError: an unknown or non-multiple-choice harness task, lm-eval not installed.
          DataError: a missing or malformed JSONL file.
        """
        t = cfg.train
        if not t.evals:
            return None
        add_bos = starts_with_bos(tokenizer)
        files = [e for e in t.evals if e.endswith(".jsonl")]
        names = [e for e in t.evals if not e.endswith(".jsonl")]
        tasks = [
            load_jsonl_task(Path(f), tokenizer, limit=t.evals_limit, add_bos=add_bos) for f in files
        ]
        if names:
            tasks += load_harness_tasks(
                names, t.evals_include_path, tokenizer, limit=t.evals_limit, add_bos=add_bos
            )
        seen = [task.name for task in tasks]
        if len(set(seen)) != len(seen):
            raise ConfigError(f"train.evals: two tasks share a name in {seen}; rename a file")
        return cls(tasks, cfg.model.max_seq_len, t.batch_size)

    def evaluate(self, tr: Any, step: int) -> dict[str, float]:
        """Scores every task with `tr.state.params`; writes and logs the metrics at `step`."""
        start = time.perf_counter()
        forward = self._sharded_forward(tr)
        metrics: dict[str, float] = {}
        with use_mesh(tr.mesh, tr.cfg.mesh.rules):
            for task in self.tasks:
                scores = loglikelihoods(
                    forward, task.requests, max_seq_len=self.max_seq_len, batch_size=self.batch_size
                )
                metrics.update(task.metrics(scores))
        metrics["perf/evals_seconds"] = time.perf_counter() - start
        tr.writer.write(step, metrics)
        shown = ", ".join(f"{t.name} acc {metrics[f'eval/{t.name}/acc']:.4f}" for t in self.tasks)
        log.info("step %d: %s (%.2f s)", step, shown, metrics["perf/evals_seconds"])
        return metrics

    def _sharded_forward(self, tr: Any) -> Forward:
        """A `Forward` over the run's mesh: params as the train state holds them, batch rows
        over data x fsdp; every process passes its own rows of the same batch."""
        if self._forward is None:
            graphdef, _ = model_graphdef(tr.model_cfg)
            rows = batch_sharding(tr.mesh)
            self._forward = jax.jit(
                partial(token_scores, graphdef=graphdef),
                in_shardings=(tr.shardings.params, rows, rows, rows),
                out_shardings=NamedSharding(tr.mesh, PartitionSpec()),  # every process reads all
            )
        jitted, params, mesh = self._forward, tr.state.params, tr.mesh
        per_process = self.batch_size // jax.process_count()
        first = jax.process_index() * per_process

        def forward(inputs, targets, segments):
            local = {
                name: a[first : first + per_process]
                for name, a in (("inputs", inputs), ("targets", targets), ("segments", segments))
            }
            batch = shard_batch(local, mesh, self.batch_size)
            logp, greedy = jitted(params, batch["inputs"], batch["targets"], batch["segments"])
            return np.asarray(jax.device_get(logp)), np.asarray(jax.device_get(greedy))

        return forward
