"""Self- and cross-attention with packed-document masks, MHA / GQA / MQA, RoPE, an additive
logit bias (T5's relative positions), a KV buffer, and the kernels that compute it.

One mask rule serves training, prefill and decoding: a query attends to a key when both carry
the same nonzero segment id and, for decoders (causal), the key's slot is not later than the
query's; encoders attend in both directions. Segment 0 marks padding and empty cache slots.
The model passes the rule as an `AttentionMask` (segment ids and slots, `attention_segments`),
not as a dense [B, 1, L, S] array, so that each kernel can take what it understands:

- `xla`: `jax.nn.dot_product_attention` with the dense mask (`attention_mask`); runs anywhere.
- `cudnn`: cuDNN flash attention (GPU, bf16/f16). Causal self-attention passes `is_causal=True`,
  so cuDNN skips the blocks above the diagonal; jax's API has no segment ids, and packed rows
  (several documents, padding on either side) cannot be said with `query_seq_lengths` without
  letting documents see each other, so the same-segment part still goes in as a dense mask.
- `splash`: the Pallas TPU splash kernel (`splash.py`) with a causal or full static mask and
  segment ids: no dense mask exists. Calls it cannot take (an additive bias, a query offset in
  a KV buffer) run XLA's kernel; `splash_interpret` is the same kernel in the Pallas interpreter.
- `auto`: per platform, `choose_attention`.

The kernel is chosen once, when `Attention` is built, for the devices of the current mesh
(`sharding.use_mesh`) or jax's default backend; a choice those devices cannot run is refused
with a `ConfigError` that says what to use instead.

What it leaves out: the cache bookkeeping (slot index, positions), which lives with `KVCache`
in `transformer.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from plm_jax.errors import ConfigError
from plm_jax.models.layers import (
    INIT_STD,
    add_bias,
    apply_rope,
    make_param,
    normal,
    token_einsum,
    zeros,
)
from plm_jax.models.splash import splash_attention
from plm_jax.sharding import current_mesh

__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "Attention",
    "AttentionMask",
    "attention_mask",
    "attention_segments",
    "choose_attention",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """Which keys each query may attend, kept as segment ids and slots (a pytree).

    Attributes:
      q_segment: [B, L] int, segment id of each query (0 = padding).
      k_segment: [B, S] int, segment id of each key slot (0 = padding or empty).
      q_index: [L] int, slot of each query in the key sequence.
      k_index: [S] int, slot of each key.
      is_causal: keys later than the query are masked (decoders); else both directions.
      is_aligned: query i is key slot i (self-attention without a KV buffer), which fused
        kernels need for their causal masks.
    """

    q_segment: jax.Array
    k_segment: jax.Array
    q_index: jax.Array
    k_index: jax.Array
    is_causal: bool = dataclasses.field(metadata=dict(static=True))
    is_aligned: bool = dataclasses.field(metadata=dict(static=True))

    def same_segment(self) -> jax.Array:
        """[B, 1, L, S] bool: same nonzero segment, causality left out."""
        q, k = self.q_segment[:, :, None], self.k_segment[:, None, :]
        return ((q == k) & (q != 0))[:, None]

    def dense(self) -> jax.Array:
        """[B, 1, L, S] bool, True where the query may attend (see `attention_mask`)."""
        same = self.same_segment()
        if self.is_causal:
            same = same & (self.q_index[:, None] >= self.k_index[None, :])  # [L, S] broadcast
        return same


def attention_segments(
    q_segment: jax.Array,
    k_segment: jax.Array,
    q_index: jax.Array,
    k_index: jax.Array,
    *,
    causal: bool = True,
) -> AttentionMask:
    """The mask rule of the module docstring as an `AttentionMask` (what the models pass).

    Args as `attention_mask`. Passing the same array as `q_index` and `k_index` marks the mask
    aligned (self-attention without a buffer).
    """
    return AttentionMask(q_segment, k_segment, q_index, k_index, causal, q_index is k_index)


def attention_mask(
    q_segment: jax.Array,
    k_segment: jax.Array,
    q_index: jax.Array,
    k_index: jax.Array,
    *,
    causal: bool = True,
) -> jax.Array:
    """Causal (or, with `causal=False`, bidirectional) + same-document mask, dense.

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
    return attention_segments(q_segment, k_segment, q_index, k_index, causal=causal).dense()


Mask = jax.Array | AttentionMask  # a dense [B, 1, L, S] bool mask, or the segments behind one


def _dense(mask: Mask) -> jax.Array:
    return mask.dense() if isinstance(mask, AttentionMask) else mask


def _xla(q, k, v, mask: Mask, bias):
    # Logits and softmax run in float32 inside dot_product_attention (XLA adds a float32 bias
    # to the float32 logits).
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=_dense(mask))


def _cudnn(q, k, v, mask: Mask, bias):
    bias = None if bias is None else bias.astype(q.dtype)  # cuDNN takes it in the compute dtype
    if isinstance(mask, AttentionMask) and mask.is_causal and mask.is_aligned:
        # The causal flag lets cuDNN skip the blocks above the diagonal. Segments still need a
        # mask: jax's API has no segment ids, and seq lengths would merge packed documents.
        return jax.nn.dot_product_attention(
            q, k, v, bias=bias, mask=mask.same_segment(), is_causal=True, implementation="cudnn"
        )
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=_dense(mask), implementation="cudnn"
    )


def _splash(q, k, v, mask: Mask, bias, *, interpret: bool):
    takes_it = isinstance(mask, AttentionMask) and (mask.is_aligned or not mask.is_causal)
    if bias is not None or not takes_it:
        # An additive bias, a dense mask or a query offset in a KV buffer (decoding): splash
        # has no input for them, XLA's kernel computes the same attention.
        return _xla(q, k, v, mask, bias)
    return splash_attention(
        q, k, v, mask.q_segment, mask.k_segment, is_causal=mask.is_causal, interpret=interpret
    )


# Kernel name -> (q [B, L, N, H], k, v [B, S, K, H], mask, bias or None) -> [B, L, N, H].
KERNELS: dict[str, Callable[..., jax.Array]] = {
    "xla": _xla,
    "cudnn": _cudnn,
    "splash": functools.partial(_splash, interpret=False),
    "splash_interpret": functools.partial(_splash, interpret=True),
}

# config `model.attention` -> what `Attention(implementation=...)` is given: a kernel name, or
# "auto", which `choose_attention` resolves for the devices when the model is built.
ATTENTION_IMPLEMENTATIONS: dict[str, str] = {name: name for name in ("auto", *KERNELS)}

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _target_device() -> jax.Device:
    """The first device of the current mesh (compile-only TPU devices included), else of jax's
    default backend."""
    mesh = current_mesh()
    return mesh.devices.flat[0] if mesh is not None else jax.devices()[0]


def _cudnn_problem(device: jax.Device, dtype: Any, head_dim: int) -> str:
    """Why cuDNN flash attention cannot run here, or "" when it can."""
    if device.platform != "gpu":
        return f"it is a GPU kernel and the devices are {device.platform}"
    capability = getattr(device, "compute_capability", None)
    if not capability:
        return f"it needs a CUDA device and {device.device_kind} reports no compute capability"
    major = float(capability)
    if major < 8.0:
        return f"it needs compute capability >= 8.0, not {capability}"
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
        return (
            f"it needs bfloat16 or float16 compute, not {jnp.dtype(dtype).name} (set "
            "model.dtype=bfloat16)"
        )
    most = 256 if major >= 9.0 else 128
    if head_dim > most or head_dim % 8:
        return f"it needs a head_dim that is a multiple of 8 and <= {most}, not {head_dim}"
    return ""


def choose_attention(
    name: str | None, *, dtype: Any, head_dim: int, device: jax.Device | None = None
) -> str:
    """The kernel `model.attention=name` runs on `device` (default: `_target_device()`).

    "auto" is splash on TPU, cuDNN on a GPU where its constraints hold (compute capability
    >= 8.0, bf16/f16 compute, head_dim a multiple of 8 and at most 128, or 256 from Hopper on),
    and XLA otherwise. None means "xla". Any other name is honoured or refused.

    Raises:
      ConfigError: a kernel these devices cannot run, with what to use instead.
    """
    name = name or "xla"
    if name in ("xla", "splash_interpret"):
        return name
    device = _target_device() if device is None else device
    if name == "auto":
        if device.platform == "tpu":
            return "splash"
        return "cudnn" if not _cudnn_problem(device, dtype, head_dim) else "xla"
    if name == "splash" and device.platform != "tpu":
        raise ConfigError(
            f"model.attention=splash is a TPU kernel (Pallas/Mosaic) and the devices are "
            f"{device.platform}; use model.attention=auto (it picks "
            f"{choose_attention('auto', dtype=dtype, head_dim=head_dim, device=device)} here) "
            "or xla. model.attention=splash_interpret runs the same kernel in the Pallas "
            "interpreter on any device (slow: for tests)"
        )
    if name == "cudnn" and (problem := _cudnn_problem(device, dtype, head_dim)):
        raise ConfigError(
            f"model.attention=cudnn cannot run here: {problem}; or use model.attention=auto or xla"
        )
    if name not in KERNELS:
        raise ConfigError(
            f"model.attention={name!r} is not a kernel; choose one of "
            f"{list(ATTENTION_IMPLEMENTATIONS)}"
        )
    return name


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
        # Chosen once, for the devices the model is built for; None is XLA.
        self.implementation = choose_attention(implementation, dtype=dtype, head_dim=h)
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
        mask: Mask,
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
          mask: an `AttentionMask` from `attention_segments`, or a dense [B, 1, L, S] bool
            mask from `attention_mask` (S = L without a buffer); fused kernels need the
            former, and run XLA's kernel for the latter.
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
        out = KERNELS[self.implementation](q, k, v, mask, bias)
        y = token_einsum("BLNH,NHD->BLD", out, w_o)
        return add_bias(y, self.b_o), kv
