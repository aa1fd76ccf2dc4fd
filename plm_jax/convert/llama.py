"""LLaMA (`LlamaForCausalLM`, model_type "llama") <-> plm_jax `Decoder`.

LLaMA is plm_jax's RoPE, RMSNorm, SwiGLU, bias-free decoder with grouped-query attention.
Its projections are `torch.nn.Linear` weights stored [out, in]: import transposes them to
[in, out] and splits the head axis (q_proj [N*H, D] -> w_q [D, N, H]). The q/k weights need no
permutation: plm_jax's RoPE uses HF's rotate_half channel pairing.

Every config.json field that changes the math is checked; what plm_jax cannot express (RoPE
scaling other than Llama 3.1's "llama3", partial rotary, biases, another activation) raises
`ConfigError` naming the field. Both config spellings are read: transformers 5's
`rope_parameters` and 4.x's `rope_theta` / `rope_scaling`; export writes both, and they must
agree when both are given. `pretraining_tp` and `attention_dropout` do not change inference
math and are ignored.

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
# Llama 3.1 scaling: config.json key -> ModelConfig field (all but the last are required).
_LLAMA3_FIELDS = {
    "factor": "rope_scaling_factor",
    "low_freq_factor": "rope_low_freq_factor",
    "high_freq_factor": "rope_high_freq_factor",
    "original_max_position_embeddings": "rope_original_max_len",
}
_ROPE_TYPES = ("default", "llama3")


def _rope_section(hf: dict[str, Any], section: str) -> dict[str, Any]:
    """ModelConfig RoPE fields from `rope_parameters` or `rope_scaling` ({} when null)."""
    params = hf.get(section) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"config.json: {section}={params!r} must be a mapping or null")
    if not params:
        return {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(
            f"config.json: {section}.rope_type={kind!r} is not supported: plm_jax computes "
            "plain RoPE and Llama 3.1's frequency scaling. Supported: "
            f"{', '.join(repr(t) for t in _ROPE_TYPES)}"
        )
    allowed = _ROPE_KEYS | (set(_LLAMA3_FIELDS) if kind == "llama3" else set())
    for key, value in params.items():
        if key not in allowed:
            raise ConfigError(
                f"config.json: {section}.{key}={value!r} is not supported with rope_type "
                f"{kind!r}: plm_jax reads only {', '.join(sorted(allowed))}"
            )
    if option(params, "partial_rotary_factor", 1.0, float) != 1.0:
        raise ConfigError(
            f"config.json: {section}.partial_rotary_factor="
            f"{params['partial_rotary_factor']} is not supported: plm_jax rotates every "
            "channel of a head (factor 1.0)"
        )
    # transformers 5 defaults rope_theta inside the section from the top-level field.
    theta = option(hf, "rope_theta", 10000.0, float)
    fields: dict[str, Any] = {"rope_theta": option(params, "rope_theta", theta, float)}
    if kind == "llama3":
        fields.update(rope_scaling="llama3", **_llama3_fields(hf, section, params))
    return fields


def _llama3_fields(hf: dict[str, Any], section: str, params: dict[str, Any]) -> dict[str, Any]:
    """The four Llama 3.1 settings, defaulted and checked as transformers does."""
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if params.get(key) is None:
            raise ConfigError(f"config.json: {section}.rope_type='llama3' needs {section}.{key}")
    # transformers prefers a top-level original_max_position_embeddings (its Phi-3 exception),
    # then the section's, then max_position_embeddings.
    old_len = option(params, "original_max_position_embeddings", None, int)
    old_len = option(hf, "original_max_position_embeddings", old_len, int)
    if old_len is None:
        old_len = option(hf, "max_position_embeddings", 2048, int)
    factor = option(params, "factor", None, float)
    low = option(params, "low_freq_factor", None, float)
    high = option(params, "high_freq_factor", None, float)
    if not (factor >= 1.0 and high > low > 0.0 and old_len > 0):
        raise ConfigError(
            f"config.json: {section} has factor={factor}, low_freq_factor={low}, "
            f"high_freq_factor={high}, original_max_position_embeddings={old_len}; Llama 3.1 "
            "scaling needs factor >= 1, high_freq_factor > low_freq_factor > 0 and a positive "
            "original length"
        )
    return dict(zip(_LLAMA3_FIELDS.values(), (factor, low, high, old_len), strict=True))


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig RoPE fields from either config spelling; both given must agree.

    transformers 5 reads `rope_scaling` over `rope_parameters` when both are set; a file where
    they differ is ambiguous, so it is an error rather than a silent pick.
    """
    v5, v4 = _rope_section(hf, "rope_parameters"), _rope_section(hf, "rope_scaling")
    if v5 and v4 and v5 != v4:
        raise ConfigError(
            f"config.json: rope_parameters (read as {v5}) and rope_scaling with rope_theta "
            f"(read as {v4}) disagree; keep only rope_parameters (transformers 5) or only "
            "rope_scaling + rope_theta (transformers 4)"
        )
    return v5 or v4 or {"rope_theta": option(hf, "rope_theta", 10000.0, float)}


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
        **_rope(hf),
        norm="rmsnorm",
        norm_eps=option(hf, "rms_norm_eps", 1e-6, float),
        mlp="swiglu",
        use_bias=False,
        tie_embeddings=option(hf, "tie_word_embeddings", False, bool),
        dropout=0.0,
    )


def mismatches(cfg: ModelConfig) -> list[str]:
    """The settings of a resolved config that LLaMA cannot express (empty: exportable)."""
    wanted = {
        "family": "decoder",
        "position": "rope",
        "norm": "rmsnorm",
        "norm_placement": "pre",
        "mlp": "swiglu",
        "use_bias": False,
    }
    # Every rope_scaling value ("" and "llama3") has a LLaMA spelling (`_rope_to_hf`).
    return [
        f"model.{k}={getattr(cfg, k)!r} (LLaMA needs {v!r})"
        for k, v in wanted.items()
        if getattr(cfg, k) != v
    ]


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """The RoPE fields of config.json, in transformers 5's and 4.x's spellings.

    transformers 5 takes `rope_scaling` over `rope_parameters` when both are set, filling its
    rope_theta from the top-level field, so the two spellings below read the same in 5 and 4.x.
    """
    if cfg.rope_scaling == "":
        scaling = None
    else:
        scaling = {
            "rope_type": cfg.rope_scaling,
            "factor": cfg.rope_scaling_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len,
        }
    v5 = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
    return {"rope_parameters": v5, "rope_theta": cfg.rope_theta, "rope_scaling": scaling}


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
        **_rope_to_hf(cfg),
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
