"""Mixed precision: `model.dtype=auto` (bfloat16 compute on accelerators, float32 on CPU, float32
master weights everywhere), user-given dtypes honoured, bfloat16 first moments
(`train.mu_dtype`), and the quick start's loss in bfloat16 against float32 (slow)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from plm_jax.config import (
    MODEL_PRESETS,
    ConfigError,
    ModelConfig,
    TrainConfig,
    load_config,
)
from plm_jax.models import Decoder, build_model, count_params, resolve_model_config
from plm_jax.models.sizes import resolve_compute_dtype
from plm_jax.train.optimizer import lr_schedule, make_optimizer
from plm_jax.train.state import abstract_train_state, model_graphdef
from plm_jax.train.step import train_step

TINY = ModelConfig(vocab_size=128, num_layers=2, embed_dim=32, num_heads=4, max_seq_len=16)


def test_auto_is_bfloat16_on_accelerators_and_float32_on_cpu():
    assert ModelConfig().dtype == "auto" and ModelConfig().param_dtype == "float32"
    assert [resolve_compute_dtype("auto", p) for p in ("cpu", "gpu", "cuda", "tpu")] == [
        "float32",
        "bfloat16",
        "bfloat16",
        "bfloat16",
    ]
    # A value the user gives is kept on every platform.
    for dtype in ("float32", "bfloat16", "float16"):
        assert {resolve_compute_dtype(dtype, p) for p in ("cpu", "gpu", "tpu")} == {dtype}
    assert jax.default_backend() == "cpu"  # the suite's fake devices
    assert resolve_model_config(TINY).dtype == "float32"
    assert load_config().model.dtype == "auto"
    assert load_config(overrides=["model.dtype=bfloat16"]).model.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"model.dtype='bf16' is not allowed.*'auto'"):
        load_config(overrides=["model.dtype=bf16"])


def test_bfloat16_compute_keeps_float32_weights_and_logits():
    tokens = jnp.ones((2, 8), jnp.int32)
    model = Decoder(dataclasses.replace(TINY, dtype="bfloat16"), rngs=nnx.Rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}  # the master copy
    out = jax.eval_shape(lambda: model(tokens))  # shapes and dtypes only: no compute
    assert (out.hidden.dtype, out.logits.dtype) == (jnp.bfloat16, jnp.float32)
    cpu = Decoder(TINY, rngs=nnx.Rngs(0))  # auto on CPU
    assert (cpu.cfg.dtype, jax.eval_shape(lambda: cpu(tokens)).hidden.dtype) == (
        "float32",
        jnp.float32,
    )


def _moments(opt_state):
    """(mu, nu) of the AdamW state inside clip -> adamw chain."""
    adam = next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")))
    return adam.mu, adam.nu


def _step_memory(train_cfg: TrainConfig):
    """The compiled train step's memory analysis, lowered from the state's shapes."""
    tx = make_optimizer(train_cfg)
    graphdef, _ = model_graphdef(TINY)
    step = partial(
        train_step,
        graphdef=graphdef,
        tx=tx,
        schedule=lr_schedule(train_cfg),
        grad_accum=1,
        use_dropout=False,
    )
    batch = {
        k: jax.ShapeDtypeStruct((2, 16), jnp.float32 if k == "weights" else jnp.int32)
        for k in ("inputs", "targets", "weights", "segment_ids", "positions")
    }
    state = abstract_train_state(TINY, tx)
    return jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis(), state


def test_bfloat16_first_moment_state_and_memory():
    base = TrainConfig(steps=10, warmup_steps=0)
    assert load_config(overrides=["train.mu_dtype=bfloat16"]).train.mu_dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"train.mu_dtype='bf16' is not allowed"):
        load_config(overrides=["train.mu_dtype=bf16"])
    memory32, state32 = _step_memory(base)
    memory16, state16 = _step_memory(dataclasses.replace(base, mu_dtype="bfloat16"))
    mu, nu = _moments(state16.opt_state)
    assert {x.dtype for x in jax.tree.leaves(mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(nu)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(_moments(state32.opt_state)[0])} == {
        jnp.dtype(jnp.float32)
    }
    assert {x.dtype for x in jax.tree.leaves(state16.params)} == {jnp.dtype(jnp.float32)}
    # The state (an argument, donated) shrinks by 2 bytes per parameter, the first moment's
    # halving; the rest of the state is unchanged.
    saved = memory32.argument_size_in_bytes - memory16.argument_size_in_bytes
    assert saved == 2 * count_params(TINY), (saved, count_params(TINY))


def test_bfloat16_first_moment_is_the_float32_one_rounded():
    """After a step, mu = (1 - b1) * g rounded to bfloat16; the update is the same to within
    that rounding, and the float32 master weights take it."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    grads = {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.float32)}
    results = []
    for mu_dtype in ("float32", "bfloat16"):
        tx = make_optimizer(TrainConfig(steps=10, warmup_steps=0, mu_dtype=mu_dtype))
        updates, state = tx.update(grads, tx.init(params), params)
        results.append((updates["w"], _moments(state)[0]["w"]))
    (update32, mu32), (update16, mu16) = results
    assert (mu16.dtype, update16.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_array_equal(np.asarray(mu16), np.asarray(mu32.astype(jnp.bfloat16)))
    # Step 1 uses the float32 moment before storing it: the first update is identical.
    np.testing.assert_array_equal(np.asarray(update16), np.asarray(update32))


def test_mu_dtype_keeps_the_default_optimizer():
    """mu_dtype '' is optax's default (the parameters' dtype): bf16 params keep bf16 moments."""
    params = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    mu, _ = _moments(make_optimizer(TrainConfig()).init(params))
    assert mu["w"].dtype == jnp.bfloat16
    mu, _ = _moments(make_optimizer(TrainConfig(mu_dtype="float32")).init(params))
    assert mu["w"].dtype == jnp.float32
    assert isinstance(make_optimizer(TrainConfig()), optax.GradientTransformation)


def _quickstart_eval_loss(tmp_path, dtype: str) -> float:
    run = tmp_path / dtype
    cmd = [sys.executable, "-m", "plm_jax.cli", "pretrain", f"run.dir={run}"]
    cmd += [f"data.cache_dir={tmp_path / 'cache'}", f"model.dtype={dtype}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert evals[-1]["step"] == 600
    return evals[-1]["eval/loss"]


@pytest.mark.slow
def test_quickstart_bfloat16_eval_loss_is_within_0_05_nats_of_float32(tmp_path):
    """The quick start twice (about 5 minutes each on 2 cores): bfloat16 compute with float32
    weights ends within 0.05 nats of float32 compute (docs/training.md has the numbers)."""
    f32 = _quickstart_eval_loss(tmp_path, "float32")
    bf16 = _quickstart_eval_loss(tmp_path, "bfloat16")
    assert abs(bf16 - f32) <= 0.05, (f32, bf16)
    assert f32 < 5.0  # the run learned (log 4096 = 8.3 at the start)


def test_build_model_resolves_auto_for_every_family():
    t5 = ModelConfig(**{**MODEL_PRESETS["t5-tiny"], "vocab_size": 64})
    for cfg in (TINY, dataclasses.replace(TINY, family="encoder"), t5):
        assert cfg.dtype == "auto"
        model = nnx.eval_shape(lambda cfg=cfg: build_model(cfg, rngs=nnx.Rngs(0)))
        assert model.cfg.dtype == "float32"
