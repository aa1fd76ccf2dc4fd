"""Attention kernels that respect packing: splash equals XLA, `auto` picks per platform, and
the train step with splash compiles for a TPU slice.

- Splash (`model.attention=splash`, Pallas TPU) runs in the Pallas interpreter on CPU
  (`splash_interpret`, the same kernel and block tables) against XLA's kernel with the dense
  mask: outputs and gradients for causal, padded (left and right), packed (several documents
  per row) and bidirectional masks, MHA, GQA and MQA, unsharded and under a 2x2x2 mesh
  (shard_map over batch and heads). Both run in float32 on CPU; the bound is in float32 ulps
  (tests/numerics.py), and a wrong mask (segments or causality ignored) fails the same bound.
- `choose_attention`: `auto` per platform; a kernel the devices cannot run is refused with a
  ConfigError (and exit code 2 from the CLI), never replaced.
- `tpu_aot` (needs libtpu, the `tpu` extra): `loop.train_step_jit`, the step `pretrain` runs,
  lowered and compiled with attention=splash for compile-only v5e 2x2 devices.

cuDNN's equality tests are `gpu`-marked in tests/test_gpu_path.py (they need a GPU).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from plm_jax.cli import main
from plm_jax.config import Config, MeshConfig, ModelConfig, TrainConfig, validate
from plm_jax.errors import ConfigError
from plm_jax.models import build_model
from plm_jax.models.attention import KERNELS, attention_segments, choose_attention
from plm_jax.sharding import batch_sharding, make_mesh, use_mesh
from tests.numerics import assert_close, assert_not_close

# Each row as runs of (segment id, length); 0 is padding. "padded" has right and left padding,
# so a mask that ignored segment ids would let real queries see padding keys; "packed_96" has a
# length that is not a whole 128-slot tile (splash pads it).
SEGMENT_RUNS = {
    "causal": [[(1, 128)], [(1, 128)]],
    "padded": [[(1, 100), (0, 28)], [(0, 40), (1, 88)]],
    "packed": [[(1, 30), (2, 50), (3, 48)], [(1, 10), (2, 70), (0, 48)]],
    "packed_96": [[(1, 20), (2, 40), (0, 36)], [(0, 16), (1, 50), (2, 30)]],
    "packed_4": [  # four rows, for a mesh that splits rows 4 ways
        [(1, 30), (2, 98)],
        [(1, 128)],
        [(1, 10), (2, 20), (3, 60), (0, 38)],
        [(0, 28), (1, 50), (2, 50)],
    ],
}
NUM_HEADS, HEAD_DIM = 4, 16

# A small Llama-style decoder: GQA, RoPE, RMSNorm, SwiGLU, scanned layers.
LLAMA_TINY = ModelConfig(
    vocab_size=256,
    num_layers=2,
    embed_dim=256,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    max_seq_len=256,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    use_scan_layers=True,
    dtype="bfloat16",
)

# Two programs for one softmax: the kernel rescales an online softmax tile by tile, XLA
# normalises once, and the backward sums dk/dv over query tiles in another order. Measured
# 2026-12-08 on the 2-core Xeon (jax 0.10.2, float32): at most 3 ulps of the values' scale
# for outputs, 4.2 for gradients; 16 allowed. Every wrong mask below is off by O(0.1) of the
# scale, about a million ulps.
ULPS = 16


def _segments(kind: str) -> np.ndarray:
    rows = SEGMENT_RUNS[kind]
    length = sum(n for _, n in rows[0])
    out = np.zeros((len(rows), length), np.int32)
    for b, runs in enumerate(rows):
        out[b] = np.concatenate([np.full(n, s, np.int32) for s, n in runs])
    return out


def _inputs(segments: np.ndarray, num_kv_heads: int, kv_length: int | None = None):
    batch, length = segments.shape
    s = length if kv_length is None else kv_length
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, length, NUM_HEADS, HEAD_DIM), jnp.float32)
    k = jax.random.normal(keys[1], (batch, s, num_kv_heads, HEAD_DIM), jnp.float32)
    v = jax.random.normal(keys[2], (batch, s, num_kv_heads, HEAD_DIM), jnp.float32)
    # Padding queries get no gradient, as in training, where their loss weight is 0.
    real = segments != 0
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32) * real[:, :, None, None]
    return q, k, v, cotangent


def _vjp_fn(kernel: str):
    """(q, k, v, mask, cotangent) -> (out, dq, dk, dv) through KERNELS[kernel]."""

    def run(q, k, v, mask, cotangent):
        out, vjp = jax.vjp(lambda q, k, v: KERNELS[kernel](q, k, v, mask, None), q, k, v)
        return (out, *vjp(cotangent))

    return run


@functools.cache
def _vjp(kernel: str):
    """`_vjp_fn(kernel)` jitted once, for calls outside a mesh."""
    return jax.jit(_vjp_fn(kernel))


def _mask(q_segment, k_segment, *, causal: bool):
    q_index = jnp.arange(q_segment.shape[1])
    k_index = q_index if k_segment is q_segment else jnp.arange(k_segment.shape[1])
    return attention_segments(
        jnp.asarray(q_segment), jnp.asarray(k_segment), q_index, k_index, causal=causal
    )


def _check_equal(got, want, real):
    for name, g, w, rows in zip(
        ("out", "dq", "dk", "dv"), got, want, (real, real, None, None), strict=True
    ):
        g, w = np.asarray(g), np.asarray(w)
        if rows is not None:  # padding queries' outputs are ignored downstream by every kernel
            g, w = g[rows], w[rows]
        assert_close(g, w, ulps=ULPS, err_msg=name)


CASES = {  # id -> (segments, num_kv_heads, causal, wrong variant)
    "causal-mha": ("causal", 4, True, "bidirectional"),
    "padded-gqa": ("padded", 2, True, "segments ignored"),
    "packed-gqa": ("packed", 2, True, "segments ignored"),
    "packed-mqa": ("packed", 1, True, "segments ignored"),
    "bidirectional-packed-96": ("packed_96", 2, False, "segments ignored"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_splash_equals_xla(case):
    kind, num_kv_heads, causal, wrong = CASES[case]
    segments = _segments(kind)
    q, k, v, cotangent = _inputs(segments, num_kv_heads)
    mask = _mask(segments, segments, causal=causal)
    assert mask.is_aligned  # one index array: splash takes it (no fallback to XLA)
    got = _vjp("splash_interpret")(q, k, v, mask, cotangent)
    want = _vjp("xla")(q, k, v, mask, cotangent)
    real = segments != 0
    _check_equal(got, want, real)

    if wrong == "bidirectional":
        bad = _mask(segments, segments, causal=False)
    else:  # every token in one document: attends across documents and to padding
        ones = np.ones_like(segments)
        bad = _mask(ones, ones, causal=causal)
    bad_out = _vjp("xla")(q, k, v, bad, cotangent)[0]
    assert_not_close(np.asarray(bad_out)[real], np.asarray(got[0])[real], ulps=ULPS)


def test_splash_cross_attention_equals_xla():
    # Decoder queries (64, packed) against encoder keys (160, packed and padded), as packed
    # translation pairs give them: each decoder segment has its source segment. No causality,
    # L != S, both lengths padded to whole tiles inside the kernel.
    q_segments = _segments("packed_96")[:, :64]  # rows: 1, 2, pad | pad, 1
    k_segments = np.zeros((2, 160), np.int32)
    k_segments[0, :70], k_segments[0, 70:120] = 1, 2
    k_segments[1, :40], k_segments[1, 40:100] = 2, 1
    q, k, v, cotangent = _inputs(q_segments, 2, kv_length=160)
    mask = _mask(q_segments, k_segments, causal=False)
    assert not mask.is_aligned
    got = _vjp("splash_interpret")(q, k, v, mask, cotangent)
    want = _vjp("xla")(q, k, v, mask, cotangent)
    real = q_segments != 0
    _check_equal(got, want, real)
    assert all(np.isfinite(np.asarray(x)).all() for x in got)  # padding rows included
    bad = _mask(np.ones_like(q_segments), np.ones_like(k_segments), causal=False)
    bad_out = _vjp("xla")(q, k, v, bad, cotangent)[0]
    assert_not_close(np.asarray(bad_out)[real], np.asarray(got[0])[real], ulps=ULPS)


@pytest.mark.parametrize("num_kv_heads", [2, 1])  # kv heads split over tensor; MQA: repeated
def test_splash_under_a_mesh_equals_xla(num_kv_heads):
    # data 2 x fsdp 2 split the 4 rows, tensor 2 the heads: shard_map runs the kernel per device.
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    segments = _segments("packed_4")
    q, k, v, cotangent = _inputs(segments, num_kv_heads)
    mask = _mask(segments, segments, causal=True)
    heads = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    q, cotangent = jax.device_put((q, cotangent), heads)
    k, v = jax.device_put((k, v), heads if num_kv_heads % 2 == 0 else rows)
    with use_mesh(mesh):  # traced under the mesh: the kernel runs inside shard_map
        run = jax.jit(_vjp_fn("splash_interpret"))
        got = run(q, k, v, mask, cotangent)
        hlo = run.lower(q, k, v, mask, cotangent).as_text()
    assert "manual_computation" in hlo  # shard_map's manual region (Shardy)
    assert got[0].sharding.is_equivalent_to(heads, 4)
    want = _vjp("xla")(q, k, v, mask, cotangent)
    _check_equal(got, want, segments != 0)


def test_models_pass_segments_and_kv_buffer_calls_fall_back():
    # The decoder's training layout is aligned (splash runs); a KV-cache step is not (XLA runs).
    seg = jnp.ones((1, 4), jnp.int32)
    idx = jnp.arange(4)
    aligned = attention_segments(seg, seg, idx, idx)
    offset = attention_segments(seg[:, :1], seg, jnp.array([3]), idx)
    assert aligned.is_aligned and not offset.is_aligned
    np.testing.assert_array_equal(offset.dense()[0, 0], [[1, 1, 1, 1]])
    q = jax.random.normal(jax.random.key(1), (1, 1, NUM_HEADS, HEAD_DIM))
    kv = jax.random.normal(jax.random.key(2), (1, 4, 2, HEAD_DIM))
    got = KERNELS["splash_interpret"](q, kv, kv, offset, None)
    np.testing.assert_array_equal(got, KERNELS["xla"](q, kv, kv, offset, None))


@pytest.mark.e2e
def test_decoder_with_splash_equals_xla_under_a_mesh():
    # A small Llama-style decoder (GQA, RoPE) on packed rows, its parameters sharded on the
    # 2x2x2 mesh as training shards them: logits on real tokens and every parameter gradient.
    from plm_jax.train.optimizer import make_optimizer
    from plm_jax.train.state import init_train_state, model_graphdef

    model = dataclasses.replace(LLAMA_TINY, embed_dim=64, head_dim=16, mlp_dim=128, dtype="float32")
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    segments = _segments("packed_4")
    positions = np.zeros_like(segments)
    for b, runs in enumerate(SEGMENT_RUNS["packed_4"]):
        positions[b] = np.concatenate([np.arange(n) if s else np.zeros(n) for s, n in runs])
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, model.vocab_size, (2, *segments.shape), dtype=np.int32)
    weights = (segments != 0).astype(np.float32)
    results = {}
    for attention in ("xla", "splash_interpret"):
        cfg = dataclasses.replace(model, attention=attention)
        with use_mesh(mesh):
            state, _ = init_train_state(cfg, make_optimizer(TrainConfig()), mesh, seed=0)
            graphdef, _ = model_graphdef(cfg)

            def loss_fn(params, graphdef=graphdef):
                logits = nnx.merge(graphdef, params)(
                    tokens, segment_ids=segments, positions=positions
                ).logits
                nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
                return jnp.sum(nll[..., 0] * weights) / jnp.sum(weights), logits

            (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params)
            # The Pallas kernel is in the program (not a fallback to XLA's kernel).
            program = str(jax.make_jaxpr(loss_fn)(state.params))
            assert ("pallas_call" in program) == (attention != "xla")
        results[attention] = (logits, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)]))
    real = segments != 0
    (xla_logits, xla_grads), (splash_logits, splash_grads) = results.values()
    assert_close(np.asarray(splash_logits)[real], np.asarray(xla_logits)[real], ulps=ULPS)
    assert_close(splash_grads, xla_grads, ulps=ULPS)


# ------------------------------------------------------------------------------------------
# Choosing a kernel: auto per platform; a kernel the devices cannot run is refused.

TPU = types.SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")
H100 = types.SimpleNamespace(platform="gpu", device_kind="H100", compute_capability="9.0")
T4 = types.SimpleNamespace(platform="gpu", device_kind="T4", compute_capability="7.5")
CPU = types.SimpleNamespace(platform="cpu", device_kind="cpu")


def choose(name, device, dtype=jnp.bfloat16, head_dim=64):
    return choose_attention(name, dtype=dtype, head_dim=head_dim, device=device)


def test_auto_picks_per_platform():
    assert choose("auto", TPU) == "splash"
    assert choose("auto", H100) == "cudnn"
    assert choose("auto", H100, dtype=jnp.float32) == "xla"  # cuDNN flash needs bf16/f16
    assert choose("auto", H100, head_dim=264) == "xla"
    assert choose("auto", T4) == "xla"  # compute capability 7.5
    assert choose("auto", CPU, dtype=jnp.float32) == "xla"
    assert choose_attention("auto", dtype=jnp.float32, head_dim=16) == "xla"  # this CPU
    for name in ("xla", "splash_interpret"):  # run anywhere: honoured as given
        assert choose(name, CPU) == name and choose(name, TPU) == name
    assert choose("splash", TPU) == "splash" and choose("cudnn", H100) == "cudnn"
    assert choose(None, TPU) == "xla"


def test_a_kernel_the_devices_cannot_run_is_refused():
    with pytest.raises(ConfigError, match=r"splash is a TPU kernel .* cpu; use model.attention"):
        choose("splash", CPU)
    with pytest.raises(ConfigError, match=r"splash is a TPU kernel .* gpu.*picks cudnn here"):
        choose("splash", H100)
    with pytest.raises(ConfigError, match="cudnn cannot run here: it is a GPU kernel"):
        choose("cudnn", TPU)
    with pytest.raises(ConfigError, match="bfloat16 or float16 compute, not float32"):
        choose("cudnn", H100, dtype=jnp.float32)
    with pytest.raises(ConfigError, match="compute capability >= 8.0, not 7.5"):
        choose("cudnn", T4)
    with pytest.raises(ConfigError, match="multiple of 8 and <= 256, not 12"):
        choose("cudnn", H100, head_dim=12)


def test_building_a_splash_model_on_cpu_is_refused():
    cfg = ModelConfig(vocab_size=64, num_layers=1, embed_dim=32, attention="splash")
    with pytest.raises(ConfigError, match="splash is a TPU kernel"):
        build_model(cfg, rngs=nnx.Rngs(0))


def test_splash_with_t5_relative_bias_is_refused():
    t5 = dict(family="encoder_decoder", position="relative", norm="rmsnorm", use_bias=False)
    cfg = Config(model=ModelConfig(**t5, attention="splash"))
    with pytest.raises(ConfigError, match="no additive logit bias.*model.attention=auto"):
        validate(cfg)
    validate(dataclasses.replace(cfg, model=ModelConfig(**t5, attention="auto")))


def test_cli_splash_on_cpu_exits_2_with_one_line(tmp_path, small_corpus, small_tokenizer, capsys):
    code = main(
        [
            "pretrain",
            f"data.source={small_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
            f"tokenizer.path={small_tokenizer.path}",
            "model.max_seq_len=32",
            "model.num_layers=1",
            "model.embed_dim=32",
            "model.attention=splash",
            "train.batch_size=8",
            "train.steps=2",
            "train.warmup_steps=1",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert any("model.attention=splash is a TPU kernel" in line for line in err), err
    assert not any("Traceback" in line for line in err)


# ------------------------------------------------------------------------------------------
# Compile-only TPU: the real train step with splash, for v5e 2x2.


def _tpu_devices(topology: str = "v5e:2x2"):
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: pip install -e '.[tpu]' (jax[tpu]==jax's version)")
    # libtpu asks for the slice type and the workers' hostnames; a compile-only topology
    # needs neither, and setting them keeps it from warning. Other processes on this host
    # (another test run) may hold libtpu's lock file; compiling needs no exclusive chip.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    return topologies.get_topology_desc(topology_name=topology, platform="tpu").devices


def _compile_train_step(model: ModelConfig, mesh_cfg: MeshConfig, devices, batch=4, length=256):
    from plm_jax.train import loop
    from plm_jax.train.optimizer import make_optimizer
    from plm_jax.train.state import sharded_abstract_state, state_shardings

    cfg = Config(model=model, mesh=mesh_cfg, train=TrainConfig(batch_size=batch, steps=10))
    mesh = make_mesh(cfg.mesh, devices=devices)
    rows = batch_sharding(mesh)
    ints = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
    floats = jax.ShapeDtypeStruct((batch, length), jnp.float32, sharding=rows)
    batch_shapes = dict(inputs=ints, targets=ints, weights=floats, segment_ids=ints, positions=ints)
    with use_mesh(mesh, cfg.mesh.rules):
        tx = make_optimizer(cfg.train)
        shardings = state_shardings(model, tx, mesh, cfg.mesh.rules)
        state = sharded_abstract_state(model, tx, shardings)
        step = loop.train_step_jit(cfg, model, mesh, shardings, cfg.train.grad_accum)
        return step.lower(state, batch_shapes).compile()


@pytest.mark.tpu_aot
@pytest.mark.parametrize(
    "attention,num_kv_heads",
    [("splash", 2), ("auto", 1)],  # GQA with kv heads split over tensor; MQA, auto -> splash
)
def test_train_step_with_splash_compiles_for_v5e(attention, num_kv_heads):
    devices = _tpu_devices()
    assert jax.devices()[0].platform == "cpu"  # libtpu adds compile-only devices, no backend
    model = dataclasses.replace(LLAMA_TINY, attention=attention, num_kv_heads=num_kv_heads)
    compiled = _compile_train_step(model, MeshConfig(data=1, fsdp=2, tensor=2), devices)
    # The scanned layer body holds splash's three Mosaic kernels: forward, dq and dk/dv.
    assert compiled.as_text().count("tpu_custom_call") == 3
    memory = compiled.memory_analysis()
    assert memory.temp_size_in_bytes + memory.argument_size_in_bytes < 16 * 2**30  # v5e chip
