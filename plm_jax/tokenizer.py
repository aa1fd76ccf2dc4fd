"""SentencePiece tokenizer: train on a stream of documents, load, and encode/decode losslessly.

Holds `train_tokenizer` (BPE or unigram, streamed, written atomically to a directory) and
`Tokenizer` (the loaded model with its special ids and a content fingerprint for data caches).
It leaves out reading corpora from files and caching token ids (`plm_jax.data`), and Hugging Face
tokenizers (`plm_jax.hf_tokenizer`). `encode` adds no bos/eos; `encode_pair` builds a model's
input with them. For span tasks (question answering), `encode_with_offsets` also gives each
token's character span and `frame_pair` frames already-tokenized segments as `encode_pair` does.

Round trip. `decode(encode(text)) == text` for every Python string that is valid Unicode, when the
model was trained with `byte_fallback=True` (the default). The trainer settings below make that
hold: identity normalization, no dummy prefix, whitespace kept as written, and byte pieces for
every character outside the vocabulary (newlines, tabs, NUL and other control characters, rare
emoji). Two cases need help outside SentencePiece:

- SentencePiece writes a space as the piece "\u2581" and turns "\u2581" back into a space when
  decoding, so a literal "\u2581" in the text would come back as " ". `encode` emits a literal
  "\u2581" as its three UTF-8 byte pieces instead, which decode to the character itself.
- A string with lone surrogates (not valid Unicode, e.g. from `errors="surrogateescape"`) cannot
  be encoded at all; `encode` raises `DataError`.

Training splits documents at newlines, so the vocabulary never holds "\n": each newline is the
byte piece <0x0A>. Tabs, "\r" and other characters frequent enough for `character_coverage` get
pieces of their own.

Special pieces. pad, unk, bos and eos get ids 0..3 and the mask piece, when there is one, id 4,
followed by `user_defined_symbols`. pad/bos/eos/mask are SentencePiece *control* symbols: they are
never produced from text, so a document containing the literal string "<mask>" or "</s>" is
encoded as ordinary characters (user text cannot inject a special token), and `decode` drops the
control ids. User-defined symbols are matched in text and decode to themselves. The unk id decodes
to " \u2047 " (SentencePiece's surface form); with byte fallback, `encode` never emits it.
Span-corruption sentinels (`<extra_id_0>`, ... from `sentinel_pieces`) are user-defined symbols,
as in Hugging Face's T5 tokenizers: they decode to their names, and a literal "<extra_id_0>" in
a document is encoded as that sentinel.

Word starts. For whole-word masking, a piece that starts with "\u2581" (a space) begins a word
and special pieces are words of their own; user-defined symbols follow the "\u2581" rule like
any piece (SentencePiece's API does not tell them from normal pieces). Byte pieces (<0x..>)
continue the word before them: the bytes of one character outside the vocabulary stay in one
word, at the price of gluing a newline (<0x0A>) to the word before it. Since no dummy space is
prefixed, the first word of a text, and one after a newline, starts without "\u2581" and counts
as a continuation too.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from plm_jax.errors import ConfigError, DataError

if TYPE_CHECKING:
    from plm_jax.hf_tokenizer import HfTokenizer

__all__ = ["Tokenizer", "sentinel_pieces", "train_tokenizer"]

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
META_FILE = "tokenizer.json"
_META_FORMAT = "plm_jax.tokenizer/1"  # tells our tokenizer.json from Hugging Face's

_SPACE_SYMBOL = "\u2581"  # SentencePiece's escaped space
_SENTINEL = "<extra_id_{}>"  # T5's span-corruption sentinels, numbered from 0
# SentencePiece silently drops training sentences over max_sentence_length (4192 bytes); lines
# are cut below it, at a space where possible so the cut does not split a word.
_MAX_LINE_BYTES = 4000
_MODEL_TYPES = ("bpe", "unigram")


def train_tokenizer(
    texts: Iterable[str],
    output_dir: str | Path,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    character_coverage: float = 0.9995,
    pad_piece: str = "<pad>",
    unk_piece: str = "<unk>",
    bos_piece: str = "<s>",
    eos_piece: str = "</s>",
    mask_piece: str = "<mask>",
    user_defined_symbols: Sequence[str] = (),
    max_train_bytes: int = 200_000_000,
    num_threads: int = 0,
    show_progress: bool = True,
) -> Tokenizer:
    """Trains a SentencePiece model on `texts` and writes it to `output_dir`.

    Each document is split into lines (long lines into chunks under 4000 bytes) as it is read;
    reading stops once `max_train_bytes` of UTF-8 text have been consumed, so the corpus is never
    held in memory here (SentencePiece keeps the sampled sentences).

    Args:
      texts: documents; any iterable, consumed once.
      output_dir: directory that receives tokenizer.model, tokenizer.vocab and tokenizer.json
        (training options, special ids, the model's sha256). Created if missing.
      vocab_size: number of pieces, including 256 byte pieces when `byte_fallback`.
      model_type: "bpe" or "unigram".
      byte_fallback: encode characters outside the vocabulary as UTF-8 byte pieces; needed for
        a lossless round trip.
      character_coverage: fraction of characters that get their own piece; the rest use bytes.
      pad_piece, unk_piece, bos_piece, eos_piece: special pieces, ids 0, 1, 2, 3.
      mask_piece: the mask piece (id 4), or "" for none.
      user_defined_symbols: pieces always kept whole when they appear in text.
      max_train_bytes: stop reading `texts` after this many bytes.
      num_threads: trainer threads; 0 means all cores.
      show_progress: print a progress bar and timings to stderr.

    Returns:
      The trained tokenizer, loaded from `output_dir`. Its model bytes (so its fingerprint) are
      the same for the same text, options and thread count; unigram results depend on the
      thread count, and SentencePiece records it in the model.

    Raises:
      ConfigError: an argument is out of range or the special pieces collide.
      DataError: `texts` holds no text, or `vocab_size` does not fit the text.
    """
    if isinstance(texts, str):
        raise ConfigError("train_tokenizer takes an iterable of documents, not one str; wrap it")
    options: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=vocab_size,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        # Lossless text: no NFKC, no leading "▁" added, runs of spaces kept as written.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # indentation runs become pieces
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=pad_piece,
        unk_piece=unk_piece,
        bos_piece=bos_piece,
        eos_piece=eos_piece,
        # Control symbols are never matched in text, so a literal "<mask>" stays plain text.
        control_symbols=[mask_piece] if mask_piece else [],
        user_defined_symbols=list(user_defined_symbols),
    )
    _check_train_args(options, max_train_bytes, num_threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = num_threads or os.cpu_count() or 1
    counter = _Counter()
    if show_progress:
        print(
            f"training SentencePiece {model_type} tokenizer, vocab_size={vocab_size}, on up to "
            f"{max_train_bytes / 1e6:.1f} MB of text ...",
            file=sys.stderr,
        )
    start = time.perf_counter()
    sentences = _training_sentences(texts, max_train_bytes, counter, show_progress)
    model_bytes = _run_trainer(sentences, options, threads, counter)
    _publish(model_bytes, output_dir, options)
    if show_progress:
        print(
            f"done in {time.perf_counter() - start:.1f} s: {output_dir / MODEL_FILE} "
            f"({counter.num_bytes / 1e6:.1f} MB read)",
            file=sys.stderr,
        )
    return Tokenizer.load(output_dir)


class Tokenizer:
    """A loaded SentencePiece model with lossless encode/decode and its special ids.

    Build one with `Tokenizer.load` or `train_tokenizer`. Instances can be pickled (e.g. into
    data-loader worker processes).

    Attributes:
      vocab_size: number of pieces (V).
      pad_id, unk_id, bos_id, eos_id: special ids (0..3 for tokenizers trained here).
      mask_id: id of the mask piece, or None if the model has none.
      sentinel_ids: ids of T5's <extra_id_0>, <extra_id_1>, ... (see the property).
      special_ids: frozenset of every special id (see the property).
      fingerprint: sha256 hex digest of the .model file's bytes; a key for token caches.
      path: the .model file.
    """

    def __init__(
        self,
        processor: spm.SentencePieceProcessor,
        path: Path,
        fingerprint: str,
        mask_id: int | None,
    ):
        self._sp = processor
        self.path = path
        self.fingerprint = fingerprint
        self.vocab_size: int = processor.vocab_size()
        self.pad_id: int = processor.pad_id()
        self.unk_id: int = processor.unk_id()
        self.bos_id: int = processor.bos_id()
        self.eos_id: int = processor.eos_id()
        self.mask_id = mask_id
        byte_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_SYMBOL.encode()]
        # Without byte pieces a literal "▁" cannot be kept apart from a space.
        has_bytes = all(processor.is_byte(i) for i in byte_ids)
        self._space_symbol_ids = byte_ids if has_bytes else None
        self._word_starts: np.ndarray | None = None  # built by word_starts() on first use

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer | HfTokenizer:
        """Loads a directory written by `train_tokenizer`, or a SentencePiece .model file.

        The mask piece comes from the tokenizer.json written beside the model; without one (or
        with another library's tokenizer.json) it is the model's only control symbol other than
        pad/bos/eos, if there is exactly one.

        A Hugging Face tokenizer (a directory with no tokenizer.model and either a tokenizer.json
        not written here or a BERT vocab.txt, or the path of such a json or .txt file) loads as
        `plm_jax.hf_tokenizer.HfTokenizer`, which has the same interface.

        Raises:
          DataError: the path is missing, is not a SentencePiece model, lacks pad/unk/bos/eos,
            or its tokenizer.json belongs to a different model.
        """
        path = Path(path)
        model_path = path / MODEL_FILE if path.is_dir() else path
        if _is_hugging_face(path):
            from plm_jax.hf_tokenizer import HfTokenizer

            return HfTokenizer.load(path)
        if not model_path.is_file():
            raise DataError(
                f"tokenizer not found: {str(model_path)!r} does not exist; give a directory "
                f"written by train_tokenizer or a SentencePiece .model file in tokenizer.path, "
                "or set tokenizer.path='' to train one"
            )
        data = model_path.read_bytes()
        processor = spm.SentencePieceProcessor()
        try:
            processor.LoadFromSerializedProto(data)
        except RuntimeError as e:
            raise DataError(
                f"{str(model_path)!r} is not a valid SentencePiece model ({e}); the file is "
                "corrupt or of another format. Retrain it (tokenizer.path='') or point "
                "tokenizer.path at a .model file written by SentencePiece"
            ) from None
        missing = [
            name for name in ("pad", "unk", "bos", "eos") if getattr(processor, f"{name}_id")() < 0
        ]
        if missing:
            raise DataError(
                f"SentencePiece model {str(model_path)!r} has no {'/'.join(missing)} piece; "
                "plm_jax needs pad, unk, bos and eos. Retrain it with train_tokenizer"
            )
        fingerprint = hashlib.sha256(data).hexdigest()
        mask_id = _find_mask_id(processor, model_path.with_suffix(".json"), fingerprint)
        return cls(processor, model_path, fingerprint, mask_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos. Exact: `decode(encode(text)) == text`.

        Raises:
          DataError: `text` holds lone surrogates (it is not valid Unicode).
        """
        try:
            if _SPACE_SYMBOL in text and self._space_symbol_ids is not None:
                return self._encode_space_symbols(text)
            return self._sp.encode(text)
        except RuntimeError:
            _check_unicode(text)
            raise

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """`[encode(t) for t in texts]`, computed by SentencePiece's C++ threads.

        Args:
          texts: the strings to encode.
          num_threads: encoder threads; 0 means all cores.

        Raises:
          DataError: a text holds lone surrogates.
        """
        texts = list(texts)
        threads = num_threads or os.cpu_count() or 1
        try:
            out = self._sp.encode(texts, num_threads=threads)
        except (RuntimeError, TypeError):  # how SentencePiece reports a string it cannot cast
            for text in texts:
                _check_unicode(text)
            raise
        if self._space_symbol_ids is not None:
            for i, text in enumerate(texts):
                if _SPACE_SYMBOL in text:  # rare: redo these few on the exact path
                    out[i] = self._encode_space_symbols(text)
        return out

    def encode_pair(self, text: str, text_pair: str | None = None) -> tuple[list[int], list[int]]:
        """A model's input for `text` (and `text_pair`): `[bos] A [eos]` or `[bos] A [eos] B [eos]`.

        Args:
          text: the first (or only) segment.
          text_pair: the second segment, or None.

        Returns:
          (ids, token_type_ids), two lists of the same length; type ids are 0 on `[bos] A [eos]`
          and 1 on `B [eos]`.

        Raises:
          DataError: a text holds lone surrogates.
        """
        ids = [self.bos_id, *self.encode(text), self.eos_id]
        type_ids = [0] * len(ids)
        if text_pair is not None:
            second = [*self.encode(text_pair), self.eos_id]
            ids += second
            type_ids += [1] * len(second)
        return ids, type_ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and, per token, the [start, end) character span it covers in `text`.

        Spans index the Python string (code points), so `text[start:end]` is the token's text.
        SentencePiece reports byte offsets into the input; they are turned into character
        offsets here. Two rules keep spans useful for answer extraction:

        - A piece's leading space is left out of its span: "\u2581the" in "a the" spans "the".
          A piece of spaces only ("\u2581\u2581") keeps its spaces.
        - The byte pieces of one character outside the vocabulary (the four of "\U0001f642")
          all span that character.

        Spans follow the text's order and never overlap, except that byte pieces of one
        character share its span.

        Args:
          text: the string to encode.

        Returns:
          (ids, spans): `ids == encode(text)`; `spans[i]` is token i's (start, end).

        Raises:
          DataError: `text` holds lone surrogates (it is not valid Unicode).
        """
        _check_unicode(text)
        if _SPACE_SYMBOL not in text or self._space_symbol_ids is None:
            return self._piece_offsets(text, 0)
        # A literal "\u2581" is encoded as its byte pieces (see `encode`); each part between
        # two of them is encoded on its own, as `_encode_space_symbols` does.
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        shift = 0
        for j, part in enumerate(text.split(_SPACE_SYMBOL)):
            if j:
                ids.extend(self._space_symbol_ids)
                spans.extend([(shift - 1, shift)] * len(self._space_symbol_ids))
            part_ids, part_spans = self._piece_offsets(part, shift)
            ids.extend(part_ids)
            spans.extend(part_spans)
            shift += len(part) + 1
        return ids, spans

    def frame_pair(
        self, ids_a: Sequence[int], ids_b: Sequence[int]
    ) -> tuple[list[int], list[int], int]:
        """Frames two token sequences as `encode_pair` frames two texts: `[bos] A [eos] B [eos]`.

        `frame_pair(encode(a), encode(b))[:2] == encode_pair(a, b)`; use it when A or B was
        cut or windowed after tokenizing (question answering).

        Args:
          ids_a: the first segment's ids, without special tokens.
          ids_b: the second segment's ids, without special tokens.

        Returns:
          (ids, token_type_ids, b_start): type ids are 0 on `[bos] A [eos]` and 1 on
          `B [eos]`; `ids[b_start : b_start + len(ids_b)] == ids_b`.
        """
        ids = [self.bos_id, *ids_a, self.eos_id, *ids_b, self.eos_id]
        b_start = len(ids_a) + 2
        return ids, [0] * b_start + [1] * (len(ids_b) + 1), b_start

    @functools.cached_property
    def sentinel_ids(self) -> tuple[int, ...]:
        """Ids of the span-corruption sentinels `<extra_id_0>`, `<extra_id_1>`, ..., in order.

        A tokenizer trained for an encoder_decoder model holds `tokenizer.num_sentinels` of
        them; counting stops at the first number missing.

        Raises:
          ConfigError: the model has no `<extra_id_0>` piece.
        """
        sp = self._sp

        def lookup(piece: str) -> int | None:
            i = sp.piece_to_id(piece)  # unk_id when missing
            return i if sp.id_to_piece(i) == piece else None

        return find_sentinel_ids(lookup, self.path)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Every special id: the control and unknown pieces, and pad/unk/bos/eos/mask.

        These are the ids a masked-LM never selects. Other user-defined symbols (e.g. "<|sep|>")
        are matched in text like words, so they are not special here.
        """
        sp = self._sp
        ids = {i for i in range(self.vocab_size) if sp.is_control(i) or sp.is_unknown(i)}
        ids |= {self.pad_id, self.unk_id, self.bos_id, self.eos_id}
        return frozenset(ids if self.mask_id is None else ids | {self.mask_id})

    def word_starts(self) -> np.ndarray:
        """`[V]` bool: True for pieces that begin a word, for whole-word masking.

        A piece starting with "\u2581" begins a word; special ids are True, byte pieces (<0x..>)
        False (see "Word starts" in the module docstring). Computed once; the array is read-only.
        """
        if self._word_starts is None:
            sp = self._sp
            pieces = (sp.id_to_piece(i) for i in range(self.vocab_size))
            starts = np.fromiter((p.startswith(_SPACE_SYMBOL) for p in pieces), bool)
            starts[sorted(self.special_ids)] = True
            starts.flags.writeable = False
            self._word_starts = starts
        return self._word_starts

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; pad/bos/eos/mask ids are dropped.

        Raises:
          IndexError: an id is outside [0, vocab_size).
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        self._check_ids(ids)
        return self._sp.decode(ids)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """`[decode(ids) for ids in batch]`, computed by SentencePiece's C++ threads."""
        rows = [ids.tolist() if hasattr(ids, "tolist") else list(ids) for ids in batch]
        for ids in rows:
            self._check_ids(ids)
        if not rows:
            return []
        return self._sp.decode(rows, num_threads=os.cpu_count() or 1)

    def id_to_piece(self, i: int) -> str:
        """The piece string of id `i` (a space is written "▁")."""
        self._check_ids([i])
        return self._sp.id_to_piece(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`.

        Raises:
          KeyError: `piece` is not in the vocabulary (SentencePiece itself would return unk_id).
        """
        i = self._sp.piece_to_id(piece)
        if i == self.unk_id and piece != self._sp.id_to_piece(i):
            raise KeyError(f"piece {piece!r} is not in the vocabulary of {self.path}")
        return i

    def __repr__(self) -> str:
        return (
            f"Tokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint[:12]})"
        )

    def _encode_space_symbols(self, text: str) -> list[int]:
        ids: list[int] = []
        for j, part in enumerate(text.split(_SPACE_SYMBOL)):
            if j:
                ids.extend(self._space_symbol_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def _piece_offsets(self, text: str, shift: int) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character spans (plus `shift`) of `text`, which holds no literal "\u2581"."""
        from sentencepiece import sentencepiece_pb2  # needs protobuf; only offsets use it

        spt = sentencepiece_pb2.SentencePieceText()
        # The serialized proto works from sentencepiece 0.2.0 on; 0.2.3 dropped immutable_proto.
        spt.ParseFromString(self._sp.encode(text, out_type="serialized_proto"))
        # char_of[b]: the index of the character that holds UTF-8 byte b; len(text) at the end.
        char_of = [i for i, c in enumerate(text) for _ in range(len(c.encode("utf-8")))]
        char_of.append(len(text))
        ids, spans = [], []
        for piece in spt.pieces:
            start = char_of[piece.begin]
            if self._sp.is_byte(piece.id):
                # Only the last byte piece of a character carries its surface; the others are
                # empty at its first byte. All of them get the whole character.
                end = start + 1
            else:
                end = char_of[piece.end]
                if piece.piece.startswith(_SPACE_SYMBOL):
                    trimmed = start
                    while trimmed < end and text[trimmed].isspace():
                        trimmed += 1
                    start = trimmed if trimmed < end else start  # spaces only: keep them
            ids.append(piece.id)
            spans.append((start + shift, end + shift))
        return ids, spans

    def _check_ids(self, ids: list[int]) -> None:
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise IndexError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")


def sentinel_pieces(num_sentinels: int) -> list[str]:
    """T5's sentinel pieces `<extra_id_0>`, ..., `<extra_id_{num_sentinels - 1}>`, in order."""
    return [_SENTINEL.format(i) for i in range(num_sentinels)]


def find_sentinel_ids(lookup: Callable[[str], int | None], path: Path) -> tuple[int, ...]:
    """The ids of `<extra_id_0>`, `<extra_id_1>`, ... by `lookup(piece) -> id | None`, in order.

    Raises:
      ConfigError: there is no `<extra_id_0>`.
    """
    ids: list[int] = []
    while (i := lookup(_SENTINEL.format(len(ids)))) is not None:
        ids.append(i)
    if not ids:
        raise ConfigError(
            f"the tokenizer {str(path)!r} has no sentinel pieces (<extra_id_0>, <extra_id_1>, "
            "...), which span-corruption pretraining puts in place of each noise span. Let "
            "plm_jax train one for model.family=encoder_decoder (tokenizer.path='' and "
            "tokenizer.num_sentinels > 0), or use a T5 tokenizer, whose tokenizer.json has them"
        )
    return tuple(ids)


# ---------------------------------------------------------------------------------------------
# Training helpers.


@dataclass
class _Counter:
    """What the sentence stream has read so far; SentencePiece drains the stream before training."""

    num_bytes: int = 0
    num_sentences: int = 0
    error: Exception | None = None  # raised by the caller's document iterator


def _check_train_args(options: dict[str, Any], max_train_bytes: int, num_threads: int) -> None:
    model_type, vocab_size = options["model_type"], options["vocab_size"]
    if model_type not in _MODEL_TYPES:
        raise ConfigError(
            f"tokenizer model_type={model_type!r} is unknown; choose one of {list(_MODEL_TYPES)}"
        )
    if vocab_size < 16:
        raise ConfigError(f"tokenizer vocab_size={vocab_size} is too small; use at least 16")
    if not 0.0 < options["character_coverage"] <= 1.0:
        raise ConfigError(f"character_coverage={options['character_coverage']} must be in (0, 1]")
    if max_train_bytes <= 0:
        raise ConfigError(f"max_train_bytes={max_train_bytes} must be positive")
    if num_threads < 0:
        raise ConfigError(f"num_threads={num_threads} must be >= 0 (0 means all cores)")
    named = [options[f"{name}_piece"] for name in ("pad", "unk", "bos", "eos")]
    named += options["control_symbols"] + options["user_defined_symbols"]
    if not all(isinstance(piece, str) and piece for piece in named):
        raise ConfigError(
            f"tokenizer special pieces and user_defined_symbols must be non-empty strings, "
            f"got {named}"
        )
    if len(set(named)) != len(named):
        raise ConfigError(
            f"tokenizer special pieces and user_defined_symbols must be distinct, got {named}"
        )


def _training_sentences(
    texts: Iterable[str], max_train_bytes: int, counter: _Counter, show_progress: bool
) -> Iterator[str]:
    """Lines of `texts`, cut below _MAX_LINE_BYTES, until `max_train_bytes` have been read."""
    bar = tqdm(
        desc="reading tokenizer text",
        unit="B",
        unit_scale=True,
        disable=not show_progress,
        file=sys.stderr,
        mininterval=0.5,
    )
    try:
        for text in texts:
            if not isinstance(text, str):
                raise DataError(
                    f"tokenizer training documents must be str, got {type(text).__name__}; "
                    "decode bytes to text before training"
                )
            for line in text.split("\n"):
                for chunk in _chunks(line.encode("utf-8")):
                    counter.num_sentences += 1
                    counter.num_bytes += len(chunk) + 1  # +1: the newline or the cut
                    bar.update(len(chunk) + 1)
                    yield chunk.decode("utf-8")
                    if counter.num_bytes >= max_train_bytes:
                        return
    except Exception as e:
        # SentencePiece turns an exception raised here into a bare RuntimeError; keep the
        # original so the caller sees, e.g., the DataError of a missing data file.
        counter.error = e
        raise
    finally:
        bar.close()


def _chunks(data: bytes) -> Iterator[bytes]:
    """`data` in pieces of at most _MAX_LINE_BYTES, cut between UTF-8 characters."""
    start = 0
    while start < len(data):
        end = start + _MAX_LINE_BYTES
        if end < len(data):
            while data[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: not a character start
                end -= 1
            space = data.rfind(b" ", start + _MAX_LINE_BYTES // 2, end)
            end = space if space > start else end
        yield data[start:end]
        start = end


def _run_trainer(
    sentences: Iterator[str], options: dict[str, Any], threads: int, counter: _Counter
) -> bytes:
    """Runs SentencePiece and returns the serialized model; user-input failures become DataError.

    The model comes back through `model_writer` rather than `model_prefix`: SentencePiece stores
    the prefix in the model, and a temporary path there would make the fingerprint of two
    identical trainings differ.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=model,
            num_threads=threads,
            minloglevel=2,  # SentencePiece's INFO/WARNING lines would flood the console
            **options,
        )
    except RuntimeError as e:
        if counter.error is not None:
            raise counter.error from None
        vocab_size = options["vocab_size"]
        if counter.num_sentences == 0:
            raise DataError(
                "no text to train the tokenizer on: the input documents are empty; check "
                "data.source and data.text_field"
            ) from None
        message = str(e)
        if "Vocabulary size too high" in message:
            limit = re.search(r"<= (\d+)", message)
            bound = f" at most {limit.group(1)}" if limit else ""
            raise DataError(
                f"tokenizer vocab_size={vocab_size} is too large for "
                f"{counter.num_bytes} bytes of training text: it has too few distinct pieces; "
                f"lower --vocab-size (tokenizer.vocab_size) to{bound}, or train on more text"
            ) from None
        if "smaller than required_chars" in message:
            need = re.search(r"vs (\d+)", message)
            bound = f" at least {need.group(1)}" if need else " it"
            raise DataError(
                f"tokenizer vocab_size={vocab_size} cannot hold the byte pieces, special pieces "
                f"and the characters the text needs; raise --vocab-size (tokenizer.vocab_size) "
                f"to{bound}, or lower character_coverage"
            ) from None
        raise
    return model.getvalue()


def _publish(model_bytes: bytes, output_dir: Path, options: dict[str, Any]) -> None:
    """Writes tokenizer.vocab, tokenizer.json and tokenizer.model, each atomically, model last.

    Each file is written under a temporary name and renamed, so a crash leaves the old file or the
    new one, never a partial one; the json carries the model's sha256, so a crash between two
    renames shows up in `Tokenizer.load` as a mismatch rather than as a silently wrong mask id.
    """
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    vocab = "".join(
        f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n"
        for i in range(processor.vocab_size())
    )
    meta = {
        "format": _META_FORMAT,
        "model_file": MODEL_FILE,
        "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        "special_ids": {"pad": 0, "unk": 1, "bos": 2, "eos": 3},
        "mask_piece": options["control_symbols"][0] if options["control_symbols"] else "",
        "options": options,
        "sentencepiece_version": spm.__version__,
    }
    _write_atomic(output_dir / VOCAB_FILE, vocab.encode("utf-8"))
    _write_atomic(
        output_dir / META_FILE, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()
    )
    _write_atomic(output_dir / MODEL_FILE, model_bytes)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Loading helpers.


def _find_mask_id(
    processor: spm.SentencePieceProcessor, meta_path: Path, fingerprint: str
) -> int | None:
    meta = _read_meta(meta_path)
    if meta is not None:
        if meta.get("model_sha256") != fingerprint:
            raise DataError(
                f"{str(meta_path)!r} describes a different model than {meta_path.stem}.model "
                "(an interrupted training run?); retrain the tokenizer or delete the json"
            )
        mask_piece = meta.get("mask_piece", "")
        if not mask_piece:
            return None
        mask_id = processor.piece_to_id(mask_piece)
        if processor.id_to_piece(mask_id) != mask_piece:
            raise DataError(
                f"{str(meta_path)!r} names mask piece {mask_piece!r}, which is not in the model; "
                "retrain the tokenizer or delete the json"
            )
        return mask_id
    named = {processor.pad_id(), processor.bos_id(), processor.eos_id()}
    extra = [i for i in range(processor.vocab_size()) if processor.is_control(i) and i not in named]
    return extra[0] if len(extra) == 1 else None


def _is_hugging_face(path: Path) -> bool:
    """Whether `path` names a Hugging Face tokenizer (tokenizer.json or BERT vocab.txt)."""
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return False  # a SentencePiece model wins over a Hugging Face file beside it
        if (path / META_FILE).is_file():
            return _read_meta(path / META_FILE) is None  # not ours: Hugging Face's (or corrupt)
        return (path / "vocab.txt").is_file()
    if path.suffix == ".json":
        return path.is_file() and _read_meta(path) is None
    return path.suffix == ".txt" and path.is_file()


def _read_meta(path: Path) -> dict[str, Any] | None:
    """Our tokenizer.json, or None; a Hugging Face tokenizer.json beside the model is ignored."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _META_FORMAT:
        return None
    return meta


def _check_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"text is not valid Unicode ({e.reason} at index {e.start}: {text[e.start]!r}); "
            "decode input files with errors='replace' (data.encoding_errors=replace)"
        ) from None
