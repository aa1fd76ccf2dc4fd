"""Inference: scoring text (`score.py`) and generating it (`generate.py`) with a decoder;
hidden states, pooled embeddings and mask filling with any model (`encode.py`); greedy and
beam-search decoding with an encoder-decoder (`seq2seq.py`).

Pure library functions over a live `Decoder` and `Tokenizer`; loading a checkpoint into them
is `plm_jax.load`'s job, and the CLI wraps these functions.
"""

from plm_jax.infer.encode import Embedding, MaskPrediction, embed_texts, fill_mask
from plm_jax.infer.generate import Generation, generate, generate_ids
from plm_jax.infer.score import TextScore, score_texts
from plm_jax.infer.seq2seq import (
    DecodeOutput,
    Hypothesis,
    Seq2SeqDecoder,
    beam_search,
    decode_texts,
    greedy_decode,
)

__all__ = [
    "DecodeOutput",
    "Embedding",
    "Generation",
    "Hypothesis",
    "MaskPrediction",
    "Seq2SeqDecoder",
    "TextScore",
    "beam_search",
    "decode_texts",
    "embed_texts",
    "fill_mask",
    "generate",
    "generate_ids",
    "greedy_decode",
    "score_texts",
]
