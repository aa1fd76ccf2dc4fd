"""What is explained: the input sequence, the output that is read, and how a residual stream
becomes that output.

One `Subject` per call. Its `Readout` (static, hashable) says which output is read:

    next_token        a decoder's next-token distribution after the text
    masked_token      an MLM encoder's distribution at the (first) mask token
    translated_token  an encoder-decoder's next decoder token after the source and a prefix
    class             a fine-tuned classifier's class distribution
    none              an encoder without an output head (BertModel, e.g. all-MiniLM-L6-v2):
                      attention maps only

`output_logits` applies the model's own final norm and head to any stream, so the last
layer's logit lens *is* the model's output and every earlier layer is read the same way.
The explained score of every method is the target's log-probability under that output.

Inputs are framed as the rest of plm_jax frames them: decoders `[bos] text` (as `score`),
encoders and classifiers `encode_pair` (as `embed` / `predict`), encoder-decoders
`text [eos]` with the decoder starting from pad (as `transform`). A longer text is cut to
`max_seq_len` and the subject says what was dropped.

What it leaves out: QA span heads, regression heads and decoder-only translation runs
(`explain` refuses them with a message), and text pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from plm_jax.errors import ConfigError, DataError
from plm_jax.explain.trace import Inputs
from plm_jax.models.encoder import HEAD_ACTIVATIONS
from plm_jax.models.layers import add_bias, token_einsum

__all__ = ["ClassHead", "Readout", "Subject", "class_subject", "lm_subject", "output_logits"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ClassHead:
    """A classifier's head: w [D, C], b [C] float32, and its pooling (static)."""

    w: jax.Array
    b: jax.Array
    pooling: str = dataclasses.field(metadata=dict(static=True))


@dataclasses.dataclass(frozen=True)
class Readout:
    """kind (see the module docstring), stack ("decoder"/"encoder": the streams the output
    reads) and position (the query position whose output is read; classifiers pool)."""

    kind: str
    stack: str
    position: int


@dataclasses.dataclass
class Subject:
    """One sequence and what is read from it.

    Attributes:
      readout: the static `Readout`.
      inputs: the model input (`Inputs`, batch 1).
      pieces: the attributed tokens' strings (the text; an encoder-decoder's source).
      stack_pieces: {stack: its tokens' strings} for attention axes.
      target: the explained output id (token or class), or None: the model's top choice,
        filled in by `explain`.
      output_name: id -> display string (a piece or a label).
      num_outputs: V or C.
      truncation: a sentence saying what was cut, or None.
    """

    readout: Readout
    inputs: Inputs
    pieces: list[str]
    stack_pieces: dict[str, list[str]]
    target: int | None
    output_name: Callable[[int], str]
    num_outputs: int
    truncation: str | None = None


def _pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    return [tokenizer.id_to_piece(i) for i in ids]


def resolve_token(tokenizer: Any, target: str) -> int:
    """The id of `target`: a piece of the vocabulary, or a string that encodes to one token.

    Raises:
      ConfigError: it is neither.
    """
    try:
        return tokenizer.piece_to_id(target)
    except KeyError:
        pass
    ids = tokenizer.encode(target) if target else []
    if len(ids) == 1:
        return ids[0]
    shown = _pieces(tokenizer, ids[:4])
    raise ConfigError(
        f"--target {target!r} is not one token of the model's vocabulary (it encodes to "
        f"{len(ids)} tokens {shown}); give a single piece, e.g. {shown[0]!r}"
        if ids
        else f"--target {target!r} is not in the model's vocabulary; give a single piece"
    )


def _check_text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError("--text is empty; give the text to explain")
    return text


def _mask_ids(tokenizer: Any, text: str) -> list[int]:
    """`encode_pair(text)`, with the mask piece's string in `text` turned into the mask id
    (a SentencePiece mask is a control symbol that encoding never produces)."""
    mask_id = tokenizer.mask_id
    piece = tokenizer.id_to_piece(mask_id)
    ids, _ = tokenizer.encode_pair(text)
    if mask_id not in ids and piece in text:
        frame, _ = tokenizer.encode_pair("")
        parts = [tokenizer.encode(part.strip()) for part in text.split(piece)]
        body = parts[0]
        for part in parts[1:]:
            body = [*body, mask_id, *part]
        ids = [*frame[:1], *body, *frame[1:]]
    if mask_id not in ids:
        raise DataError(
            f"--text holds no mask token; an MLM encoder explains its prediction at a mask: "
            f"write {piece!r} in the text"
        )
    return ids


def _cut_pair(ids: list[int], types: list[int], max_len: int):
    """The first max_len - 1 tokens and the closing one (as `predict`), and the message."""
    if len(ids) <= max_len:
        return ids, types, None
    note = (
        f"the text has {len(ids)} tokens and the model reads at most {max_len}: explained "
        f"its first {max_len - 1} tokens and the closing one ({len(ids) - max_len} cut)"
    )
    return ids[: max_len - 1] + ids[-1:], types[: max_len - 1] + types[-1:], note


def lm_subject(
    model: Any, tokenizer: Any, text: str, *, target: str | None = None, prefix: str = ""
) -> Subject:
    """The subject of a pretrained or converted model (any family).

    Args:
      model: a Decoder, Encoder or EncoderDecoder.
      tokenizer: its tokenizer.
      text: the text (encoder-decoders: the source; MLM encoders: holds a mask piece).
      target: the explained token (a piece, or a string of one token), or None for the
        model's most likely one.
      prefix: encoder-decoders: the decoder's output so far, after the start token.

    Raises:
      ConfigError: a target that is not one token; a prefix for another family.
      DataError: an empty text; an MLM text without a mask.
    """
    text = _check_text(text)
    cfg, max_len = model.cfg, model.cfg.max_seq_len
    target_id = None if target is None else resolve_token(tokenizer, target)
    name = tokenizer.id_to_piece
    if prefix and cfg.family != "encoder_decoder":
        raise ConfigError("--prefix is for encoder-decoders (the decoder's output so far)")
    if cfg.family == "decoder":
        ids = [tokenizer.bos_id, *tokenizer.encode(text)]
        note = None
        if len(ids) > max_len:  # the next token depends most on the nearest context
            note = (
                f"the text has {len(ids)} tokens with bos and the model reads at most "
                f"{max_len}: explained bos and the last {max_len - 1} ({len(ids) - max_len} "
                "cut from the start)"
            )
            ids = ids[:1] + ids[len(ids) - max_len + 1 :]
        inputs = Inputs(jnp.asarray([ids], jnp.int32))
        pieces = _pieces(tokenizer, ids)
        readout = Readout("next_token", "decoder", len(ids) - 1)
        return Subject(
            readout, inputs, pieces, {"decoder": pieces}, target_id, name, cfg.vocab_size, note
        )
    if cfg.family == "encoder":
        if not cfg.use_mlm_head or tokenizer.mask_id is None:
            ids, types = tokenizer.encode_pair(text)
            kind, position = "none", 0
        else:
            ids = _mask_ids(tokenizer, text)
            types = [0] * len(ids)
            kind, position = "masked_token", ids.index(tokenizer.mask_id)
        ids, types, note = _cut_pair(ids, types, max_len)
        if kind == "masked_token" and position >= len(ids) - 1:
            raise DataError(
                f"the mask is token {position} but the model reads {max_len}; move it earlier"
            )
        inputs = Inputs(jnp.asarray([ids], jnp.int32), jnp.asarray([types], jnp.int32))
        pieces = _pieces(tokenizer, ids)
        return Subject(
            Readout(kind, "encoder", position),
            inputs,
            pieces,
            {"encoder": pieces},
            target_id,
            name,
            cfg.vocab_size,
            note,
        )
    source = [*tokenizer.encode(text), tokenizer.eos_id]
    note = None
    if len(source) > max_len:
        note = (
            f"the source has {len(source)} tokens with eos and the model reads at most "
            f"{max_len}: explained its first {max_len - 1} and the eos"
        )
        source = source[: max_len - 1] + source[-1:]
    decoder = [tokenizer.pad_id, *(tokenizer.encode(prefix) if prefix else [])][:max_len]
    inputs = Inputs(jnp.asarray([source], jnp.int32), decoder_tokens=jnp.asarray([decoder]))
    pieces = _pieces(tokenizer, source)
    stacks = {"encoder": pieces, "decoder": _pieces(tokenizer, decoder)}
    readout = Readout("translated_token", "decoder", len(decoder) - 1)
    return Subject(readout, inputs, pieces, stacks, target_id, name, cfg.vocab_size, note)


def class_subject(
    family: str, max_len: int, tokenizer: Any, labels: Any, text: str, target: str | None
) -> Subject:
    """The subject of a fine-tuned classifier (`labels`: its `LabelSet`).

    Raises:
      ConfigError: a target that is not one of the labels.
      DataError: an empty text.
    """
    text = _check_text(text)
    target_id = None
    if target is not None:
        if target not in labels.labels:
            raise ConfigError(
                f"--target {target!r} is not a label of this classifier; choose one of "
                f"{list(labels.labels)}"
            )
        target_id = labels.labels.index(target)
    ids, types = tokenizer.encode_pair(text)
    ids, types, note = _cut_pair(ids, types, max_len)
    stack = "encoder" if family == "encoder" else "decoder"
    inputs = Inputs(
        jnp.asarray([ids], jnp.int32),
        jnp.asarray([types], jnp.int32) if family == "encoder" else None,
    )
    pieces = _pieces(tokenizer, ids)
    return Subject(
        Readout("class", stack, len(ids) - 1),
        inputs,
        pieces,
        {stack: pieces},
        target_id,
        labels.decode,
        labels.num_classes,
        note,
    )


def _final_hidden(model: Any, stack: str, x: jax.Array) -> jax.Array:
    """The stack's last hidden state from a stream [1, L, D], as the model computes it."""
    if model.cfg.family == "encoder_decoder":
        return model.decoder_norm(x)
    norm = model.final_norm
    return x if norm is None else norm(x)


def _lm_logits(model: Any, hidden: jax.Array) -> jax.Array:
    """[1, L, D] -> [1, L, V] float32 through the family's output head (as in the models)."""
    family = model.cfg.family
    if family == "encoder":
        h = model.mlm_norm(HEAD_ACTIVATIONS[model.cfg.mlp](model.mlm_dense(hidden)))
        if model.head is None:
            logits = model.embed.attend(h)
        else:
            w = model.head[...].astype(h.dtype)
            logits = jnp.einsum("BLD,DV->BLV", h, w, preferred_element_type=jnp.float32)
        return add_bias(logits, model.mlm_bias)
    if family == "encoder_decoder" and model.head is None:
        # T5 v1.0 rescales the decoder output by D**-0.5 before the tied head.
        scaled = hidden * jnp.asarray(model.cfg.embed_dim**-0.5, hidden.dtype)
        return model.embed.attend(scaled)
    if model.head is None:
        return model.embed.attend(hidden)
    w = model.head[...].astype(hidden.dtype)
    if family == "encoder_decoder":
        return jnp.einsum("BLD,DV->BLV", hidden, w, preferred_element_type=jnp.float32)
    return token_einsum("BLD,DV->BLV", hidden, w, preferred_element_type=jnp.float32)


def _class_logits(model: Any, head: ClassHead, hidden: jax.Array) -> jax.Array:
    """[1, L, D] -> [C] float32, pooled as `TaskModel` pools (all tokens are real)."""
    hidden = hidden.astype(jnp.float32)
    if head.pooling == "pooler":
        pooled = jnp.tanh(model.pooler(hidden[:, 0].astype(model.pooler.dtype)).astype(jnp.float32))
    elif head.pooling == "cls":
        pooled = hidden[:, 0]
    elif head.pooling == "mean":
        pooled = hidden.mean(axis=1)
    else:
        pooled = hidden[:, -1]
    return (pooled @ head.w + head.b)[0]


def output_logits(
    model: Any, head: ClassHead | None, readout: Readout, stream: jax.Array
) -> jax.Array:
    """The output read from a residual stream [L, D] float32: [V] or [C] float32 logits."""
    dtype = model.embed.dtype
    hidden = _final_hidden(model, readout.stack, stream[None].astype(dtype))
    if readout.kind == "class":
        return _class_logits(model, head, hidden)
    return _lm_logits(model, hidden)[0, readout.position]


def top_k(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(id, probability) of the k most likely outputs, most likely first."""
    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[:k]
    return [(int(i), float(probs[i])) for i in order]
