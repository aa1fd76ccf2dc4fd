"""Training: optimizer, gradient accumulation, sharded state, exact resume, bad checkpoints."""

import json
import shutil

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from plm_jax.config import MeshConfig, ModelConfig, TrainConfig, load_config
from plm_jax.errors import DataError, TrainingError
from plm_jax.metrics import read_metrics
from plm_jax.sharding import batch_sharding, make_mesh, use_mesh
from plm_jax.train import loop
from plm_jax.train.optimizer import decay_mask, lr_schedule, make_optimizer
from plm_jax.train.state import init_train_state, model_graphdef
from plm_jax.train.step import train_step
from tests.numerics import assert_close

TINY = ModelConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=16)


def test_lr_schedule_warmup_then_cosine_to_floor():
    sched = lr_schedule(TrainConfig(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1))
    np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(sched(60), 0.1 + 0.9 * 0.5, atol=1e-6)  # halfway: cos = 0
    np.testing.assert_allclose(sched(110), 0.1, atol=1e-6)
    lin = lr_schedule(
        TrainConfig(lr=1.0, warmup_steps=0, steps=100, lr_schedule="linear", min_lr_ratio=0.0)
    )
    np.testing.assert_allclose(lin(50), 0.5, atol=1e-6)


def test_weight_decay_skips_norms_and_biases():
    _, params = model_graphdef(TINY)
    mask = decay_mask(params)
    assert mask["blocks"][0]["attn"]["w_q"].value is True
    assert mask["blocks"][0]["attn"]["b_q"].value is False
    assert mask["final_norm"]["scale"].value is False
    assert mask["embed"]["embedding"].value is True


def random_batch(rng, rows, seq, vocab, pad_rows=0):
    tokens = rng.integers(1, vocab, (rows, seq + 1)).astype(np.int32)
    weights = np.ones((rows, seq), np.float32)
    segments = np.ones((rows, seq), np.int32)
    weights[:pad_rows, seq // 2 :] = 0  # some rows half padding
    segments[:pad_rows, seq // 2 :] = 0
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": weights,
        "segment_ids": segments,
        "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (rows, seq)).copy(),
    }


def step_fn(grad_accum, train_cfg, model_cfg=TINY, dropout=False):
    graphdef, _ = model_graphdef(model_cfg)
    return jax.jit(
        lambda s, b: train_step(
            s,
            b,
            graphdef=graphdef,
            tx=make_optimizer(train_cfg),
            schedule=lr_schedule(train_cfg),
            grad_accum=grad_accum,
            use_dropout=dropout,
        )
    )


def test_grad_accumulation_matches_one_big_batch_with_padding():
    # SGD, so the update is linear in the gradient: Adam's g/sqrt(v) would turn float noise in
    # analytically-zero gradients (e.g. key biases, which softmax ignores) into O(lr) updates.
    train_cfg = TrainConfig(lr=1e-2, warmup_steps=0, steps=10)
    tx = optax.sgd(1.0)
    mesh = make_mesh(MeshConfig())
    graphdef, _ = model_graphdef(TINY)
    batch = random_batch(np.random.default_rng(0), 8, 16, 128, pad_rows=3)
    results = {}
    for accum in (1, 4):
        state, _ = init_train_state(TINY, tx, mesh, seed=0)
        fn = jax.jit(
            lambda s, b, a=accum: train_step(
                s,
                b,
                graphdef=graphdef,
                tx=tx,
                schedule=lr_schedule(train_cfg),
                grad_accum=a,
                use_dropout=False,
            )
        )
        results[accum] = fn(state, batch)
    (one, m1), (four, m4) = results[1], results[4]
    # One sum against four partial sums: the order differs, so a few ulps of the loss.
    assert_close(m1["train/loss"], m4["train/loss"], ulps=16)
    np.testing.assert_allclose(m1["train/grad_norm"], m4["train/grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_overfits_one_batch():
    train_cfg = TrainConfig(
        lr=1e-2, warmup_steps=0, steps=60, weight_decay=0.0, lr_schedule="constant"
    )
    state, _ = init_train_state(TINY, make_optimizer(train_cfg), make_mesh(MeshConfig()), 0)
    batch = random_batch(np.random.default_rng(1), 4, 16, 128)
    fn = step_fn(1, train_cfg)
    first = None
    for _ in range(60):
        state, m = fn(state, batch)
        first = first if first is not None else float(m["train/loss"])
    assert first == pytest.approx(np.log(128), abs=0.2)  # uniform at init
    assert float(m["train/loss"]) < 0.5


def test_dropout_key_follows_the_step():
    cfg = ModelConfig(**{**TINY.__dict__, "dropout": 0.3})
    train_cfg = TrainConfig(lr=1e-3, warmup_steps=0, steps=10)
    tx = make_optimizer(train_cfg)
    batch = random_batch(np.random.default_rng(2), 4, 16, 128)
    fn = step_fn(1, train_cfg, cfg, dropout=True)
    outs = []
    for _ in range(2):
        state, _ = init_train_state(cfg, tx, make_mesh(MeshConfig()), 0)
        state, m = fn(state, batch)
        outs.append(float(m["train/loss"]))
    assert outs[0] == outs[1]  # same step, same key: reproducible
    _, m2 = fn(state, batch)
    assert float(m2["train/loss"]) != outs[0]


def test_sharded_state_on_2x4_mesh_keeps_its_layout():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    train_cfg = TrainConfig(lr=1e-3, warmup_steps=0, steps=10)
    tx = make_optimizer(train_cfg)
    with use_mesh(mesh):
        state, shardings = init_train_state(TINY, tx, mesh, 0)
        p = state.params
        assert p["embed"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")
        assert p["blocks"][0]["attn"]["w_q"].sharding.spec == PartitionSpec("fsdp", "tensor", None)
        assert p["blocks"][0]["mlp"]["w_in"].sharding.spec == PartitionSpec("fsdp", "tensor")
        assert p["blocks"][0]["mlp"]["w_out"].sharding.spec == PartitionSpec("tensor", "fsdp")
        # each device holds a slice, never the whole matrix
        shard = p["blocks"][0]["mlp"]["w_in"].addressable_shards[0].data
        assert shard.shape == (32 // 2, 128 // 4)
        graphdef, _ = model_graphdef(TINY)
        jitted = jax.jit(
            lambda s, b: train_step(
                s,
                b,
                graphdef=graphdef,
                tx=tx,
                schedule=lr_schedule(train_cfg),
                grad_accum=2,
                use_dropout=False,
            ),
            in_shardings=(shardings, batch_sharding(mesh)),
            out_shardings=(shardings, None),
            donate_argnums=0,
        )
        batch = random_batch(np.random.default_rng(3), 8, 16, 128)
        new, _ = jitted(state, batch)
    for a, s in zip(jax.tree.leaves(new), jax.tree.leaves(shardings), strict=True):
        assert a.sharding == s


# ---------------------------------------------------------------------------------------------
# End to end on the real loop: resume and bad checkpoints.


def run_config(tmp_path, corpus, tokenizer, steps, *extra, name="run"):
    return load_config(
        None,
        [
            f"data.source={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / name}",
            f"tokenizer.path={tokenizer.path}",
            "model.max_seq_len=32",
            "model.num_layers=1",
            "model.embed_dim=32",
            "train.batch_size=8",
            f"train.steps={steps}",
            "train.warmup_steps=2",
            "train.log_every=1",
            "train.eval_every=1000",
            "train.eval_batches=2",
            "checkpoint.save_every=4",
            "model.dropout=0.1",
            *extra,
        ],
    )


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d["train/loss"] for d in lines if "train/loss" in d}


def final_params(cfg, with_paths=False):
    tr = loop.setup(cfg, show_progress=False)
    leaves = jax.tree_util.tree_flatten_with_path(tr.state.params)[0]
    tr.checkpointer.close()
    if with_paths:
        return [(jax.tree_util.keystr(p), np.asarray(x)) for p, x in leaves]
    return [np.asarray(x) for _, x in leaves]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_corpus, small_tokenizer):
    tmp = tmp_path_factory.mktemp("resume")
    cfg = run_config(tmp, small_corpus, small_tokenizer, 40, name="whole")
    loop.pretrain(cfg, show_progress=False)
    return tmp, losses(tmp / "whole"), final_params(cfg)


@pytest.mark.e2e
def test_resume_is_bit_identical(uninterrupted, small_corpus, small_tokenizer):
    tmp, whole, whole_params = uninterrupted
    loop.pretrain(
        run_config(tmp, small_corpus, small_tokenizer, 40, name="split"),
        show_progress=False,
        until=23,
    )  # stops as an interrupted run would, 3 steps after its last checkpoint (20)
    shutil.rmtree(tmp / "split" / "checkpoints" / "23")
    cfg = run_config(tmp, small_corpus, small_tokenizer, 40, name="split")
    loop.pretrain(cfg, show_progress=False)  # resumes from the step-20 checkpoint
    assert losses(tmp / "split") == whole  # exact, step by step
    steps = [r["step"] for r in read_metrics(tmp / "split") if "train/loss" in r]
    assert steps == sorted(set(steps))  # records past the checkpoint were not kept twice
    for a, b in zip(final_params(cfg), whole_params, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.e2e
def test_resume_on_another_mesh(uninterrupted, small_corpus, small_tokenizer):
    tmp, whole, whole_params = uninterrupted
    loop.pretrain(
        run_config(tmp, small_corpus, small_tokenizer, 40, name="mesh"),
        show_progress=False,
        until=20,
    )
    cfg = run_config(
        tmp,
        small_corpus,
        small_tokenizer,
        40,
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
        name="mesh",
    )
    loop.pretrain(cfg, show_progress=False)
    resumed = losses(tmp / "mesh")
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, 41)], [whole[s] for s in range(1, 41)], rtol=1e-5
    )
    for (path, a), b in zip(final_params(cfg, with_paths=True), whole_params, strict=True):
        if "b_k" in path:
            # The key bias adds q.b_k to every logit of a row, which softmax ignores: its
            # gradient is analytically zero, and Adam scales the float noise left in it up to
            # steps of ~lr * 1e-3. Both runs keep it at that noise level.
            assert np.abs(a).max() < 1e-4 and np.abs(b).max() < 1e-4
            continue
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=path)


def test_incompatible_checkpoint_is_refused_naming_shapes(
    uninterrupted, small_corpus, small_tokenizer
):
    tmp, _, _ = uninterrupted
    cfg = run_config(tmp, small_corpus, small_tokenizer, 12, "model.embed_dim=64", name="whole")
    with pytest.raises(DataError, match=r"does not fit this model .*\(32,\) vs model \(64,\)"):
        loop.setup(cfg, show_progress=False)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, small_corpus, small_tokenizer):
    cfg = run_config(
        tmp_path,
        small_corpus,
        small_tokenizer,
        6,
        "train.lr=1e30",
        "train.grad_clip=0",
        "train.log_every=5",
        name="nan",
    )
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step"):
        loop.pretrain(cfg, show_progress=False)
    assert not list((tmp_path / "nan" / "checkpoints").glob("[0-9]*"))  # nothing non-finite saved


def test_gqa_with_fewer_kv_heads_than_tensor_devices():
    cfg = ModelConfig(
        vocab_size=128,
        num_layers=1,
        embed_dim=32,
        num_heads=4,
        num_kv_heads=2,
        max_seq_len=16,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        use_bias=False,
    )
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    state, _ = init_train_state(cfg, make_optimizer(TrainConfig()), mesh, 0)
    w_k = state.params["blocks"][0]["attn"]["w_k"]
    assert w_k.sharding.spec == PartitionSpec("fsdp", None, None)


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path, tiny_run):
    from plm_jax.api import load
    from plm_jax.config import load_config as load_yaml

    source = load(tiny_run)  # 1 layer, 32 wide, trained 4 steps
    cfg = load_config(
        None,
        [
            f"init_from={tiny_run}",
            f"data.source={source.config.data.source}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'ft'}",
            "train.batch_size=8",
            "train.steps=3",
            "train.warmup_steps=1",
            "checkpoint.save_every=2",
            "train.eval_every=1000",
            "model.dropout=0.1",  # runtime settings stay the new run's own
        ],
    )
    tr = loop.setup(cfg, show_progress=False)
    try:
        assert tr.model_cfg.num_layers == 1 and tr.model_cfg.embed_dim == 32
        assert tr.model_cfg.dropout == 0.1
        assert int(tr.state.step) == 0
        got = jax.tree.leaves(jax.device_get(tr.state.params))
        want = jax.tree.leaves(jax.device_get(nnx_params(source.model)))
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)
        mu = jax.tree.leaves(jax.device_get(tr.state.opt_state))
        assert all(not np.any(x) for x in mu if np.ndim(x) > 0)  # fresh optimizer moments
        loop.run(tr, show_progress=False, until=2)
    finally:
        tr.checkpointer.wait()
        tr.checkpointer.close()
        tr.writer.close()
    saved = load_yaml(tmp_path / "ft" / "config.yaml")
    assert saved.model.num_layers == 1 and saved.tokenizer.path  # the real model is recorded
    # Resuming with the same command continues the new run from its own checkpoint.
    final = loop.pretrain(cfg, show_progress=False)
    assert final["step"] == 3


def nnx_params(model):
    from flax import nnx

    return nnx.state(model, nnx.Param)


def test_init_from_a_missing_path_is_a_clear_error(tmp_path, small_corpus, small_tokenizer):
    cfg = run_config(tmp_path, small_corpus, small_tokenizer, 4, "init_from=runs/x", name="i")
    with pytest.raises(DataError, match=r"'runs/x' does not exist"):
        loop.setup(cfg, show_progress=False)
