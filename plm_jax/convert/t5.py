"""T5 (`T5ForConditionalGeneration`, model_type "t5") <-> plm_jax `EncoderDecoder`.

T5 is plm_jax's encoder-decoder with relative position buckets, RMSNorm without biases and an
input embedding (`shared`) used by both stacks. v1.0 (`feed_forward_proj` "relu") ties the
output head to it and scales the decoder output by d_model**-0.5; v1.1 ("gated-gelu", the tanh
GELU) has a separate `lm_head` and no scaling. Projections are `torch.nn.Linear` weights stored
[out, in]: import transposes them and splits the head axis (q [N*H, D] -> w_q [D, N, H]).

T5 does not scale attention logits by 1/sqrt(H); plm_jax does, so import multiplies w_q by
sqrt(H) and export divides it back (exact for H a power of 4, such as T5's 64; otherwise the
round trip may differ in the last bit).

Tied head and scaling: transformers 4 scales exactly when `tie_word_embeddings` (default true);
transformers 5 reads `scale_decoder_outputs` first and keeps `lm_head.weight` whenever the
checkpoint stores one that differs from `shared.weight`. plm_jax ties the head exactly when it
scales, so a checkpoint that scales with an untied head, or ties it without scaling (a v1.1
config without `lm_head.weight`), raises `ConfigError`. Export writes both fields.

Older checkpoints may store `encoder.embed_tokens.weight` / `decoder.embed_tokens.weight` (must
equal `shared.weight`; not written back) and the unused relative-bias table of the decoder's
first cross-attention (skipped). Every other config.json field that changes the math is
checked; dropout rates are training settings (import sets `dropout=0`, export writes
`model.dropout` as `dropout_rate`).

What it leaves out: file I/O and the exactly-once checks (`hf.py`); `T5Model`,
`T5EncoderModel` and the task heads; mT5/UMT5 (other model types).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from typing import Any

import numpy as np

from plm_jax.config import ModelConfig
from plm_jax.convert.rules import Family, Path, TensorRule, linear, option, require, same
from plm_jax.errors import ConfigError

__all__ = ["T5"]

# (gated, dense activation) -> plm_jax `model.mlp`; transformers reads feed_forward_proj
# "gated-gelu" as the tanh GELU `gelu_new` (so is "gelu_pytorch_tanh").
MLPS = {(False, "relu"): "relu", (True, "gelu_new"): "geglu", (True, "gelu_pytorch_tanh"): "geglu"}
EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """config.json of a T5 -> ModelConfig; defaults are T5Config's (t5-small).

    Raises:
      ConfigError: an option that plm_jax's encoder-decoder does not compute, named.
    """
    mlp = _mlp_variant(hf)
    require(hf, "is_encoder_decoder", True, (True,), "T5 is an encoder-decoder")
    require(hf, "is_decoder", False, (False,), "the top-level T5 config is not a decoder")
    require(hf, "tie_encoder_decoder", False, (False,), "plm_jax's stacks have own weights")
    scale = _scales_output(hf)
    buckets = option(hf, "relative_attention_num_buckets", 32, int)
    max_distance = option(hf, "relative_attention_max_distance", 128, int)
    if buckets < 4 or max_distance <= buckets // 2:
        raise ConfigError(
            f"config.json: relative_attention_num_buckets={buckets} and "
            f"relative_attention_max_distance={max_distance}: T5's buckets need at least 4 "
            "buckets and a max distance above half of them"
        )
    num_layers = option(hf, "num_layers", 6, int)
    num_heads = option(hf, "num_heads", 8, int)
    return ModelConfig(
        family="encoder_decoder",
        vocab_size=option(hf, "vocab_size", 32128, int),
        num_layers=num_layers,
        num_decoder_layers=option(hf, "num_decoder_layers", num_layers, int),
        embed_dim=option(hf, "d_model", 512, int),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=option(hf, "d_kv", 64, int),
        mlp_dim=option(hf, "d_ff", 2048, int),
        max_seq_len=option(hf, "n_positions", 512, int),
        position="relative",
        relative_buckets=buckets,
        relative_max_distance=max_distance,
        norm="rmsnorm",
        norm_eps=option(hf, "layer_norm_epsilon", 1e-6, float),
        norm_placement="pre",
        mlp=mlp,
        use_bias=False,
        tie_embeddings=scale,
        dropout=0.0,
    )


def _mlp_variant(hf: dict[str, Any]) -> str:
    """`model.mlp` of the feed-forward layers, read as transformers does: `feed_forward_proj`
    ("ACT" or "gated-ACT"), unless config.json also stores `is_gated_act` / `dense_act_fn`
    (transformers 5 writes them), which then win.

    Raises:
      ConfigError: an MLP other than ReLU or the gated tanh-GELU, naming the fields.
    """
    proj = option(hf, "feed_forward_proj", "relu", str)
    parts = proj.split("-")
    gated = option(hf, "is_gated_act", len(parts) == 2 and parts[0] == "gated", bool)
    act = option(hf, "dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1], str)
    if (gated, act) not in MLPS:
        stored = [f"{k}={hf[k]!r}" for k in ("is_gated_act", "dense_act_fn") if k in hf]
        raise ConfigError(
            f"config.json: {', '.join([f'feed_forward_proj={proj!r}', *stored])} is not "
            "supported: plm_jax computes T5's 'relu' (v1.0) and 'gated-gelu' (v1.1, tanh GELU)"
        )
    return MLPS[gated, act]


def _scales_output(hf: dict[str, Any]) -> bool:
    """Whether the decoder output is scaled by d_model**-0.5 (then the head is tied).

    Raises:
      ConfigError: scaling together with an explicitly untied head.
    """
    tied = option(hf, "tie_word_embeddings", True, bool)
    scale = option(hf, "scale_decoder_outputs", tied, bool)
    if scale and not tied:
        raise ConfigError(
            "config.json: scale_decoder_outputs=True with tie_word_embeddings=False is not "
            "supported: plm_jax scales the decoder output only before the tied head (T5 v1.0)"
        )
    return scale


def config_from_tensors(cfg: ModelConfig, prefix: str, names: Collection[str]) -> ModelConfig:
    """`cfg`, after checking that an unscaled (untied) model stores its `lm_head`.

    Raises:
      ConfigError: no `lm_head.weight` although the output is not scaled.
    """
    if not cfg.tie_embeddings and f"{prefix}lm_head.weight" not in names:
        raise ConfigError(
            "config.json does not scale the decoder output (scale_decoder_outputs or "
            "tie_word_embeddings false) but the checkpoint has no lm_head.weight, so its head is "
            "the input embedding without T5's d_model**-0.5 scaling, which plm_jax does not "
            "compute; store lm_head.weight (a copy of shared.weight) to import it untied"
        )
    return cfg


def mismatches(cfg: ModelConfig) -> list[str]:
    """The settings of a resolved config that T5 cannot express (empty: exportable)."""
    wanted = {
        "family": "encoder_decoder",
        "position": "relative",
        "norm": "rmsnorm",
        "norm_placement": "pre",
        "use_bias": False,
    }
    found = [
        f"model.{k}={getattr(cfg, k)!r} (T5 needs {v!r})"
        for k, v in wanted.items()
        if getattr(cfg, k) != v
    ]
    if cfg.mlp not in ("relu", "geglu"):
        found.append(f"model.mlp={cfg.mlp!r} (T5 needs 'relu' or 'geglu')")
    if cfg.num_kv_heads != cfg.num_heads:
        found.append(f"model.num_kv_heads={cfg.num_kv_heads} (T5 has no grouped-query heads)")
    return found


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A resolved, exportable ModelConfig -> T5Config fields for config.json."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.embed_dim,
        "d_kv": cfg.head_dim,
        "d_ff": cfg.mlp_dim,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_decoder_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "layer_norm_epsilon": cfg.norm_eps,
        "feed_forward_proj": "relu" if cfg.mlp == "relu" else "gated-gelu",
        "is_encoder_decoder": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.tie_embeddings,
        "n_positions": cfg.max_seq_len,
        "dropout_rate": cfg.dropout,
        # T5's SentencePiece ids and HF's defaults; the decoder starts from the padding id.
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
    }


def rules(cfg: ModelConfig, prefix: str) -> list[TensorRule]:
    """Every T5ForConditionalGeneration tensor of a resolved config (no name prefix)."""
    d, v, n, r = cfg.embed_dim, cfg.vocab_size, cfg.num_heads, cfg.relative_buckets
    table = [same(f"{prefix}shared.weight", ("embed", "embedding"), (v, d))]
    for stack, count in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        bias = f"{prefix}{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        table.append(same(bias, (f"{stack}_rel_bias", "embedding"), (r, n)))
        for i in range(count):
            name, block = f"{prefix}{stack}.block.{i}.layer.", (f"{stack}_blocks", i)
            sublayers = [("SelfAttention", "attn_norm", "attn")]
            if stack == "decoder":
                sublayers.append(("EncDecAttention", "cross_norm", "cross_attn"))
            for j, (hf, norm, attn) in enumerate(sublayers):
                table.append(same(f"{name}{j}.layer_norm.weight", (*block, norm, "scale"), (d,)))
                table += _attention(f"{name}{j}.{hf}", (*block, attn), cfg)
            ff = len(sublayers)
            table.append(same(f"{name}{ff}.layer_norm.weight", (*block, "mlp_norm", "scale"), (d,)))
            table += _mlp(f"{name}{ff}.DenseReluDense", (*block, "mlp"), cfg)
        table.append(
            same(f"{prefix}{stack}.final_layer_norm.weight", (f"{stack}_norm", "scale"), (d,))
        )
    if not cfg.tie_embeddings:
        table.append(linear(f"{prefix}lm_head.weight", (v, d), ("head",), (d, v)))
    return table


def _attention(name: str, path: Path, cfg: ModelConfig) -> list[TensorRule]:
    """A `T5Attention` (q, k, v, o; no biases) -> plm_jax `Attention`."""
    d, n, h = cfg.embed_dim, cfg.num_heads, cfg.head_dim
    return [
        _query(f"{name}.q.weight", (*path, "w_q"), d, n, h),
        linear(f"{name}.k.weight", (n * h, d), (*path, "w_k"), (d, n, h)),
        linear(f"{name}.v.weight", (n * h, d), (*path, "w_v"), (d, n, h)),
        linear(f"{name}.o.weight", (d, n * h), (*path, "w_o"), (n, h, d)),
    ]


def _query(hf_name: str, path: Path, d: int, n: int, h: int) -> TensorRule:
    """T5's q [N*H, D] -> w_q [D, N, H] times sqrt(H): plm_jax's 1/sqrt(H) logit scaling then
    gives T5's unscaled logits. Computed in float32, stored in the tensor's dtype."""
    scale = np.float32(math.sqrt(h))

    def to_plm(x: np.ndarray) -> tuple[np.ndarray]:
        return ((x.T.reshape(d, n, h).astype(np.float32) * scale).astype(x.dtype),)

    def to_hf(y: np.ndarray) -> np.ndarray:
        return (y.astype(np.float32) / scale).astype(y.dtype).reshape(d, n * h).T

    return TensorRule(hf_name, (n * h, d), (path,), to_plm, to_hf)


def _mlp(name: str, path: Path, cfg: ModelConfig) -> list[TensorRule]:
    """`T5DenseActDense` (wi, wo) -> `ReluMlp`; `T5DenseGatedActDense` (wi_0 gated by the
    GELU, wi_1, wo) -> `GegluMlp`."""
    d, f = cfg.embed_dim, cfg.mlp_dim
    inputs = [("wi", "w_in")] if cfg.mlp == "relu" else [("wi_0", "w_gate"), ("wi_1", "w_up")]
    table = [linear(f"{name}.{hf}.weight", (f, d), (*path, ours), (d, f)) for hf, ours in inputs]
    out = "w_out" if cfg.mlp == "relu" else "w_down"
    return [*table, linear(f"{name}.wo.weight", (d, f), (*path, out), (f, d))]


def copies(cfg: ModelConfig, prefix: str) -> dict[str, str]:
    """Per-stack embeddings of older checkpoints repeat `shared.weight` (read, not written)."""
    return {f"{prefix}{name}": f"{prefix}shared.weight" for name in EMBED_COPIES}


T5 = Family(
    model_type="t5",
    architecture="T5ForConditionalGeneration",
    prefix="",
    embed_name="shared.weight",
    # Never-used tensors older checkpoints carry (the decoder's first cross-attention has a
    # relative-bias table transformers ignores), and the per-stack embedding copies, which
    # `copies` checks on import and export leaves out (transformers re-ties them).
    buffers=re.compile(
        r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight"
        r"|(encoder|decoder)\.embed_tokens\.weight"
    ),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    mismatches=mismatches,
    rules=rules,
    model_family="encoder_decoder",
    architectures=("T5WithLMHeadModel",),
    copies=copies,
    config_from_tensors=config_from_tensors,
)
