"""BERT (`BertModel`, `BertForMaskedLM`, `BertForPreTraining`; model_type "bert") <-> `Encoder`.

BERT is plm_jax's post-norm encoder: learned positions, token-type embeddings, LayerNorm with
bias on the embeddings and after each residual sum, exact (erf) GELU, biased multi-head
attention. Its projections are `torch.nn.Linear` weights stored [out, in]: import transposes
them to [in, out] and splits the head axis (query [N*H, D] -> w_q [D, N, H]).

The optional parts follow the tensors the checkpoint holds, not its class name: the pooler
(`pooler.dense`, in `BertModel` and `BertForPreTraining`) sets `model.use_pooler`, the masked-LM
head (`cls.predictions.*`, in `BertForMaskedLM` and `BertForPreTraining`) `model.use_mlm_head`.
The MLM decoder is tied to the word embeddings unless `tie_word_embeddings` is false; a stored
tied copy must equal them, and `cls.predictions.decoder.bias`, when stored, must equal
`cls.predictions.bias` (transformers ties the two). The next-sentence head of
`BertForPreTraining` (`cls.seq_relationship.*`) is skipped with a log line. Pre-2020 names
(`LayerNorm.gamma` / `.beta`) are read too.

Export writes `BertForMaskedLM` ("bert." prefix) for a model with an MLM head, else
`BertModel` (no prefix); the pooler's tensors are written whenever the model has one.

Every config.json field that changes the math is checked; what plm_jax cannot express
(relative position embeddings, a decoder or cross-attention, another activation) raises
`ConfigError` naming the field. Dropout rates are training settings: import sets `dropout=0`;
export writes `model.dropout` as `hidden_dropout_prob` and 0 for the attention probabilities
(plm_jax never drops those).

What it leaves out: file I/O and the exactly-once checks (`hf.py`); task heads (sequence
classification, question answering) and the NSP head.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection
from typing import Any

from plm_jax.config import ModelConfig
from plm_jax.convert.rules import Family, TensorRule, linear, option, require, reshaped, same
from plm_jax.errors import ConfigError

__all__ = ["BERT"]

# ACT2FN name -> plm_jax `model.mlp`: "gelu" is the exact erf GELU, the other two the tanh one.
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
# The HF class -> (use_pooler, use_mlm_head) when only config.json is known.
HEADS = {
    "BertModel": (True, False),
    "BertForMaskedLM": (False, True),
    "BertForPreTraining": (True, True),
}
MLM = "cls.predictions."


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """config.json of a BERT -> ModelConfig; defaults are BertConfig's.

    The pooler and MLM head follow `architectures` here; `config_from_tensors` corrects them
    from the tensors a checkpoint actually holds.

    Raises:
      ConfigError: an option that plm_jax's encoder does not compute, named.
    """
    act = require(hf, "hidden_act", "gelu", tuple(ACTIVATIONS), "the MLP uses GELU")
    require(
        hf,
        "position_embedding_type",
        "absolute",
        ("absolute",),
        "plm_jax adds learned absolute position embeddings, not relative ones",
    )
    require(hf, "is_decoder", False, (False,), "plm_jax's encoder attends bidirectionally")
    require(hf, "add_cross_attention", False, (False,), "the encoder has no cross-attention")
    embed_dim = option(hf, "hidden_size", 768, int)
    num_heads = option(hf, "num_attention_heads", 12, int)
    if embed_dim % num_heads:
        raise ConfigError(
            f"config.json: hidden_size={embed_dim} is not divisible by num_attention_heads="
            f"{num_heads}; BERT's head size is hidden_size / num_attention_heads"
        )
    type_vocab_size = option(hf, "type_vocab_size", 2, int)
    if type_vocab_size < 1:
        raise ConfigError(
            f"config.json: type_vocab_size={type_vocab_size} must be at least 1; BERT always "
            "adds a token-type embedding"
        )
    architectures = hf.get("architectures") or ["BertModel"]
    use_pooler, use_mlm_head = HEADS.get(architectures[0], HEADS["BertModel"])
    return ModelConfig(
        family="encoder",
        vocab_size=option(hf, "vocab_size", 30522, int),
        num_layers=option(hf, "num_hidden_layers", 12, int),
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=embed_dim // num_heads,
        mlp_dim=option(hf, "intermediate_size", 3072, int),
        max_seq_len=option(hf, "max_position_embeddings", 512, int),
        position="learned",
        norm="layernorm",
        norm_eps=option(hf, "layer_norm_eps", 1e-12, float),
        norm_placement="post",
        mlp=ACTIVATIONS[act],
        use_bias=True,
        tie_embeddings=option(hf, "tie_word_embeddings", True, bool),
        type_vocab_size=type_vocab_size,
        use_pooler=use_pooler,
        use_mlm_head=use_mlm_head,
        dropout=0.0,
    )


def config_from_tensors(cfg: ModelConfig, prefix: str, names: Collection[str]) -> ModelConfig:
    """`cfg` with the pooler and MLM head present exactly when the checkpoint holds them."""
    return dataclasses.replace(
        cfg,
        use_pooler=f"{prefix}pooler.dense.weight" in names,
        use_mlm_head=any(n.startswith(MLM) for n in names),
    )


def mismatches(cfg: ModelConfig) -> list[str]:
    """The settings of a resolved config that BERT cannot express (empty: exportable)."""
    wanted = {
        "family": "encoder",
        "position": "learned",
        "norm": "layernorm",
        "norm_placement": "post",
        "use_bias": True,
    }
    found = [
        f"model.{k}={getattr(cfg, k)!r} (BERT needs {v!r})"
        for k, v in wanted.items()
        if getattr(cfg, k) != v
    ]
    if cfg.mlp not in ACTIVATIONS.values():
        found.append(f"model.mlp={cfg.mlp!r} (BERT needs 'gelu_exact' or 'gelu')")
    if cfg.num_kv_heads != cfg.num_heads:
        found.append(f"model.num_kv_heads={cfg.num_kv_heads} (BERT has no grouped-query heads)")
    if cfg.num_heads * cfg.head_dim != cfg.embed_dim:
        found.append(
            f"model.head_dim={cfg.head_dim} (BERT needs num_heads * head_dim == embed_dim)"
        )
    if cfg.type_vocab_size < 1:
        found.append("model.type_vocab_size=0 (BERT always has token-type embeddings)")
    return found


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A resolved, exportable ModelConfig -> BertConfig fields for config.json."""
    return {
        "architectures": ["BertForMaskedLM" if cfg.use_mlm_head else "BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.embed_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.mlp_dim,
        "hidden_act": "gelu" if cfg.mlp == "gelu_exact" else "gelu_new",
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.norm_eps,
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": 0.0,
        # BERT's [PAD] is id 0, transformers' default; `export_hf` writes the tokenizer's.
        "pad_token_id": 0,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def rules(cfg: ModelConfig, prefix: str) -> list[TensorRule]:
    """Every BERT tensor of a resolved config, base-model names under `prefix` ("bert.")."""
    d, n, h, f = cfg.embed_dim, cfg.num_heads, cfg.head_dim, cfg.mlp_dim
    v, p, t = cfg.vocab_size, cfg.max_seq_len, cfg.type_vocab_size
    emb = f"{prefix}embeddings."
    table = [
        same(f"{emb}word_embeddings.weight", ("embed", "embedding"), (v, d)),
        same(f"{emb}position_embeddings.weight", ("pos_embed", "embedding"), (p, d)),
        same(f"{emb}token_type_embeddings.weight", ("type_embed", "embedding"), (t, d)),
        *_layer_norm(f"{emb}LayerNorm", ("embed_norm",), d),
    ]
    for i in range(cfg.num_layers):
        name, block = f"{prefix}encoder.layer.{i}.", ("blocks", i)
        attn, mlp = (*block, "attn"), (*block, "mlp")
        for hf, ours in (("query", "q"), ("key", "k"), ("value", "v")):
            proj = f"{name}attention.self.{hf}"
            table += [
                linear(f"{proj}.weight", (n * h, d), (*attn, f"w_{ours}"), (d, n, h)),
                reshaped(f"{proj}.bias", (n * h,), (*attn, f"b_{ours}"), (n, h)),
            ]
        table += [
            linear(f"{name}attention.output.dense.weight", (d, n * h), (*attn, "w_o"), (n, h, d)),
            same(f"{name}attention.output.dense.bias", (*attn, "b_o"), (d,)),
            *_layer_norm(f"{name}attention.output.LayerNorm", (*block, "attn_norm"), d),
            linear(f"{name}intermediate.dense.weight", (f, d), (*mlp, "w_in"), (d, f)),
            same(f"{name}intermediate.dense.bias", (*mlp, "b_in"), (f,)),
            linear(f"{name}output.dense.weight", (d, f), (*mlp, "w_out"), (f, d)),
            same(f"{name}output.dense.bias", (*mlp, "b_out"), (d,)),
            *_layer_norm(f"{name}output.LayerNorm", (*block, "mlp_norm"), d),
        ]
    if cfg.use_pooler:
        table += _dense(f"{prefix}pooler.dense", ("pooler",), d)
    if cfg.use_mlm_head:
        table += [
            *_dense(f"{MLM}transform.dense", ("mlm_dense",), d),
            *_layer_norm(f"{MLM}transform.LayerNorm", ("mlm_norm",), d),
            same(f"{MLM}bias", ("mlm_bias",), (v,)),
        ]
        if not cfg.tie_embeddings:
            table.append(linear(f"{MLM}decoder.weight", (v, d), ("head",), (d, v)))
    return table


def _layer_norm(name: str, path: tuple, d: int) -> list[TensorRule]:
    """An `nn.LayerNorm` (weight, bias) -> plm_jax `LayerNorm` (scale, bias)."""
    return [
        same(f"{name}.weight", (*path, "scale"), (d,)),
        same(f"{name}.bias", (*path, "bias"), (d,)),
    ]


def _dense(name: str, path: tuple, d: int) -> list[TensorRule]:
    """A [D, D] `nn.Linear` (pooler, MLM transform) -> plm_jax `Dense` (w [in, out], b)."""
    return [
        linear(f"{name}.weight", (d, d), (*path, "w"), (d, d)),
        same(f"{name}.bias", (*path, "b"), (d,)),
    ]


def copies(cfg: ModelConfig, prefix: str) -> dict[str, str]:
    """The MLM decoder's bias repeats `cls.predictions.bias` (transformers ties the two)."""
    return {f"{MLM}decoder.bias": f"{MLM}bias"} if cfg.use_mlm_head else {}


def export_prefix(cfg: ModelConfig) -> str:
    """BertForMaskedLM nests the encoder under "bert."; BertModel is the bare encoder."""
    return "bert." if cfg.use_mlm_head else ""


BERT = Family(
    model_type="bert",
    architecture="BertModel",
    prefix="bert.",
    embed_name="embeddings.word_embeddings.weight",
    # Position-id and token-type-id buffers saved by older transformers versions.
    buffers=re.compile(r"(bert\.)?embeddings\.(position_ids|token_type_ids)"),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    mismatches=mismatches,
    rules=rules,
    model_family="encoder",
    architectures=("BertForMaskedLM", "BertForPreTraining"),
    head_name=f"{MLM}decoder.weight",
    legacy_names=(
        (r"LayerNorm\.gamma$", "LayerNorm.weight"),
        (r"LayerNorm\.beta$", "LayerNorm.bias"),
    ),
    copies=copies,
    config_from_tensors=config_from_tensors,
    export_prefix=export_prefix,
    dropped=re.compile(r"cls\.seq_relationship\.(weight|bias)"),
)
