"""GPT-2 (`GPT2LMHeadModel`, model_type "gpt2") <-> plm_jax `Decoder`.

GPT-2 is plm_jax's learned-position, LayerNorm (with bias), tanh-GELU, biased decoder with
multi-head attention. Its `Conv1D` weights are stored [in, out], so the only layout work is
splitting the packed `c_attn` into q, k, v and reshaping to heads.

Every config.json field that changes the math is checked; what plm_jax cannot express raises
`ConfigError` naming the field. Dropout rates are training settings, not weights: import sets
`dropout=0` (set `model.dropout` to fine-tune with it); export writes `model.dropout` as
`embd_pdrop`/`resid_pdrop`, where plm_jax applies it too, and 0 for `attn_pdrop` (plm_jax
never drops attention probabilities).

What it leaves out: file I/O and the exactly-once checks (`hf.py`).
"""

from __future__ import annotations

import re
from typing import Any

from plm_jax.config import ModelConfig
from plm_jax.convert.rules import (
    Family,
    TensorRule,
    conv1d,
    linear,
    option,
    require,
    same,
    split_columns,
)
from plm_jax.errors import ConfigError

__all__ = ["GPT2"]

# ACT2FN names of the tanh-approximated GELU, the one `GeluMlp` computes (same formula).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """config.json of a GPT-2 LM -> ModelConfig; defaults are GPT2Config's.

    Raises:
      ConfigError: an option that plm_jax's decoder does not compute, named.
    """
    require(hf, "activation_function", "gelu_new", TANH_GELUS, "the MLP uses tanh-GELU")
    require(
        hf, "scale_attn_weights", True, (True,), "attention logits are scaled by 1/sqrt(head_dim)"
    )
    require(
        hf,
        "scale_attn_by_inverse_layer_idx",
        False,
        (False,),
        "attention logits are not scaled per layer",
    )
    require(hf, "add_cross_attention", False, (False,), "the decoder has no cross-attention")
    # reorder_and_upcast_attn only moves where rounding happens in mixed precision; plm_jax
    # computes attention logits and softmax in float32 either way, so it is accepted.
    option(hf, "reorder_and_upcast_attn", False, bool)
    embed_dim = option(hf, "n_embd", 768, int)
    num_heads = option(hf, "n_head", 12, int)
    if embed_dim % num_heads:
        raise ConfigError(
            f"config.json: n_embd={embed_dim} is not divisible by n_head={num_heads}; GPT-2's "
            "head size is n_embd / n_head"
        )
    return ModelConfig(
        vocab_size=option(hf, "vocab_size", 50257, int),
        num_layers=option(hf, "n_layer", 12, int),
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=embed_dim // num_heads,
        mlp_dim=option(hf, "n_inner", 4 * embed_dim, int),
        max_seq_len=option(hf, "n_positions", 1024, int),
        position="learned",
        norm="layernorm",
        norm_eps=option(hf, "layer_norm_epsilon", 1e-5, float),
        mlp="gelu",
        use_bias=True,
        tie_embeddings=option(hf, "tie_word_embeddings", True, bool),
        dropout=0.0,
    )


def mismatches(cfg: ModelConfig) -> list[str]:
    """The settings of a resolved config that GPT-2 cannot express (empty: exportable)."""
    wanted = {
        "family": "decoder",
        "position": "learned",
        "norm": "layernorm",
        "norm_placement": "pre",
        "mlp": "gelu",
        "use_bias": True,
    }
    found = [
        f"model.{k}={getattr(cfg, k)!r} (GPT-2 needs {v!r})"
        for k, v in wanted.items()
        if getattr(cfg, k) != v
    ]
    if cfg.num_kv_heads != cfg.num_heads:
        found.append(f"model.num_kv_heads={cfg.num_kv_heads} (GPT-2 has no grouped-query heads)")
    if cfg.num_heads * cfg.head_dim != cfg.embed_dim:
        found.append(
            f"model.head_dim={cfg.head_dim} (GPT-2 needs num_heads * head_dim == embed_dim)"
        )
    return found


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A resolved, exportable ModelConfig -> GPT2Config fields for config.json."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_seq_len,
        "n_embd": cfg.embed_dim,
        "n_layer": cfg.num_layers,
        "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_dim,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": cfg.norm_eps,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "embd_pdrop": cfg.dropout,
        "resid_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        # Token ids belong to the tokenizer, which this converter does not see.
        "bos_token_id": None,
        "eos_token_id": None,
    }


def rules(cfg: ModelConfig, prefix: str) -> list[TensorRule]:
    """Every GPT-2 tensor of a resolved config, with names under `prefix` ("transformer.")."""
    d, n, h, f = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    v, p = cfg.vocab_size, cfg.max_seq_len
    table = [
        same(f"{prefix}wte.weight", ("embed", "embedding"), (v, d)),
        same(f"{prefix}wpe.weight", ("pos_embed", "embedding"), (p, d)),
    ]
    for i in range(cfg.num_layers):
        name, block = f"{prefix}h.{i}.", ("blocks", i)
        attn, mlp = (*block, "attn"), (*block, "mlp")
        qkv = tuple((*attn, w) for w in ("w_q", "w_k", "w_v"))
        qkv_bias = tuple((*attn, b) for b in ("b_q", "b_k", "b_v"))
        table += [
            same(f"{name}ln_1.weight", (*block, "attn_norm", "scale"), (d,)),
            same(f"{name}ln_1.bias", (*block, "attn_norm", "bias"), (d,)),
            split_columns(f"{name}attn.c_attn.weight", (d, 3 * d), qkv, (d, n, h)),
            split_columns(f"{name}attn.c_attn.bias", (3 * d,), qkv_bias, (n, h)),
            conv1d(f"{name}attn.c_proj.weight", (d, d), (*attn, "w_o"), (n, h, d)),
            same(f"{name}attn.c_proj.bias", (*attn, "b_o"), (d,)),
            same(f"{name}ln_2.weight", (*block, "mlp_norm", "scale"), (d,)),
            same(f"{name}ln_2.bias", (*block, "mlp_norm", "bias"), (d,)),
            same(f"{name}mlp.c_fc.weight", (*mlp, "w_in"), (d, f)),
            same(f"{name}mlp.c_fc.bias", (*mlp, "b_in"), (f,)),
            same(f"{name}mlp.c_proj.weight", (*mlp, "w_out"), (f, d)),
            same(f"{name}mlp.c_proj.bias", (*mlp, "b_out"), (d,)),
        ]
    table += [
        same(f"{prefix}ln_f.weight", ("final_norm", "scale"), (d,)),
        same(f"{prefix}ln_f.bias", ("final_norm", "bias"), (d,)),
    ]
    if not cfg.tie_embeddings:
        table.append(linear("lm_head.weight", (v, d), ("head",), (d, v)))
    return table


GPT2 = Family(
    model_type="gpt2",
    architecture="GPT2LMHeadModel",
    prefix="transformer.",
    embed_name="wte.weight",
    # Causal-mask buffers saved by older transformers versions; not parameters.
    buffers=re.compile(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias"),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    mismatches=mismatches,
    rules=rules,
)
