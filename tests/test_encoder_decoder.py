"""Tests for plm_jax.models.encoder_decoder: the T5-style encoder-decoder and its cache.

Hand-computed relative position buckets; shapes, parameter names and counts; invariants
(encoder padding, packing, decoder causality, scan = unrolled, sharded = single device);
cached step-by-step decoding equal to the full forward (relative bias and RoPE, GQA) and
`take_rows`; config errors. The Hugging Face reference tests are in test_convert_t5.py.

Sizes: V=64, D=32, 4 heads of 8, F=48, 1 encoder and 2 decoder layers, 8 relative buckets up to
distance 16 (so the test lengths reach the log-spaced buckets). Weights are random with a
larger spread than the initialiser's, so attention is far from uniform.
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

from plm_jax.config import MODEL_PRESETS, Config, MeshConfig, ModelConfig, validate
from plm_jax.errors import ConfigError
from plm_jax.models import EncoderDecoder, build_model, count_params, param_count
from plm_jax.models.encoder_decoder import relative_position_bucket
from plm_jax.sharding import logical_to_sharding, make_mesh, use_mesh
from tests.numerics import assert_close, assert_not_close

REL = ModelConfig(
    family="encoder_decoder",
    vocab_size=64,
    num_layers=1,
    num_decoder_layers=2,
    embed_dim=32,
    num_heads=4,
    head_dim=8,
    mlp_dim=48,
    max_seq_len=64,
    position="relative",
    relative_buckets=8,
    relative_max_distance=16,
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="relu",
    use_bias=False,
    tie_embeddings=True,
)
# RoPE with grouped-query heads, LayerNorm, biases, GeGLU and an untied head.
ROPE = dataclasses.replace(
    REL,
    position="rope",
    num_kv_heads=2,
    norm="layernorm",
    use_bias=True,
    mlp="geglu",
    tie_embeddings=False,
)
B, T, L = 2, 12, 10  # rows, encoder length, decoder length

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST)


def abstract(cfg: ModelConfig) -> EncoderDecoder:
    """The model with `jax.ShapeDtypeStruct` leaves and no stored dropout stream."""
    return nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(params=0)))


def randomized(cfg: ModelConfig, seed: int = 0, pure: dict | None = None) -> EncoderDecoder:
    """A `cfg` model with random weights (norm scales near 1), or `pure`'s (unrolled) weights
    stacked for a scanned config; no initialiser is compiled."""
    graphdef, state = nnx.split(abstract(cfg))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        is_scale = any(getattr(k, "key", None) == "scale" for k in path)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if is_scale else 0.3 * noise, x.dtype)

    if pure is None:
        pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    elif cfg.use_scan_layers:
        pure = dict(pure)
        for stack, count in (("encoder_blocks", 1), ("decoder_blocks", 2)):
            layers = [pure[stack][i] for i in range(count)]
            pure[stack] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@functools.partial(fast_jit, static_argnums=0)
def _forward(graphdef, state, tokens, dec, pos, seg, dpos, dseg):
    model = nnx.merge(graphdef, state)
    out = model(
        tokens,
        dec,
        positions=pos,
        segment_ids=seg,
        decoder_positions=dpos,
        decoder_segment_ids=dseg,
    )
    return out.logits, out.hidden


def forward(model, tokens, dec, pos=None, seg=None, dpos=None, dseg=None):
    """Jitted (logits [B, L, V], hidden) with explicit defaults: one trace per model config."""
    (b, t), (_, n) = tokens.shape, dec.shape
    pos = np.broadcast_to(np.arange(t), (b, t)) if pos is None else pos
    dpos = np.broadcast_to(np.arange(n), (b, n)) if dpos is None else dpos
    seg = np.ones((b, t)) if seg is None else seg
    dseg = np.ones((b, n)) if dseg is None else dseg
    arrays = [jnp.asarray(a, jnp.int32) for a in (tokens, dec, pos, seg, dpos, dseg)]
    graphdef, state = nnx.split(model)
    logits, hidden = _forward(graphdef, state, *arrays)
    return np.asarray(logits), np.asarray(hidden)


def random_tokens(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 64, shape).astype(np.int32)


@pytest.fixture(scope="module")
def rel():
    return randomized(REL, seed=0)


@pytest.fixture(scope="module")
def rope():
    return randomized(ROPE, seed=1)


# ---------------------------------------------------------------------------------------------
# Hand-computed relative position buckets.


def test_relative_buckets_literal():
    """8 buckets, max distance 16. Bidirectional: 4 per direction, exact for distance 0 and 1,
    then 2 + int(log(d / 2) / log(8) * 2) up to 3; keys after the query (relative > 0) add 4.
    Causal: distances 0..3 exact, then 4 + int(log(d / 4) / log(4) * 4) up to 7; keys after
    the query share bucket 0."""
    buckets = fast_jit(
        lambda r: [relative_position_bucket(r, 8, 16, bidirectional=b) for b in (True, False)]
    )
    bidirectional, causal = buckets(jnp.arange(-13, 8))
    #                 -13 ... -6         -5 ... -2   -1 0  1  2..5        6  7
    expected = [3] * 8 + [2] * 4 + [1, 0, 5] + [6] * 4 + [7, 7]
    np.testing.assert_array_equal(bidirectional, expected)
    # distance 13..12 -> 7, 11..8 -> 6, 7..6 -> 5, 5..4 -> 4, then 3, 2, 1, 0 and 0 after.
    expected = [7, 7, 6, 6, 6, 6, 5, 5, 4, 4, 3, 2, 1, 0] + [0] * 7
    np.testing.assert_array_equal(causal, expected)
    far = buckets(jnp.array([-10_000, 10_000] + [0] * 19))
    np.testing.assert_array_equal([far[0][:2], far[1][:2]], [[3, 7], [7, 0]])


# ---------------------------------------------------------------------------------------------
# Shapes, names, counts.


def test_shapes_and_parameter_names(rel):
    tokens, dec = random_tokens(0, (B, T)), random_tokens(1, (B, L))
    logits, hidden = forward(rel, tokens, dec)
    assert logits.shape == (B, L, 64) and logits.dtype == np.float32
    assert hidden.shape == (B, L, 32)
    graphdef, state = nnx.split(rel)
    encoded = jax.eval_shape(lambda s, t: nnx.merge(graphdef, s).encode(t), state, tokens)
    assert encoded.shape == (B, T, 32) and encoded.dtype == jnp.float32
    params = params_of(rel)
    assert set(params) == {
        "embed",
        "encoder_rel_bias",
        "encoder_blocks",
        "encoder_norm",
        "decoder_rel_bias",
        "decoder_blocks",
        "decoder_norm",
    }
    assert set(params["decoder_blocks"][1]) == {
        "attn_norm",
        "attn",
        "cross_norm",
        "cross_attn",
        "mlp_norm",
        "mlp",
    }
    assert params["encoder_rel_bias"]["embedding"].shape == (8, 4)
    assert params["decoder_blocks"][0]["cross_attn"]["w_k"].shape == (32, 4, 8)


@pytest.mark.slow  # compiling the random initialisers takes ~10 s on CPU
def test_loss_at_init_is_log_vocab():
    """The initialiser's small weights and the tied head's D**-0.5 give near-uniform logits."""
    init = fast_jit(lambda: nnx.split(EncoderDecoder(REL, rngs=nnx.Rngs(params=0)))[1])()
    graphdef, _ = nnx.split(abstract(REL))
    tokens, dec, targets = (random_tokens(i, (B, n)) for i, n in ((0, T), (1, L), (2, L)))
    logits, _ = forward(nnx.merge(graphdef, init), tokens, dec)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    loss = float(jnp.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]))
    assert abs(loss - math.log(64)) < 0.02, loss


@pytest.mark.parametrize("name", ["REL", "ROPE", "scan", "t5-small", "t5-base", "t5-tiny"])
def test_param_count_matches_formula(name):
    configs = {"REL": REL, "ROPE": ROPE, "scan": dataclasses.replace(ROPE, use_scan_layers=True)}
    if name in configs:
        cfg = configs[name]
    else:
        cfg = ModelConfig(**{**MODEL_PRESETS[name], "vocab_size": 128, "use_scan_layers": True})
    assert param_count(abstract(cfg)) == count_params(cfg)


def test_published_sizes():
    # transformers' T5ForConditionalGeneration t5-small and t5-base (tied, 32128 ids).
    assert count_params(ModelConfig(**MODEL_PRESETS["t5-small"])) == 60_506_624
    assert count_params(ModelConfig(**MODEL_PRESETS["t5-base"])) == 222_903_552


# ---------------------------------------------------------------------------------------------
# Invariants.


@pytest.mark.parametrize("kind", ["rel", "rope"])
def test_encoder_padding_does_not_change_logits(kind, request):
    model = request.getfixturevalue(kind)
    tokens, dec = random_tokens(2, (B, T)), random_tokens(3, (B, L))
    lengths = np.array([7, 12])
    seg = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    logits, _ = forward(model, tokens, dec, seg=seg)
    garbage = np.where(seg == 1, tokens, random_tokens(4, (B, T)))
    again, _ = forward(model, garbage, dec, seg=seg)
    np.testing.assert_allclose(again, logits, atol=1e-5)
    # Left padding of row 0 (its positions still count from 0) gives the same logits too.
    shifted = np.concatenate([garbage[:1, 7:], tokens[:1, :7]], axis=1)
    left_seg = np.concatenate([np.zeros((1, 5)), np.ones((1, 7))], axis=1)
    left_pos = np.concatenate([np.zeros((1, 5)), np.arange(7)[None]], axis=1)
    rows = (np.concatenate([shifted, tokens[1:]]), np.concatenate([left_seg, seg[1:]]))
    pos = np.concatenate([left_pos, np.arange(T)[None]])
    left, _ = forward(model, rows[0], dec, pos=pos, seg=rows[1])
    np.testing.assert_allclose(left, logits, atol=1e-5)
    # The padding really is ignored: changing a real encoder token does change the logits.
    changed = tokens.copy()
    changed[0, 3] = (changed[0, 3] + 1) % 64
    assert np.abs(forward(model, changed, dec, seg=seg)[0][0] - logits[0]).max() > 1e-3


@pytest.mark.parametrize("kind", ["rel", "rope"])
def test_packed_examples_equal_separate_ones(kind, request):
    """Two examples in one row (segments 1 and 2 on both sides, positions restarting) give the
    logits each gives alone."""
    model = request.getfixturevalue(kind)
    src = [random_tokens(5, (5,)), random_tokens(6, (6,))]
    tgt = [random_tokens(7, (4,)), random_tokens(8, (5,))]

    def row(parts, length):
        tokens = np.concatenate([*parts, np.zeros(length - sum(map(len, parts)), np.int32)])
        seg = np.concatenate([np.full(len(p), i + 1) for i, p in enumerate(parts)])
        pos = np.concatenate([np.arange(len(p)) for p in parts])
        pad = length - len(seg)
        return tokens, np.pad(seg, (0, pad)), np.pad(pos, (0, pad))

    def batch(*rows):  # rows of (tokens, segment ids, positions) -> three [2, len] arrays
        return [np.stack(parts) for parts in zip(*rows, strict=True)]

    alone = [(row([src[i]], T), row([tgt[i]], L)) for i in range(2)]
    enc = batch(row(src, T), alone[1][0])
    dec = batch(row(tgt, L), alone[1][1])
    packed, _ = forward(model, enc[0], dec[0], enc[2], enc[1], dec[2], dec[1])
    enc, dec = batch(alone[0][0], alone[1][0]), batch(alone[0][1], alone[1][1])
    separate, _ = forward(model, enc[0], dec[0], enc[2], enc[1], dec[2], dec[1])
    np.testing.assert_allclose(packed[0, :4], separate[0, :4], atol=1e-5)
    np.testing.assert_allclose(packed[0, 4:9], separate[1, :5], atol=1e-5)
    np.testing.assert_allclose(packed[1], separate[1], atol=1e-5)


def test_decoder_is_causal(rel):
    tokens, dec = random_tokens(9, (B, T)), random_tokens(10, (B, L))
    logits, _ = forward(rel, tokens, dec)
    changed = dec.copy()
    changed[:, 6] = (changed[:, 6] + 5) % 64
    again, _ = forward(rel, tokens, changed)
    np.testing.assert_allclose(again[:, :6], logits[:, :6], atol=1e-6)
    assert np.abs(again[:, 6:] - logits[:, 6:]).max() > 1e-3


def test_scan_equals_unrolled(rope):
    """Forward pass, the cache's cross-attention K/V and a cached step of the scanned stack."""
    cfg = dataclasses.replace(ROPE, use_scan_layers=True, remat="full")
    scanned = randomized(cfg, pure=params_of(rope))
    tokens, dec = random_tokens(11, (B, T)), random_tokens(12, (B, L))
    full, _ = forward(rope, tokens, dec)
    np.testing.assert_allclose(forward(scanned, tokens, dec)[0], full, atol=1e-5)
    graphdef, state = nnx.split(scanned)
    ones = jnp.ones((B, T), jnp.int32)
    _, cache = _start(graphdef, state, jnp.asarray(tokens), ones, L + 2)
    _, unrolled = _start(*nnx.split(rope), jnp.asarray(tokens), ones, L + 2)
    # Two programs (a scanned and an unrolled encoder, then a K/V projection): the encoder's
    # residual stream carries a few ulps of its scale (2 seen on AVX-512); 16 leaves room, while
    # the K/V of the wrong decoder layer is off by O(1).
    assert_close(cache.cross_k, unrolled.cross_k, ulps=16)
    assert_close(cache.cross_v, unrolled.cross_v, ulps=16)
    assert_not_close(cache.cross_v[::-1], unrolled.cross_v, ulps=16)
    logits, cache = _step(graphdef, state, cache, jnp.asarray(dec[:, :3]), None)
    np.testing.assert_allclose(logits, full[:, :3], atol=1e-5)
    assert cache.k.shape == unrolled.k.shape and int(cache.index) == 3


# ---------------------------------------------------------------------------------------------
# Cached decoding.


@functools.partial(fast_jit, static_argnums=(0, 4))
def _start(graphdef, state, tokens, seg, max_len):
    model = nnx.merge(graphdef, state)
    encoded = model.encode(tokens, segment_ids=seg)
    return encoded, model.init_cache(encoded, seg, max_len)


@functools.partial(fast_jit, static_argnums=0)
def _step(graphdef, state, cache, tokens, positions):
    """One decoding call; positions None (the cache's slots) or explicit, as a beam search
    passes them."""
    if positions is not None:
        positions = jnp.broadcast_to(positions, tokens.shape)
    out = nnx.merge(graphdef, state).decode(
        tokens, None, encoder_segment_ids=None, positions=positions, cache=cache
    )
    return out.logits, out.cache


def test_cached_decoding_equals_full_forward(rel):
    """A 3-token first chunk, then one token per call: the logits of the full forward pass
    (with encoder padding in row 0)."""
    tokens, dec = random_tokens(13, (B, T)), random_tokens(14, (B, L))
    seg = (np.arange(T)[None] < np.array([[9], [12]])).astype(np.int32)
    full, _ = forward(rel, tokens, dec, seg=seg)
    graphdef, state = nnx.split(rel)
    encoded, cache = _start(graphdef, state, jnp.asarray(tokens), jnp.asarray(seg), L + 2)
    assert encoded.shape == (B, T, 32)
    assert cache.k.shape == (2, B, L + 2, 4, 8) and cache.cross_k.shape == (2, B, T, 4, 8)
    for start, stop in [(0, 3), *((t, t + 1) for t in range(3, L))]:
        chunk = jnp.asarray(dec[:, start:stop])
        logits, cache = _step(graphdef, state, cache, chunk, None)
        np.testing.assert_allclose(logits, full[:, start:stop], atol=1e-5, err_msg=str(start))
    assert int(cache.index) == L
    np.testing.assert_array_equal(cache.segment_ids, [[1] * L + [0, 0]] * B)


def test_cached_rope_decoding_and_take_rows(rope):
    """RoPE with grouped-query heads, one token per call at explicit positions: the full
    forward's logits; after 4 steps `take_rows` swaps the rows, which then continue as the
    swapped rows' full forward does."""
    tokens, dec = random_tokens(15, (B, T)), random_tokens(16, (B, L))
    seg = (np.arange(T)[None] < np.array([[12], [6]])).astype(np.int32)
    full, _ = forward(rope, tokens, dec, seg=seg)
    graphdef, state = nnx.split(rope)
    _, cache = _start(graphdef, state, jnp.asarray(tokens), jnp.asarray(seg), L + 2)
    assert cache.k.shape == (2, B, L + 2, 2, 8)  # 2 kv heads
    rows = np.arange(B)
    for t in range(L):
        if t == 4:
            expanded = cache.take_rows(jnp.array([1, 0, 1]))
            np.testing.assert_array_equal(expanded.k, np.asarray(cache.k)[:, [1, 0, 1]])
            np.testing.assert_array_equal(expanded.cross_v, np.asarray(cache.cross_v)[:, [1, 0, 1]])
            np.testing.assert_array_equal(expanded.encoder_segment_ids, seg[[1, 0, 1]])
            np.testing.assert_array_equal(expanded.segment_ids, [[1] * 4 + [0] * 8] * 3)
            assert int(expanded.index) == 4
            rows = np.array([1, 0])
            cache = cache.take_rows(jnp.asarray(rows))
        chunk = jnp.asarray(dec[rows, t : t + 1])
        logits, cache = _step(graphdef, state, cache, chunk, jnp.int32(t))
        # A cached step against the full forward: up to 5 ulps of the logits' scale seen.
        assert_close(logits[:, 0], full[rows, t], ulps=16, err_msg=str(t))


# ---------------------------------------------------------------------------------------------
# Sharding and dropout.


def test_sharded_forward_matches_single_device(rel):
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    graphdef, state = nnx.split(rel)
    shardings = jax.tree.map(
        lambda names: names.replace(logical_to_sharding(names.get_value(), mesh)),
        nnx.get_partition_spec(state),
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    tokens, dec = random_tokens(17, (B, T)), random_tokens(18, (B, L))
    seg = (np.arange(T)[None] < np.array([[7], [12]])).astype(np.int32)
    with use_mesh(mesh):
        sharded = jax.device_put(state, shardings)
        run = fast_jit(lambda s, *a: nnx.merge(graphdef, s)(a[0], a[1], segment_ids=a[2]).logits)
        logits = run(sharded, jnp.asarray(tokens), jnp.asarray(dec), jnp.asarray(seg))
    cross = sharded["decoder_blocks"][1]["cross_attn"]["w_q"][...]
    assert cross.sharding.spec == P("fsdp", "tensor", None)
    assert sharded["encoder_rel_bias"]["embedding"][...].sharding.spec == P(None, "tensor")
    expected = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor"))  # act_batch, act_vocab
    assert logits.sharding.is_equivalent_to(expected, logits.ndim)
    expected, _ = forward(rel, tokens, dec, seg=seg)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-5)


def test_dropout_only_when_not_deterministic(rel):
    model = randomized(dataclasses.replace(REL, dropout=0.3), pure=params_of(rel))
    tokens, dec = jnp.asarray(random_tokens(19, (B, T))), jnp.asarray(random_tokens(20, (B, L)))
    with pytest.raises(ValueError, match="deterministic=False with dropout"):
        jax.eval_shape(lambda: model(tokens, dec, deterministic=False))
    graphdef, state = nnx.split(model)

    @fast_jit
    def noisy(state, key):
        model = nnx.merge(graphdef, state)
        return model(tokens, dec, deterministic=False, rngs=nnx.Rngs(dropout=key)).logits

    keys = (jax.random.key(k, impl="rbg") for k in (0, 0, 1))  # rbg: faster to compile
    first, again, other = (noisy(state, key) for key in keys)
    np.testing.assert_array_equal(first, again)
    quiet, _ = forward(rel, tokens, dec)  # the same weights without dropout
    assert np.abs(first - quiet).max() > 1e-3 and np.abs(first - other).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# Config errors.


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"family": "decoder"}, "model.position=relative .* needs model.family=encoder_decoder"),
        ({"position": "learned"}, "supports model.position=relative .* or rope, not learned"),
        ({"norm_placement": "post"}, "encoder_decoder is pre-norm"),
        ({"relative_buckets": 3}, "model.relative_buckets=3 must be at least 4"),
        ({"relative_max_distance": 4}, r"relative_max_distance=4 must exceed .* = 4"),
        ({"num_decoder_layers": -1}, "model.num_decoder_layers=-1 must be >= 0"),
        (
            {"family": "encoder", "position": "learned", "mlp": "geglu"},
            "model.mlp=geglu has no masked-LM head activation",
        ),
    ],
)
def test_config_errors(changes, match):
    model = dataclasses.replace(REL, **changes)
    with pytest.raises(ConfigError, match=match):
        validate(Config(model=model))


def test_presets_validate_and_model_errors():
    for name in ("t5-small", "t5-base", "t5-tiny"):
        validate(Config(model=ModelConfig(**MODEL_PRESETS[name])))
    assert ModelConfig(**MODEL_PRESETS["t5-tiny"]).mlp == "geglu"
    with pytest.raises(ValueError, match="model.position='learned' is not supported"):
        EncoderDecoder(dataclasses.replace(REL, position="learned"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cannot build a encoder_decoder"):
        EncoderDecoder(dataclasses.replace(REL, family="decoder"), rngs=nnx.Rngs(0))
