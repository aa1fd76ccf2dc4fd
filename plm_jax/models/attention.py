"""Self- and cross-attention with packed-document masks, MHA / GQA / MQA, RoPE, an additive
logit bias (T5's relative positions) and a KV buffer.

One mask rule serves training, prefill and decoding (`attention_mask`): a query attends to a key
when both carry the same nonzero segment id and, for decoders (causal), the key's slot is not
later than the query's; encoders attend in both directions.
Segment 0 marks padding and empty cache slots. The kernel is `jax.nn.dot_product_attention`,
which broadcasts K kv heads over N query heads itself (N must be a multiple of K).

What it leaves out: the cache bookkeeping (slot index, positions), which lives with `KVCache`
in `transformer.py`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from plm_jax.models.layers import (
    INIT_STD,
    add_bias,
    apply_rope,
    make_param,
    normal,
    token_einsum,
    zeros,
)

__all__ = ["ATTENTION_IMPLEMENTATIONS", "Attention", "attention_mask"]

# config `model.attention` -> `implementation=` of jax.nn.dot_product_attention. None is XLA
# (it runs everywhere); cuDNN flash attention needs a GPU and bfloat16/float16 compute.
ATTENTION_IMPLEMENTATIONS: dict[str, str | None] = {"xla": None, "cudnn": "cudnn"}


def attention_mask(
    q_segment: jax.Array,
    k_segment: jax.Array,
    q_index: jax.Array,
    k_index: jax.Array,
    *,
    causal: bool = True,
) -> jax.Array:
    """Causal (or, with `causal=False`, bidirectional) + same-document mask.

    Args:
      q_segment: [B, L] int, segment id of each query (0 = padding).
      k_segment: [B, S] int, segment id of each key slot (0 = padding or empty).
      q_index: [L] int, slot of each query in the key sequence.
      k_index: [S] int, slot of each key.

    Returns:
      [B, 1, L, S] bool, True where the query may attend. A padding query's row is all False;
      `dot_product_attention` fills masked logits with a large finite negative, so that row is
      a uniform average (finite, never NaN) and is ignored downstream.
    """
    same = (q_segment[:, :, None] == k_segment[:, None, :]) & (q_segment[:, :, None] != 0)
    if causal:
        same = same & (q_index[:, None] >= k_index[None, :])[None]  # [L, S] broadcast over B
    return same[:, None]


class Attention(nnx.Module):
    """Multi-head attention with `num_kv_heads` key/value heads (MHA, GQA or MQA).

    Weights: w_q [D, N, H], w_k and w_v [D, K, H], w_o [N, H, D]; biases when `use_bias`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        use_bias: bool,
        implementation: str | None,
        out_std: float,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        d, n, k, h = embed_dim, num_heads, num_kv_heads, head_dim
        kw = dict(rngs=rngs, dtype=param_dtype)
        self.w_q = make_param(normal(INIT_STD), (d, n, h), ("embed", "heads", "head_dim"), **kw)
        self.w_k = make_param(normal(INIT_STD), (d, k, h), ("embed", "kv_heads", "head_dim"), **kw)
        self.w_v = make_param(normal(INIT_STD), (d, k, h), ("embed", "kv_heads", "head_dim"), **kw)
        self.w_o = make_param(normal(out_std), (n, h, d), ("heads", "head_dim", "embed"), **kw)
        if use_bias:
            self.b_q = make_param(zeros, (n, h), ("heads", "head_dim"), **kw)
            self.b_k = make_param(zeros, (k, h), ("kv_heads", "head_dim"), **kw)
            self.b_v = make_param(zeros, (k, h), ("kv_heads", "head_dim"), **kw)
            self.b_o = make_param(zeros, (d,), ("embed",), **kw)
        else:
            self.b_q = self.b_k = self.b_v = self.b_o = None
        self.implementation = implementation
        self.dtype = dtype

    def project_kv(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [B, S, D] -> (k, v), each [B, S, K, H]: the keys and values x offers (unrotated).

        Cross-attention computes them once from the encoder output (`cross_kv` below).
        """
        w_k, w_v = (p[...].astype(self.dtype) for p in (self.w_k, self.w_v))
        k = add_bias(token_einsum("BLD,DKH->BLKH", x, w_k), self.b_k)
        v = add_bias(token_einsum("BLD,DKH->BLKH", x, w_v), self.b_v)
        return k, v

    def __call__(
        self,
        x: jax.Array,
        *,
        mask: jax.Array,
        rope: tuple[jax.Array, jax.Array] | None = None,
        kv: tuple[jax.Array, jax.Array] | None = None,
        write_index: jax.Array | None = None,
        bias: jax.Array | None = None,
        cross_kv: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Attends from x to itself, to a KV buffer that x's keys/values are written into, or
        (cross-attention) to given keys/values.

        Args:
          x: [B, L, D] in the compute dtype.
          mask: [B, 1, L, S] bool from `attention_mask` (S = L without a buffer).
          rope: (cos, sin), each [B, L, 1, H], or None for no rotation (with `cross_kv`, only
            the queries would turn).
          kv: this layer's (k, v) buffers, each [B, S, K, H], or None.
          write_index: [] int, the buffer slot of x's first token (only with `kv`).
          bias: [B or 1, N, L, S] float added to the scaled logits (T5's relative position
            bias), or None.
          cross_kv: (k, v), each [B, S, K, H] from `project_kv` of another sequence, attended
            instead of x's own keys/values (not with `kv`).

        Returns:
          ([B, L, D], the updated (k, v) buffers or None).
        """
        w_q, w_o = (p[...].astype(self.dtype) for p in (self.w_q, self.w_o))
        q = add_bias(token_einsum("BLD,DNH->BLNH", x, w_q), self.b_q)
        k, v = self.project_kv(x) if cross_kv is None else cross_kv
        if rope is not None:
            q = apply_rope(q, *rope)
            k = k if cross_kv is not None else apply_rope(k, *rope)
        if kv is not None:
            start = (0, write_index, 0, 0)
            k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
            v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
            kv = (k, v)
        if bias is not None and self.implementation is not None:
            bias = bias.astype(q.dtype)  # fused kernels take the bias in the compute dtype
        # Logits and softmax run in float32 inside dot_product_attention (XLA adds a float32
        # bias to the float32 logits).
        out = jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask, implementation=self.implementation
        )
        y = token_einsum("BLNH,NHD->BLD", out, w_o)
        return add_bias(y, self.b_o), kv
