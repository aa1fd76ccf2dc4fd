"""The decoder-only Transformer (GPT-2 and LLaMA styles) and its KV cache.

`Decoder` is a pre-norm stack: embeddings (+ learned positions) -> blocks of
`x + Attn(Norm(x))`, `x + Mlp(Norm(x))` -> final norm -> tied or untied output head. Variants
are picked once, at construction, from dicts keyed by the config strings (`NORMS`, `MLPS`,
`REMAT_POLICIES`, `attention.ATTENTION_IMPLEMENTATIONS`).

Decoding uses `KVCache`: one buffer of K/V slots shared by all rows, written at the same slot
index for every row. Padding tokens carry segment id 0 and are never attended, so prompts of
different lengths may be padded on either side; left padding is simplest, since every row's
next-token logits are then in the last column.

What it leaves out: losses (train/), sampling (infer/) and the mesh (sharding.py). Activations
are constrained by logical names at block boundaries and after the head only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from plm_jax.config import ModelConfig
from plm_jax.models.attention import ATTENTION_IMPLEMENTATIONS, Attention, attention_segments
from plm_jax.models.layers import (
    INIT_STD,
    Embed,
    GegluMlp,
    GeluMlp,
    LayerNorm,
    ReluMlp,
    RMSNorm,
    SwiGluMlp,
    dropout,
    make_param,
    normal,
    rope_scaling_from_config,
    rope_tables,
    token_einsum,
)
from plm_jax.models.sizes import resolve_model_config
from plm_jax.sharding import constrain

__all__ = [
    "Block",
    "Decoder",
    "KVCache",
    "LmOutput",
    "MLPS",
    "NORMS",
    "POSITION_EMBEDDINGS",
    "REMAT_POLICIES",
    "Stack",
    "check_variants",
    "make_blocks",
]

ACT_AXES = ("act_batch", "act_seq", "act_embed")
LOGIT_AXES = ("act_batch", "act_seq", "act_vocab")

DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

NORMS: dict[str, Callable[..., nnx.Module]] = {
    "layernorm": lambda cfg, **kw: LayerNorm(
        cfg.embed_dim, cfg.norm_eps, use_bias=cfg.use_bias, **kw
    ),
    "rmsnorm": lambda cfg, **kw: RMSNorm(cfg.embed_dim, cfg.norm_eps, **kw),
}
MLPS: dict[str, Callable[..., nnx.Module]] = {
    "gelu": GeluMlp,
    "gelu_exact": functools.partial(GeluMlp, approximate=False),
    "swiglu": SwiGluMlp,
    "relu": ReluMlp,
    "geglu": GegluMlp,
}
# Remat is applied per block; "full" saves nothing and recomputes the whole block backward.
REMAT_POLICIES: dict[str, Callable[[Callable], Callable]] = {
    "none": lambda f: f,
    "full": functools.partial(nnx.remat, policy=jax.checkpoint_policies.nothing_saveable),
    "dots": functools.partial(nnx.remat, policy=jax.checkpoint_policies.dots_saveable),
    "dots_no_batch": functools.partial(
        nnx.remat, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    ),
}
# RoPE has no table: it rotates q and k inside attention (`rope_tables` in __call__).
POSITION_EMBEDDINGS: dict[str, Callable[..., nnx.Module | None]] = {
    "learned": lambda cfg, **kw: Embed(cfg.max_seq_len, cfg.embed_dim, names=(None, "embed"), **kw),
    "rope": lambda cfg, **kw: None,
}


def check_variants(cfg: ModelConfig, family: str) -> None:
    """Raises ValueError for a variant string that no table knows, or another model family."""
    if cfg.family != family:
        raise ValueError(
            f"model.family={cfg.family!r} cannot build a {family}; use models.build_model"
        )
    tables = {
        "norm": NORMS,
        "mlp": MLPS,
        "remat": REMAT_POLICIES,
        "dtype": [*DTYPES, "auto"],  # auto: resolve_model_config picks one per platform
        "attention": ATTENTION_IMPLEMENTATIONS,
        "param_dtype": DTYPES,
        "position": POSITION_EMBEDDINGS,
    }
    for field, table in tables.items():
        value = getattr(cfg, field)
        if value not in table:
            raise ValueError(
                f"model.{field}={value!r} is not supported; choose one of {list(table)}"
            )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys/values of every layer for incremental decoding; a pytree, replaced on every call.

    Attributes:
      k: [layers, B, S, K, H] keys, in the compute dtype (S = max_len slots).
      v: [layers, B, S, K, H] values.
      segment_ids: [B, S] int32, segment id of each slot; 0 = empty or padding (never attended).
      index: [] int32, the next slot to write; all rows write the same slots.
      next_position: [B] int32, each row's next token position (its number of real tokens when
        positions are left to their defaults).
    """

    k: jax.Array
    v: jax.Array
    segment_ids: jax.Array
    index: jax.Array
    next_position: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LmOutput:
    """logits: [B, L, V] float32; hidden: [B, L, D] after the final norm; cache: the updated
    `KVCache` when one was passed, else None."""

    logits: jax.Array | None
    hidden: jax.Array
    cache: KVCache | None = None


class Block(nnx.Module):
    """Transformer block. Pre-norm (GPT-2, LLaMA): `x + Attn(Norm(x))`, then `x + Mlp(Norm(x))`.
    Post-norm (BERT): `Norm(x + Attn(x))`, then `Norm(x + Mlp(x))`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        """cfg: a resolved config (`resolve_model_config`)."""
        kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)
        # GPT-2: residual-branch output projections scaled by 1/sqrt(2 * num_layers) so the
        # residual stream's variance does not grow with depth.
        out_std = INIT_STD / math.sqrt(2 * cfg.num_layers)
        self.attn_norm = NORMS[cfg.norm](cfg, **kw)
        self.attn = Attention(
            cfg.embed_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            use_bias=cfg.use_bias,
            implementation=ATTENTION_IMPLEMENTATIONS[cfg.attention],
            out_std=out_std,
            **kw,
        )
        self.mlp_norm = NORMS[cfg.norm](cfg, **kw)
        self.mlp = MLPS[cfg.mlp](
            cfg.embed_dim, cfg.mlp_dim, use_bias=cfg.use_bias, out_std=out_std, **kw
        )
        self.dropout_rate = cfg.dropout
        self.post_norm = cfg.norm_placement == "post"

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None = None,
        key: jax.Array | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
        write_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x: [B, L, D] -> ([B, L, D], updated kv). `key` None means no dropout."""
        x = constrain(x, ACT_AXES)
        rate = self.dropout_rate
        if self.post_norm:
            h, kv = self.attn(x, mask=mask, rope=rope, kv=kv, write_index=write_index)
            x = self.attn_norm(x + dropout(h, rate, _fold_in(key, 0)))
            x = self.mlp_norm(x + dropout(self.mlp(x), rate, _fold_in(key, 1)))
            return constrain(x, ACT_AXES), kv
        h, kv = self.attn(self.attn_norm(x), mask=mask, rope=rope, kv=kv, write_index=write_index)
        x = x + dropout(h, rate, _fold_in(key, 0))
        x = x + dropout(self.mlp(self.mlp_norm(x)), rate, _fold_in(key, 1))
        return constrain(x, ACT_AXES), kv


def _fold_in(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def make_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    if not cfg.use_scan_layers:
        return nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

    # One Block whose parameters carry a leading `layers` axis, for nnx.scan in __call__.
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs)

    return make(rngs)


class Stack(nnx.Module):
    """What every Transformer stack shares: dropout keys and running the blocks.

    Subclasses set `self.cfg` (resolved), `self.blocks` (`make_blocks`) and `self.dropout_rngs`.
    """

    cfg: ModelConfig

    def _dropout_keys(self, deterministic: bool, rngs: nnx.Rngs | None):
        """(embedding key, [num_layers] block keys), or (None, None) without dropout."""
        if deterministic or self.cfg.dropout == 0.0:
            return None, None
        if rngs is None and self.dropout_rngs is None:
            raise ValueError(
                "deterministic=False with dropout > 0 needs randomness: pass "
                "rngs=nnx.Rngs(dropout=key) or build the model with a 'dropout' stream"
            )
        key = rngs.dropout() if rngs is not None else self.dropout_rngs()
        keys = jax.random.split(key, self.cfg.num_layers + 1)
        return keys[0], keys[1:]

    def _run_blocks(self, x, *, mask, rope, keys, kv=None, index=None):
        """Applies every block, scanned or unrolled; kv: (k, v) [layers, B, S, K, H] or None."""

        def apply(block, x, key, layer_kv):
            return block(x, mask=mask, rope=rope, key=key, kv=layer_kv, write_index=index)

        apply = REMAT_POLICIES[self.cfg.remat](apply)
        if self.cfg.use_scan_layers:
            scan = nnx.scan(apply, in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0))
            return scan(self.blocks, x, keys, kv)
        new_k, new_v = [], []
        for i, block in enumerate(self.blocks):
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])
            x, layer_kv = apply(block, x, None if keys is None else keys[i], layer_kv)
            if layer_kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
        return x, None if kv is None else (jnp.stack(new_k), jnp.stack(new_v))


class Decoder(Stack):
    """Decoder-only causal LM (GPT-2: learned positions, LayerNorm, GELU; LLaMA: RoPE, RMSNorm,
    SwiGLU, GQA).

    Dropout keys come from `rngs` passed to `__call__` (its `dropout` stream, or `default`), or
    else from a stream forked at construction (stored in the model state only when
    `cfg.dropout > 0`).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        """Builds the parameters from `rngs.params` (or `default`); `self.cfg` is the resolved
        config.

        Raises:
          ValueError: an unusable config (see `resolve_model_config`) or variant string.
        """
        check_variants(cfg, "decoder")
        cfg = resolve_model_config(cfg)
        self.cfg = cfg
        kw = dict(dtype=DTYPES[cfg.dtype], param_dtype=DTYPES[cfg.param_dtype], rngs=rngs)
        self.embed = Embed(cfg.vocab_size, cfg.embed_dim, names=("vocab", "embed"), **kw)
        self.pos_embed = POSITION_EMBEDDINGS[cfg.position](cfg, **kw)
        self.blocks = make_blocks(cfg, rngs)
        self.final_norm = NORMS[cfg.norm](cfg, **kw)
        head_shape = (cfg.embed_dim, cfg.vocab_size)
        head_kw = dict(rngs=rngs, dtype=DTYPES[cfg.param_dtype])
        self.head = (
            None
            if cfg.tie_embeddings
            else make_param(normal(INIT_STD), head_shape, ("embed", "vocab"), **head_kw)
        )
        has_stream = "dropout" in rngs or "default" in rngs
        self.dropout_rngs = rngs.dropout.fork() if cfg.dropout > 0 and has_stream else None

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows and `max_len` slots (prompt padding included).

        The caller keeps `index + chunk length <= max_len`: writes past the end are clamped
        by `dynamic_update_slice` and would overwrite the last slots.
        """
        cfg = self.cfg
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        return KVCache(
            k=jnp.zeros(shape, DTYPES[cfg.dtype]),
            v=jnp.zeros(shape, DTYPES[cfg.dtype]),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32),
            index=jnp.zeros((), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        cache: KVCache | None = None,
        rngs: nnx.Rngs | None = None,
        lm_logits: bool = True,
    ) -> LmOutput:
        """Next-token logits for every position.

        Args:
          tokens: [B, L] int32.
          positions: [B, L] int32. Default: arange(L) without a cache; with a cache, each row
            continues from `cache.next_position`, counting only tokens with nonzero segment id.
          segment_ids: [B, L] int32; 0 = padding. A token attends to earlier-or-equal tokens
            (and cache slots) with the same nonzero id. Default: all ones.
          deterministic: no dropout when True.
          cache: a `KVCache`; the chunk is written at `cache.index` (prefill: a whole padded
            prompt batch; decode: [B, 1]).
          rngs: dropout randomness for this call (overrides the stored stream).
          lm_logits: False skips the output head (logits None), for task heads on `hidden`
            or a loss that applies `lm_head` to chunks of it.

        Returns:
          `LmOutput(logits [B, L, V] float32, hidden [B, L, D], cache)`.
        """
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        positions, mask, k_segment = self._layout(tokens.shape, positions, segment_ids, cache)
        embed_key, layer_keys = self._dropout_keys(deterministic, rngs)

        x = self.embed(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(
                positions, cfg.head_dim, cfg.rope_theta, scaling=rope_scaling_from_config(cfg)
            )
        x = dropout(x, cfg.dropout, embed_key)
        kv = None if cache is None else (cache.k, cache.v)
        index = None if cache is None else cache.index
        x, kv = self._run_blocks(x, mask=mask, rope=rope, keys=layer_keys, kv=kv, index=index)

        hidden = self.final_norm(x)
        logits = self.lm_head(hidden) if lm_logits else None
        if cache is not None:
            real_next = jnp.where(segment_ids != 0, positions + 1, 0).max(axis=1)
            cache = KVCache(
                k=kv[0],
                v=kv[1],
                segment_ids=k_segment,
                index=cache.index + tokens.shape[1],
                next_position=jnp.maximum(cache.next_position, real_next),
            )
        return LmOutput(logits=logits, hidden=hidden, cache=cache)

    def lm_head(self, hidden: jax.Array) -> jax.Array:
        """The output head: hidden [B, L, D] (after the final norm) -> logits [B, L, V] float32,
        tied to the embedding or not. The train step applies it to chunks of positions of
        `hidden` (`train.loss_chunk`), so the whole [B, L, V] logits need not exist at once."""
        if self.head is None:
            return constrain(self.embed.attend(hidden), LOGIT_AXES)
        w = self.head[...].astype(hidden.dtype)
        logits = token_einsum("BLD,DV->BLV", hidden, w, preferred_element_type=jnp.float32)
        return constrain(logits, LOGIT_AXES)

    def _layout(self, shape, positions, segment_ids, cache):
        """Positions [B, L], the `AttentionMask` ([B, 1, L, S]) and the key segment ids [B, S]."""
        batch, length = shape
        q_index = jnp.arange(length, dtype=jnp.int32)
        if cache is None:
            if positions is None:
                positions = jnp.broadcast_to(q_index, (batch, length))
            mask = attention_segments(segment_ids, segment_ids, q_index, q_index)
            return positions, mask, segment_ids
        if positions is None:
            count = jnp.cumsum(segment_ids != 0, axis=1, dtype=jnp.int32)
            positions = cache.next_position[:, None] + jnp.maximum(count - 1, 0)
        start = (jnp.zeros((), jnp.int32), cache.index)
        k_segment = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids, start)
        k_index = jnp.arange(k_segment.shape[1], dtype=jnp.int32)
        mask = attention_segments(segment_ids, k_segment, cache.index + q_index, k_index)
        return positions, mask, k_segment
