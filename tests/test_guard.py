"""Non-finite values and loss spikes: `train.nonfinite` abort/skip and `train.spike_window`."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from plm_jax.checkpoint import Checkpointer
from plm_jax.config import MAX_SPIKE_WINDOW, CheckpointConfig, load_config
from plm_jax.errors import TrainingError
from plm_jax.train import loop
from plm_jax.train.state import TrainState, empty_loss_window
from plm_jax.train.step import Guard, apply_update

TX = optax.adam(0.1)


def toy_state(history=()) -> TrainState:
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    window = empty_loss_window()
    if history:
        window = window.at[-len(history) :].set(jnp.asarray(history, jnp.float32))
    return TrainState(jnp.int32(4), params, TX.init(params), jnp.zeros(2, jnp.uint32), window)


def update(state, losses, guard, grad=1.0):
    grads = {"w": jnp.full((2, 3), grad)}
    return apply_update(state, grads, jnp.asarray(losses, jnp.float32), jnp.float32(1.0), TX, guard)


def assert_same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_skip_leaves_params_and_optimizer_state_unchanged():
    state = toy_state()
    new, metrics = update(state, [1.0, np.nan], Guard(skip_nonfinite=True))
    assert_same(new.params, state.params)
    assert_same(new.opt_state, state.opt_state)
    assert int(new.step) == 5 and float(metrics["train/skipped"]) == 1.0
    assert int(metrics["train/bad_micro"]) == 1  # the second micro-batch held the NaN
    assert_same(new.loss_window, state.loss_window)  # NaN never enters the window
    # An infinite gradient with a finite loss is skipped too.
    new, metrics = update(state, [1.0, 2.0], Guard(skip_nonfinite=True), grad=np.inf)
    assert_same(new.params, state.params) and float(metrics["train/skipped"]) == 1.0


def test_abort_policy_applies_the_update_and_leaves_the_verdict_to_the_loop():
    new, metrics = update(toy_state(), [np.nan], Guard(), grad=np.nan)
    assert np.isnan(np.asarray(new.params["w"])).all()
    assert float(metrics["train/skipped"]) == 0.0 and int(metrics["train/bad_micro"]) == 0
    _, metrics = update(toy_state(), [1.0, 2.0], Guard())
    assert int(metrics["train/bad_micro"]) == -1


def test_a_finite_step_updates_and_enters_the_window():
    state = toy_state()
    new, metrics = update(state, [0.5, 0.25], Guard(skip_nonfinite=True, spike_window=4))
    assert not np.array_equal(np.asarray(new.params["w"]), np.asarray(state.params["w"]))
    assert float(new.loss_window[-1]) == 0.75 and float(metrics["train/skipped"]) == 0.0


def test_spikes_are_skipped_against_the_rolling_window():
    history = [2.0, 2.1, 1.9, 2.0, 2.05, 1.95, 2.0, 2.0]  # mean 2.0, std ~0.056
    guard = Guard(spike_window=8, spike_zscore=6.0)
    state = toy_state(history)
    spiked, metrics = update(state, [3.0], guard)
    assert float(metrics["train/skipped"]) == 1.0
    assert_same(spiked.params, state.params)
    assert float(spiked.loss_window[-1]) == 3.0  # a spike still enters: a real shift adapts
    normal, metrics = update(state, [2.2], guard)
    assert float(metrics["train/skipped"]) == 0.0
    # Until the window is full, nothing is skipped.
    _, metrics = update(toy_state(history[:5]), [30.0], guard)
    assert float(metrics["train/skipped"]) == 0.0


def test_the_loss_window_survives_a_checkpoint(tmp_path):
    state = toy_state([1.0, 2.0, 3.0])
    ck = Checkpointer(tmp_path, CheckpointConfig(use_async=False))
    ck.save(4, state, {}, {})
    restored, _, _ = ck.restore(4, jax.eval_shape(lambda: state))
    ck.close()
    assert restored.loss_window.shape == (MAX_SPIKE_WINDOW,)
    assert_same(restored.loss_window, state.loss_window)


def nan_at(monkeypatch, *bad_steps: int):
    """Makes the loss weights of the batches of `bad_steps` NaN (corrupt batches). The first
    batch sharded is the step-0 evaluation's (train.eval_batches=1); then step 1's, ..."""
    real, calls = loop.shard_batch, [0]

    def shard(local, mesh, rows):
        calls[0] += 1
        if calls[0] - 1 in bad_steps:
            local = {**local, "weights": np.full_like(local["weights"], np.nan)}
        return real(local, mesh, rows)

    monkeypatch.setattr(loop, "shard_batch", shard)


def tiny_cfg(tmp_path, small_corpus, small_tokenizer, *extra):
    return load_config(
        None,
        [
            f"data.source={small_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
            f"tokenizer.path={small_tokenizer.path}",
            "model.max_seq_len=32",
            "model.num_layers=1",
            "model.embed_dim=32",
            "train.batch_size=8",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.log_every=2",
            "train.eval_every=4",
            "train.eval_batches=1",
            "checkpoint.save_every=1",
            "checkpoint.use_async=false",
            *extra,
        ],
    )


def all_finite(run_dir, step) -> bool:
    ck = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    try:
        meta = ck.read_metadata(step)
        state, _, _ = ck.restore(
            step, jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
        )
    finally:
        ck.close()
    return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


@pytest.mark.faults  # a pretraining run each: CI's second step
def test_abort_names_the_step_and_batch_and_saves_nothing_non_finite(
    tmp_path, small_corpus, small_tokenizer, monkeypatch
):
    cfg = tiny_cfg(tmp_path, small_corpus, small_tokenizer, "train.log_every=4")
    nan_at(monkeypatch, 3)
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step 3 \(batch 2 "):
        loop.pretrain(cfg, show_progress=False)
    ck = Checkpointer(cfg.run_dir, cfg.checkpoint, read_only=True)
    steps = ck.all_steps()
    ck.close()
    assert steps == [1, 2]  # step 3 was never saved, though save_every=1
    assert all(all_finite(cfg.run_dir, s) for s in steps)


@pytest.mark.faults  # a pretraining run each: CI's second step
def test_skip_goes_on_and_the_skipped_step_changes_nothing(
    tmp_path, small_corpus, small_tokenizer, monkeypatch
):
    cfg = tiny_cfg(tmp_path, small_corpus, small_tokenizer, "train.nonfinite=skip")
    nan_at(monkeypatch, 3)
    result = loop.pretrain(cfg, show_progress=False)
    assert result["step"] == 4 and np.isfinite(result["train/loss"])
    records = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["train/skipped"] for r in records if "train/skipped" in r}
    assert skipped == {1: 0.0, 2: 0.0, 3: 1.0, 4: 0.0}  # every step is logged: save_every=1
    ck = Checkpointer(cfg.run_dir, cfg.checkpoint, read_only=True)
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), ck.read_metadata(2))
    before, after = ck.restore(2, abstract)[0], ck.restore(3, abstract)[0]
    ck.close()
    assert_same(before["params"], after["params"])
    assert_same(before["opt_state"], after["opt_state"])
    assert int(after["step"]) == 3


@pytest.mark.faults  # a pretraining run each: CI's second step
def test_too_many_consecutive_skips_abort(tmp_path, small_corpus, small_tokenizer, monkeypatch):
    cfg = tiny_cfg(
        tmp_path, small_corpus, small_tokenizer, "train.nonfinite=skip", "train.max_skipped=1"
    )
    nan_at(monkeypatch, 2, 3)
    with pytest.raises(TrainingError, match=r"2 consecutive steps skipped up to step 3"):
        loop.pretrain(cfg, show_progress=False)
