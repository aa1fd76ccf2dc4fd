"""Splash attention: the Pallas TPU flash-attention kernel, fed plm_jax's packed batches.

`splash_attention` takes the layout of `jax.nn.dot_product_attention` (q [B, L, N, H], k and v
[B, S, K, H]) and the segment ids of queries and keys. The kernel's static mask is causal or
full; segment ids are its dynamic part, so a query attends only to keys of its own segment and
blocks above the diagonal are never computed. Segment 0 (padding) is never attended by a real
token; padding queries attend other padding and are ignored downstream, as with XLA's kernel.

Under a mesh (`sharding.use_mesh`) the kernel runs per device with `jax.shard_map`: batch rows
split as `act_batch`, query heads as `act_heads`, and every device holds whole sequences
(MaxText shards it the same way, `layers/attention_op.py`). Without a mesh it runs as is.

What it leaves out: additive logit biases (T5's relative positions), queries at an offset in a
KV buffer (decoding) and sequence sharding; `attention.py` runs those calls with XLA's kernel.
The kernel compiles for TPU only; `interpret=True` runs it in the Pallas interpreter on any
backend (slow: for tests on CPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from plm_jax.sharding import current_mesh, logical_to_sharding

__all__ = ["splash_attention"]

LANES = 128  # the kv compute block must be a multiple of the TPU's 128 lanes; lengths pad to it
BLOCKS = (512, 256, 128)  # tile sizes tried, largest first (MaxText's default tile is 512)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment: jax.Array,
    k_segment: jax.Array,
    *,
    is_causal: bool,
    interpret: bool = False,
) -> jax.Array:
    """Softmax(q k^T / sqrt(H)) v over same-segment (and, causal, not later) keys.

    Args:
      q: [B, L, N, H] queries.
      k, v: [B, S, K, H] keys and values; N a multiple of K (query head n reads kv head
        n // (N / K)). With `is_causal`, S = L and query i is key slot i.
      q_segment: [B, L] int segment id of each query (0 = padding).
      k_segment: [B, S] int segment id of each key.
      is_causal: a query attends to keys at its own slot or earlier only.
      interpret: run the kernel in the Pallas interpreter (any backend) instead of Mosaic.

    Returns:
      [B, L, N, H] in q's dtype.
    """
    length, n, heads_k = q.shape[1], q.shape[2], k.shape[2]
    # Splash takes no softmax scale: scale the queries, as MaxText does.
    q = q * jnp.asarray(1.0 / math.sqrt(q.shape[-1]), q.dtype)
    # The kernel wants [B, heads, length, H] and lengths that are whole tiles. Padded slots are
    # segment 0 at the end: real queries never see them, and causality for real slots holds.
    q, k, v = (_pad(x.transpose(0, 2, 1, 3), 2) for x in (q, k, v))
    q_segment, k_segment = (_pad(x.astype(jnp.int32), 1) for x in (q_segment, k_segment))
    run = functools.partial(_local_attention, is_causal=is_causal, interpret=interpret)
    mesh = current_mesh()
    if mesh is not None and mesh.size > 1:
        # Fitted to the shape: an axis that does not divide batch or heads stays replicated.
        spec = logical_to_sharding(("act_batch", "act_heads", None, None), mesh, shape=q.shape)
        q_spec = spec.spec
        head_axes = (
            () if q_spec[1] is None else (q_spec[1],) if isinstance(q_spec[1], str) else q_spec[1]
        )
        head_shards = math.prod(mesh.shape[a] for a in head_axes)
        if heads_k % head_shards:
            # Each device's query heads must find their kv heads locally: repeat the kv heads
            # (GQA -> MHA) when the head shards do not split them evenly.
            k, v = (jnp.repeat(x, n // heads_k, axis=1) for x in (k, v))
        kv_spec = PartitionSpec(q_spec[0], q_spec[1], None, None)
        segment_spec = PartitionSpec(q_spec[0], None)
        run = jax.shard_map(
            run,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, segment_spec, segment_spec),
            out_specs=q_spec,
            check_vma=False,  # pallas_call does not declare how its outputs vary over the mesh
        )
    out = run(q, k, v, q_segment, k_segment)
    return out[:, :, :length].transpose(0, 2, 1, 3)


def _local_attention(q, k, v, q_segment, k_segment, *, is_causal, interpret):
    """One device's rows: q [B, N, L, H], k/v [B, K, S, H], segments [B, L] / [B, S]."""
    kernel = _kernel(q.shape[1], q.shape[2], k.shape[2], is_causal, interpret)
    segments = kernels.SegmentIds(q=q_segment, kv=k_segment)
    return jax.vmap(kernel)(q, k, v, segments)


@functools.lru_cache(maxsize=64)
def _kernel(heads: int, length: int, kv_length: int, is_causal: bool, interpret: bool):
    """The splash kernel for these (local) sizes, built once: its block tables come from the
    static mask in numpy, and every layer of every step shares them."""
    shape = (length, kv_length)
    head_mask = masks.CausalMask(shape) if is_causal else masks.FullMask(shape)
    block_q, block_kv = _tile(length), _tile(kv_length)
    sizes = kernels.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    # Concrete block tables even when first built inside a trace, so the cache never holds a
    # tracer of a finished trace.
    with jax.ensure_compile_time_eval():
        return kernels.make_splash_mha(
            masks.MultiHeadMask([head_mask] * heads),
            block_sizes=sizes,
            head_shards=1,  # inside shard_map each device has its own heads and whole sequences
            q_seq_shards=1,
            interpret=interpret,
        )


def _tile(length: int) -> int:
    return next(b for b in BLOCKS if length % b == 0)


def _pad(x: jax.Array, axis: int) -> jax.Array:
    """x padded with zeros at the end of `axis` to a multiple of `LANES`."""
    extra = -x.shape[axis] % LANES
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)
