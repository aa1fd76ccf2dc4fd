"""Leaf layers: the one parameter helper, embeddings, norms, MLPs, rotary positions, dropout.

Every parameter in `plm_jax.models` is created by `make_param`, the only function that touches
Flax's sharding metadata: it attaches logical axis names (`embed, mlp, heads, kv_heads,
head_dim, vocab, layers`) that `sharding.py` later maps to mesh axes. Leaf layers take explicit
sizes and dtypes, never the whole `ModelConfig`.

What it leaves out: attention (`attention.py`) and the stacks, cache and heads
(`transformer.py`).

Numerics: parameters are stored in `param_dtype` and cast to the compute `dtype` at use; norm
statistics and the rotary rotation run in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.config import ModelConfig

__all__ = [
    "INIT_STD",
    "Embed",
    "GegluMlp",
    "GeluMlp",
    "LayerNorm",
    "RMSNorm",
    "ReluMlp",
    "RopeScaling",
    "SwiGluMlp",
    "apply_rope",
    "dropout",
    "make_param",
    "rope_frequencies",
    "rope_scaling_from_config",
    "rope_tables",
    "token_einsum",
]

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]

INIT_STD = 0.02  # GPT-2 / LLaMA: every weight matrix starts as N(0, 0.02^2)
normal = nnx.initializers.normal
zeros = nnx.initializers.zeros
ones = nnx.initializers.ones


def make_param(
    init: Initializer,
    shape: Sequence[int],
    names: Sequence[str | None],
    *,
    rngs: nnx.Rngs,
    dtype: Any,
) -> nnx.Param:
    """Creates a parameter with logical axis names; the only place that sets sharding metadata.

    `eager_sharding=False`: the model never sees a mesh. Shardings are derived later from the
    names (`nnx.get_partition_spec(nnx.state(model))` then `sharding.logical_to_spec`).

    Args:
      init: `init(key, shape, dtype)`.
      shape: the parameter shape.
      names: one logical axis name (or None) per dimension.
      rngs: draws the key from its `params` stream.
      dtype: the storage dtype (`param_dtype`).
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
    value = init(rngs.params(), tuple(shape), dtype)
    return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def add_bias(y: jax.Array, bias: nnx.Param | None) -> jax.Array:
    return y if bias is None else y + bias[...].astype(y.dtype)


def token_einsum(spec: str, x: jax.Array, w: jax.Array, **kwargs: Any) -> jax.Array:
    """`jnp.einsum(spec, x, w, **kwargs)` for activations x: [B, L, ...] and a weight w, with
    B and L merged into one token axis `T` for the product ("BLD,DF->BLF" runs as "TD,DF->TF").

    Merging is a free reshape. It matters for the weight gradient, which contracts over both
    B and L: XLA's CPU backend turns a two-axis contraction into a matrix product by copying
    an operand into a transposed layout, and fuses the operand's elementwise producers into
    that copy, so the residual stream's gradient (through every later layer) was recomputed
    in each such copy (`benchmarks/profile_cpu.py`, docs/performance.md "CPU").

    Raises:
      ValueError: `spec` does not start x and the output with `BL`, or names B or L in w.
    """
    operands, out = spec.split("->")
    x_spec, w_spec = operands.split(",")
    if x_spec[:2] != "BL" or out[:2] != "BL" or "B" in w_spec or "L" in w_spec:
        raise ValueError(f"token_einsum needs 'BL...,W->BL...' with no B/L in W, got {spec!r}")
    batch, length = x.shape[:2]
    tokens = x.reshape(batch * length, *x.shape[2:])
    y = jnp.einsum(f"T{x_spec[2:]},{w_spec}->T{out[2:]}", tokens, w, **kwargs)
    return y.reshape(batch, length, *y.shape[1:])


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity when `key` is None (deterministic) or `rate` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Embed(nnx.Module):
    """A lookup table `[V, D]`; `attend` reuses it as a tied output projection.

    An id >= num_embeddings looks up NaNs (`jnp.take`'s fill mode), so an id outside the
    vocabulary or a position past `max_seq_len` is loud rather than silently clamped.
    """

    def __init__(
        self,
        num_embeddings: int,
        dim: int,
        *,
        names: Sequence[str | None] = ("vocab", "embed"),
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.embedding = make_param(
            normal(INIT_STD), (num_embeddings, dim), names, rngs=rngs, dtype=param_dtype
        )
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: [B, L] int -> [B, L, D] in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> logits [B, L, V] float32 (accumulated in float32)."""
        table = self.embedding[...].astype(self.dtype)
        return token_einsum("BLD,VD->BLV", x, table, preferred_element_type=jnp.float32)


class LayerNorm(nnx.Module):
    """LayerNorm (Ba et al. 2016) over the last axis; statistics in float32."""

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = make_param(ones, (dim,), ("embed",), rngs=rngs, dtype=param_dtype)
        self.bias = (
            make_param(zeros, (dim,), ("embed",), rngs=rngs, dtype=param_dtype)
            if use_bias
            else None
        )
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in the compute dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...].astype(jnp.float32)
        return add_bias(y, self.bias).astype(self.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019): `x / sqrt(mean(x^2) + eps) * scale`, in float32."""

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.scale = make_param(ones, (dim,), ("embed",), rngs=rngs, dtype=param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in the compute dtype."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class GeluMlp(nnx.Module):
    """GPT-2/BERT MLP: `gelu(x W_in + b_in) W_out + b_out`.

    `approximate=True` is GPT-2's tanh approximation; False is the exact erf GELU of BERT.
    """

    def __init__(
        self,
        embed_dim: int,
        mlp_dim: int,
        *,
        use_bias: bool,
        out_std: float,
        approximate: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        d, f = embed_dim, mlp_dim
        kw = dict(rngs=rngs, dtype=param_dtype)
        self.w_in = make_param(normal(INIT_STD), (d, f), ("embed", "mlp"), **kw)
        self.b_in = make_param(zeros, (f,), ("mlp",), **kw) if use_bias else None
        self.w_out = make_param(normal(out_std), (f, d), ("mlp", "embed"), **kw)
        self.b_out = make_param(zeros, (d,), ("embed",), **kw) if use_bias else None
        self.approximate = approximate
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]."""
        h = add_bias(token_einsum("BLD,DF->BLF", x, self.w_in[...].astype(self.dtype)), self.b_in)
        h = jax.nn.gelu(h, approximate=self.approximate)
        return add_bias(
            token_einsum("BLF,FD->BLD", h, self.w_out[...].astype(self.dtype)), self.b_out
        )


class ReluMlp(GeluMlp):
    """T5 v1.0 MLP: `relu(x W_in + b_in) W_out + b_out` (T5 has no biases: use_bias=False)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]."""
        h = add_bias(token_einsum("BLD,DF->BLF", x, self.w_in[...].astype(self.dtype)), self.b_in)
        return add_bias(
            token_einsum("BLF,FD->BLD", jax.nn.relu(h), self.w_out[...].astype(self.dtype)),
            self.b_out,
        )


class SwiGluMlp(nnx.Module):
    """LLaMA MLP (Shazeer 2020): `(silu(x W_gate) * x W_up) W_down`; biases only if use_bias."""

    activation = staticmethod(jax.nn.silu)  # the gate's nonlinearity

    def __init__(
        self,
        embed_dim: int,
        mlp_dim: int,
        *,
        use_bias: bool,
        out_std: float,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        d, f = embed_dim, mlp_dim
        kw = dict(rngs=rngs, dtype=param_dtype)
        self.w_gate = make_param(normal(INIT_STD), (d, f), ("embed", "mlp"), **kw)
        self.w_up = make_param(normal(INIT_STD), (d, f), ("embed", "mlp"), **kw)
        self.w_down = make_param(normal(out_std), (f, d), ("mlp", "embed"), **kw)
        self.b_gate = make_param(zeros, (f,), ("mlp",), **kw) if use_bias else None
        self.b_up = make_param(zeros, (f,), ("mlp",), **kw) if use_bias else None
        self.b_down = make_param(zeros, (d,), ("embed",), **kw) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, L, D] -> [B, L, D]."""
        gate = token_einsum("BLD,DF->BLF", x, self.w_gate[...].astype(self.dtype))
        up = token_einsum("BLD,DF->BLF", x, self.w_up[...].astype(self.dtype))
        h = self.activation(add_bias(gate, self.b_gate)) * add_bias(up, self.b_up)
        return add_bias(
            token_einsum("BLF,FD->BLD", h, self.w_down[...].astype(self.dtype)), self.b_down
        )


class GegluMlp(SwiGluMlp):
    """T5 v1.1 MLP (Shazeer 2020): `(gelu(x W_gate) * x W_up) W_down` with the tanh GELU
    (transformers' `gelu_new`); the same weights as `SwiGluMlp`."""

    activation = staticmethod(functools.partial(jax.nn.gelu, approximate=True))


class RopeScaling(NamedTuple):
    """Llama 3.1 frequency scaling of RoPE (transformers' rope_type "llama3").

    Attributes:
      factor: long wavelengths are stretched by this much (8 in Llama 3.1).
      low_freq_factor: wavelengths above original_max_len / low_freq_factor are fully scaled.
      high_freq_factor: wavelengths below original_max_len / high_freq_factor are kept.
      original_max_len: the context length of pre-training (8192 in Llama 3.1).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_len: int


def rope_scaling_from_config(cfg: ModelConfig) -> RopeScaling | None:
    """The RoPE scaling that `cfg.rope_scaling` names, or None for plain RoPE ("")."""
    if cfg.rope_scaling == "":
        return None
    if cfg.rope_scaling != "llama3":
        raise ValueError(f"model.rope_scaling={cfg.rope_scaling!r}; supported: '', 'llama3'")
    return RopeScaling(
        cfg.rope_scaling_factor,
        cfg.rope_low_freq_factor,
        cfg.rope_high_freq_factor,
        cfg.rope_original_max_len,
    )


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """The H/2 rotation frequencies (radians per position), float32, as transformers has them.

    They depend only on the config, so they are computed once on the host in numpy float32
    (constants under jit), rounding op for op as transformers' torch code does so the values
    match bit for bit. torch evaluates `scalar / tensor` as `reciprocal(tensor) * scalar`,
    hence the explicit reciprocals below.

    Args:
      head_dim: H, even.
      theta: the RoPE base; channel pair i turns at `theta^(-2i/H)` before scaling.
      scaling: Llama 3.1 scaling (transformers `_compute_llama3_parameters`), or None.

    Returns:
      [H/2] float32.
    """
    f32 = np.float32
    inv_freq = f32(1.0) / f32(theta) ** (np.arange(0, head_dim, 2, dtype=f32) / f32(head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3.1: wavelengths shorter than original_max_len / high_freq_factor keep their
    # frequency, longer than original_max_len / low_freq_factor are slowed by `factor`, and the
    # band between blends the two linearly in original_max_len / wavelength.
    factor, low, high, old_len = scaling
    wavelen = (f32(1.0) / inv_freq) * f32(2 * math.pi)
    is_low_freq = wavelen > f32(old_len / low)
    is_high_freq = wavelen < f32(old_len / high)
    scaled = np.where(is_low_freq, inv_freq / f32(factor), inv_freq)
    smooth = ((f32(1.0) / wavelen) * f32(old_len) - f32(low)) / f32(high - low)
    smoothed = (f32(1.0) - smooth) * scaled / f32(factor) + smooth * scaled
    return np.where(is_low_freq | is_high_freq, scaled, smoothed)


def rope_tables(
    positions: jax.Array, head_dim: int, theta: float, *, scaling: RopeScaling | None = None
) -> tuple[jax.Array, jax.Array]:
    """Rotary tables (Su et al. 2021) in the Hugging Face LLaMA layout.

    Channel `i` and channel `i + H/2` form a rotating pair with frequency
    `theta^(-2i/H)` (HF `rotate_half`), so q/k weights convert from HF checkpoints unpermuted.

    Args:
      positions: [B, L] int.
      head_dim: H, even.
      theta: the RoPE base.
      scaling: Llama 3.1 frequency scaling (`rope_scaling_from_config`), or None for plain RoPE.

    Returns:
      (cos, sin), each [B, L, 1, H] float32, broadcasting over heads.
    """
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x: [B, L, N, H] by the tables from `rope_tables`; computed in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)  # rotate_half
    return (x32 * cos + rotated * sin).astype(x.dtype)
