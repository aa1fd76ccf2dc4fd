"""The pretraining loop: data -> jitted step -> metrics, evaluation and checkpoints.

    setup   mesh, tokenizer, data pipeline, optimizer, state (restored or fresh, sharded)
    compile the train step once, with explicit in/out shardings and the state donated
    loop    fetch metrics every `log_every` steps (NaN/Inf checked on the host), evaluate every
            `eval_every`, save every `save_every` (asynchronously) and at the end

A run directory that holds checkpoints resumes from the newest one: parameters, optimizer
state, step and the data iterator position, so the resumed run continues exactly as the
uninterrupted one would have. Dropout keys are folded from the step, so results do not depend
on how often the run logs or saves.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from functools import partial
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from plm_jax.checkpoint import Checkpointer
from plm_jax.config import (
    Config,
    ModelConfig,
    TrainConfig,
    check_resume,
    config_to_dict,
    save_config,
    validate_for_devices,
)
from plm_jax.data.pipeline import Pipeline, build_pipeline, load_or_train_tokenizer
from plm_jax.errors import ConfigError, TrainingError
from plm_jax.evals.downstream import DownstreamEvals
from plm_jax.metrics import (
    MetricsWriter,
    ProgressBar,
    StepTimer,
    peak_flops,
    train_flops_per_token,
    truncate_metrics,
)
from plm_jax.models import count_params
from plm_jax.run_lock import hold_run_dir
from plm_jax.sharding import batch_sharding, make_mesh, shard_batch, use_mesh
from plm_jax.tokenizer import Tokenizer
from plm_jax.tracking import check_trackers, open_metrics_writer
from plm_jax.train.init_from import load_init_params, resolve_init_from
from plm_jax.train.memory import check_step_fits
from plm_jax.train.optimizer import lr_schedule, make_optimizer
from plm_jax.train.preemption import Preempted, SignalGuard
from plm_jax.train.state import (
    TrainState,
    init_train_state,
    model_graphdef,
    sharded_abstract_state,
    state_shardings,
)
from plm_jax.train.step import Guard, eval_step, train_step

log = logging.getLogger(__name__)

VOCAB_MULTIPLE = 128  # embedding rows padded for even tensor-parallel splits and matmul tiles


def resolve_vocab(model: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The model config with `vocab_size` filled from the tokenizer (padded to 128).

    Raises:
      ConfigError: an explicit `model.vocab_size` smaller than the tokenizer's.
    """
    if model.vocab_size == 0:
        padded = -(-tokenizer.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        return dataclasses.replace(model, vocab_size=padded)
    if model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} pieces ({tokenizer.path}); set model.vocab_size=0"
        )
    return model


@dataclasses.dataclass
class Trainer:
    """Everything a run holds between steps; built by `setup`, driven by `run`."""

    cfg: Config
    model_cfg: ModelConfig
    tokenizer: Tokenizer
    mesh: Any
    pipeline: Pipeline
    state: TrainState
    shardings: TrainState
    checkpointer: Checkpointer
    writer: MetricsWriter
    step_fn: Any = None
    eval_fn: Any = None
    downstream: DownstreamEvals | None = None  # train.evals, scored at every evaluation


def _count(n: int) -> str:
    """28.4 K, 124.4 M, 8.03 B: three significant figures."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def run_summary(cfg: Config, model: ModelConfig, mesh: Any, *, tokens: str = "") -> str:
    """A few lines on what a run trains (the full config is in `config.yaml`, or --verbose)."""
    total = count_params(model)
    shape = dict(mesh.shape)
    tokens = tokens or f"{cfg.train.batch_size} x {model.max_seq_len}"
    per_step = cfg.train.batch_size * model.max_seq_len
    return (
        f"{model.family}, {_count(total)} parameters, "
        f"{model.num_layers} layers x {model.embed_dim} wide; {tokens} = {per_step:,} tokens "
        f"per step ({cfg.train.grad_accum} micro-batch(es)); mesh "
        + " ".join(f"{k}={v}" for k, v in shape.items())
        + f" on {mesh.devices.size} {jax.default_backend()} device(s); {cfg.train.steps} steps "
        f"into {cfg.run_dir} (full config: {cfg.run_dir / 'config.yaml'}, or plm-jax --verbose)"
    )


def warn_if_remat_saves_nothing(model: ModelConfig, backend: str) -> bool:
    """Logs (and returns True) when `model.remat` cannot save memory: on CPU with unrolled
    layers XLA drops remat's optimization barriers and merges the recomputation away
    (docs/performance.md, "Remat on CPU")."""
    if model.remat == "none" or model.use_scan_layers or backend != "cpu":
        return False
    log.warning(
        "model.remat=%s saves no memory on CPU with unrolled layers (XLA merges the "
        "recomputation away); set model.use_scan_layers=true for it to take effect",
        model.remat,
    )
    return True


def setup(cfg: Config, *, show_progress: bool = True) -> Trainer:
    """Builds (or restores) everything a run needs, before any step is compiled."""
    cfg = resolve_init_from(cfg)
    validate_for_devices(cfg, jax.device_count())
    check_trackers(cfg)  # a missing wandb fails here, not after the data is prepared
    warn_if_remat_saves_nothing(cfg.model, jax.default_backend())
    mesh = make_mesh(cfg.mesh)
    is_primary = jax.process_index() == 0
    tokenizer = load_or_train_tokenizer(cfg, show_progress=show_progress and is_primary)
    model_cfg = resolve_vocab(cfg.model, tokenizer)
    pipeline = build_pipeline(
        cfg,
        tokenizer,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        show_progress=show_progress and is_primary,
    )
    tx = make_optimizer(cfg.train)
    checkpointer = Checkpointer(cfg.run_dir, cfg.checkpoint)
    with use_mesh(mesh, cfg.mesh.rules):
        shardings = state_shardings(model_cfg, tx, mesh, cfg.mesh.rules)
        abstract = sharded_abstract_state(model_cfg, tx, shardings)
        restored = checkpointer.restore_latest(abstract)  # falls back past corrupt ones
        if restored is None:
            state, _ = init_train_state(model_cfg, tx, mesh, cfg.run.seed, cfg.mesh.rules)
            if cfg.init_from:
                params = load_init_params(cfg, model_cfg, state.params, shardings.params)
                state = dataclasses.replace(state, params=params)
        else:
            latest, state, data_state, saved = restored
            changed = check_resume(saved, cfg, checkpointer.directory / str(latest), latest)
            if changed:
                log.info("resuming with new values of %s", ", ".join(changed))
            pipeline.train.set_state(data_state)
            log.info("resumed from %s at step %d", checkpointer.directory / str(latest), latest)
            if is_primary:
                truncate_metrics(cfg.run_dir, latest)
    if is_primary:
        save_config(cfg, cfg.run_dir / "config.yaml")
    log.info("%s", run_summary(cfg, model_cfg, mesh))
    downstream = DownstreamEvals.from_config(cfg, tokenizer)  # bad tasks fail before compiling
    writer = open_metrics_writer(cfg, enabled=is_primary)  # JSONL + run.trackers
    return Trainer(
        cfg,
        model_cfg,
        tokenizer,
        mesh,
        pipeline,
        state,
        shardings,
        checkpointer,
        writer,
        downstream=downstream,
    )


def accum_choices(batch_size: int, grad_accum: int, batch_shards: int) -> list[int]:
    """Larger `train.grad_accum` values (doublings) whose micro-batches still split evenly."""
    choices, accum = [], grad_accum * 2
    while batch_size % accum == 0 and (batch_size // accum) % batch_shards == 0:
        choices.append(accum)
        accum *= 2
    return choices


def train_step_jit(
    cfg: Config, model_cfg: ModelConfig, mesh: Any, shardings: TrainState, grad_accum: int
):
    """The jitted train step a run executes: static settings bound, shardings and donation set.

    `plm-jax plan` compiles this same function for other devices (plm_jax/plan)."""
    graphdef, _ = model_graphdef(model_cfg)
    return jax.jit(
        partial(
            train_step,
            graphdef=graphdef,  # static: the model's structure, merged with params inside
            tx=make_optimizer(cfg.train),  # static: optimizer transformations
            schedule=lr_schedule(cfg.train),  # static: learning-rate schedule
            grad_accum=grad_accum,  # static: micro-batches per step
            use_dropout=cfg.model.dropout > 0,
            guard=Guard.from_config(cfg.train),  # static: non-finite and spike skipping
            loss_chunk=cfg.train.loss_chunk,  # static: positions per head/loss chunk (0: all)
        ),
        in_shardings=(shardings, batch_sharding(mesh)),  # batch rows over data x fsdp
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),  # metrics
        donate_argnums=0,  # the old state's buffers become the new state's
    )


def eval_step_jit(model_cfg: ModelConfig, mesh: Any, shardings: TrainState, loss_chunk: int = 0):
    """The jitted eval step: loss sums over a batch, params as the train state holds them;
    `loss_chunk` as `train.loss_chunk`."""
    graphdef, _ = model_graphdef(model_cfg)
    return jax.jit(
        partial(eval_step, graphdef=graphdef, loss_chunk=loss_chunk),
        in_shardings=(shardings.params, batch_sharding(mesh)),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


def compile_steps(tr: Trainer, first_batch: dict[str, jax.Array]) -> None:
    """Compiles the train and eval steps once; logs compile time and memory estimate.

    Raises:
      DoesNotFit: the compiled train step needs more memory than the devices have.
    """
    cfg = tr.cfg

    def compiled_at(grad_accum: int):
        with use_mesh(tr.mesh, cfg.mesh.rules):
            step = train_step_jit(cfg, tr.model_cfg, tr.mesh, tr.shardings, grad_accum)
            return step.lower(tr.state, first_batch).compile()

    start = time.perf_counter()
    compiled = compiled_at(cfg.train.grad_accum)
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    info = f"train step compiled in {seconds:.1f} s"
    if memory is not None:
        total = sum(
            getattr(memory, f, 0) or 0
            for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
        )
        info += f"; compiled memory estimate {total / 2**20:.1f} MiB per device"
    log.info(info)
    tr.writer.write_text("compile", info)
    shards = tr.mesh.shape["data"] * tr.mesh.shape["fsdp"]
    check_step_fits(
        compiled,
        list(tr.mesh.devices.flat),
        grad_accum=cfg.train.grad_accum,
        accum_choices=accum_choices(cfg.train.batch_size, cfg.train.grad_accum, shards),
        recompile=compiled_at,
    )
    tr.step_fn = compiled
    tr.eval_fn = eval_step_jit(tr.model_cfg, tr.mesh, tr.shardings, cfg.train.loss_chunk)


def evaluate(tr: Trainer, guard: SignalGuard | None = None) -> dict[str, float]:
    """Loss and perplexity over the held-out split (`train.eval_batches` batches, 0 = all).

    A single-process run stops evaluating when `guard` has a signal (returning {}); the
    processes of a multi-process run finish it together."""
    loader = tr.pipeline.eval_batches(jax.process_index(), jax.process_count())
    if loader is None:
        return {}
    loss_sum = tokens = 0.0
    with use_mesh(tr.mesh, tr.cfg.mesh.rules):
        for i, local in enumerate(loader):
            if tr.cfg.train.eval_batches and i >= tr.cfg.train.eval_batches:
                break
            if guard is not None and guard.local and jax.process_count() == 1:
                log.warning("evaluation interrupted by %s", guard.signame)
                return {}
            batch = shard_batch(local, tr.mesh, tr.cfg.train.batch_size)
            out = jax.device_get(tr.eval_fn(tr.state.params, batch))
            loss_sum += float(out["loss_sum"])
            tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/tokens": tokens}


def _log_eval(tr: Trainer, step: int, guard: SignalGuard | None = None) -> dict[str, float]:
    evals = evaluate(tr, guard)
    if evals:
        tr.writer.write(step, evals)
        log.info(
            "step %d: eval loss %.4f, perplexity %.2f",
            step,
            evals["eval/loss"],
            evals["eval/perplexity"],
        )
    if tr.downstream is not None:  # train.evals: writes eval/<task>/acc and its own timing
        evals = {**evals, **tr.downstream.evaluate(tr, step)}
    return evals


def applied_loss(fetched: list[dict[str, Any]], weight_key: str) -> tuple[float, float]:
    """(weighted mean loss over the applied steps, number of skipped steps): steps with a
    non-finite loss or `train/skipped` set do not count; NaN when none was applied."""
    weights = np.array([m[weight_key] for m in fetched], np.float64)
    losses = np.array([m["train/loss"] for m in fetched], np.float64)
    used = np.isfinite(losses) & (np.array([m["train/skipped"] for m in fetched]) == 0)
    if not used.any():
        return float("nan"), float(len(fetched))
    w = weights * used
    return float((np.where(used, losses, 0.0) * w).sum() / max(w.sum(), 1.0)), float((~used).sum())


def _summarise(fetched: list[dict[str, Any]]) -> dict[str, float]:
    """Token-weighted mean loss over the applied steps since the last log, latest lr and
    grad norm, and the number of skipped steps."""
    loss, skipped = applied_loss(fetched, "train/tokens")
    return {
        "train/loss": loss,
        "train/grad_norm": float(fetched[-1]["train/grad_norm"]),
        "train/lr": float(fetched[-1]["train/lr"]),
        "train/tokens": float(sum(m["train/tokens"] for m in fetched)),
        "train/input_tokens": float(sum(m["train/input_tokens"] for m in fetched)),
        "train/skipped": skipped,
    }


def check_steps(fetched: list[dict[str, Any]], first: int, t: TrainConfig, run: int) -> int:
    """Applies `train.nonfinite` and `train.max_skipped` to the metrics of steps `first`,
    `first + 1`, ...; returns the updated count of consecutive skipped steps.

    Raises:
      TrainingError: a non-finite loss or gradient under `abort` (naming the step, the batch
        and micro-batch), or more than `train.max_skipped` consecutive skipped steps.
    """
    for i, m in enumerate(fetched):
        step, loss, norm = first + i, float(m["train/loss"]), float(m["train/grad_norm"])
        if t.nonfinite == "abort" and not (math.isfinite(loss) and math.isfinite(norm)):
            micro = int(m["train/bad_micro"])
            part = f", micro-batch {micro} of {t.grad_accum}" if t.grad_accum > 1 else ""
            raise TrainingError(
                f"non-finite loss or gradient at step {step} (batch {step - 1} of the data "
                f"stream{part}: loss={loss}, grad_norm={norm}); no state after it was saved. "
                "Lower train.lr or raise train.warmup_steps (or set train.nonfinite=skip), "
                "then rerun to resume from the last checkpoint"
            )
        run = run + 1 if m["train/skipped"] else 0
        if run > t.max_skipped:
            raise TrainingError(
                f"{run} consecutive steps skipped up to step {step} (non-finite values or loss "
                f"spikes; train.max_skipped={t.max_skipped}): the run is diverging. Lower "
                "train.lr, then rerun to resume from the last checkpoint"
            )
    return run


def _save(tr: Trainer, step: int, config_dict: dict, evals: dict, force: bool) -> None:
    ranked = {"eval/loss": evals["eval/loss"]} if "eval/loss" in evals else None  # (train.evals)
    tr.checkpointer.save(
        step, tr.state, tr.pipeline.train.get_state(), config_dict, metrics=ranked, force=force
    )


def run(
    tr: Trainer,
    *,
    show_progress: bool = True,
    until: int | None = None,
    guard: SignalGuard | None = None,
) -> dict[str, Any]:
    """Trains from the current step to `train.steps` (or stops after step `until`, with a
    checkpoint, as an interrupted run would); returns the last logged metrics.

    Raises:
      Preempted: `guard` received SIGTERM/SIGINT; the current step's checkpoint is committed.
      TrainingError: non-finite values (`train.nonfinite: abort`) or too many skipped steps.
    """
    cfg, t = tr.cfg, tr.cfg.train
    guard = guard or SignalGuard()
    start_step = int(jax.device_get(tr.state.step))
    if start_step >= t.steps:
        log.info("run already complete at step %d (train.steps=%d)", start_step, t.steps)
        return {"step": start_step, "complete": True}
    config_dict = config_to_dict(cfg)
    decoder_len = getattr(tr.pipeline.masker, "decoder_len", None)  # span corruption's
    flops = train_flops_per_token(
        tr.model_cfg, tr.model_cfg.vocab_size, cfg.model.max_seq_len, decoder_len
    )
    try:
        peak, peak_source = peak_flops(jax.devices())
        log.info("MFU formula: %s; peak %.3g FLOP/s (%s)", flops["formula"], peak, peak_source)
    except ValueError as e:  # an accelerator missing from the peak table: no MFU, say why
        peak = None
        log.warning("perf/mfu not reported: %s", e)
    timer = StepTimer(flops_per_token=flops["flops_per_token"], peak=peak)
    bar = ProgressBar(t.steps, initial=start_step, enabled=show_progress)
    padded_per_step = t.batch_size * cfg.model.max_seq_len
    pending: list[dict[str, Any]] = []
    last: dict[str, Any] = {}
    skipped_run = 0
    stop = t.steps if until is None else min(until, t.steps)
    if guard.should_stop(at_sync_point=True):  # a signal during setup
        _save(tr, start_step, config_dict, {}, force=True)
        tr.checkpointer.wait()
        raise Preempted(start_step, guard.signame or "a signal")
    for step in range(start_step, stop):
        batch = shard_batch(next(tr.pipeline.train), tr.mesh, t.batch_size)
        if tr.step_fn is None:
            compile_steps(tr, batch)
            if step == 0:  # the starting point that the final eval loss is compared with
                _log_eval(tr, 0, guard)
            timer.reset()
        with use_mesh(tr.mesh, cfg.mesh.rules):
            tr.state, metrics = tr.step_fn(tr.state, batch)
        pending.append(metrics)
        tr.checkpointer.poll()
        done = step + 1
        evals: dict[str, float] = {}
        saving = done % cfg.checkpoint.save_every == 0 or done == stop
        eval_due = done % t.eval_every == 0 or done == t.steps
        sync = done % t.log_every == 0 or saving or eval_due  # every process passes these
        preempted = guard.should_stop(at_sync_point=sync)
        if sync or preempted:  # fetch before saving: never save a NaN state
            fetched = jax.device_get(pending)
            skipped_run = check_steps(fetched, done - len(fetched) + 1, t, skipped_run)
            last = {"step": done, **_summarise(fetched)}
            last.update(
                timer.lap(len(pending), last["train/input_tokens"], padded_per_step * len(pending))
            )
            pending = []
            tr.writer.write(done, {k: v for k, v in last.items() if k != "step"})
            bar.update(done, loss=last["train/loss"], tokens_per_sec=last["perf/tokens_per_sec"])
        if eval_due and not preempted:
            evals = _log_eval(tr, done, guard)
            last.update(evals)
            timer.reset()
            preempted = guard.should_stop(at_sync_point=True)  # a signal during evaluation
        if saving or preempted:
            _save(tr, done, config_dict, evals, force=done == stop or preempted)
        if preempted:
            bar.close()
            tr.checkpointer.wait()
            raise Preempted(done, guard.signame or "a signal")
    bar.close()
    tr.checkpointer.wait()
    return last


def pretrain(
    cfg: Config, *, show_progress: bool = True, until: int | None = None
) -> dict[str, Any]:
    """Sets up (or resumes) a run and trains it to `train.steps` (or to step `until`).

    SIGTERM/SIGINT stop it with a committed checkpoint (`Preempted`).
    """
    # One writer per run directory, held from before the tokenizer is written to the end.
    lock = hold_run_dir(cfg.run_dir, timeout=cfg.distributed.initialization_timeout)
    with SignalGuard() as guard, lock:
        tr = setup(cfg, show_progress=show_progress)
        try:
            return run(tr, show_progress=show_progress, until=until, guard=guard)
        finally:
            try:
                tr.checkpointer.close()  # commits the last save
            finally:
                tr.writer.close()
