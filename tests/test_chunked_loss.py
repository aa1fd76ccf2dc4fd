"""`train.loss_chunk`: the head and loss computed a chunk of positions at a time equal the
plain path (loss and gradients), use less compiled memory, and bad values are refused."""

from __future__ import annotations

import dataclasses
import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from plm_jax.config import ConfigError, MeshConfig, ModelConfig, TrainConfig, load_config
from plm_jax.models import build_model
from plm_jax.sharding import batch_sharding, make_mesh, use_mesh
from plm_jax.train.optimizer import lr_schedule
from plm_jax.train.state import init_train_state, model_graphdef
from plm_jax.train.step import (
    _forward_loss,
    chunked_next_token_loss,
    eval_step,
    next_token_loss,
    train_step,
)
from tests.numerics import assert_close, assert_not_close, f32_bound

SMALL = ModelConfig(vocab_size=256, num_layers=1, embed_dim=32, num_heads=4, max_seq_len=24)
ROWS, SEQ = 4, 24


def make_batch(seed: int = 0, vocab: int = 256, rows: int = ROWS, seq: int = SEQ):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, (rows, seq + 1)).astype(np.int32)
    weights = np.ones((rows, seq), np.float32)
    segments = np.ones((rows, seq), np.int32)
    weights[0, seq // 2 :] = segments[0, seq // 2 :] = 0  # a half-padded row
    weights[1, 5] = 0  # a cross-document target
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": weights,
        "segment_ids": segments,
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
    }


@functools.cache
def loss_and_grads(tied: bool, chunk: int, shift: int = 0):
    """Loss and {"embed/embedding": gradient, ...} of SMALL on `make_batch()`, its targets
    rolled by `shift` positions."""
    cfg = dataclasses.replace(SMALL, tie_embeddings=tied)
    batch = make_batch()
    batch["targets"] = np.roll(batch["targets"], shift, axis=1)
    graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    fn = partial(_forward_loss, graphdef=graphdef, batch=batch, key=None, loss_chunk=chunk)
    loss, grads = jax.jit(jax.value_and_grad(fn))(params)
    flat = nnx.to_flat_state(grads)
    return float(loss), {"/".join(map(str, path)): np.asarray(v) for path, v in flat}


# Bounds, in float32 ulps of the values' scale. The loss is a sum of ~90 per-token losses of
# ~5.5 nats: chunking changes only the order of that sum (a scan over chunks of XLA
# reductions), worth a few ulps of the total; 8 leaves room for each per-token logsumexp
# being rounded differently when XLA tiles the [C, V] matmul differently from the [L, V] one
# (measured: under 1 ulp). Gradients sum the same per-token contributions over chunks in
# another order; each array is compared at its own scale, and 16 ulps covers sums of ~90
# terms of mixed sign (measured: at most 5.4 ulps, in b_q), still far below the change an
# off-by-one target makes (assert_not_close). The key bias's gradient is analytically zero
# (it adds the same q.b_k to every score of a query, which softmax ignores): both programs
# give rounding noise there, bounded at the scale of the largest gradient instead.
LOSS_ULPS, GRAD_ULPS = 8, 16
ZERO_GRADIENTS = ("b_k",)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [8, 10])  # divides 24; leaves a remainder of 4
def test_loss_and_grads_equal_the_plain_path(tied, chunk):
    plain_loss, plain_grads = loss_and_grads(tied, 0)
    loss, grads = loss_and_grads(tied, chunk)
    assert_close(loss, plain_loss, ulps=LOSS_ULPS)
    assert plain_grads.keys() == grads.keys() and len(grads) > 10
    scale = max(np.abs(g).max() for g in plain_grads.values())
    for name, g in grads.items():
        if name.endswith(ZERO_GRADIENTS):
            assert max(np.abs(g).max(), np.abs(plain_grads[name]).max()) <= f32_bound(
                scale, GRAD_ULPS
            ), name
            continue
        assert_close(g, plain_grads[name], ulps=GRAD_ULPS, err_msg=name)


@pytest.mark.parametrize("tied", [True, False])
def test_the_bounds_reject_an_off_by_one_target(tied):
    """Targets rolled by one position (a classic off-by-one) through the chunked path: the
    bounds above reject its loss and gradients."""
    plain_loss, plain_grads = loss_and_grads(tied, 0)
    wrong_loss, wrong_grads = loss_and_grads(tied, 10, shift=1)
    assert_not_close(wrong_loss, plain_loss, ulps=LOSS_ULPS)
    for name in ("embed/embedding", "blocks/0/mlp/w_in"):
        assert_not_close(wrong_grads[name], plain_grads[name], ulps=GRAD_ULPS)


def test_label_smoothing_and_literal_chunks():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 7)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (2, 7)), jnp.float32)
    head = lambda h: h @ w  # noqa: E731 - a linear head [B, C, D] -> [B, C, V]

    @partial(jax.jit, static_argnums=(0, 1))
    def chunked(chunk, smoothing):
        return chunked_next_token_loss(hidden, head, targets, weights, chunk, smoothing)

    for smoothing in (0.0, 0.1):
        plain = next_token_loss(head(hidden), targets, weights, smoothing)
        for chunk in (1, 3, 7, 9):  # 9 > the 7 positions: one chunk
            assert_close(chunked(chunk, smoothing), plain, ulps=LOSS_ULPS)  # 14 terms reordered
    # By hand, one chunk of one position: -log softmax(logits)[target].
    one = chunked_next_token_loss(hidden[:1, :1], head, targets[:1, :1], jnp.ones((1, 1)), 4)
    logits = np.asarray(head(hidden[:1, :1]), np.float64)[0, 0]
    expected = np.log(np.exp(logits).sum()) - logits[int(targets[0, 0])]
    np.testing.assert_allclose(float(one), expected, rtol=1e-5)


def test_sharded_train_and_eval_steps_equal_the_plain_path():
    """On a data x fsdp x tensor mesh (vocab sharded over tensor), one train step with chunks
    gives the plain step's loss, gradient norm and parameters."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    train_cfg = TrainConfig(lr=1e-3, warmup_steps=0, steps=10)
    tx = optax.sgd(1.0)
    graphdef, _ = model_graphdef(SMALL)
    batch = make_batch(rows=8)
    results = []
    with use_mesh(mesh):
        for chunk in (0, 10):
            state, shardings = init_train_state(SMALL, tx, mesh, 0)
            step = partial(
                train_step,
                graphdef=graphdef,
                tx=tx,
                schedule=lr_schedule(train_cfg),
                grad_accum=1,
                use_dropout=False,
                loss_chunk=chunk,
            )
            jitted = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)))
            new, metrics = jitted(state, batch)
            evals = jax.jit(partial(eval_step, graphdef=graphdef, loss_chunk=chunk))(
                state.params, batch
            )
            results.append((metrics, new.params, evals))
    (plain, plain_params, plain_eval), (chunked, params, evals) = results
    for key in ("train/loss", "train/grad_norm"):
        assert_close(chunked[key], plain[key], ulps=LOSS_ULPS, err_msg=key)
    assert_close(evals["loss_sum"], plain_eval["loss_sum"], ulps=LOSS_ULPS)
    # SGD with learning rate 1: the new parameters carry the gradients' differences (b_k:
    # zero minus rounding noise, see ZERO_GRADIENTS).
    paths = jax.tree_util.tree_leaves_with_path(plain_params)
    for (path, want), got in zip(paths, jax.tree.leaves(params), strict=True):
        if "'b_k'" not in jax.tree_util.keystr(path):
            assert_close(got, want, ulps=GRAD_ULPS, err_msg=jax.tree_util.keystr(path))


# Compiled memory of the loss and its gradient at a 32k vocabulary and 2 x 1024 tokens. The
# whole float32 logits are 2 * 1024 * 32768 * 4 B = 256 MiB, and their gradient as much again;
# in chunks of 128 positions one chunk is 32 MiB. Measured 2026-12-08 (2-core Xeon, XLA CPU):
# temp 574.6 MiB plain, 127.1 MiB with loss_chunk=128 (4.5x less); the test asserts 3x.
BIG = ModelConfig(vocab_size=32768, num_layers=1, embed_dim=64, num_heads=2, max_seq_len=1024)


def test_chunks_shrink_compiled_memory():
    graphdef, params = nnx.split(build_model(BIG, rngs=nnx.Rngs(0)), nnx.Param)
    batch = make_batch(vocab=BIG.vocab_size, rows=2, seq=1024)
    temp = {}
    for chunk in (0, 128):
        fn = partial(_forward_loss, graphdef=graphdef, batch=batch, key=None, loss_chunk=chunk)
        compiled = jax.jit(jax.value_and_grad(fn)).lower(params).compile()
        temp[chunk] = compiled.memory_analysis().temp_size_in_bytes
    logits_bytes = 2 * 1024 * BIG.vocab_size * 4
    assert temp[0] > 2 * logits_bytes  # the plain path holds the logits and their gradient
    assert temp[0] > 3 * temp[128], temp


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.loss_chunk=-1"], r"train.loss_chunk=-1 must be >= 0"),
        (
            ["train.loss_chunk=64", "model.preset=bert-tiny"],
            r"train.loss_chunk=64 chunks the next-token loss of decoder pretraining; "
            r"model.family=encoder",
        ),
        (
            ["train.loss_chunk=64", "task.name=classification"],
            r"task.name=classification computes its loss from the whole logits",
        ),
    ],
)
def test_bad_loss_chunk_is_a_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_loss_chunk_is_read_and_may_change_on_resume():
    assert load_config(overrides=["train.loss_chunk=512"]).train.loss_chunk == 512
    assert TrainConfig().loss_chunk == 0
    from plm_jax.config import RESUMABLE_KEYS

    assert "train.loss_chunk" in RESUMABLE_KEYS  # same math, another summation order


@pytest.mark.e2e
def test_pretrain_with_loss_chunk_follows_the_plain_run(tmp_path, small_corpus, small_tokenizer):
    """`plm-jax pretrain train.loss_chunk=N` through the real loop (train and eval steps):
    the logged losses equal the plain run's to float32 rounding. Measured: at most 1.9 ulps
    over 6 Adam steps; 16 leaves room for Adam's g/sqrt(v) amplifying rounding differences in
    near-zero gradients from step to step."""
    from plm_jax.metrics import read_metrics
    from plm_jax.train import loop

    records = {}
    for chunk in (0, 12):  # 32 positions: chunks of 12, 12 and a padded 8
        overrides = [
            f"data.source={small_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / str(chunk)}",
            f"tokenizer.path={small_tokenizer.path}",
            "model.max_seq_len=32",
            "model.num_layers=1",
            "model.embed_dim=32",
            "train.batch_size=8",
            "train.steps=6",
            "train.warmup_steps=2",
            "train.log_every=1",
            "train.eval_every=3",
            "train.eval_batches=2",
            f"train.loss_chunk={chunk}",
        ]
        loop.pretrain(load_config(None, overrides), show_progress=False)
        records[chunk] = read_metrics(tmp_path / str(chunk))
    for key in ("train/loss", "eval/loss"):
        plain = [r[key] for r in records[0] if key in r]
        chunked = [r[key] for r in records[12] if key in r]
        assert len(plain) == len(chunked) >= 2, key
        assert_close(chunked, plain, ulps=16, err_msg=key)
    assert [r["train/loss"] for r in records[0] if "train/loss" in r][0] == pytest.approx(
        np.log(512), abs=0.5
    )
