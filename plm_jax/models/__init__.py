"""Transformer language models in Flax NNX. Decoder-only (GPT-2 and LLaMA styles) for now.

Module map: `layers` (the parameter helper, embeddings, norms, MLPs, RoPE), `attention`,
`transformer` (Block, Decoder, KVCache, LmOutput), `sizes` (resolved sizes, parameter counts).
Nothing here imports `plm_jax.train`, `plm_jax.data` or `plm_jax.cli`, and no model sees a Mesh.
"""

from plm_jax.models.attention import Attention, attention_mask
from plm_jax.models.layers import (
    Embed,
    GeluMlp,
    LayerNorm,
    RMSNorm,
    SwiGluMlp,
    apply_rope,
    make_param,
    rope_tables,
)
from plm_jax.models.sizes import count_params, param_count, resolve_model_config
from plm_jax.models.transformer import Block, Decoder, KVCache, LmOutput

__all__ = [
    "Attention",
    "Block",
    "Decoder",
    "Embed",
    "GeluMlp",
    "KVCache",
    "LayerNorm",
    "LmOutput",
    "RMSNorm",
    "SwiGluMlp",
    "apply_rope",
    "attention_mask",
    "count_params",
    "make_param",
    "param_count",
    "resolve_model_config",
    "rope_tables",
]
