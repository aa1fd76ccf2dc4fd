"""The encoder-decoder Transformer (T5 style) and its decoding cache.

`EncoderDecoder` (Raffel et al. 2020) = one token embedding shared by both stacks ->
  encoder: pre-norm blocks `x + Attn(Norm(x))`, `x + Mlp(Norm(x))` with bidirectional
    self-attention -> final norm = `encoded`
  decoder: pre-norm blocks `x + SelfAttn(Norm(x))` (causal), `x + CrossAttn(Norm(x), encoded)`,
    `x + Mlp(Norm(x))` -> final norm -> output head: the shared embedding applied to
    `hidden * D**-0.5` when tied (T5 v1.0), or a separate [D, V] matrix (T5 v1.1, unscaled).

Positions (`model.position`): "relative" is T5's bias, a learned [buckets, N] table per stack
indexed by the bucket of `key position - query position` (bidirectional buckets in the
encoder, causal ones in the decoder), computed once per stack and added to the logits of every
self-attention layer; "rope" rotates queries and keys of self-attention. Cross-attention has no
position information in either case. Attention logits are scaled by 1/sqrt(H) as everywhere in
plm_jax; T5 does not scale them, so `convert/t5.py` folds sqrt(H) into w_q.

Segment ids (0 = padding) keep packed examples apart: encoder tokens attend to encoder tokens of
their segment, decoder tokens causally to decoder tokens of their segment and across to encoder
tokens whose segment id equals theirs. Positions restart at 0 in each packed example.

Decoding uses `Seq2SeqCache`: self-attention K/V slots written in lockstep for all rows from
slot 0, and the cross-attention K/V of every decoder layer, computed once by `init_cache`.

What it leaves out: learned absolute positions, post-norm, dropout on attention probabilities
and inside the MLP (dropout applies to embeddings and residual branches, as in the other
stacks), losses (train/) and search (infer/seq2seq.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.config import ModelConfig
from plm_jax.models.attention import ATTENTION_IMPLEMENTATIONS, Attention, attention_segments
from plm_jax.models.layers import (
    INIT_STD,
    Embed,
    dropout,
    make_param,
    normal,
    rope_scaling_from_config,
    rope_tables,
)
from plm_jax.models.sizes import resolve_model_config
from plm_jax.models.transformer import (
    ACT_AXES,
    DTYPES,
    LOGIT_AXES,
    MLPS,
    NORMS,
    REMAT_POLICIES,
    LmOutput,
    check_variants,
)
from plm_jax.sharding import constrain

__all__ = [
    "EncoderDecoder",
    "RelativePositionBias",
    "Seq2SeqCache",
    "relative_position_bucket",
]

POSITIONS = ("relative", "rope")  # what `model.position` may be for this family

KV = tuple[jax.Array, jax.Array]


@functools.cache
def _distance_buckets(num_buckets: int, max_distance: int) -> np.ndarray:
    """[max_distance + 1] int32: the bucket of each distance 0..max_distance in one direction.

    Half the buckets hold the distances below `num_buckets // 2` one each; the rest split the
    distances up to `max_distance` logarithmically, and farther ones share the last bucket.
    Computed once on the host in float32, op for op as transformers' T5 does, so the buckets
    match it and do not depend on a device's `log`.
    """
    f32 = np.float32
    max_exact = num_buckets // 2
    distance = np.arange(max_distance + 1)
    large = np.maximum(distance, max_exact).astype(f32)  # the log of distances below is unused
    scaled = (
        np.log(large / f32(max_exact))
        / f32(math.log(max_distance / max_exact))
        * f32(num_buckets - max_exact)
    )
    large_bucket = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return np.where(distance < max_exact, distance, large_bucket).astype(np.int32)


def relative_position_bucket(
    relative: jax.Array, num_buckets: int, max_distance: int, *, bidirectional: bool
) -> jax.Array:
    """T5's bucket of each relative position (transformers' `_relative_position_bucket`).

    Args:
      relative: int array, key position - query position.
      num_buckets: the bucket count; bidirectional buckets give half to keys after the query.
      max_distance: distances at or beyond it share the last bucket of their direction.
      bidirectional: False for causal attention, where keys after the query (masked anyway)
        share bucket 0 with distance 0.

    Returns:
      int32 bucket ids in [0, num_buckets), the shape of `relative`.
    """
    if bidirectional:
        half = num_buckets // 2
        table = _distance_buckets(half, max_distance)
        offset = jnp.where(relative > 0, half, 0)
        distance = jnp.abs(relative)
    else:
        table = _distance_buckets(num_buckets, max_distance)
        offset = 0
        distance = jnp.maximum(-relative, 0)
    return offset + jnp.asarray(table)[jnp.minimum(distance, max_distance)]


class RelativePositionBias(nnx.Module):
    """A learned [buckets, N] table: the attention-logit bias of each relative position bucket
    and head, shared by every layer of one stack."""

    def __init__(
        self,
        num_buckets: int,
        max_distance: int,
        num_heads: int,
        *,
        bidirectional: bool,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        shape, names = (num_buckets, num_heads), (None, "heads")
        self.embedding = make_param(normal(INIT_STD), shape, names, rngs=rngs, dtype=param_dtype)
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.bidirectional = bidirectional

    def __call__(self, relative: jax.Array) -> jax.Array:
        """relative: [B, L, S] int (key - query position) -> bias [B, N, L, S] float32."""
        buckets = relative_position_bucket(
            relative, self.num_buckets, self.max_distance, bidirectional=self.bidirectional
        )
        values = jnp.take(self.embedding[...].astype(jnp.float32), buckets, axis=0)
        return values.transpose(0, 3, 1, 2)  # [B, L, S, N] -> [B, N, L, S]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Seq2SeqCache:
    """The decoder's state for incremental decoding; a pytree, replaced on every call.

    Attributes:
      k: [layers, B, S, K, H] self-attention keys in the compute dtype (S = max_len slots).
      v: [layers, B, S, K, H] self-attention values.
      segment_ids: [B, S] int32 segment id of each self-attention slot; 0 = empty.
      cross_k: [layers, B, T, K, H] cross-attention keys of the encoder output (T its length).
      cross_v: [layers, B, T, K, H] cross-attention values.
      encoder_segment_ids: [B, T] int32 segment ids of the encoder tokens; 0 = padding.
      index: [] int32, the next slot to write (all rows in lockstep); also the position of the
        next decoder token.
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    cross_k: jax.Array
    cross_v: jax.Array
    encoder_segment_ids: jax.Array
    index: jax.Array

    def take_rows(self, index: jax.Array) -> Seq2SeqCache:
        """The cache of rows `index` ([B'] int32, repeats allowed): beam reordering/expansion."""
        return Seq2SeqCache(
            k=jnp.take(self.k, index, axis=1),
            v=jnp.take(self.v, index, axis=1),
            segment_ids=jnp.take(self.segment_ids, index, axis=0),
            cross_k=jnp.take(self.cross_k, index, axis=1),
            cross_v=jnp.take(self.cross_v, index, axis=1),
            encoder_segment_ids=jnp.take(self.encoder_segment_ids, index, axis=0),
            index=self.index,
        )


def _fold_in(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


class Seq2SeqBlock(nnx.Module):
    """Pre-norm block: `x + SelfAttn(Norm(x))`, in the decoder `x + CrossAttn(Norm(x),
    encoded)`, then `x + Mlp(Norm(x))`."""

    def __init__(self, cfg: ModelConfig, *, is_decoder: bool, rngs: nnx.Rngs):
        """cfg: a resolved config."""
        kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)
        # As GPT-2: residual-branch outputs scaled by 1/sqrt(number of branches in the stack).
        branches = 3 * cfg.num_decoder_layers if is_decoder else 2 * cfg.num_layers
        out_std = INIT_STD / math.sqrt(branches)
        attention = functools.partial(
            Attention,
            cfg.embed_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            use_bias=cfg.use_bias,
            implementation=ATTENTION_IMPLEMENTATIONS[cfg.attention],
            out_std=out_std,
            **kw,
        )
        self.attn_norm = NORMS[cfg.norm](cfg, **kw)
        self.attn = attention()
        self.cross_norm = NORMS[cfg.norm](cfg, **kw) if is_decoder else None
        self.cross_attn = attention() if is_decoder else None
        self.mlp_norm = NORMS[cfg.norm](cfg, **kw)
        self.mlp = MLPS[cfg.mlp](
            cfg.embed_dim, cfg.mlp_dim, use_bias=cfg.use_bias, out_std=out_std, **kw
        )
        self.dropout_rate = cfg.dropout

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array,
        bias: jax.Array | None,
        rope: tuple[jax.Array, jax.Array] | None,
        cross_mask: jax.Array | None = None,
        cross_kv: KV | None = None,
        key: jax.Array | None = None,
        kv: KV | None = None,
        write_index: jax.Array | None = None,
    ) -> tuple[jax.Array, KV | None]:
        """x: [B, L, D] -> ([B, L, D], the updated self-attention kv or None).

        mask [B, 1, L, S] and bias [B, N, L, S] (or None) of self-attention; decoder only:
        cross_mask [B, 1, L, T] and cross_kv, the encoder output's (k, v) [B, T, K, H] each;
        kv / write_index as in `Attention`; `key` None means no dropout.
        """
        x = constrain(x, ACT_AXES)
        rate = self.dropout_rate
        h, kv = self.attn(
            self.attn_norm(x), mask=mask, rope=rope, bias=bias, kv=kv, write_index=write_index
        )
        x = x + dropout(h, rate, _fold_in(key, 0))
        if self.cross_attn is not None:
            h, _ = self.cross_attn(self.cross_norm(x), mask=cross_mask, cross_kv=cross_kv)
            x = x + dropout(h, rate, _fold_in(key, 1))
        x = x + dropout(self.mlp(self.mlp_norm(x)), rate, _fold_in(key, 2))
        return constrain(x, ACT_AXES), kv


def _make_layers(cfg: ModelConfig, count: int, is_decoder: bool, rngs: nnx.Rngs) -> nnx.Module:
    """`count` blocks: a list, or (use_scan_layers) one block whose parameters carry a leading
    `layers` axis, for nnx.scan."""
    if not cfg.use_scan_layers:
        return nnx.List([Seq2SeqBlock(cfg, is_decoder=is_decoder, rngs=rngs) for _ in range(count)])

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> nnx.Module:
        return Seq2SeqBlock(cfg, is_decoder=is_decoder, rngs=rngs)

    return make(rngs)


def _resolved(cfg: ModelConfig) -> ModelConfig:
    """The resolved config, after checking every variant string.

    Raises:
      ValueError: another family, learned positions, post-norm or an unknown variant.
    """
    # The family and the tables of norm, mlp, remat, dtypes and attention are the decoder's;
    # positions differ and are checked here.
    check_variants(dataclasses.replace(cfg, position="rope"), "encoder_decoder")
    if cfg.position not in POSITIONS:
        raise ValueError(
            f"model.position={cfg.position!r} is not supported by the encoder-decoder; "
            f"choose one of {list(POSITIONS)}"
        )
    if cfg.norm_placement != "pre":
        raise ValueError("the encoder-decoder is pre-norm; set model.norm_placement='pre'")
    return resolve_model_config(cfg)


class EncoderDecoder(nnx.Module):
    """T5-style encoder-decoder (v1.0: ReLU, tied head; v1.1: GeGLU, untied), or with RoPE.

    Dropout keys come from `rngs` passed to a call (its `dropout` stream, or `default`), or
    else from a stream forked at construction (kept only when `cfg.dropout > 0`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        """Builds the parameters from `rngs.params` (or `default`); `self.cfg` is resolved.

        Raises:
          ValueError: an unusable config (see `resolve_model_config`) or variant.
        """
        cfg = _resolved(cfg)
        self.cfg = cfg
        param_dtype = DTYPES[cfg.param_dtype]
        kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=param_dtype, rngs=rngs)
        self.embed = Embed(cfg.vocab_size, cfg.embed_dim, names=("vocab", "embed"), **kw)
        relative = functools.partial(
            RelativePositionBias,
            cfg.relative_buckets,
            cfg.relative_max_distance,
            cfg.num_heads,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        is_relative = cfg.position == "relative"
        self.encoder_rel_bias = relative(bidirectional=True) if is_relative else None
        self.encoder_blocks = _make_layers(cfg, cfg.num_layers, False, rngs)
        self.encoder_norm = NORMS[cfg.norm](cfg, **kw)
        self.decoder_rel_bias = relative(bidirectional=False) if is_relative else None
        self.decoder_blocks = _make_layers(cfg, cfg.num_decoder_layers, True, rngs)
        self.decoder_norm = NORMS[cfg.norm](cfg, **kw)
        head_shape, head_names = (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab")
        self.head = (
            None
            if cfg.tie_embeddings
            else make_param(normal(INIT_STD), head_shape, head_names, rngs=rngs, dtype=param_dtype)
        )
        has_stream = "dropout" in rngs or "default" in rngs
        self.dropout_rngs = rngs.dropout.fork() if cfg.dropout > 0 and has_stream else None

    # -- public API -------------------------------------------------------------------------

    def __call__(
        self,
        tokens: jax.Array,
        decoder_tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        lm_logits: bool = True,
    ) -> LmOutput:
        """Encodes `tokens` and decodes `decoder_tokens` against them (training, scoring).

        Args:
          tokens: [B, T] int32 encoder input. positions, segment_ids: [B, T] as in `encode`.
          decoder_tokens: [B, L] int32 decoder input (targets shifted right, start id first).
          decoder_positions, decoder_segment_ids: [B, L] as in `decode`.
          deterministic: no dropout when True. rngs: dropout randomness for this call.
          lm_logits: False skips the output head (logits None).

        Returns:
          `LmOutput(logits [B, L, V] float32, hidden [B, L, D], cache None)`.
        """
        key = self._dropout_key(deterministic, rngs)
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        encoded = self._encode(tokens, positions, segment_ids, _fold_in(key, 0))
        return self._decode(
            decoder_tokens,
            encoded,
            segment_ids,
            decoder_positions,
            decoder_segment_ids,
            _fold_in(key, 1),
            None,
            lm_logits,
        )

    def encode(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The encoder output.

        Args:
          tokens: [B, T] int32.
          positions: [B, T] int32; default arange(T) per row (restart them in packed rows).
          segment_ids: [B, T] int32; tokens attend to tokens with the same nonzero id (0 =
            padding). Default: all ones.
          deterministic: no dropout when True. rngs: dropout randomness for this call.

        Returns:
          encoded: [B, T, D] after the encoder's final norm.
        """
        key = self._dropout_key(deterministic, rngs)
        return self._encode(tokens, positions, segment_ids, key)

    def decode(
        self,
        tokens: jax.Array,
        encoded: jax.Array | None,
        *,
        encoder_segment_ids: jax.Array | None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        cache: Seq2SeqCache | None = None,
        lm_logits: bool = True,
    ) -> LmOutput:
        """Next-token logits of the decoder, attending to the encoder output.

        Args:
          tokens: [B, L] int32 decoder input.
          encoded: [B, T, D] from `encode`; unused (may be None) with a cache, which holds
            its cross-attention keys and values.
          encoder_segment_ids: [B, T] int32 segment ids of the encoder tokens (default all
            ones); with a cache, the cache's are used.
          positions: [B, L] int32 query positions. Default: arange(L) without a cache; with
            one, `cache.index + arange(L)` (lockstep decoding, keys at their slots).
          segment_ids: [B, L] int32; a token attends causally to tokens of its (nonzero)
            segment and across to encoder tokens of the same segment. Default: all ones.
          deterministic: no dropout when True. rngs: dropout randomness for this call.
          cache: a `Seq2SeqCache` (`init_cache`); the tokens are written at `cache.index`.
          lm_logits: False skips the output head (logits None).

        Returns:
          `LmOutput(logits [B, L, V] float32, hidden [B, L, D], the updated cache or None)`.
        """
        key = self._dropout_key(deterministic, rngs)
        return self._decode(
            tokens, encoded, encoder_segment_ids, positions, segment_ids, key, cache, lm_logits
        )

    def init_cache(
        self, encoded: jax.Array, encoder_segment_ids: jax.Array | None, max_len: int
    ) -> Seq2SeqCache:
        """A cache of `max_len` empty self-attention slots and the cross-attention K/V of every
        decoder layer, computed once from `encoded` ([B, T, D]; segment ids [B, T], default
        all ones). The caller keeps the decoded length within max_len."""
        cfg = self.cfg
        batch, source_len = encoded.shape[:2]
        if encoder_segment_ids is None:
            encoder_segment_ids = jnp.ones((batch, source_len), jnp.int32)
        if cfg.use_scan_layers:
            project = nnx.vmap(lambda b: b.cross_attn.project_kv(encoded), in_axes=0, out_axes=0)
            cross_k, cross_v = project(self.decoder_blocks)
        else:
            pairs = [b.cross_attn.project_kv(encoded) for b in self.decoder_blocks]
            cross_k, cross_v = (jnp.stack(parts) for parts in zip(*pairs, strict=True))
        shape = (cfg.num_decoder_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return Seq2SeqCache(
            k=jnp.zeros(shape, DTYPES[cfg.dtype]),
            v=jnp.zeros(shape, DTYPES[cfg.dtype]),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            cross_k=cross_k,
            cross_v=cross_v,
            encoder_segment_ids=encoder_segment_ids.astype(jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    # -- the stacks ---------------------------------------------------------------------------

    def _encode(self, tokens, positions, segment_ids, key) -> jax.Array:
        cfg = self.cfg
        batch, length = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        index = jnp.arange(length, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(index, (batch, length))
        mask = attention_segments(segment_ids, segment_ids, index, index, causal=False)
        bias = None
        if self.encoder_rel_bias is not None:
            bias = self.encoder_rel_bias(positions[:, None, :] - positions[:, :, None])
        rope = self._rope(positions)
        keys = None if key is None else jax.random.split(key, cfg.num_layers + 1)

        def apply(block, x, layer_key, _):
            return block(x, mask=mask, bias=bias, rope=rope, key=layer_key)

        x = dropout(self.embed(tokens), cfg.dropout, None if keys is None else keys[0])
        layer_keys = None if keys is None else keys[1:]
        x, _ = self._run_layers(self.encoder_blocks, apply, x, layer_keys, None)
        return constrain(self.encoder_norm(x), ACT_AXES)

    def _decode(
        self, tokens, encoded, encoder_segment_ids, positions, segment_ids, key, cache, lm_logits
    ) -> LmOutput:
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        if encoder_segment_ids is None and cache is None:
            encoder_segment_ids = jnp.ones(encoded.shape[:2], jnp.int32)
        positions, mask, cross_mask, relative, k_segment = self._decoder_layout(
            positions, segment_ids, encoder_segment_ids, cache
        )
        bias = None if self.decoder_rel_bias is None else self.decoder_rel_bias(relative)
        rope = self._rope(positions)
        layers = None if cache is None else ((cache.k, cache.v), (cache.cross_k, cache.cross_v))
        write_index = None if cache is None else cache.index
        keys = None if key is None else jax.random.split(key, cfg.num_decoder_layers + 1)

        def apply(block, x, layer_key, layer):
            kv, cross_kv = (None, None) if layer is None else layer
            if cross_kv is None:  # training: the encoder output's K/V, layer by layer
                cross_kv = block.cross_attn.project_kv(encoded)
            return block(
                x,
                mask=mask,
                bias=bias,
                rope=rope,
                cross_mask=cross_mask,
                cross_kv=cross_kv,
                key=layer_key,
                kv=kv,
                write_index=write_index,
            )

        x = dropout(self.embed(tokens), cfg.dropout, None if keys is None else keys[0])
        layer_keys = None if keys is None else keys[1:]
        x, kv = self._run_layers(self.decoder_blocks, apply, x, layer_keys, layers)
        hidden = self.decoder_norm(x)
        logits = self._logits(hidden) if lm_logits else None
        if cache is not None:
            cache = dataclasses.replace(
                cache, k=kv[0], v=kv[1], segment_ids=k_segment, index=cache.index + tokens.shape[1]
            )
        return LmOutput(logits=logits, hidden=hidden, cache=cache)

    def _decoder_layout(self, positions, segment_ids, encoder_segment_ids, cache):
        """Positions [B, L], self-attention mask [B, 1, L, S], cross-attention mask
        [B, 1, L, T], relative positions [B, L, S] (key - query) and key segment ids [B, S]."""
        batch, length = segment_ids.shape
        q_index = jnp.arange(length, dtype=jnp.int32)
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(q_index, (batch, length))
            mask = attention_segments(segment_ids, segment_ids, q_index, q_index)
            relative = positions[:, None, :] - positions[:, :, None]
            k_segment = segment_ids
        else:
            encoder_segment_ids = cache.encoder_segment_ids
            if positions is None:
                positions = jnp.broadcast_to(cache.index + q_index, (batch, length))
            start = (jnp.zeros((), jnp.int32), cache.index)
            k_segment = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, start)
            k_index = jnp.arange(k_segment.shape[1], dtype=jnp.int32)
            mask = attention_segments(segment_ids, k_segment, cache.index + q_index, k_index)
            relative = k_index[None, None, :] - positions[:, :, None]  # keys at their slots
        source_index = jnp.arange(encoder_segment_ids.shape[1], dtype=jnp.int32)
        cross_mask = attention_segments(
            segment_ids, encoder_segment_ids, q_index, source_index, causal=False
        )
        return positions, mask, cross_mask, relative, k_segment

    def _logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, L, D] -> logits [B, L, V] float32."""
        if self.head is None:
            # T5 v1.0 (Mesh TensorFlow) rescales the decoder output by D**-0.5 before the head
            # it shares with the input embedding.
            scaled = hidden * jnp.asarray(self.cfg.embed_dim**-0.5, hidden.dtype)
            return constrain(self.embed.attend(scaled), LOGIT_AXES)
        w = self.head[...].astype(hidden.dtype)
        logits = jnp.einsum("BLD,DV->BLV", hidden, w, preferred_element_type=jnp.float32)
        return constrain(logits, LOGIT_AXES)

    def _rope(self, positions: jax.Array) -> tuple[jax.Array, jax.Array] | None:
        cfg = self.cfg
        if cfg.position != "rope":
            return None
        scaling = rope_scaling_from_config(cfg)
        return rope_tables(positions, cfg.head_dim, cfg.rope_theta, scaling=scaling)

    def _dropout_key(self, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array | None:
        if deterministic or self.cfg.dropout == 0.0:
            return None
        if rngs is None and self.dropout_rngs is None:
            raise ValueError(
                "deterministic=False with dropout > 0 needs randomness: pass "
                "rngs=nnx.Rngs(dropout=key) or build the model with a 'dropout' stream"
            )
        return rngs.dropout() if rngs is not None else self.dropout_rngs()

    def _run_layers(self, blocks, apply: Callable, x, keys, layers):
        """Applies `apply(block, x, key, layer) -> (x, out)` to every block, scanned or
        unrolled; `keys` [layers] and `layers` (a pytree with a leading layers axis) may be
        None. Returns (x, the outs stacked on a leading layers axis)."""
        apply = REMAT_POLICIES[self.cfg.remat](apply)
        if self.cfg.use_scan_layers:
            scan = nnx.scan(apply, in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
            return scan(blocks, x, keys, layers)
        outs = []
        for i, block in enumerate(blocks):
            layer = jax.tree.map(lambda a, i=i: a[i], layers)
            x, out = apply(block, x, None if keys is None else keys[i], layer)
            outs.append(out)
        return x, jax.tree.map(lambda *a: jnp.stack(a), *outs)
