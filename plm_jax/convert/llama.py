"""LLaMA (`LlamaForCausalLM`, model_type "llama") <-> plm_jax `Decoder`.

LLaMA is plm_jax's RoPE, RMSNorm, SwiGLU, bias-free decoder with grouped-query attention.
Its projections are `torch.nn.Linear` weights stored [out, in]: import transposes them to
[in, out] and splits the head axis (q_proj [N*H, D] -> w_q [D, N, H]). The q/k weights need no
permutation: plm_jax's RoPE uses HF's rotate_half channel pairing.

Every config.json field that changes the math is checked; what plm_jax cannot express (RoPE
scaling, partial rotary, biases, another activation) raises `ConfigError` naming the field.
Both config spellings are read: transformers 5's `rope_parameters` and 4.x's `rope_theta` /
`rope_scaling`; export writes both. `pretraining_tp` and `attention_dropout` do not change
inference math and are ignored.

What it leaves out: file I/O and the exactly-once checks (`hf.py`).
"""

from __future__ import annotations

import re
from typing import Any

from plm_jax.config import ModelConfig
from plm_jax.convert.rules import Family, TensorRule, linear, option, require, same
from plm_jax.errors import ConfigError

__all__ = ["LLAMA"]

# ACT2FN's "silu" and "swish" are the same function, the one `SwiGluMlp` gates with.
SILUS = ("silu", "swish")
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "partial_rotary_factor"}


def _rope_theta(hf: dict[str, Any]) -> float:
    """The RoPE base from either config spelling; anything but plain RoPE is an error."""
    theta = option(hf, "rope_theta", 10000.0, float)
    for section in ("rope_parameters", "rope_scaling"):
        params = hf.get(section) or {}
        if not isinstance(params, dict):
            raise ConfigError(f"config.json: {section}={params!r} must be a mapping or null")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise ConfigError(
                f"config.json: {section}.rope_type={kind!r} is not supported: plm_jax computes "
                "plain RoPE (rope_type 'default') without scaling. Supported: 'default'"
            )
        for key, value in params.items():
            if key not in _ROPE_KEYS:
                raise ConfigError(
                    f"config.json: {section}.{key}={value!r} is not supported: plm_jax computes "
                    "plain RoPE from rope_theta only"
                )
        if option(params, "partial_rotary_factor", 1.0, float) != 1.0:
            raise ConfigError(
                f"config.json: {section}.partial_rotary_factor="
                f"{params['partial_rotary_factor']} is not supported: plm_jax rotates every "
                "channel of a head (factor 1.0)"
            )
        theta = option(params, "rope_theta", theta, float)
    return theta


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """config.json of a LLaMA LM -> ModelConfig; defaults are LlamaConfig's.

    Raises:
      ConfigError: an option that plm_jax's decoder does not compute, named.
    """
    require(hf, "hidden_act", "silu", SILUS, "the gated MLP uses SiLU (SwiGLU)")
    no_bias = "plm_jax's LLaMA has no biases (model.use_bias=false)"
    require(hf, "attention_bias", False, (False,), no_bias)
    require(hf, "mlp_bias", False, (False,), no_bias)
    embed_dim = option(hf, "hidden_size", 4096, int)
    num_heads = option(hf, "num_attention_heads", 32, int)
    num_kv_heads = option(hf, "num_key_value_heads", num_heads, int)
    if num_heads % num_kv_heads:
        raise ConfigError(
            f"config.json: num_attention_heads={num_heads} is not divisible by "
            f"num_key_value_heads={num_kv_heads}; each kv head serves a whole group"
        )
    head_dim = option(hf, "head_dim", embed_dim // num_heads, int)
    if head_dim % 2:
        raise ConfigError(f"config.json: head_dim={head_dim} must be even; RoPE rotates pairs")
    return ModelConfig(
        vocab_size=option(hf, "vocab_size", 32000, int),
        num_layers=option(hf, "num_hidden_layers", 32, int),
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        mlp_dim=option(hf, "intermediate_size", 11008, int),
        max_seq_len=option(hf, "max_position_embeddings", 2048, int),
        position="rope",
        rope_theta=_rope_theta(hf),
        norm="rmsnorm",
        norm_eps=option(hf, "rms_norm_eps", 1e-6, float),
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=option(hf, "tie_word_embeddings", False, bool),
        dropout=0.0,
    )


def mismatches(cfg: ModelConfig) -> list[str]:
    """The settings of a resolved config that LLaMA cannot express (empty: exportable)."""
    wanted = {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "use_bias": False}
    return [
        f"model.{k}={getattr(cfg, k)!r} (LLaMA needs {v!r})"
        for k, v in wanted.items()
        if getattr(cfg, k) != v
    ]


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A resolved, exportable ModelConfig -> LlamaConfig fields for config.json."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,  # the transformers 4.x spelling
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        # plm_jax's residual dropout has no LLaMA counterpart; attention dropout is off.
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        # Token ids belong to the tokenizer, which this converter does not see.
        "bos_token_id": None,
        "eos_token_id": None,
    }


def rules(cfg: ModelConfig, prefix: str) -> list[TensorRule]:
    """Every LLaMA tensor of a resolved config, with names under `prefix` ("model.")."""
    d, n, k, h, f = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
    v = cfg.vocab_size
    table = [same(f"{prefix}embed_tokens.weight", ("embed", "embedding"), (v, d))]
    for i in range(cfg.num_layers):
        name, block = f"{prefix}layers.{i}.", ("blocks", i)
        attn, mlp = (*block, "attn"), (*block, "mlp")
        table += [
            same(f"{name}input_layernorm.weight", (*block, "attn_norm", "scale"), (d,)),
            linear(f"{name}self_attn.q_proj.weight", (n * h, d), (*attn, "w_q"), (d, n, h)),
            linear(f"{name}self_attn.k_proj.weight", (k * h, d), (*attn, "w_k"), (d, k, h)),
            linear(f"{name}self_attn.v_proj.weight", (k * h, d), (*attn, "w_v"), (d, k, h)),
            linear(f"{name}self_attn.o_proj.weight", (d, n * h), (*attn, "w_o"), (n, h, d)),
            same(f"{name}post_attention_layernorm.weight", (*block, "mlp_norm", "scale"), (d,)),
            linear(f"{name}mlp.gate_proj.weight", (f, d), (*mlp, "w_gate"), (d, f)),
            linear(f"{name}mlp.up_proj.weight", (f, d), (*mlp, "w_up"), (d, f)),
            linear(f"{name}mlp.down_proj.weight", (d, f), (*mlp, "w_down"), (f, d)),
        ]
    table.append(same(f"{prefix}norm.weight", ("final_norm", "scale"), (d,)))
    if not cfg.tie_embeddings:
        table.append(linear("lm_head.weight", (v, d), ("head",), (d, v)))
    return table


LLAMA = Family(
    model_type="llama",
    architecture="LlamaForCausalLM",
    prefix="model.",
    embed_name="embed_tokens.weight",
    # RoPE frequency buffers saved by older transformers versions; not parameters.
    buffers=re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq"),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    mismatches=mismatches,
    rules=rules,
)
