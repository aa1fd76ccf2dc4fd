"""Tests for plm_jax.models: hand-computed layers, decoder invariants, KV cache, sharding names.

Every model shares one set of tiny sizes (V=64, D=32, N=4, H=8, F=128, 2 layers). Compiling
dominates the runtime on CPU, so: two models are initialised (module fixtures), variants get
their weights copied in abstractly (`with_weights`), forwards are jitted on `(graphdef, state)`
with fixed shapes (B=2, L=16) so each model compiles once, and XLA's backend optimisations are
off for these throwaway programs (`FAST`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from plm_jax.config import MODEL_PRESETS, MeshConfig, ModelConfig
from plm_jax.models import (
    Attention,
    Decoder,
    RMSNorm,
    apply_rope,
    attention_mask,
    build_model,
    count_params,
    param_count,
    rope_tables,
)
from plm_jax.models.layers import LayerNorm
from plm_jax.sharding import logical_to_sharding, logical_to_spec, make_mesh, use_mesh
from tests.numerics import assert_close, assert_not_close

TINY = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=128, max_seq_len=32)
GPT = ModelConfig(**TINY)  # learned positions, LayerNorm, GELU, biases, tied
LLAMA = ModelConfig(
    **TINY,
    num_kv_heads=2,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
    tie_embeddings=False,
)
B, L = 2, 16


# Tests compile many small programs and run them once: skip XLA's slow backend optimisations
# (about 3x faster compiles on CPU). Every comparison is between programs built this way.
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


def abstract(cfg: ModelConfig) -> Decoder:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory, no compile."""
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))


def build(cfg: ModelConfig, seed: int = 0) -> Decoder:
    """Initialises in one compiled program (eager initialisers compile once per shape)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed))))
    state = fast_jit(lambda: nnx.split(Decoder(cfg, rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, state)


@functools.partial(fast_jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions, segment_ids):
    out = nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids)
    return out.logits, out.hidden


def run(model, tokens, positions=None, segment_ids=None):
    """Jitted (logits [B, L, V], hidden [B, L, D]) with explicit defaults: one trace per model."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    graphdef, state = nnx.split(model)
    return jax.tree.map(np.asarray, _forward(graphdef, state, tokens, positions, segment_ids))


def logits_of(model, tokens, positions=None, segment_ids=None):
    return run(model, tokens, positions, segment_ids)[0]


def with_weights(cfg: ModelConfig, source: Decoder) -> Decoder:
    """A `cfg` model (scanned or not, any dtype or remat) holding `source`'s unrolled weights.

    Built abstractly, so no initialiser is compiled; a dropout RNG stream starts from key 0.
    """
    graphdef, state = nnx.split(abstract(cfg))
    pure = nnx.to_pure_dict(nnx.state(source, nnx.Param))
    if cfg.use_scan_layers:
        layers = [pure["blocks"][i] for i in range(cfg.num_layers)]
        pure["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    nnx.replace_by_pure_dict(state, pure)

    def fill(x):  # the RNG stream's key and counter
        if not isinstance(x, jax.ShapeDtypeStruct):
            return x
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.key(0)
        return jnp.zeros(x.shape, x.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, state))


def random_tokens(seed: int, shape=(B, L), vocab: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


@pytest.fixture(scope="module")
def gpt():
    return build(GPT)


@pytest.fixture(scope="module")
def llama():
    return build(LLAMA)


@pytest.fixture(scope="module", params=["gpt", "llama"])
def model(request, gpt, llama):
    return {"gpt": gpt, "llama": llama}[request.param]


# ------------------------------------------------------------------------------------------
# Hand-computed layers.


def test_rmsnorm_literal():
    norm = RMSNorm(4, eps=0.0, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.array([1.0, 2.0, 3.0, 4.0])
    x = jnp.array([[2.0, -2.0, 2.0, -2.0], [3.0, 4.0, 0.0, 0.0]])
    # row 0: rms = 2; row 1: rms = sqrt(25 / 4) = 2.5
    expected = [[1.0, -2.0, 3.0, -4.0], [1.2, 3.2, 0.0, 0.0]]
    np.testing.assert_allclose(norm(x), expected, rtol=1e-6)


def test_layernorm_literal():
    norm = LayerNorm(4, eps=0.0, rngs=nnx.Rngs(0))
    norm.bias[...] = jnp.array([0.0, 0.0, 0.0, 1.0])
    x = jnp.array([[1.0, 3.0, 1.0, 3.0]])  # mean 2, std 1
    np.testing.assert_allclose(norm(x), [[-1.0, 1.0, -1.0, 2.0]], rtol=1e-6)


def test_rope_literal_hf_rotate_half_layout():
    # H = 4, theta = 10000: channel pairs (0, 2) at frequency 1 and (1, 3) at frequency 0.01.
    cos, sin = rope_tables(jnp.array([[0, 1]]), head_dim=4, theta=10000.0)
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4).repeat(2, axis=1)  # [B, L, N, H]
    out = np.asarray(apply_rope(x, cos, sin))[0, :, 0]
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.01), math.sin(0.01)
    np.testing.assert_allclose(out[0], [1.0, 2.0, 3.0, 4.0], rtol=1e-6)  # position 0: identity
    expected = [1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2]
    np.testing.assert_allclose(out[1], expected, rtol=1e-6)
    np.testing.assert_allclose(expected, [-1.98411, 1.95990, 2.46238, 4.01980], atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = np.random.default_rng(0).normal(size=(2, 1, 1, 1, 8)).astype(np.float32)

    @fast_jit
    def score(pq, pk):
        cq, sq = rope_tables(jnp.full((1, 1), pq), 8, 10000.0)
        ck, sk = rope_tables(jnp.full((1, 1), pk), 8, 10000.0)
        return jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk))

    assert float(score(7, 3)) == pytest.approx(float(score(5, 1)), abs=1e-5)
    assert float(score(7, 3)) != pytest.approx(float(score(7, 2)), abs=1e-3)


def test_attention_mask_literal():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    idx = jnp.arange(5)
    expected = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],  # padding query: fully masked
    ]
    np.testing.assert_array_equal(attention_mask(seg, seg, idx, idx)[0, 0], expected)
    # Decoding: one query in slot 3 against a cache whose slot 2 is padding, slot 4 empty.
    cache_seg = jnp.array([[1, 1, 0, 1, 0]])
    mask = attention_mask(jnp.array([[1]]), cache_seg, jnp.array([3]), idx)
    np.testing.assert_array_equal(mask[0, 0], [[1, 1, 0, 1, 0]])


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_attention_weight_shapes(num_kv_heads):
    kw = dict(use_bias=True, implementation=None, out_std=0.02)
    attn = nnx.eval_shape(lambda: Attention(32, 4, num_kv_heads, 8, **kw, rngs=nnx.Rngs(0)))
    assert attn.w_q.shape == (32, 4, 8) and attn.w_o.shape == (4, 8, 32)
    assert attn.w_k.shape == attn.w_v.shape == (32, num_kv_heads, 8)
    assert attn.b_k.shape == (num_kv_heads, 8) and attn.b_o.shape == (32,)


def test_gqa_equals_mha_with_repeated_kv_heads():
    # MQA could not tell a wrong head grouping apart, so two kv heads for four query heads.
    kw = dict(use_bias=False, implementation=None, out_std=0.02)
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: Attention(32, 4, 2, 8, **kw, rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(np.float32), state)
    mha_state = nnx.to_pure_dict(state)
    for name in ("w_k", "w_v"):  # query head n reads kv head n // 2 (HF repeat_kv)
        mha_state[name] = np.repeat(mha_state[name], 2, axis=1)
    mha_graphdef = nnx.graphdef(
        nnx.eval_shape(lambda: Attention(32, 4, 4, 8, **kw, rngs=nnx.Rngs(0)))
    )
    idx = jnp.arange(6)
    mask = attention_mask(jnp.ones((B, 6), jnp.int32), jnp.ones((B, 6), jnp.int32), idx, idx)

    @fast_jit
    def both(state, mha_state, x):
        mha = nnx.merge(mha_graphdef, nnx.State(mha_state))
        return nnx.merge(graphdef, state)(x, mask=mask)[0], mha(x, mask=mask)[0]

    x = rng.normal(size=(B, 6, 32)).astype(np.float32)
    out, expected = both(state, mha_state, x)
    assert out.shape == (B, 6, 32)
    # Two programs (grouped and repeated-head einsums): 3 ulps of the output's scale seen on
    # AVX-512, 16 allowed; query heads reading the wrong kv heads are off by O(0.1).
    assert_close(out, expected, ulps=16)
    for name in ("w_k", "w_v"):  # the wrong grouping: query head n reads kv head n % 2
        mha_state[name] = np.tile(nnx.to_pure_dict(state)[name], (1, 2, 1))
    assert_not_close(both(state, mha_state, x)[1], out, ulps=16)


# ------------------------------------------------------------------------------------------
# Decoder invariants.


def test_causality(model):
    tokens = random_tokens(0)
    changed = tokens.copy()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    a, b = logits_of(model, tokens), logits_of(model, changed)
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-4


def test_packed_documents_are_isolated(model):
    # Row 0 packs doc A (6 tokens), doc B (7 tokens) and 3 padding tokens.
    seg = np.array([[1] * 6 + [2] * 7 + [0] * 3, [1] * L])
    pos = np.array([list(range(6)) + list(range(7)) + [0] * 3, list(range(L))])
    tokens = random_tokens(1)
    changed = tokens.copy()
    changed[0, :6] = (changed[0, :6] + 7) % 64  # rewrite all of doc A
    a = logits_of(model, tokens, pos, seg)
    b = logits_of(model, changed, pos, seg)
    np.testing.assert_array_equal(a[0, 6:13], b[0, 6:13])
    assert np.abs(a[0, :6] - b[0, :6]).max() > 1e-4
    assert np.isfinite(a).all()  # padding rows are fully masked but finite
    # Positions restart: doc B packed after doc A == doc B alone at the start of a row.
    alone = np.zeros_like(tokens)
    alone[0, :7] = tokens[0, 6:13]
    alone_seg = np.array([[1] * 7 + [0] * 9, [1] * L])
    alone_pos = np.array([list(range(7)) + [0] * 9, list(range(L))])
    c = logits_of(model, alone, alone_pos, alone_seg)
    np.testing.assert_allclose(a[0, 6:13], c[0, :7], atol=1e-5)


def test_initial_loss_is_log_vocab(model):
    tokens = random_tokens(2)
    logits = logits_of(model, tokens)[:, :-1]
    targets = tokens[:, 1:]
    logz = jax.nn.logsumexp(logits, axis=-1)
    loss = float(jnp.mean(logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]))
    assert abs(loss - math.log(64)) < 0.2, loss


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_param_count_matches_formula_for_presets(name):
    preset = {**MODEL_PRESETS[name], "use_scan_layers": True}  # one block traced: fast
    cfg = ModelConfig(**{"vocab_size": 64, **preset})
    assert param_count(abstract(cfg)) == count_params(cfg)


def test_param_count_published_sizes():
    gpt2 = ModelConfig(**MODEL_PRESETS["gpt2-124m"])
    llama = ModelConfig(**MODEL_PRESETS["llama-1b"])
    assert count_params(gpt2) == 124_439_808  # HF gpt2
    assert count_params(llama) == 1_235_814_400  # meta-llama/Llama-3.2-1B


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"position": "rope"},
        {"norm": "rmsnorm"},
        {"mlp": "swiglu", "mlp_dim": 0},  # LLaMA's rule: 256 * ceil(int(8 * 32 / 3) / 256)
        {"num_kv_heads": 2},
        {"num_kv_heads": 1},
        {"tie_embeddings": False},
        {"use_bias": False},
        {"head_dim": 16},
        {"use_scan_layers": True, "num_layers": 3},
    ],
)
def test_param_count_matches_formula_for_variants(changes):
    cfg = dataclasses.replace(GPT, **changes)
    assert param_count(abstract(cfg)) == count_params(cfg)


def test_untied_head_adds_vocab_by_embed(gpt):
    untied = dataclasses.replace(GPT, tie_embeddings=False)
    assert count_params(untied) - count_params(GPT) == 64 * 32
    assert gpt.head is None
    logits, hidden = run(gpt, random_tokens(3))
    # tied: the logits are the final hidden states against the token table
    expected = jnp.einsum("BLD,VD->BLV", hidden, gpt.embed.embedding[...])
    np.testing.assert_allclose(logits, expected, atol=1e-5)


@functools.partial(fast_jit, static_argnums=1)
def _loss_and_grads(state, graphdef, tokens, segment_ids):
    def loss_fn(state):
        logits = nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids).logits
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
        real = segment_ids[:, 1:] != 0
        return jnp.sum(nll * real) / jnp.sum(real), logits

    return jax.value_and_grad(loss_fn, has_aux=True)(state)


@pytest.mark.parametrize(
    "scan, remat",
    [
        (True, "full"),
        pytest.param(True, "none", marks=pytest.mark.slow),
        pytest.param(False, "dots", marks=pytest.mark.slow),
        pytest.param(True, "dots_no_batch", marks=pytest.mark.slow),
    ],
)
def test_scan_and_remat_match_unrolled(llama, scan, remat):
    """Same weights: logits, loss and gradients agree to float32 rounding."""
    tokens = jnp.asarray(random_tokens(5))
    segment_ids = jnp.asarray([[1] * 12 + [0] * 4, [1] * L])  # padding: gradients stay finite

    def outputs(cfg):
        graphdef, state = nnx.split(with_weights(cfg, llama), nnx.Param)
        (loss, logits), grads = _loss_and_grads(state, graphdef, tokens, segment_ids)
        grads = nnx.to_pure_dict(grads)
        if cfg.use_scan_layers:  # unstack the `layers` axis to compare with unrolled gradients
            stacked = grads.pop("blocks")
            grads["blocks"] = {i: jax.tree.map(lambda g, i=i: g[i], stacked) for i in range(2)}
        return loss, logits, grads

    ref_loss, ref_logits, ref_grads = outputs(LLAMA)
    loss, logits, grads = outputs(dataclasses.replace(LLAMA, use_scan_layers=scan, remat=remat))
    assert np.isfinite(ref_loss) and all(np.isfinite(g).all() for g in jax.tree.leaves(ref_grads))
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    assert_close(loss, ref_loss, ulps=16)  # a mean over 2 x 16 tokens: a few ulps of reordering
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_dropout_only_when_not_deterministic(gpt):
    model = with_weights(dataclasses.replace(GPT, dropout=0.2), gpt)
    tokens = jnp.asarray(random_tokens(6))
    reference = logits_of(gpt, tokens)
    np.testing.assert_array_equal(logits_of(model, tokens), reference)
    graphdef, state = nnx.split(model)

    @fast_jit
    def noisy(state, key):  # key None: the stream stored in the model, which advances
        m = nnx.merge(graphdef, state)
        rngs = None if key is None else nnx.Rngs(dropout=key)
        return m(tokens, deterministic=False, rngs=rngs).logits, nnx.state(m)

    first, _ = noisy(state, jax.random.key(1))
    again, _ = noisy(state, jax.random.key(1))
    other, _ = noisy(state, jax.random.key(2))
    np.testing.assert_array_equal(first, again)  # same key, same mask
    assert np.abs(first - reference).max() > 1e-3
    assert np.abs(first - other).max() > 1e-3
    stored, state = noisy(state, None)
    stored_next, _ = noisy(state, None)
    assert np.abs(stored - reference).max() > 1e-3
    assert np.abs(stored - stored_next).max() > 1e-3


def test_dropout_without_randomness_raises():
    model = abstract(dataclasses.replace(GPT, dropout=0.2))
    stateless = nnx.eval_shape(
        lambda: Decoder(dataclasses.replace(GPT, dropout=0.2), rngs=nnx.Rngs(params=0))
    )
    assert model.dropout_rngs is not None and stateless.dropout_rngs is None
    with pytest.raises(ValueError, match="deterministic=False with dropout"):
        stateless(jnp.zeros((1, 4), jnp.int32), deterministic=False)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"num_kv_heads": 3}, "not divisible by model.num_kv_heads=3"),
        ({"norm": "batchnorm"}, "model.norm='batchnorm' is not supported"),
        ({"remat": "some"}, "model.remat='some'"),
        ({"position": "alibi"}, "model.position='alibi'"),
        ({"embed_dim": 30, "num_heads": 4}, "embed_dim=30 is not divisible"),
    ],
)
def test_bad_config_raises(changes, match):
    with pytest.raises(ValueError, match=match):
        abstract(dataclasses.replace(GPT, **changes))


def test_bfloat16_compute_keeps_float32_params_and_logits(gpt):
    model = with_weights(dataclasses.replace(GPT, dtype="bfloat16"), gpt)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tokens = random_tokens(7)
    logits, hidden = run(model, tokens)
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    np.testing.assert_allclose(logits, logits_of(gpt, tokens), atol=0.05)


# ------------------------------------------------------------------------------------------
# KV cache.


@functools.partial(fast_jit, static_argnums=0)
def _cached_step(graphdef, state, tokens, segment_ids, cache):
    out = nnx.merge(graphdef, state)(tokens, segment_ids=segment_ids, cache=cache)
    return out.logits, out.cache


@pytest.mark.parametrize(
    "name, padding",
    [("gpt", "left"), ("gpt", "right"), ("llama", "left"), ("llama", "right"), ("scan", "left")],
)
def test_kv_cache_greedy_matches_full_recompute(gpt, llama, name, padding):
    model = {"gpt": gpt, "llama": llama}.get(name, llama)  # reference: the unrolled model
    cached = model
    if name == "scan":
        cached = with_weights(dataclasses.replace(LLAMA, use_scan_layers=True), llama)
    prompts = [[5, 9, 17, 3, 40], [22, 7]]
    width, steps = 5, 6
    rows, seg = [], []
    for p in prompts:
        pad = [0] * (width - len(p))
        rows.append(pad + p if padding == "left" else p + pad)
        seg.append([0] * len(pad) + [1] * len(p) if padding == "left" else [1] * len(p) + pad)
    last = [width - 1 if padding == "left" else len(p) - 1 for p in prompts]

    graphdef, state = nnx.split(cached)
    cache = cached.init_cache(len(prompts), max_len=L)
    logits, cache = _cached_step(graphdef, state, jnp.array(rows), jnp.array(seg), cache)
    step_logits = [np.asarray(logits)[np.arange(2), last]]
    for _ in range(steps - 1):
        nxt = step_logits[-1].argmax(-1).astype(np.int32)[:, None]
        logits, cache = _cached_step(graphdef, state, nxt, jnp.ones_like(nxt), cache)
        step_logits.append(np.asarray(logits)[:, 0])
    cached_tokens = np.stack([s.argmax(-1) for s in step_logits], axis=1)
    assert int(cache.index) == width + steps - 1
    np.testing.assert_array_equal(cache.next_position, [len(p) + steps - 1 for p in prompts])

    # Reference: each row unpadded, the whole sequence recomputed every step (right-filled
    # with zeros to one shape; causality makes the fill irrelevant).
    seqs = [list(p) for p in prompts]
    for t in range(steps):
        full = np.zeros((2, L), np.int32)
        for b, s in enumerate(seqs):
            full[b, : len(s)] = s
        ref = logits_of(model, full)[np.arange(2), [len(s) - 1 for s in seqs]]
        np.testing.assert_allclose(step_logits[t], ref, atol=1e-5)
        for b, s in enumerate(seqs):
            s.append(int(ref[b].argmax()))
    np.testing.assert_array_equal(cached_tokens, np.array([s[-steps:] for s in seqs]))


# ------------------------------------------------------------------------------------------
# Sharding.


def test_logical_axis_names_and_partition_specs():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    unrolled = nnx.get_partition_spec(nnx.state(abstract(LLAMA)))
    scanned_cfg = dataclasses.replace(LLAMA, use_scan_layers=True)
    scanned = nnx.get_partition_spec(nnx.state(abstract(scanned_cfg)))
    names = {
        "token embedding": unrolled["embed"]["embedding"],
        "q projection": unrolled["blocks"][0]["attn"]["w_q"],
        "k projection": unrolled["blocks"][0]["attn"]["w_k"],
        "mlp input": unrolled["blocks"][1]["mlp"]["w_gate"],
        "mlp output": unrolled["blocks"][1]["mlp"]["w_down"],
        "untied head": unrolled["head"],
        "scanned q": scanned["blocks"]["attn"]["w_q"],
        "scanned norm": scanned["blocks"]["attn_norm"]["scale"],
    }
    expected = {
        "token embedding": (("vocab", "embed"), P("tensor", "fsdp")),
        "q projection": (("embed", "heads", "head_dim"), P("fsdp", "tensor", None)),
        "k projection": (("embed", "kv_heads", "head_dim"), P("fsdp", "tensor", None)),
        "mlp input": (("embed", "mlp"), P("fsdp", "tensor")),
        "mlp output": (("mlp", "embed"), P("tensor", "fsdp")),
        "untied head": (("embed", "vocab"), P("fsdp", "tensor")),
        "scanned q": (("layers", "embed", "heads", "head_dim"), P(None, "fsdp", "tensor", None)),
        "scanned norm": (("layers", "embed"), P(None, "fsdp")),
    }
    for key, (logical, spec) in expected.items():
        assert tuple(names[key].get_value()) == logical, key
        assert logical_to_spec(names[key].get_value()) == spec, key
    assert mesh.shape == {"data": 1, "fsdp": 2, "tensor": 4}


def test_sharded_forward_matches_single_device(gpt):
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    graphdef, state = nnx.split(gpt)
    specs = nnx.get_partition_spec(state)
    shardings = jax.tree.map(
        lambda names: names.replace(logical_to_sharding(names.get_value(), mesh)),
        specs,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    tokens = random_tokens(8)
    with use_mesh(mesh):
        sharded = jax.device_put(state, shardings)
        forward = fast_jit(lambda s, t: nnx.merge(graphdef, s)(t).logits)
        logits = forward(sharded, jnp.asarray(tokens))
    w_q = sharded["blocks"][0]["attn"]["w_q"][...]
    assert w_q.sharding.spec == P("fsdp", "tensor", None)
    expected = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))  # act_batch, act_vocab
    assert logits.sharding.is_equivalent_to(expected, logits.ndim)
    np.testing.assert_allclose(logits, logits_of(gpt, tokens), atol=1e-5)
