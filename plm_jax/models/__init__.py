"""Transformer language models in Flax NNX: decoders (GPT-2, LLaMA), encoders (BERT) and
encoder-decoders (T5).

Module map: `layers` (the parameter helper, embeddings, norms, MLPs, RoPE), `attention`,
`transformer` (Block, Decoder, KVCache, LmOutput), `encoder` (Encoder, EncoderOutput),
`encoder_decoder` (EncoderDecoder, Seq2SeqCache, relative position bias), `sizes`
(resolved sizes, parameter counts). `build_model` picks the class from `model.family`.
Nothing here imports `plm_jax.train`, `plm_jax.data` or `plm_jax.cli`, and no model sees a Mesh.
"""

from flax import nnx

from plm_jax.config import ModelConfig
from plm_jax.models.attention import Attention, AttentionMask, attention_mask, attention_segments
from plm_jax.models.encoder import Encoder, EncoderOutput
from plm_jax.models.encoder_decoder import EncoderDecoder, RelativePositionBias, Seq2SeqCache
from plm_jax.models.layers import (
    Embed,
    GegluMlp,
    GeluMlp,
    LayerNorm,
    ReluMlp,
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
    "AttentionMask",
    "Block",
    "Decoder",
    "Embed",
    "Encoder",
    "EncoderDecoder",
    "EncoderOutput",
    "GegluMlp",
    "GeluMlp",
    "KVCache",
    "LayerNorm",
    "LmOutput",
    "RMSNorm",
    "RelativePositionBias",
    "ReluMlp",
    "Seq2SeqCache",
    "SwiGluMlp",
    "apply_rope",
    "attention_mask",
    "attention_segments",
    "build_model",
    "count_params",
    "make_param",
    "param_count",
    "resolve_model_config",
    "rope_tables",
]


MODEL_CLASSES: dict[str, type[nnx.Module]] = {
    "decoder": Decoder,
    "encoder": Encoder,
    "encoder_decoder": EncoderDecoder,
}


def build_model(cfg: ModelConfig, *, rngs: nnx.Rngs) -> Decoder | Encoder | EncoderDecoder:
    """The model class of `cfg.family`, built from `rngs`.

    Raises:
      ValueError: a family without a model class here.
    """
    if cfg.family not in MODEL_CLASSES:
        raise ValueError(
            f"model.family={cfg.family!r} has no model yet; choose one of {list(MODEL_CLASSES)}"
        )
    return MODEL_CLASSES[cfg.family](cfg, rngs=rngs)
