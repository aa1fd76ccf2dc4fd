"""Model sizes: the derived defaults of `ModelConfig` and parameter counts.

`resolve_model_config` turns the config's `0 = derive it` fields into numbers; every model
module works from the resolved config. `count_params` is the closed-form count, documented per
variant; `param_count` measures a built (or `nnx.eval_shape`d) model. `layer_stacks`,
`stack_layers` and `unstack_layers` move flat parameters between the unrolled layout
(`blocks.0.attn.w_q`) and the scanned one (`blocks.attn.w_q` with a leading layers axis).

What it leaves out: variant strings are checked where their tables live (`transformer.py`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from plm_jax.config import ModelConfig

__all__ = ["count_params", "param_count", "resolve_compute_dtype", "resolve_model_config"]

# model.dtype=auto: mixed precision where the matrix units are built for it (bfloat16 compute,
# float32 parameters and optimizer state), float32 on CPU, where bfloat16 matmuls are no faster
# and tests compare against float32 references.
AUTO_DTYPES = {"cpu": "float32", "gpu": "bfloat16", "cuda": "bfloat16", "rocm": "bfloat16"}


def resolve_compute_dtype(dtype: str, platform: str | None = None) -> str:
    """`model.dtype` with "auto" replaced for `platform` (default: jax's default backend);
    any other value is returned as given.

    "auto" is bfloat16 on GPU and TPU (every accelerator platform but CPU) and float32 on CPU.
    A plan for other devices than the attached ones passes their platform ("tpu").
    """
    if dtype != "auto":
        return dtype
    platform = jax.default_backend() if platform is None else platform
    return AUTO_DTYPES.get(platform, "bfloat16")


def resolve_model_config(cfg: ModelConfig) -> ModelConfig:
    """Fills the sizes left at 0 and checks what the model itself needs.

    num_kv_heads 0 -> num_heads; head_dim 0 -> embed_dim // num_heads; mlp_dim 0 -> 4 * embed_dim
    for GELU and ReLU, or LLaMA's rule for the gated SwiGLU and GeGLU: int(2/3 * 4 * embed_dim)
    (as many parameters as a 4x GELU MLP), rounded up to a multiple of 256; an encoder-decoder's
    num_decoder_layers 0 -> num_layers; dtype auto -> `resolve_compute_dtype` on the default
    backend.

    Raises:
      ValueError: vocab_size not positive, or heads that do not divide.
    """
    if cfg.vocab_size <= 0:
        raise ValueError(
            f"model.vocab_size={cfg.vocab_size}: the model needs a positive vocabulary size; "
            "set it from the tokenizer (model.vocab_size=0 is only a config placeholder)"
        )
    kv_heads = cfg.num_kv_heads or cfg.num_heads
    if cfg.num_heads % kv_heads:
        raise ValueError(
            f"model.num_heads={cfg.num_heads} is not divisible by model.num_kv_heads={kv_heads}; "
            "each kv head serves a whole group of query heads"
        )
    if not cfg.head_dim and cfg.embed_dim % cfg.num_heads:
        raise ValueError(
            f"model.embed_dim={cfg.embed_dim} is not divisible by model.num_heads="
            f"{cfg.num_heads}; set model.head_dim explicitly or pick a dividing head count"
        )
    mlp_dim = cfg.mlp_dim
    if not mlp_dim and cfg.mlp in ("gelu", "gelu_exact", "relu"):
        mlp_dim = 4 * cfg.embed_dim
    elif not mlp_dim:
        mlp_dim = 256 * math.ceil(int(2 * 4 * cfg.embed_dim / 3) / 256)
    decoder_layers = cfg.num_decoder_layers
    if cfg.family == "encoder_decoder":
        decoder_layers = decoder_layers or cfg.num_layers
    return dataclasses.replace(
        cfg,
        num_kv_heads=kv_heads,
        head_dim=cfg.head_dim or cfg.embed_dim // cfg.num_heads,
        mlp_dim=mlp_dim,
        num_decoder_layers=decoder_layers,
        dtype=resolve_compute_dtype(cfg.dtype),
    )


def _pick(table: dict[str, Any], key: str, field: str) -> Any:
    if key not in table:
        raise ValueError(f"model.{field}={key!r} is not supported; choose one of {list(table)}")
    return table[key]


def count_params(cfg: ModelConfig) -> int:
    """Closed-form parameter count of `Decoder(cfg)`, `Encoder(cfg)` or `EncoderDecoder(cfg)`.

    With D embed, V vocab, P max_seq_len, N/K heads, H head dim, F mlp dim, b = use_bias:
      embeddings  V*D, plus P*D for learned positions (none for RoPE)
      norm        2D for LayerNorm with bias, else D (LayerNorm without bias, RMSNorm)
      attention   D*N*H (q) + 2*D*K*H (k, v) + N*H*D (o) + b*(N*H + 2*K*H + D)
      mlp         GELU, ReLU: 2*D*F + b*(F + D);  SwiGLU, GeGLU: 3*D*F + b*(2F + D)
      total       embeddings + layers * (2 norm + attention + mlp) + norm + (0 tied | D*V)
    GPT-2 124M: 124,439,808. Llama 3.2 1B: 1,235,814,400.

    An encoder adds T*D token types (T = type_vocab_size), one norm on the embeddings (post-norm)
    instead of the final norm (pre-norm), a pooler D*D + b*D, and an MLM head D*D + b*D + norm
    + b*V. BERT-base: 109,482,240 with the pooler (`BertModel`), 110,104,890 with the MLM
    head too.

    An encoder-decoder (E encoder, L decoder layers, R relative buckets) shares the embeddings:
      V*D + E * (2 norm + attention + mlp) + L * (3 norm + 2 attention + mlp) + 2 norm
      + 2*R*N (relative bias tables; none for RoPE) + (0 tied | D*V)
    t5-small: 60,506,624 (HF `T5ForConditionalGeneration`, t5-small); t5-base: 222,903,552.
    """
    c = resolve_model_config(cfg)
    d, v, f, b = c.embed_dim, c.vocab_size, c.mlp_dim, int(c.use_bias)
    n, k, h = c.num_heads, c.num_kv_heads, c.head_dim
    norm = _pick({"layernorm": d * (1 + b), "rmsnorm": d}, c.norm, "norm")
    attention = d * n * h + 2 * d * k * h + n * h * d + b * (n * h + 2 * k * h + d)
    gelu, gated = 2 * d * f + b * (f + d), 3 * d * f + b * (2 * f + d)
    mlps = {"gelu": gelu, "gelu_exact": gelu, "relu": gelu, "swiglu": gated, "geglu": gated}
    mlp = _pick(mlps, c.mlp, "mlp")
    positions = _pick(
        {"learned": c.max_seq_len * d, "rope": 0, "relative": 0}, c.position, "position"
    )
    embeddings = v * d + positions
    head = 0 if c.tie_embeddings else d * v
    blocks = c.num_layers * (2 * norm + attention + mlp)
    if c.family == "encoder_decoder":
        relative = 2 * c.relative_buckets * n if c.position == "relative" else 0
        decoder = c.num_decoder_layers * (3 * norm + 2 * attention + mlp)
        return v * d + blocks + decoder + 2 * norm + relative + head
    if c.family != "encoder":
        return embeddings + blocks + norm + head
    pooler = (d * d + b * d) if c.use_pooler else 0
    mlm = (d * d + b * d + norm + b * v + head) if c.use_mlm_head else 0
    return embeddings + c.type_vocab_size * d + norm + blocks + pooler + mlm


def param_count(model: nnx.Module) -> int:
    """Measured number of parameters (works on `nnx.eval_shape` abstract models too)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def layer_stacks(cfg: ModelConfig) -> dict[str, int]:
    """{top-level name of a stack of blocks: its number of layers}."""
    if cfg.family == "encoder_decoder":
        return {"encoder_blocks": cfg.num_layers, "decoder_blocks": cfg.num_decoder_layers}
    return {"blocks": cfg.num_layers}


def stack_layers(flat: dict[tuple, Any], stacks: dict[str, int]) -> dict[tuple, Any]:
    """(stack, i, *rest) for each i -> (stack, *rest) stacked on a leading layers axis."""
    out = {p: v for p, v in flat.items() if p[0] not in stacks}
    for stack, num_layers in stacks.items():
        for rest in {p[2:] for p in flat if p[0] == stack}:
            out[(stack, *rest)] = np.stack([flat[(stack, i, *rest)] for i in range(num_layers)])
    return out


def unstack_layers(flat: dict[tuple, Any], stacks: dict[str, int]) -> dict[tuple, Any]:
    """The inverse of `stack_layers`."""
    out = {p: v for p, v in flat.items() if p[0] not in stacks}
    for path, value in flat.items():
        if path[0] in stacks:
            for i in range(stacks[path[0]]):
                out[(path[0], i, *path[1:])] = value[i]
    return out
