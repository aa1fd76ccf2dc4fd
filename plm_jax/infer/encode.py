"""Hidden states, pooled embeddings and masked-token predictions of texts.

    embed_texts(model, tokenizer, texts)   last hidden states and one pooled vector per text
    fill_mask(model, tokenizer, texts)     the most likely tokens at each mask token

Texts are encoded with the tokenizer's own special tokens (`encode_pair`: `[CLS] A [SEP]` and
token types for BERT, `<s> A </s>` for a SentencePiece model), exactly what a converted model
saw in training. Rows are padded (segment id 0, never attended) to a few bucketed lengths, and
the batch to a fixed row count, so a stream of texts compiles a handful of shapes, not one per
text. A text longer than the model's `max_seq_len` keeps its first `max_seq_len - 1` tokens and
its final token (the closing [SEP]) and is marked `truncated`.

Pooling: "mean" (over every real token, specials included, as sentence-transformers does),
"cls" (the first token), "pooler" (BERT's tanh pooler; encoders that have one) or "last" (the
last real token; the usual choice for decoders).

What it leaves out: loading checkpoints (`plm_jax.load`) and file formats (the CLI).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.errors import ConfigError, DataError

__all__ = ["POOLINGS", "Embedding", "MaskPrediction", "embed_texts", "fill_mask"]

POOLINGS = ("mean", "cls", "pooler", "last")
MIN_BUCKET = 16  # shortest padded length; buckets double up to max_seq_len


@dataclasses.dataclass
class Embedding:
    """text: the input; token_ids: its ids with special tokens ([n]); hidden: [n, D] float32
    last hidden states; pooled: [D] float32; truncated: cut to the model's max_seq_len."""

    text: str
    token_ids: list[int]
    hidden: np.ndarray
    pooled: np.ndarray
    truncated: bool


@dataclasses.dataclass
class MaskPrediction:
    """The candidates at one mask token: `position` in the ids, and (piece, id, probability)
    triples, most likely first."""

    position: int
    candidates: list[tuple[str, int, float]]


def _encode(tokenizer: Any, texts: Sequence[str], pairs: Sequence[str | None], max_len: int):
    rows = []
    for text, pair in zip(texts, pairs, strict=True):
        if not isinstance(text, str):
            raise DataError(f"texts must be strings, got {type(text).__name__}: {text!r:.60}")
        ids, types = tokenizer.encode_pair(text, pair)
        truncated = len(ids) > max_len
        if truncated:
            ids, types = ids[: max_len - 1] + ids[-1:], types[: max_len - 1] + types[-1:]
        rows.append((list(ids), list(types), truncated))
    return rows


def _encode_masked(tokenizer: Any, text: str, max_len: int):
    """A `_encode` row for a text that holds the mask piece's string at least once.

    A Hugging Face tokenizer matches "[MASK]" in text itself; a SentencePiece mask is a control
    symbol that text never produces, so the text is split at the string and the id inserted.

    Raises:
      DataError: no mask token in the text.
    """
    mask_id = tokenizer.mask_id
    piece = tokenizer.id_to_piece(mask_id)
    (row,) = _encode(tokenizer, [text], [None], max_len)
    if mask_id not in row[0] and piece in text:
        frame, _ = tokenizer.encode_pair("")  # the special tokens around a text, e.g. <s> </s>
        parts = [tokenizer.encode(part.strip()) for part in text.split(piece)]
        body = parts[0]
        for part in parts[1:]:
            body = [*body, mask_id, *part]
        ids = [*frame[:1], *body, *frame[1:]]
        row = (ids[:max_len], [0] * min(len(ids), max_len), len(ids) > max_len)
    if mask_id not in row[0]:
        raise DataError(f"text {text!r:.60} holds no mask token; write {piece!r} in it")
    return row


def _bucket(length: int, max_len: int) -> int:
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, max_len)


@partial(jax.jit, static_argnums=(0, 1))
def _forward(graphdef, with_logits, params, tokens, segment_ids, token_types):
    model = nnx.merge(graphdef, params)
    if hasattr(model, "type_embed"):  # an encoder
        out = model(tokens, segment_ids=segment_ids, token_types=token_types, lm_logits=with_logits)
        return out.hidden.astype(jnp.float32), out.pooled, out.logits
    out = model(tokens, segment_ids=segment_ids, lm_logits=with_logits)
    return out.hidden.astype(jnp.float32), None, out.logits


def _batches(model: nnx.Module, rows, batch_size: int, with_logits: bool = False):
    """Yields (row indices, hidden [b, L, D], pooled [b, D] | None, logits [b, L, V] | None)."""
    graphdef, params = nnx.split(model, nnx.Param)
    max_len = model.cfg.max_seq_len
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # similar lengths together
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = _bucket(max(len(rows[i][0]) for i in chunk), max_len)
        tokens = np.zeros((batch_size, width), np.int32)
        types = np.zeros((batch_size, width), np.int32)
        segments = np.zeros((batch_size, width), np.int32)
        for r, i in enumerate(chunk):
            ids, tt, _ = rows[i]
            tokens[r, : len(ids)], types[r, : len(ids)], segments[r, : len(ids)] = ids, tt, 1
        hidden, pooled, logits = _forward(graphdef, with_logits, params, tokens, segments, types)
        yield chunk, hidden, pooled, logits


def embed_texts(
    model: nnx.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    text_pairs: Sequence[str | None] | None = None,
    pooling: str = "mean",
    normalize: bool = False,
    batch_size: int = 32,
) -> list[Embedding]:
    """Last hidden states and a pooled vector for each text (and optional second text).

    Args:
      model: an `Encoder` or `Decoder`.
      tokenizer: its tokenizer (`encode_pair` adds the model's special tokens).
      texts: the texts; `text_pairs` the optional second segments (token type 1).
      pooling: one of `POOLINGS`.
      normalize: scale each pooled vector to unit L2 norm.
      batch_size: rows per forward pass.

    Raises:
      ConfigError: an unknown pooling, or "pooler" on a model without a pooler.
      DataError: a text that is not a string, or pairs of another length than texts.
    """
    if pooling not in POOLINGS:
        raise ConfigError(f"pooling={pooling!r} is not one of {list(POOLINGS)}")
    if pooling == "pooler" and getattr(model, "pooler", None) is None:
        raise ConfigError(
            "pooling='pooler' needs an encoder with a pooler (BERT's [CLS] dense + tanh); this "
            "model has none. Use pooling='mean' or 'cls'"
        )
    pairs = [None] * len(texts) if text_pairs is None else list(text_pairs)
    if len(pairs) != len(texts):
        raise DataError(f"{len(texts)} texts but {len(pairs)} text pairs; give one per text")
    rows = _encode(tokenizer, texts, pairs, model.cfg.max_seq_len)
    results: list[Embedding | None] = [None] * len(rows)
    for chunk, hidden, pooled, _ in _batches(model, rows, batch_size):
        hidden = np.asarray(hidden)
        for r, i in enumerate(chunk):
            ids, _, truncated = rows[i]
            h = hidden[r, : len(ids)]
            if pooling == "pooler":
                vector = np.asarray(pooled[r], np.float32)
            else:
                vector = {"mean": h.mean(axis=0), "cls": h[0], "last": h[-1]}[pooling]
            if normalize:
                vector = vector / max(float(np.linalg.norm(vector)), 1e-12)
            results[i] = Embedding(texts[i], ids, h, vector.astype(np.float32), truncated)
    return results  # type: ignore[return-value]


def fill_mask(
    model: nnx.Module, tokenizer: Any, texts: Sequence[str], *, top_k: int = 5
) -> list[list[MaskPrediction]]:
    """The `top_k` most likely tokens at every mask token of each text.

    Raises:
      ConfigError: a model without a masked-LM head, or a tokenizer without a mask token.
      DataError: a text without the mask token (its string is in the message).
    """
    if getattr(model, "mlm_dense", None) is None:
        raise ConfigError(
            "fill-mask needs an encoder with a masked-LM head (model.family=encoder, "
            "model.use_mlm_head=true)"
        )
    if tokenizer.mask_id is None:
        raise ConfigError("the tokenizer has no mask token, so no text can hold one")
    rows = [_encode_masked(tokenizer, text, model.cfg.max_seq_len) for text in texts]
    results: list[list[MaskPrediction]] = [[] for _ in rows]
    for chunk, _, _, logits in _batches(model, rows, 8, with_logits=True):
        probs = jax.nn.softmax(logits[:, :, : tokenizer.vocab_size], axis=-1)
        probs = np.asarray(probs)
        for r, i in enumerate(chunk):
            ids = rows[i][0]
            for pos in (p for p, t in enumerate(ids) if t == tokenizer.mask_id):
                best = np.argsort(-probs[r, pos])[:top_k]
                picks = [
                    (tokenizer.id_to_piece(int(t)), int(t), float(probs[r, pos, t])) for t in best
                ]
                results[i].append(MaskPrediction(pos, picks))
    return results
