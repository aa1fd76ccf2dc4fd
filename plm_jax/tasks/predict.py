"""Using a fine-tuned model: load it, score it on labelled data, predict on new inputs.

    run = load_task_run("runs/sentiment")        # the best checkpoint (best.json), else newest
    evaluate_task(run)                           # the task metrics on its evaluation data
    predict_records(run, [{"text": "great!"}])   # labels with probabilities / values / answers

What it leaves out: training (`finetune.py`) and the CLI's file handling.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from plm_jax.checkpoint import Checkpointer, locate_checkpoint
from plm_jax.config import Config, MeshConfig, config_from_dict
from plm_jax.errors import DataError
from plm_jax.sharding import make_mesh
from plm_jax.tasks.classification import LabelSet
from plm_jax.tasks.data import TaskData, load_task_data
from plm_jax.tasks.finetune import LABELS_FILE, best_step, model_factory, predict_outputs
from plm_jax.tokenizer import Tokenizer
from plm_jax.train.optimizer import make_optimizer
from plm_jax.train.state import model_graphdef, sharded_abstract_state, state_shardings

__all__ = ["TaskRun", "evaluate_task", "load_task_run", "predict_records"]


@dataclasses.dataclass
class TaskRun:
    """A fine-tuned model: graphdef + params of its `TaskModel`, tokenizer, config, labels."""

    graphdef: Any
    params: Any
    tokenizer: Any
    config: Config
    labels: LabelSet | None
    step: int
    path: Path
    mesh: Any


def load_task_run(path: str | Path) -> TaskRun:
    """Loads a fine-tuning run (its best checkpoint unless a checkpoint is named).

    Raises:
      DataError: not a fine-tuning run, no checkpoint, or missing labels/tokenizer.
    """
    run_dir, step = locate_checkpoint(path)
    reader = Checkpointer(run_dir, Config().checkpoint, read_only=True)
    try:
        steps = reader.all_steps()
        if step is None:
            best = best_step(run_dir)
            step = best if best in steps else reader.latest_step()
        if step is None or step not in steps:
            raise DataError(f"no committed checkpoint {step if step else ''} in {run_dir}")
        cfg = config_from_dict(reader.restore_config(step))
        if not cfg.task.name:
            raise DataError(
                f"{run_dir} is a pretraining run (no task.name); use plm-jax eval/score/embed"
            )
        tokenizer = Tokenizer.load(cfg.tokenizer.path)
        labels = None
        if cfg.task.name == "classification":
            labels_path = run_dir / LABELS_FILE
            if not labels_path.is_file():
                raise DataError(f"{run_dir} has no {LABELS_FILE}; the run is incomplete")
            labels = LabelSet.from_dict(json.loads(labels_path.read_text()))
        num_outputs = labels.num_classes if labels is not None else 1
        data = TaskData([], [], labels, num_outputs, tokenizer.pad_id, lambda _: {})
        factory = model_factory(cfg, data)
        mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
        tx = make_optimizer(cfg.train)
        if cfg.task.layer_lr_decay < 1.0:  # the optimizer state has the same structure
            from plm_jax.train.optimizer import layerwise_lr_factors

            _, abstract = model_graphdef(factory)
            tx = make_optimizer(
                cfg.train,
                layerwise_lr_factors(
                    abstract,
                    cfg.model.num_layers,
                    cfg.task.layer_lr_decay,
                    cfg.model.use_scan_layers,
                ),
            )
        shardings = state_shardings(factory, tx, mesh, cfg.mesh.rules)
        state, _, _ = reader.restore(step, sharded_abstract_state(factory, tx, shardings))
    finally:
        reader.close()
    graphdef, _ = model_graphdef(factory)
    return TaskRun(graphdef, state.params, tokenizer, cfg, labels, step, run_dir, mesh)


def _outputs(run: TaskRun, examples: list[dict]) -> list[np.ndarray]:
    mesh = make_mesh(MeshConfig(), devices=jax.devices())
    batch = -(-run.config.train.batch_size // mesh.size) * mesh.size
    params = jax.device_put(run.params, NamedSharding(mesh, PartitionSpec()))  # replicated
    return predict_outputs(
        run.graphdef,
        params,
        examples,
        mesh=mesh,
        batch_size=batch,
        pad_id=run.tokenizer.pad_id,
        max_len=run.config.model.max_seq_len,
    )


def evaluate_task(run: TaskRun, data_file: str | None = None) -> dict[str, float]:
    """The task metrics on `data_file` (labelled) or on the run's own evaluation data.

    Translation adds `bleu_signature` and `chrf_signature` (sacrebleu's) to the result.
    """
    cfg = run.config
    if cfg.task.name == "translation":
        from plm_jax.tasks.translation import evaluate_translation_run

        return evaluate_translation_run(run, data_file)
    if data_file is not None:
        task = dataclasses.replace(cfg.task, eval_file=data_file)
        cfg = dataclasses.replace(cfg, task=task)
    data = load_task_data(cfg, run.tokenizer, labels=run.labels)
    metrics = data.metrics(_outputs(run, data.eval))
    return {**{f"eval/{k}": v for k, v in metrics.items()}, "examples": len(data.eval)}


def predict_records(run: TaskRun, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Predictions for input records (`task.text_field`, optional `task.pair_field`).

    Classification: `label` and `probs` (per class name); regression: `value`; translation
    (records with `task.source_field`): `translation`.

    Raises:
      DataError: a record without its text field.
    """
    t = run.config.task
    if t.name == "translation":
        from plm_jax.tasks.translation import predict_translations

        return predict_translations(run, records)
    if t.name == "qa":
        from plm_jax.tasks.qa_task import predict_qa

        return predict_qa(run, records, _outputs)
    examples = []
    for n, record in enumerate(records, 1):
        text = record.get(t.text_field)
        if not isinstance(text, str) or not text:
            raise DataError(f"input record {n} has no non-empty string field {t.text_field!r}")
        pair = record.get(t.pair_field)
        ids, types = run.tokenizer.encode_pair(text, pair if isinstance(pair, str) else None)
        max_len = run.config.model.max_seq_len
        if len(ids) > max_len:
            ids, types = ids[: max_len - 1] + ids[-1:], types[: max_len - 1] + types[-1:]
        examples.append({"ids": ids, "token_types": types})
    outputs = _outputs(run, examples)
    results = []
    for record, out in zip(records, outputs, strict=True):
        if run.labels is None:
            results.append({**record, "value": float(out)})
            continue
        logits = out.astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = int(probs.argmax())
        results.append(
            {
                **record,
                "label": run.labels.decode(best),
                "probs": {run.labels.decode(i): float(p) for i, p in enumerate(probs)},
            }
        )
    return results
