"""The bidirectional encoder (BERT style) on the decoder's blocks.

`Encoder` = token + position (+ token-type) embeddings -> blocks with bidirectional attention
(padding and packed documents kept apart by `segment_ids`) -> outputs:

    hidden   [B, L, D]  the last hidden state (BERT's `last_hidden_state`)
    pooled   [B, D]     `tanh(W hidden[:, 0] + b)`, BERT's pooler over the first ([CLS]) token
    logits   [B, L, V]  the masked-LM head: `LayerNorm(act(W hidden + b)) E^T + bias`, with E
                        the input embedding when tied (BERT) or a separate [D, V] matrix

Post-norm (`model.norm_placement=post`, BERT) normalises the embeddings and every residual sum;
pre-norm normalises each block's input and adds a final norm. The MLP activation is the
config's (`gelu_exact` for BERT), used in the MLM head too. The pooler and the MLM head exist
only when `use_pooler` / `use_mlm_head` (a `BertModel` checkpoint has no MLM head, a
`BertForMaskedLM` no pooler).

What it leaves out: dropout on attention probabilities (dropout applies to embeddings and to
each residual branch), the next-sentence head, and the losses (`plm_jax.train`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from plm_jax.config import ModelConfig
from plm_jax.models.attention import attention_segments
from plm_jax.models.layers import (
    INIT_STD,
    Embed,
    add_bias,
    dropout,
    make_param,
    normal,
    rope_tables,
    zeros,
)
from plm_jax.models.sizes import resolve_model_config
from plm_jax.models.transformer import (
    ACT_AXES,
    DTYPES,
    LOGIT_AXES,
    NORMS,
    POSITION_EMBEDDINGS,
    Stack,
    check_variants,
    make_blocks,
)
from plm_jax.sharding import constrain

__all__ = ["Encoder", "EncoderOutput"]

# The MLM head's activation per `model.mlp` (SwiGLU encoders use plain SiLU there).
HEAD_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    "swiglu": jax.nn.silu,
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EncoderOutput:
    """logits: [B, L, V] float32 masked-LM logits (None without an MLM head); hidden: [B, L, D]
    last hidden state; pooled: [B, D] pooler output (None without a pooler)."""

    logits: jax.Array | None
    hidden: jax.Array
    pooled: jax.Array | None = None


class Dense(nnx.Module):
    """`x W + b` with W [D, D'] named (embed, mlp), for the pooler and the MLM transform."""

    def __init__(self, d_in: int, d_out: int, *, use_bias: bool, dtype, param_dtype, rngs):
        kw = dict(rngs=rngs, dtype=param_dtype)
        self.w = make_param(normal(INIT_STD), (d_in, d_out), ("embed", "mlp"), **kw)
        self.b = make_param(zeros, (d_out,), ("mlp",), **kw) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return add_bias(jnp.einsum("...D,DF->...F", x, self.w[...].astype(self.dtype)), self.b)


class Encoder(Stack):
    """Bidirectional Transformer encoder (BERT, and pre-norm / RoPE / SwiGLU variants)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        """Builds the parameters from `rngs.params`; `self.cfg` is the resolved config.

        Raises:
          ValueError: an unusable config or variant string.
        """
        check_variants(cfg, "encoder")
        cfg = resolve_model_config(cfg)
        self.cfg = cfg
        d, v = cfg.embed_dim, cfg.vocab_size
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        post = cfg.norm_placement == "post"
        self.embed = Embed(v, d, names=("vocab", "embed"), **kw)
        self.pos_embed = POSITION_EMBEDDINGS[cfg.position](cfg, **kw)
        self.type_embed = (
            Embed(cfg.type_vocab_size, d, names=(None, "embed"), **kw)
            if cfg.type_vocab_size
            else None
        )
        self.embed_norm = NORMS[cfg.norm](cfg, **kw) if post else None
        self.blocks = make_blocks(cfg, rngs)
        self.final_norm = None if post else NORMS[cfg.norm](cfg, **kw)
        dense_kw = dict(use_bias=cfg.use_bias, **kw)
        self.pooler = Dense(d, d, **dense_kw) if cfg.use_pooler else None
        mlm, pkw = cfg.use_mlm_head, dict(rngs=rngs, dtype=param_dtype)
        self.mlm_dense = Dense(d, d, **dense_kw) if mlm else None
        self.mlm_norm = NORMS[cfg.norm](cfg, **kw) if mlm else None
        self.mlm_bias = make_param(zeros, (v,), ("vocab",), **pkw) if mlm and cfg.use_bias else None
        self.head = (
            make_param(normal(INIT_STD), (d, v), ("embed", "vocab"), **pkw)
            if mlm and not cfg.tie_embeddings
            else None
        )
        has_stream = "dropout" in rngs or "default" in rngs
        self.dropout_rngs = rngs.dropout.fork() if cfg.dropout > 0 and has_stream else None

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        token_types: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        lm_logits: bool = True,
    ) -> EncoderOutput:
        """Encodes a batch.

        Args:
          tokens: [B, L] int32.
          positions: [B, L] int32; default arange(L) per row.
          segment_ids: [B, L] int32; tokens attend to every token with the same nonzero id
            (0 = padding, which nothing attends to). Default: all ones.
          token_types: [B, L] int32 BERT token types (sentence A = 0, B = 1); default zeros.
          deterministic: no dropout when True.
          rngs: dropout randomness for this call (overrides the stored stream).
          lm_logits: False skips the MLM head (logits None), for task heads.

        Returns:
          `EncoderOutput(logits, hidden, pooled)`.
        """
        cfg = self.cfg
        batch, length = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones(tokens.shape, jnp.int32)
        index = jnp.arange(length, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(index, (batch, length))
        mask = attention_segments(segment_ids, segment_ids, index, index, causal=False)
        embed_key, layer_keys = self._dropout_keys(deterministic, rngs)

        x = self.embed(tokens)
        rope = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(positions)
        else:
            rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        if self.type_embed is not None:
            types = jnp.zeros_like(tokens) if token_types is None else token_types
            x = x + self.type_embed(types)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = dropout(x, cfg.dropout, embed_key)
        x, _ = self._run_blocks(x, mask=mask, rope=rope, keys=layer_keys)
        hidden = constrain(x if self.final_norm is None else self.final_norm(x), ACT_AXES)

        pooled = None
        if self.pooler is not None:
            pooled = jnp.tanh(self.pooler(hidden[:, 0]).astype(jnp.float32)).astype(hidden.dtype)
        logits = None
        if self.mlm_dense is not None and lm_logits:
            h = self.mlm_norm(HEAD_ACTIVATIONS[cfg.mlp](self.mlm_dense(hidden)))
            if self.head is None:
                logits = self.embed.attend(h)
            else:
                w = self.head[...].astype(h.dtype)
                logits = jnp.einsum("BLD,DV->BLV", h, w, preferred_element_type=jnp.float32)
            logits = constrain(add_bias(logits, self.mlm_bias), LOGIT_AXES)
        return EncoderOutput(logits=logits, hidden=hidden, pooled=pooled)
