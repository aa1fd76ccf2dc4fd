"""An instrumented forward pass: every layer's attention weights and residual stream, with
token embeddings that may be replaced and heads or sublayers that may be ablated.

The models in `plm_jax.models` compute attention with `jax.nn.dot_product_attention`, which
returns no weights, and their stacks return only the last hidden state. Rather than thread
probes through the training code (and risk its compiled step), this module replays a model
layer by layer from the model's own submodules: its embeddings, norms, MLPs, relative position
bias, rotary tables, masks and output heads are called as they are; only two things are
written out here, the attention product (explicit softmax weights, per-head outputs) and the
order of each block's residual branches. `tests/test_explain.py` pins the replay to the
model's own outputs for every family (logits, hidden states), and the weights to transformers'
`output_attentions`.

Ablation (`Knobs`): a `keep` value per head and per sublayer; 1 keeps it, 0 replaces it by
zero (`mode="zero"`) or by its mean over the input's positions (`mode="mean"`). A head's
output is its `[L, H]` slice before the output projection, so replacing it changes exactly
that head's term `z_n W_o[n]` of the attention output (the output bias stays). A sublayer's
output is the whole branch added to the residual stream (bias included). Keep values are
arrays, so many ablations run as one vmapped/mapped call.

What it leaves out: padding (one unpadded sequence per call, batch 1), KV caches, dropout,
and scanned stacks (`unrolled` turns a `use_scan_layers` model into a list of blocks first).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from plm_jax.models import build_model
from plm_jax.models.attention import Attention, attention_mask
from plm_jax.models.layers import (
    add_bias,
    apply_rope,
    rope_scaling_from_config,
    rope_tables,
    token_einsum,
)

__all__ = ["ABLATION_MODES", "Inputs", "Knobs", "Trace", "default_knobs", "trace", "unrolled"]

ABLATION_MODES = ("zero", "mean")
KV = tuple[jax.Array, jax.Array]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Inputs:
    """One sequence (batch 1). tokens: [1, L] int32, the text (encoder-decoders: the source);
    token_types: [1, L] int32 BERT token types or None; decoder_tokens: [1, T] int32 decoder
    input of an encoder-decoder (start id first) or None."""

    tokens: jax.Array
    token_types: jax.Array | None = None
    decoder_tokens: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trace:
    """What one forward pass saw.

    Attributes:
      streams: stack name ("decoder" or "encoder") -> [layers + 1, L, D] float32: the residual
        stream entering each block, then leaving the last one (post-norm stacks: after each
        norm, the stream the next block reads). The output head reads the last entry.
      attention: site ("encoder.self", "decoder.self", "decoder.cross") -> [layers, N, L, S]
        float32 softmax weights (rows: queries, columns: keys).
    """

    streams: dict[str, jax.Array]
    attention: dict[str, jax.Array]


Knobs = dict[str, dict[str, jax.Array]]


def default_knobs(cfg) -> Knobs:
    """All-ones keep values: stack -> {"attn_heads": [layers, N], "attn": [layers],
    ("cross_heads", "cross",) "mlp": [layers]} float32. Ones change nothing."""
    n = cfg.num_heads

    def stack(layers: int, cross: bool) -> dict[str, jax.Array]:
        knobs = {"attn_heads": jnp.ones((layers, n)), "attn": jnp.ones(layers)}
        if cross:
            knobs |= {"cross_heads": jnp.ones((layers, n)), "cross": jnp.ones(layers)}
        return knobs | {"mlp": jnp.ones(layers)}

    if cfg.family == "encoder_decoder":
        return {
            "encoder": stack(cfg.num_layers, False),
            "decoder": stack(cfg.num_decoder_layers, True),
        }
    return {"decoder" if cfg.family == "decoder" else "encoder": stack(cfg.num_layers, False)}


def unrolled(model: nnx.Module) -> nnx.Module:
    """`model` itself, or, for a `use_scan_layers` model, the same weights as a list of blocks
    (the layout this module walks)."""
    cfg = model.cfg
    if not cfg.use_scan_layers:
        return model
    flat_cfg = dataclasses.replace(cfg, use_scan_layers=False)
    target = nnx.eval_shape(lambda: build_model(flat_cfg, rngs=nnx.Rngs(params=0)))
    values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for name in ("blocks", "encoder_blocks", "decoder_blocks"):
        if name in values:
            stacked = values[name]
            count = jax.tree.leaves(stacked)[0].shape[0]
            values[name] = {i: jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(count)}
    state = nnx.state(target, nnx.Param)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(target, state)
    return target


def _replace(value: jax.Array, keep: jax.Array, mode: str) -> jax.Array:
    """keep * value + (1 - keep) * (0, or the mean over positions); value [1, L, ...]."""
    fill = jnp.zeros_like(value) if mode == "zero" else value.mean(axis=1, keepdims=True)
    return keep * value + (1.0 - keep) * fill


def attend(
    attn: Attention,
    x: jax.Array,
    *,
    mask: jax.Array,
    rope=None,
    bias: jax.Array | None = None,
    cross_kv: KV | None = None,
    head_keep: jax.Array | None = None,
    mode: str = "zero",
) -> tuple[jax.Array, jax.Array]:
    """`Attention.__call__` with explicit weights: x [1, L, D] -> (out [1, L, D], weights
    [1, N, L, S] float32). head_keep: [N] keep values of the heads' outputs, or None.

    The product follows `jax.nn.dot_product_attention`'s XLA path: float32 logits scaled by
    1/sqrt(H), the bias added, masked keys set to the most negative float32, float32 softmax;
    query head n reads kv head n // (N / K).
    """
    w_q, w_o = (p[...].astype(attn.dtype) for p in (attn.w_q, attn.w_o))
    q = add_bias(token_einsum("BLD,DNH->BLNH", x, w_q), attn.b_q)
    k, v = attn.project_kv(x) if cross_kv is None else cross_kv
    if rope is not None:
        q = apply_rope(q, *rope)
        k = k if cross_kv is not None else apply_rope(k, *rope)
    group = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("BLNH,BSNH->BNLS", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(q.shape[-1] ** -0.5)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    z = jnp.einsum("BNLS,BSNH->BLNH", weights.astype(v.dtype), v)  # each head's output
    if head_keep is not None:
        z = _replace(z, head_keep[None, None, :, None].astype(z.dtype), mode)
    return add_bias(token_einsum("BLNH,NHD->BLD", z, w_o), attn.b_o), weights


def _branch(value, knobs, name, layer, mode):
    return value if knobs is None else _replace(value, knobs[name][layer].astype(value.dtype), mode)


def _heads(knobs, name, layer):
    return None if knobs is None else knobs[name][layer]


def _run_stack(blocks, x, *, mask, rope, bias, knobs, mode, cross=None, post_norm=False):
    """Every block of one stack: (streams [layers + 1, L, D] float32, weights, cross weights).

    `cross`: (encoded [1, S, D], cross mask) for decoder blocks of an encoder-decoder.
    """
    streams, weights, cross_weights = [x], [], []
    for i, block in enumerate(blocks):
        kw = dict(mask=mask, rope=rope, bias=bias, mode=mode)
        if post_norm:  # BERT: Norm(x + Attn(x)), Norm(x + Mlp(x))
            h, w = attend(block.attn, x, head_keep=_heads(knobs, "attn_heads", i), **kw)
            x = block.attn_norm(x + _branch(h, knobs, "attn", i, mode))
            x = block.mlp_norm(x + _branch(block.mlp(x), knobs, "mlp", i, mode))
        else:
            h, w = attend(
                block.attn, block.attn_norm(x), head_keep=_heads(knobs, "attn_heads", i), **kw
            )
            x = x + _branch(h, knobs, "attn", i, mode)
            if cross is not None:
                encoded, cross_mask = cross
                h, cw = attend(
                    block.cross_attn,
                    block.cross_norm(x),
                    mask=cross_mask,
                    cross_kv=block.cross_attn.project_kv(encoded),
                    head_keep=_heads(knobs, "cross_heads", i),
                    mode=mode,
                )
                x = x + _branch(h, knobs, "cross", i, mode)
                cross_weights.append(cw[0])
            x = x + _branch(block.mlp(block.mlp_norm(x)), knobs, "mlp", i, mode)
        streams.append(x)
        weights.append(w[0])
    stacked = jnp.stack(streams)[:, 0].astype(jnp.float32)
    return stacked, jnp.stack(weights), jnp.stack(cross_weights) if cross_weights else None


def _rope(cfg, positions):
    """Rotary tables as the decoder and encoder-decoder build them (with any RoPE scaling)."""
    scaling = rope_scaling_from_config(cfg)
    return rope_tables(positions, cfg.head_dim, cfg.rope_theta, scaling=scaling)


def _layout(length: int, *, causal: bool):
    index = jnp.arange(length, dtype=jnp.int32)
    segments = jnp.ones((1, length), jnp.int32)
    positions = index[None]
    return positions, attention_mask(segments, segments, index, index, causal=causal)


def trace(
    model: nnx.Module,
    inputs: Inputs,
    *,
    embeds: jax.Array | None = None,
    knobs: Knobs | None = None,
    mode: str = "zero",
) -> Trace:
    """Runs `model` (an unrolled Decoder, Encoder or EncoderDecoder) on one sequence.

    Args:
      model: the model; see `unrolled`.
      inputs: the sequence.
      embeds: [1, L, D] token embeddings to use instead of `model.embed(inputs.tokens)` (the
        attributed input: the text, or an encoder-decoder's source); positions, token types
        and the decoder side are kept.
      knobs: keep values (`default_knobs`) or None for the plain model.
      mode: "zero" or "mean" ablation of what `knobs` drops.

    Returns:
      The `Trace`.
    """
    family = model.cfg.family
    if family == "decoder":
        return _trace_decoder(model, inputs, embeds, knobs, mode)
    if family == "encoder":
        return _trace_encoder(model, inputs, embeds, knobs, mode)
    return _trace_encoder_decoder(model, inputs, embeds, knobs, mode)


def _stack_knobs(knobs, name):
    return None if knobs is None else knobs[name]


def _trace_decoder(model, inputs, embeds, knobs, mode) -> Trace:
    cfg = model.cfg
    positions, mask = _layout(inputs.tokens.shape[1], causal=True)
    x = model.embed(inputs.tokens) if embeds is None else embeds.astype(model.embed.dtype)
    rope = None
    if model.pos_embed is not None:
        x = x + model.pos_embed(positions)
    else:
        rope = _rope(cfg, positions)
    streams, weights, _ = _run_stack(
        model.blocks,
        x,
        mask=mask,
        rope=rope,
        bias=None,
        knobs=_stack_knobs(knobs, "decoder"),
        mode=mode,
        post_norm=cfg.norm_placement == "post",
    )
    return Trace({"decoder": streams}, {"decoder.self": weights})


def _trace_encoder(model, inputs, embeds, knobs, mode) -> Trace:
    cfg = model.cfg
    positions, mask = _layout(inputs.tokens.shape[1], causal=False)
    x = model.embed(inputs.tokens) if embeds is None else embeds.astype(model.embed.dtype)
    rope = None
    if model.pos_embed is not None:
        x = x + model.pos_embed(positions)
    else:
        rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    if model.type_embed is not None:
        types = jnp.zeros_like(inputs.tokens) if inputs.token_types is None else inputs.token_types
        x = x + model.type_embed(types)
    if model.embed_norm is not None:
        x = model.embed_norm(x)
    streams, weights, _ = _run_stack(
        model.blocks,
        x,
        mask=mask,
        rope=rope,
        bias=None,
        knobs=_stack_knobs(knobs, "encoder"),
        mode=mode,
        post_norm=cfg.norm_placement == "post",
    )
    return Trace({"encoder": streams}, {"encoder.self": weights})


def _trace_encoder_decoder(model, inputs, embeds, knobs, mode) -> Trace:
    source_len = inputs.tokens.shape[1]
    positions, mask = _layout(source_len, causal=False)
    bias = None
    if model.encoder_rel_bias is not None:
        bias = model.encoder_rel_bias(positions[:, None, :] - positions[:, :, None])
    x = model.embed(inputs.tokens) if embeds is None else embeds.astype(model.embed.dtype)
    enc_streams, enc_weights, _ = _run_stack(
        model.encoder_blocks,
        x,
        mask=mask,
        rope=_rope(model.cfg, positions) if model.cfg.position == "rope" else None,
        bias=bias,
        knobs=_stack_knobs(knobs, "encoder"),
        mode=mode,
    )
    encoded = model.encoder_norm(enc_streams[-1][None].astype(x.dtype))

    target_len = inputs.decoder_tokens.shape[1]
    d_positions, d_mask = _layout(target_len, causal=True)
    d_bias = None
    if model.decoder_rel_bias is not None:
        d_bias = model.decoder_rel_bias(d_positions[:, None, :] - d_positions[:, :, None])
    ones = jnp.ones((1, target_len), jnp.int32)
    source_index = jnp.arange(source_len, dtype=jnp.int32)
    cross_mask = attention_mask(
        ones, jnp.ones((1, source_len), jnp.int32), d_positions[0], source_index, causal=False
    )
    dec_streams, dec_weights, cross_weights = _run_stack(
        model.decoder_blocks,
        model.embed(inputs.decoder_tokens),
        mask=d_mask,
        rope=_rope(model.cfg, d_positions) if model.cfg.position == "rope" else None,
        bias=d_bias,
        knobs=_stack_knobs(knobs, "decoder"),
        mode=mode,
        cross=(encoded, cross_mask),
    )
    return Trace(
        {"encoder": enc_streams, "decoder": dec_streams},
        {"encoder.self": enc_weights, "decoder.self": dec_weights, "decoder.cross": cross_weights},
    )
