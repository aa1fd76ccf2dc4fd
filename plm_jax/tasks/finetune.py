"""`plm-jax finetune`: maximise sum_i log P(y_i | x_i) from pretrained weights.

    setup   init_from (architecture + tokenizer + backbone weights), task data, label set,
            length-bucketed batches, optimizer (layer-wise LR decay optional), sharded state
    loop    jitted step per bucket shape, task metrics every `train.eval_every` steps over the
            whole held-out set, checkpoints with the batcher position (exact mid-epoch resume),
            the best checkpoint by the task metric, early stopping after `task.patience` evals

Tasks: `classification` (labels from the training file, saved as labels.json), `regression`
(a float target), `qa` (extractive, SQuAD format) and `translation` (parallel text, see
`translation.py`; scored by BLEU and chrF of decoded translations). Losses are example-weighted:
the sum over real rows divided by the number of real rows in the whole accumulated batch, so
gradient accumulation gives the update of one large batch; translation weighs target tokens
instead (the loss is normalised by the real target tokens of the accumulated batch).

The run directory is a pretraining run's plus `labels.json` (classification) and
`best.json` (the step and value of the best evaluation), which `plm_jax.load` prefers.
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
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from plm_jax.checkpoint import Checkpointer
from plm_jax.config import Config, check_resume, config_to_dict, save_config, validate_for_devices
from plm_jax.errors import ConfigError
from plm_jax.metrics import MetricsWriter, ProgressBar, truncate_metrics
from plm_jax.run_lock import hold_run_dir
from plm_jax.sharding import batch_sharding, make_mesh, shard_batch, use_mesh
from plm_jax.tasks.batching import BucketBatcher, bucket_lengths
from plm_jax.tasks.data import TaskData, load_task_data
from plm_jax.tasks.model import TaskModel
from plm_jax.tasks.task_tokenizer import ensure_task_tokenizer
from plm_jax.tokenizer import Tokenizer
from plm_jax.tracking import open_metrics_writer
from plm_jax.train.init_from import load_init_params, resolve_init_from
from plm_jax.train.loop import (
    accum_choices,
    applied_loss,
    check_steps,
    resolve_vocab,
    run_summary,
    warn_if_remat_saves_nothing,
)
from plm_jax.train.memory import check_step_fits
from plm_jax.train.optimizer import layerwise_lr_factors, lr_schedule, make_optimizer
from plm_jax.train.preemption import Preempted, SignalGuard
from plm_jax.train.state import (
    TrainState,
    init_train_state,
    model_graphdef,
    sharded_abstract_state,
    state_shardings,
)
from plm_jax.train.step import NO_GUARD, Guard, accumulate, apply_update, next_token_loss

log = logging.getLogger(__name__)

# Model selection: the default metric per task and whether higher is better.
DEFAULT_METRIC = {
    "classification": "accuracy",
    "regression": "pearson",
    "qa": "f1",
    "translation": "bleu",
}
LOWER_IS_BETTER = ("loss", "mse")
LABELS_FILE = "labels.json"
BEST_FILE = "best.json"


# ---------------------------------------------------------------------------------------------
# Losses and steps (pure).


def task_loss(
    outputs: jax.Array, batch: dict[str, jax.Array], task: str, label_smoothing: float = 0.0
) -> jax.Array:
    """Sum over real rows (weight 1) of the per-example loss, in float32.

    classification: cross-entropy of `outputs` [B, C] and `label`; regression: squared error of
    `outputs` [B] and `label`; qa: the mean of the start and end cross-entropies of `outputs`
    [B, L, 2] (padding positions excluded) and `start`/`end`; translation: the (label-smoothed)
    token cross-entropy of `outputs` [B, L, V] and `targets`, summed over real target tokens.
    """
    w = batch["weights"]
    if task == "translation":
        return next_token_loss(outputs, batch["targets"], w, label_smoothing)
    if task == "classification":
        ce = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["label"])
        return jnp.sum(ce * w)
    if task == "regression":
        return jnp.sum(jnp.square(outputs - batch["label"]) * w)
    real = batch["segment_ids"] != 0
    logits = jnp.where(real[..., None], outputs, -1e9)
    start = optax.softmax_cross_entropy_with_integer_labels(logits[..., 0], batch["start"])
    end = optax.softmax_cross_entropy_with_integer_labels(logits[..., 1], batch["end"])
    return jnp.sum(0.5 * (start + end) * w)


def _forward(params, graphdef, batch, key):
    model = nnx.merge(graphdef, params)
    rngs = None if key is None else nnx.Rngs(dropout=key)
    if "targets" in batch:  # translation: the LM logits of the target side
        return model(batch, deterministic=key is None, rngs=rngs)
    return model(
        batch["inputs"],
        segment_ids=batch["segment_ids"],
        token_types=batch["token_types"],
        positions=batch["positions"],
        deterministic=key is None,
        rngs=rngs,
    )


def task_train_step(
    state: TrainState,
    batch,
    *,
    graphdef,
    tx,
    schedule,
    grad_accum,
    task,
    drop,
    guard=NO_GUARD,
    label_smoothing=0.0,
):
    """One optimizer step over `grad_accum` micro-batches; example- (translation: target
    token-) weighted loss."""
    total = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params, mb, key):
        return task_loss(_forward(params, graphdef, mb, key), mb, task, label_smoothing)

    grads, losses = accumulate(loss_fn, state.params, batch, grad_accum, step_key, drop)
    new_state, metrics = apply_update(state, grads, losses, total, tx, guard)
    metrics["train/lr"] = schedule(state.step)
    metrics["train/examples"] = jnp.sum(batch["weights"])
    return new_state, metrics


def task_outputs(params, batch, *, graphdef):
    """Deterministic head outputs of a batch (for evaluation and prediction)."""
    return _forward(params, graphdef, batch, None)


# ---------------------------------------------------------------------------------------------
# Setup.


@dataclasses.dataclass
class FineTuner:
    cfg: Config
    data: TaskData
    mesh: Any
    graphdef: Any
    state: TrainState
    shardings: TrainState
    batcher: BucketBatcher
    checkpointer: Checkpointer
    writer: MetricsWriter
    tx: Any
    metric: str
    higher_is_better: bool
    best: float | None = None
    bad_evals: int = 0
    tokenizer: Any = None


def task_kind(cfg: Config) -> str:
    """The task name, checked to be one `finetune` trains.

    Raises:
      ConfigError: no task configured, or no training data.
    """
    name = cfg.task.name
    if not name:
        raise ConfigError(
            "task.name is empty; set task.name=classification, regression, qa or translation "
            "(and task.train_file)"
        )
    if name == "translation":
        if not (cfg.task.train_file or cfg.task.source_file):
            raise ConfigError(
                "task.name=translation needs task.train_file (JSONL with source/target) or "
                "task.source_file and task.target_file (aligned text files)"
            )
        if jax.process_count() > 1:
            raise ConfigError(
                "task.name=translation fine-tunes in one process for now (its evaluation "
                "decodes on one host); run it without plm-jax launch / jax.distributed"
            )
        return name
    if not cfg.task.train_file:
        raise ConfigError(f"task.name={name} needs task.train_file (JSONL, CSV or SQuAD JSON)")
    return name


def model_factory(cfg: Config, data: TaskData):
    """`rngs -> TaskModel` for this config and data (what `state.py` builds states from)."""
    if cfg.task.name == "translation":
        return partial(_make_seq2seq_model, cfg.model)
    return partial(_make_task_model, cfg.model, cfg.task.name, data.num_outputs, cfg.task.pooling)


def _make_task_model(model_cfg, task, num_outputs, pooling, rngs):
    return TaskModel(model_cfg, task, num_outputs, pooling, rngs=rngs)


def _make_seq2seq_model(model_cfg, rngs):
    from plm_jax.tasks.translation import Seq2SeqModel

    return Seq2SeqModel(model_cfg, rngs=rngs)


def resolve_steps(cfg: Config, batches_per_epoch: int) -> Config:
    """`train.steps` from `task.epochs` (when set), checked against the warmup."""
    steps = cfg.task.epochs * batches_per_epoch if cfg.task.epochs else cfg.train.steps
    if cfg.train.warmup_steps >= steps:
        raise ConfigError(
            f"train.warmup_steps={cfg.train.warmup_steps} is not below the {steps} training "
            "steps; lower train.warmup_steps"
        )
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def setup(cfg: Config, *, show_progress: bool = True) -> FineTuner:
    """Builds (or resumes) a fine-tuning run."""
    task = task_kind(cfg)
    cfg = resolve_init_from(cfg)
    cfg = ensure_task_tokenizer(cfg, show_progress=show_progress)  # none given: train one
    validate_for_devices(cfg, jax.device_count())
    warn_if_remat_saves_nothing(cfg.model, jax.default_backend())
    tokenizer = Tokenizer.load(cfg.tokenizer.path)
    cfg = dataclasses.replace(cfg, model=resolve_vocab(cfg.model, tokenizer))
    mesh = make_mesh(cfg.mesh)
    if task == "translation":
        from plm_jax.tasks.translation import load_translation_data, make_translation_batcher

        data = load_translation_data(cfg, tokenizer)
        batcher = make_translation_batcher(
            cfg, data.train, tokenizer, shuffle=True, global_batch=cfg.train.batch_size
        )
    else:
        data = load_task_data(cfg, tokenizer)
        batcher = BucketBatcher(
            data.train,
            global_batch=cfg.train.batch_size,
            buckets=bucket_lengths(cfg.model.max_seq_len),
            seed=cfg.run.seed,
            shuffle=True,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            pad_id=tokenizer.pad_id,
        )
    cfg = resolve_steps(cfg, batcher.batches_per_epoch)
    factory = model_factory(cfg, data)
    graphdef, abstract_params = model_graphdef(factory)
    factors = None
    if cfg.task.layer_lr_decay < 1.0:
        factors = layerwise_lr_factors(
            abstract_params,
            cfg.model.num_layers,
            cfg.task.layer_lr_decay,
            cfg.model.use_scan_layers,
        )
    tx = make_optimizer(cfg.train, factors)
    metric = cfg.task.metric or DEFAULT_METRIC[task]
    higher = not metric.endswith(LOWER_IS_BETTER)
    checkpointer = Checkpointer(
        cfg.run_dir, cfg.checkpoint, best_metric=f"eval/{metric}", higher_is_better=higher
    )
    is_primary = jax.process_index() == 0
    best, bad_evals = None, 0
    with use_mesh(mesh, cfg.mesh.rules):
        shardings = state_shardings(factory, tx, mesh, cfg.mesh.rules)
        abstract = sharded_abstract_state(factory, tx, shardings)
        restored = checkpointer.restore_latest(abstract)  # falls back past corrupt ones
        if restored is None:
            state, _ = init_train_state(factory, tx, mesh, cfg.run.seed, cfg.mesh.rules)
            if cfg.init_from:
                state = _load_backbone(cfg, state, shardings)
        else:
            latest, state, data_state, saved = restored
            changed = check_resume(saved, cfg, checkpointer.directory / str(latest), latest)
            if changed:
                log.info("resuming with new values of %s", ", ".join(changed))
            batcher.set_state(data_state["batcher"])
            best, bad_evals = data_state.get("best"), data_state.get("bad_evals", 0)
            log.info("resumed from %s at step %d", checkpointer.directory / str(latest), latest)
            if is_primary:
                truncate_metrics(cfg.run_dir, latest)
    if is_primary:
        save_config(cfg, cfg.run_dir / "config.yaml")
        if data.labels is not None:
            (cfg.run_dir / LABELS_FILE).write_text(json.dumps(data.labels.to_dict()))
    log.info(
        "%s: %d training and %d evaluation examples, %d batches per epoch, %d steps",
        task,
        len(data.train),
        len(data.eval),
        batcher.batches_per_epoch,
        cfg.train.steps,
    )
    log.info(
        "%s",
        run_summary(
            cfg, cfg.model, mesh, tokens=f"up to {cfg.train.batch_size} x {cfg.model.max_seq_len}"
        ),
    )
    writer = open_metrics_writer(cfg, enabled=is_primary)  # JSONL + run.trackers
    return FineTuner(
        cfg,
        data,
        mesh,
        graphdef,
        state,
        shardings,
        batcher,
        checkpointer,
        writer,
        tx,
        metric,
        higher,
        best,
        bad_evals,
        tokenizer,
    )


def _load_backbone(cfg: Config, state: TrainState, shardings: TrainState) -> TrainState:
    """`state` with the backbone parameters of the `init_from` checkpoint."""
    params = state.params
    params["backbone"] = load_init_params(
        cfg, cfg.model, params["backbone"], shardings.params["backbone"]
    )
    return dataclasses.replace(state, params=params)


# ---------------------------------------------------------------------------------------------
# Evaluation and the loop.


def predict_outputs(
    graphdef, params, examples: list[dict], *, mesh, batch_size: int, pad_id: int, max_len: int
) -> list[np.ndarray]:
    """Head outputs of every example, in order (each once, whatever N and the batch size)."""
    batcher = BucketBatcher(
        examples,
        global_batch=batch_size,
        buckets=bucket_lengths(max_len),
        seed=0,
        shuffle=False,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        pad_id=pad_id,
    )
    fn = jax.jit(partial(task_outputs, graphdef=graphdef))
    results: list[np.ndarray | None] = [None] * len(examples)
    for local in batcher:
        batch = shard_batch(local, mesh, batch_size)
        with use_mesh(mesh, None):
            out = fn(params, batch)
        index = batch["example_index"]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            out, index = multihost_utils.process_allgather((out, index), tiled=True)
        out, index = np.asarray(jax.device_get(out)), np.asarray(jax.device_get(index))
        for row, i in enumerate(index):
            if i >= 0:
                results[i] = out[row]
    missing = [i for i, r in enumerate(results) if r is None]
    if missing:  # the batcher's contract; a bug here, not bad input
        raise RuntimeError(f"evaluation produced no output for examples {missing[:5]}")
    return results  # type: ignore[return-value]


def evaluate(ft: FineTuner, params=None) -> dict[str, float]:
    """Task metrics over the whole evaluation set."""
    cfg = ft.cfg
    if cfg.task.name == "translation":
        from plm_jax.tasks.translation import evaluate_translation

        params = ft.state.params if params is None else params
        scores = evaluate_translation(cfg, ft.graphdef, params, ft.data, ft.tokenizer, ft.mesh)
        return {f"eval/{k}": v for k, v in scores.items() if not k.endswith("signature")}
    outputs = predict_outputs(
        ft.graphdef,
        ft.state.params if params is None else params,
        ft.data.eval,
        mesh=ft.mesh,
        batch_size=cfg.train.batch_size,
        pad_id=ft.data.pad_id,
        max_len=cfg.model.max_seq_len,
    )
    return {f"eval/{k}": v for k, v in ft.data.metrics(outputs).items()}


def _improved(ft: FineTuner, value: float) -> bool:
    if ft.best is None:
        return True
    return value > ft.best if ft.higher_is_better else value < ft.best


def run(
    ft: FineTuner,
    *,
    show_progress: bool = True,
    until: int | None = None,
    guard: SignalGuard | None = None,
) -> dict:
    """Trains to `train.steps` (or `until`), evaluating, saving and stopping early.

    Raises:
      Preempted: `guard` received SIGTERM/SIGINT; the current step's checkpoint is committed.
      TrainingError: non-finite values (`train.nonfinite: abort`) or too many skipped steps.
    """
    cfg, t = ft.cfg, ft.cfg.train
    guard = guard or SignalGuard()
    start = int(jax.device_get(ft.state.step))
    if start >= t.steps:
        return {"step": start, "complete": True, **({} if ft.best is None else {"best": ft.best})}
    step_fn = _task_step_jit(ft, t.grad_accum)
    _check_largest_bucket_fits(ft)
    config_dict = config_to_dict(cfg)
    bar = ProgressBar(t.steps, initial=start, enabled=show_progress)
    stop = t.steps if until is None else min(until, t.steps)
    pending: list[dict] = []
    last: dict[str, Any] = {}
    clock = time.perf_counter()
    early = False
    skipped_run = 0
    for step in range(start, stop):
        batch = shard_batch(next(ft.batcher), ft.mesh, t.batch_size)
        with use_mesh(ft.mesh, cfg.mesh.rules):
            ft.state, metrics = step_fn(ft.state, batch)
        pending.append(metrics)
        ft.checkpointer.poll()
        done = step + 1
        evals: dict[str, float] = {}
        saving = done % cfg.checkpoint.save_every == 0 or done == stop
        evaluating = done % t.eval_every == 0 or done == t.steps
        sync = done % t.log_every == 0 or saving or evaluating  # every process passes these
        preempted = guard.should_stop(at_sync_point=sync)
        evaluating = evaluating and not preempted
        if done % t.log_every == 0 or saving or evaluating or preempted:
            fetched = jax.device_get(pending)  # waits for the steps: time after this
            skipped_run = check_steps(fetched, done - len(fetched) + 1, t, skipped_run)
            seconds = time.perf_counter() - clock
            last = {"step": done, **_summarise(fetched, seconds, cfg.task.name)}
            pending, clock = [], time.perf_counter()
            ft.writer.write(done, {k: v for k, v in last.items() if k != "step"})
            bar.update(done, loss=last["train/loss"])
        if evaluating:
            evals = evaluate(ft)
            value = evals[f"eval/{ft.metric}"]
            if _improved(ft, value):
                ft.best, ft.bad_evals = value, 0
                saving = True  # the best model is always kept
                if jax.process_index() == 0:
                    best = {"step": done, "metric": ft.metric, "value": value}
                    (cfg.run_dir / BEST_FILE).write_text(json.dumps(best))
            else:
                ft.bad_evals += 1
            ft.writer.write(done, evals)
            log.info("step %d: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in evals.items()))
            last.update(evals)
            clock = time.perf_counter()  # evaluation time is not training time
            if cfg.task.patience and ft.bad_evals >= cfg.task.patience:
                log.info(
                    "stopping early: eval/%s has not improved for %d evaluations (best %.4f)",
                    ft.metric,
                    ft.bad_evals,
                    ft.best,
                )
                early, saving = True, True
            preempted = guard.should_stop(at_sync_point=True)  # a signal during evaluation
        if saving or preempted:
            data_state = {"batcher": ft.batcher.get_state(), "best": ft.best}
            data_state["bad_evals"] = ft.bad_evals
            ranked = {f"eval/{ft.metric}": evals[f"eval/{ft.metric}"]} if evals else None
            ft.checkpointer.save(
                done, ft.state, data_state, config_dict, metrics=ranked, force=True
            )
        if preempted:
            bar.close()
            ft.checkpointer.wait()
            raise Preempted(done, guard.signame or "a signal")
        if early:
            break
    bar.close()
    ft.checkpointer.wait()
    if ft.best is not None:
        last["best"] = ft.best
    last["early_stopped"] = early
    return last


def _task_step_jit(ft: FineTuner, grad_accum: int):
    cfg, t = ft.cfg, ft.cfg.train
    return jax.jit(
        partial(
            task_train_step,
            graphdef=ft.graphdef,
            tx=ft.tx,
            schedule=lr_schedule(t),
            grad_accum=grad_accum,
            task=cfg.task.name,
            drop=cfg.model.dropout > 0,
            guard=Guard.from_config(t),
            label_smoothing=cfg.task.label_smoothing,
        ),
        out_shardings=(ft.shardings, NamedSharding(ft.mesh, PartitionSpec())),
        donate_argnums=0,
    )


def _check_largest_bucket_fits(ft: FineTuner) -> None:
    """Compiles the step for a batch of the longest bucket and checks it fits in memory.

    Batches come in buckets of lengths up to `model.max_seq_len`, each compiled when first met;
    the longest is the largest program, so it is checked before the first step.
    """
    cfg, t = ft.cfg, ft.cfg.train
    position = ft.batcher.get_state()
    probe = next(ft.batcher)  # any batch: its arrays give the keys, dtypes and layout
    ft.batcher.set_state(position)
    length = max(x.shape[1] for x in probe.values() if x.ndim >= 2)
    longest = max(length, cfg.model.max_seq_len)

    def widened(x: np.ndarray) -> jax.ShapeDtypeStruct:  # shapes only: nothing is placed
        shape = [t.batch_size, *x.shape[1:]]
        if x.ndim >= 2 and x.shape[1] == length:
            shape[1] = longest
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype, sharding=batch_sharding(ft.mesh, x.ndim))

    batch = {key: widened(x) for key, x in probe.items()}

    def compiled_at(grad_accum: int):
        with use_mesh(ft.mesh, cfg.mesh.rules):
            return _task_step_jit(ft, grad_accum).lower(ft.state, batch).compile()

    shards = ft.mesh.shape["data"] * ft.mesh.shape["fsdp"]
    check_step_fits(
        compiled_at(t.grad_accum),
        list(ft.mesh.devices.flat),
        grad_accum=t.grad_accum,
        accum_choices=accum_choices(t.batch_size, t.grad_accum, shards),
        recompile=compiled_at,
        what=f"the fine-tuning step at the longest bucket ({longest} tokens)",
    )


def _summarise(fetched: list[dict], seconds: float, task: str = "") -> dict[str, float]:
    """Example- (translation: target token-) weighted mean loss since the last log, latest lr
    and grad norm, and the rate (including any compilation of new batch shapes)."""
    rows = np.array([m["train/examples"] for m in fetched], np.float64)
    loss, skipped = applied_loss(fetched, "train/examples")
    unit = "target_tokens" if task == "translation" else "examples"
    return {
        "train/loss": loss,
        "train/skipped": skipped,
        "train/grad_norm": float(fetched[-1]["train/grad_norm"]),
        "train/lr": float(fetched[-1]["train/lr"]),
        f"perf/{unit}_per_sec": float(rows.sum() / max(seconds, 1e-9)),
    }


def finetune(cfg: Config, *, show_progress: bool = True, until: int | None = None) -> dict:
    """Sets up (or resumes) a fine-tuning run and trains it; returns the last metrics."""
    # One writer per run directory, held from before the tokenizer is written to the end.
    lock = hold_run_dir(cfg.run_dir, timeout=cfg.distributed.initialization_timeout)
    with SignalGuard() as guard, lock:
        ft = setup(cfg, show_progress=show_progress)
        try:
            result = run(ft, show_progress=show_progress, until=until, guard=guard)
            stats = ft.batcher
            result["padding_fraction"] = stats.padding_fraction
            result["compiled_shapes"] = len(stats.shapes)
            return result
        finally:
            try:
                ft.checkpointer.close()  # commits the last save
            finally:
                ft.writer.close()


def best_step(run_dir: str | Path) -> int | None:
    """The step recorded in `best.json`, or None."""
    path = Path(run_dir) / BEST_FILE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["step"])
    except (ValueError, KeyError, TypeError):
        return None
