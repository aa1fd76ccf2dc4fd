"""Hugging Face tokenizers: a `tokenizer.json` or BERT `vocab.txt` behind `Tokenizer`'s interface.

Holds `HfTokenizer`, which loads a Hugging Face `tokenizer.json` (GPT-2 and LLaMA 3 byte-level
BPE, BERT WordPiece, ...) with the `tokenizers` library and produces exactly the ids Hugging Face
produces, so a model converted from the Hub sees the token ids it was trained on. A directory
with only a BERT `vocab.txt` (and its tokenizer_config.json) gets the WordPiece pipeline that
transformers' `BertTokenizer` builds from it, built here in code. It leaves out training
tokenizers (`plm_jax.tokenizer.train_tokenizer` trains SentencePiece models), chat templates,
truncation and padding (`plm_jax.data` packs and cuts sequences).

`Tokenizer.load` returns an `HfTokenizer` for a directory that holds a Hugging Face tokenizer.json
or a vocab.txt (and no SentencePiece tokenizer.model), or for the path of such a file.

Differences from the SentencePiece `Tokenizer`:

- `encode` never adds the post-processor's special tokens (`add_special_tokens=False`): no
  `<|begin_of_text|>` for LLaMA 3 and no [CLS]/[SEP] for BERT. `encode_pair` adds them, as
  `tokenizer(text, text_pair)` in transformers does; `frame_pair` adds them to token ids.
- Literal special-token strings in text (e.g. "<|endoftext|>") are matched as those tokens, as
  Hugging Face does; `decode` then drops them, so such text does not round-trip.
- Round trip: byte-level BPE is lossless, `decode(encode(text)) == text` for any valid Unicode
  text without special-token strings. `decode` is the `tokenizers` decoder alone, without
  transformers' `clean_up_tokenization_spaces`, which would turn " ." into ".". WordPiece with
  lowercasing (BERT uncased) is not reversible: case, accents and spacing around punctuation
  are lost.
- `unk_id`: byte-level BPE never emits an unknown token; a tokenizer that names none (LLaMA 3)
  gets `unk_id = eos_id`, the convention of GPT-2's own config.
- `word_starts` reads the word boundary from the tokenizer's pieces: WordPiece marks a
  continuation with "##", byte-level BPE a word start with "Ġ" (an encoded space) and
  Metaspace (SentencePiece-converted) tokenizers with "\u2581". Byte-level BPE glues no space to
  the first word of a text or to a word after a newline, so those count as continuations.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from plm_jax.errors import DataError
from plm_jax.tokenizer import _check_unicode, find_sentinel_ids

__all__ = ["HfTokenizer", "HF_TOKENIZER_FILE", "VOCAB_FILE"]

HF_TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"  # BERT's WordPiece vocabulary: one token per line, id = line number
_CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # first one wins

# Config keys read for each role, in order, then well-known tokens tried in the vocabulary when
# the config names none. BERT has no bos/eos: its [CLS] starts and [SEP] ends a sequence.
_CONFIG_KEYS = {
    "bos": ("bos_token", "cls_token"),
    "eos": ("eos_token", "sep_token"),
    "pad": ("pad_token",),
    "unk": ("unk_token",),
    "mask": ("mask_token",),
}
# BERT's special tokens, in the order transformers adds them (a missing pad or mask token is
# appended to the vocabulary in this order); a vocab.txt must hold the unk, cls and sep tokens.
_BERT_SPECIALS = {"unk": "[UNK]", "sep": "[SEP]", "pad": "[PAD]", "cls": "[CLS]", "mask": "[MASK]"}
_BERT_REQUIRED = ("unk", "cls", "sep")
_BYTE_LEVEL_SPACE = "\u0120"  # "Ġ": byte-level BPE writes the byte of " " as this character
_SPACE_SYMBOL = "\u2581"  # "▁": SentencePiece's (and Metaspace's) escaped space
_WELL_KNOWN = {
    "bos": ("<|begin_of_text|>", "<|endoftext|>", "[CLS]", "<s>", "<bos>"),
    "eos": ("<|end_of_text|>", "<|endoftext|>", "[SEP]", "</s>", "<eos>"),
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>", "<|endoftext|>"),
    "mask": ("[MASK]", "<mask>"),
}


class HfTokenizer:
    """A Hugging Face tokenizer.json with the interface of `plm_jax.tokenizer.Tokenizer`.

    Build one with `HfTokenizer.load` (or `Tokenizer.load`). Instances can be pickled.

    Attributes:
      vocab_size: number of tokens, added tokens included (V).
      pad_id: the pad token, or eos_id when there is none (GPT-2, LLaMA 3); padding is always
        masked out by segment id 0 in plm_jax, so its id never reaches the loss.
      unk_id: the unknown token, or eos_id when there is none (byte-level BPE never emits one).
      bos_id, eos_id: sequence start and end ([CLS] and [SEP] for BERT); bos_id is eos_id when
        the tokenizer has no start token.
      mask_id: the mask token ([MASK]), or None if there is none.
      sentinel_ids: ids of T5's <extra_id_0>, <extra_id_1>, ... (see the property).
      special_ids: frozenset of every special id (see the property).
      fingerprint: sha256 hex digest of the tokenizer.json bytes (for a vocab.txt: of its bytes
        and the normalizer settings); a key for token caches.
      path: the tokenizer.json or vocab.txt file.
    """

    def __init__(self, backend: Any, path: Path, fingerprint: str, special: dict[str, int | None]):
        self._tok = backend
        self.path = path
        self.fingerprint = fingerprint
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_id: int = special["bos"]
        self.eos_id: int = special["eos"]
        self.pad_id: int = special["pad"]
        self.unk_id: int = special["unk"]
        self.mask_id: int | None = special["mask"]
        self._word_starts: np.ndarray | None = None  # built by word_starts() on first use

    @classmethod
    def load(cls, path: str | Path) -> HfTokenizer:
        """Loads a Hugging Face tokenizer directory, its tokenizer.json, or a BERT vocab.txt.

        A directory without tokenizer.json but with vocab.txt, or the path of a .txt file, is
        read as a BERT WordPiece vocabulary: the pipeline of transformers' `BertTokenizer`, with
        do_lower_case, tokenize_chinese_chars and strip_accents from tokenizer_config.json.
        Special tokens come from tokenizer_config.json, else special_tokens_map.json, beside the
        file, else from well-known tokens in the vocabulary (see the module docstring). Padding
        and truncation stored in the tokenizer.json are switched off: sequences are packed and
        cut by the data pipeline.

        Raises:
          DataError: the file is missing or is not a Hugging Face tokenizer or BERT vocabulary,
            a config names a special token that is not in the vocabulary, or no end-of-sequence
            token is found.
        """
        path = Path(path)
        if path.is_dir() and not (path / HF_TOKENIZER_FILE).is_file():
            path = path / VOCAB_FILE if (path / VOCAB_FILE).is_file() else path
        if path.suffix == ".txt" and path.is_file():
            backend, fingerprint = _wordpiece_backend(path)
            return cls(backend, path, fingerprint, _special_ids(backend, path))
        json_path = path / HF_TOKENIZER_FILE if path.is_dir() else path
        if not json_path.is_file():
            raise DataError(
                f"Hugging Face tokenizer not found: {str(json_path)!r} does not exist; point "
                "tokenizer.path at a directory holding tokenizer.json or a BERT vocab.txt (e.g. "
                "a model downloaded from the Hub), or at one of those files itself"
            )
        return cls._load_json(json_path)

    @classmethod
    def _load_json(cls, json_path: Path) -> HfTokenizer:
        from tokenizers import Tokenizer as RustTokenizer

        data = json_path.read_bytes()
        try:
            backend = RustTokenizer.from_str(data.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for any parse error
            raise DataError(
                f"{str(json_path)!r} is not a valid Hugging Face tokenizer.json ({e}); the file "
                "is corrupt or of another format. Download it again, or save it with "
                "`tokenizer.save_pretrained(dir)` from transformers"
            ) from None
        backend.no_padding()  # e.g. sentence-transformers files pad every text to 128 tokens
        backend.no_truncation()
        special = _special_ids(backend, json_path)
        return cls(backend, json_path, hashlib.sha256(data).hexdigest(), special)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the special tokens the post-processor would add.

        Raises:
          DataError: `text` holds lone surrogates (it is not valid Unicode).
        """
        try:
            return self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # how tokenizers reports a str it cannot convert to UTF-8
            _check_unicode(text)
            raise

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """`[encode(t) for t in texts]`, computed in parallel by the `tokenizers` library.

        Args:
          texts: the strings to encode.
          num_threads: 1 encodes in this thread; any other value uses the library's thread pool,
            whose size is fixed per process (all cores, or the RAYON_NUM_THREADS variable).

        Raises:
          DataError: a text holds lone surrogates.
        """
        texts = list(texts)
        if num_threads == 1:
            return [self.encode(t) for t in texts]
        try:
            encodings = self._tok.encode_batch(texts, add_special_tokens=False)
        except TypeError:
            for text in texts:
                _check_unicode(text)
            raise
        return [e.ids for e in encodings]

    def encode_pair(self, text: str, text_pair: str | None = None) -> tuple[list[int], list[int]]:
        """A model's input for `text` (and `text_pair`), with the special tokens it expects.

        Exactly `tokenizer(text, text_pair)` in transformers: the tokenizer's post-processor
        adds its tokens ("[CLS] A [SEP]" and "[CLS] A [SEP] B [SEP]" for BERT; nothing for a
        tokenizer.json without one). No truncation. An empty `text_pair` is still a segment
        (BERT: "[CLS] A [SEP] [SEP]"), as in transformers' slow tokenizers and batch calls; only
        the fast tokenizer's single call `tokenizer(text, "")` drops it.

        Args:
          text: the first (or only) segment.
          text_pair: the second segment, or None.

        Returns:
          (ids, token_type_ids), two lists of the same length; type ids are 0 on the first
          segment and 1 on the second, as the post-processor assigns them.

        Raises:
          DataError: a text holds lone surrogates.
        """
        try:
            encoding = self._tok.encode(text, text_pair, add_special_tokens=True)
        except TypeError:
            for t in (text, text_pair or ""):
                _check_unicode(t)
            raise
        return encoding.ids, encoding.type_ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and, per token, the [start, end) character span it covers in `text`.

        The spans are the `tokenizers` Encoding's offsets (character indices into `text`, so
        `text[start:end]` is the token's text, before lowercasing or accent stripping), with
        one change: leading whitespace is left out of a token's span ("\u0120the" in "a the"
        spans "the"), unless the token is whitespace only. The tokens of one character split
        into several byte-level pieces (the four of "\U0001f642") all span that character.

        Args:
          text: the string to encode.

        Returns:
          (ids, spans): `ids == encode(text)`; `spans[i]` is token i's (start, end).

        Raises:
          DataError: `text` holds lone surrogates (it is not valid Unicode).
        """
        try:
            encoding = self._tok.encode(text, add_special_tokens=False)
        except TypeError:  # how tokenizers reports a str it cannot convert to UTF-8
            _check_unicode(text)
            raise
        spans = []
        for start, end in encoding.offsets:
            trimmed = start
            while trimmed < end and text[trimmed].isspace():
                trimmed += 1
            spans.append((trimmed if trimmed < end else start, end))
        return encoding.ids, spans

    def frame_pair(
        self, ids_a: Sequence[int], ids_b: Sequence[int]
    ) -> tuple[list[int], list[int], int]:
        """Frames two token sequences as `encode_pair` frames two texts.

        `frame_pair(encode(a), encode(b))[:2] == encode_pair(a, b)`: "[CLS] A [SEP] B [SEP]"
        for BERT, "A B" for a tokenizer.json without a post-processor. Use it when A or B was
        cut or windowed after tokenizing (question answering). The post-processor's layout is
        read once, from the encoding of a probe pair.

        Args:
          ids_a: the first segment's ids, without special tokens.
          ids_b: the second segment's ids, without special tokens.

        Returns:
          (ids, token_type_ids, b_start): type ids as the post-processor assigns them;
          `ids[b_start : b_start + len(ids_b)] == ids_b`.

        Raises:
          DataError: the post-processor's layout cannot be read: no probe text gives a token,
            or the layout is not "specials, A, specials, B, specials".
        """
        ids: list[int] = []
        type_ids: list[int] = []
        b_start = 0
        for segment, token_id, type_id in self._pair_layout:
            if segment is None:
                ids.append(token_id)
                type_ids.append(type_id)
                continue
            part = ids_a if segment == 0 else ids_b
            if segment == 1:
                b_start = len(ids)
            ids.extend(part)
            type_ids.extend([type_id] * len(part))
        return ids, type_ids, b_start

    @functools.cached_property
    def _pair_layout(self) -> list[tuple[int | None, int, int]]:
        """The post-processor's pair layout: (segment, id, type id) per special token, and
        (0 or 1, -1, type id) where segment A or B goes."""
        for probe in ("a", "x", "0", ".", "the", " "):
            encoding = self._tok.encode(probe, probe, add_special_tokens=True)
            if encoding.sequence_ids.count(0) and encoding.sequence_ids.count(1):
                break
        else:  # no probe gives a token: a vocabulary without letters, digits or "."
            raise DataError(
                f"cannot find how {str(self.path)!r} frames a text pair: none of the probe "
                "texts 'a', 'x', '0', '.', 'the', ' ' encodes to a token. Use a tokenizer whose "
                "vocabulary covers ASCII letters"
            )
        layout: list[tuple[int | None, int, int]] = []
        for token_id, segment, type_id in zip(
            encoding.ids, encoding.sequence_ids, encoding.type_ids, strict=True
        ):
            if segment is None:
                layout.append((None, token_id, type_id))
            elif not layout or layout[-1][0] != segment:
                layout.append((segment, -1, type_id))
        segments = [segment for segment, _, _ in layout if segment is not None]
        if segments != [0, 1]:  # e.g. a template that repeats $A; never seen in the wild
            raise DataError(
                f"the post-processor of {str(self.path)!r} lays out a pair as segments "
                f"{segments}, not A then B once each; frame_pair cannot window such a tokenizer"
            )
        return layout

    @functools.cached_property
    def sentinel_ids(self) -> tuple[int, ...]:
        """Ids of the span-corruption sentinels `<extra_id_0>`, `<extra_id_1>`, ..., in order.

        Hugging Face's T5 tokenizers hold 100 of them as added tokens at the end of the
        vocabulary, numbered backwards (`<extra_id_0>` is id 32099 of t5-small).

        Raises:
          ConfigError: the tokenizer has no `<extra_id_0>` token.
        """
        return find_sentinel_ids(self._tok.token_to_id, self.path)

    @functools.cached_property
    def special_ids(self) -> frozenset[int]:
        """Every special id: pad/unk/bos/eos/mask and all added tokens flagged special.

        These are the ids a masked-LM never selects ([CLS], [SEP], <|endoftext|>, ...).
        """
        added = self._tok.get_added_tokens_decoder()
        ids = {i for i, token in added.items() if token.special}
        ids |= {self.pad_id, self.unk_id, self.bos_id, self.eos_id}
        return frozenset(ids if self.mask_id is None else ids | {self.mask_id})

    def word_starts(self) -> np.ndarray:
        """`[V]` bool: True for tokens that begin a word, for whole-word masking.

        WordPiece: tokens without the "##" continuation prefix. Byte-level BPE: tokens starting
        with "Ġ" (a space). Metaspace tokenizers: tokens starting with "\u2581"; their byte
        fallback pieces (<0x..>) are continuations. Special ids and other added tokens are True,
        each its own word. A tokenizer that marks words in none of these ways gets all True
        (whole-word masking then masks single tokens). Computed once; the array is read-only.
        """
        if self._word_starts is None:
            starts = np.ones(self.vocab_size, bool)
            is_start = _word_start_rule(json.loads(self._tok.to_str()))
            added = self._tok.get_added_tokens_decoder()
            for token, i in self._tok.get_vocab(with_added_tokens=True).items():
                starts[i] = i in added or is_start(token)
            starts[sorted(self.special_ids)] = True
            starts.flags.writeable = False
            self._word_starts = starts
        return self._word_starts

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special tokens are dropped.

        Raises:
          IndexError: an id is outside [0, vocab_size).
        """
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        self._check_ids(ids)
        return self._tok.decode(ids, skip_special_tokens=True)

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """`[decode(ids) for ids in batch]`, computed in parallel by the `tokenizers` library."""
        rows = [ids.tolist() if hasattr(ids, "tolist") else list(ids) for ids in batch]
        for ids in rows:
            self._check_ids(ids)
        if not rows:
            return []
        return self._tok.decode_batch(rows, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        """The token string of id `i` (byte-level BPE writes a space as "Ġ")."""
        self._check_ids([i])
        return self._tok.id_to_token(i)

    def piece_to_id(self, piece: str) -> int:
        """The id of `piece`.

        Raises:
          KeyError: `piece` is not in the vocabulary.
        """
        i = self._tok.token_to_id(piece)
        if i is None:
            raise KeyError(f"piece {piece!r} is not in the vocabulary of {self.path}")
        return i

    def __repr__(self) -> str:
        return (
            f"HfTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size}, "
            f"fingerprint={self.fingerprint[:12]})"
        )

    def _check_ids(self, ids: list[int]) -> None:
        # tokenizers silently skips unknown ids when decoding; an id past V is a bug upstream.
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise IndexError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")


def _special_ids(backend: Any, json_path: Path) -> dict[str, int | None]:
    """Ids of bos/eos/pad/unk/mask: named in the configs, else well-known tokens, else defaults."""
    configs = [_read_config(json_path.with_name(name)) for name in _CONFIG_FILES]
    found: dict[str, int | None] = {}
    for role, keys in _CONFIG_KEYS.items():
        found[role] = _configured_id(backend, configs, keys, json_path)
        if found[role] is None:
            known = (backend.token_to_id(t) for t in _WELL_KNOWN[role])
            found[role] = next((i for i in known if i is not None), None)
    if found["eos"] is None:
        raise DataError(
            f"Hugging Face tokenizer {str(json_path)!r} has no end-of-sequence token: "
            f"tokenizer_config.json names no eos_token or sep_token and the vocabulary holds none "
            f'of {list(_WELL_KNOWN["eos"])}. Add "eos_token" to tokenizer_config.json'
        )
    for role in ("bos", "pad", "unk"):  # GPT-2's convention: one token for all of these
        if found[role] is None:
            found[role] = found["eos"]
    return found


def _configured_id(
    backend: Any, configs: list[dict[str, Any]], keys: Sequence[str], json_path: Path
) -> int | None:
    """The id of the first token named under `keys` in `configs`, or None if none is named."""
    for config in configs:
        for key in keys:
            token = config.get(key)
            if isinstance(token, dict):  # a serialized AddedToken: {"content": ..., ...}
                token = token.get("content")
            if not isinstance(token, str) or not token:
                continue
            i = backend.token_to_id(token)
            if i is None:
                raise DataError(
                    f"{str(json_path.parent)!r}: the tokenizer config names {key}={token!r}, "
                    f"which is not in the vocabulary of {json_path.name}; the config belongs to "
                    "another tokenizer. Download the tokenizer files again, together"
                )
            return i
    return None


def _read_config(path: Path) -> dict[str, Any]:
    """A tokenizer_config.json or special_tokens_map.json as a dict; {} if absent."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(
            f"{str(path)!r} is not valid JSON ({e}); download it again or delete it (special "
            "tokens are then taken from well-known names in the vocabulary)"
        ) from None
    if not isinstance(config, dict):
        raise DataError(
            f"{str(path)!r} holds {type(config).__name__}, not a JSON object; download it again "
            "or delete it"
        )
    return config


# ---------------------------------------------------------------------------------------------
# Word starts.


def _word_start_rule(spec: dict[str, Any]) -> Callable[[str], bool]:
    """`is_start(token) -> bool`: how tokens mark a word start in the tokenizer.json `spec`."""
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        return lambda token: not token.startswith(prefix)
    parts = [
        *_components(spec.get("normalizer")),
        *_components(spec.get("pre_tokenizer")),
        *_components(spec.get("decoder")),
    ]
    if any(part.get("type") == "ByteLevel" for part in parts):
        return lambda token: token.startswith(_BYTE_LEVEL_SPACE)
    # SentencePiece-converted files: a Metaspace pre-tokenizer/decoder (T5), or a normalizer
    # that replaces " " with "▁" and a decoder that turns it back (LLaMA 2).
    if any(
        part.get("type") == "Metaspace"
        or (
            part.get("type") in ("Replace", "Prepend")
            and _SPACE_SYMBOL in json.dumps(part, ensure_ascii=False)
        )
        for part in parts
    ):
        return lambda token: token.startswith(_SPACE_SYMBOL)  # byte pieces <0x..> never do
    return lambda token: True


def _components(node: Any) -> Iterator[dict[str, Any]]:
    """Every component in `node`, nested ones (in a Sequence) included."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _components(value)


# ---------------------------------------------------------------------------------------------
# BERT WordPiece from a vocab.txt.


def _wordpiece_backend(vocab_path: Path) -> tuple[Any, str]:
    """The WordPiece pipeline transformers' `BertTokenizer` builds from `vocab_path`.

    Settings come from tokenizer_config.json beside the vocab: do_lower_case (default true),
    tokenize_chinese_chars (true) and strip_accents (null: strip when lowercasing). The unk,
    sep, pad, cls and mask tokens named in the configs (default [UNK], [SEP], [PAD], [CLS],
    [MASK]) become special added tokens; a pad or mask token missing from the vocab is appended
    after it, as transformers does.

    Returns:
      The `tokenizers` backend, and its fingerprint: the sha256 of the vocab's bytes, the
      settings and the special tokens.

    Raises:
      DataError: the vocab is empty, not UTF-8 or lists a token twice, it lacks the unk, cls or
        sep token, or a setting is not a boolean.
    """
    from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as RustTokenizer

    data = vocab_path.read_bytes()
    vocab = _read_vocab(vocab_path, data)
    configs = [_read_config(vocab_path.with_name(name)) for name in _CONFIG_FILES]
    settings = _bert_settings(configs[0], vocab_path.with_name(_CONFIG_FILES[0]))
    tokens = _bert_special_tokens(configs)
    missing = [
        f"{role}_token={tokens[role]!r}" for role in _BERT_REQUIRED if tokens[role] not in vocab
    ]
    if missing:
        raise DataError(
            f"{str(vocab_path)!r} lacks {', '.join(missing)}: BERT's WordPiece needs an unknown "
            "token and the cls/sep tokens it wraps every sequence in. Use the vocab.txt that "
            "came with the model, or name its tokens in tokenizer_config.json"
        )
    unk, cls, sep = tokens["unk"], tokens["cls"], tokens["sep"]
    backend = RustTokenizer(
        models.WordPiece(
            vocab, unk_token=unk, continuing_subword_prefix="##", max_input_chars_per_word=100
        )
    )
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=settings["tokenize_chinese_chars"],
        strip_accents=settings["strip_accents"],  # None: follow lowercase, as in original BERT
        lowercase=settings["do_lower_case"],
    )
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    named = dict.fromkeys(t for t in tokens.values() if t is not None)  # distinct, in order
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in named])
    digest = hashlib.sha256(data)
    digest.update(json.dumps([settings, tokens], sort_keys=True).encode())
    return backend, digest.hexdigest()


def _read_vocab(path: Path, data: bytes) -> dict[str, int]:
    """`data`, the bytes of a vocab.txt, as {token: line number}, read as transformers reads it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{str(path)!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "a BERT vocab.txt holds one UTF-8 token per line. Download it again"
        ) from None
    # Universal newlines and only "\n" stripped, like transformers' `load_vocab`: a token may
    # end in a space.
    lines = [line.rstrip("\n") for line in io.StringIO(text, newline=None)]
    if not any(lines):
        raise DataError(
            f"{str(path)!r} holds no tokens; a BERT vocab.txt lists one token per line, the "
            "line number being its id. Download it again"
        )
    vocab: dict[str, int] = {}
    for i, token in enumerate(lines):
        if token in vocab:
            raise DataError(
                f"{str(path)!r} lists the token {token!r} twice, on lines {vocab[token] + 1} and "
                f"{i + 1}; a token's id is its line number, so each may appear once. Download "
                "the vocab.txt again"
            )
        vocab[token] = i
    return vocab


def _bert_settings(config: dict[str, Any], config_path: Path) -> dict[str, bool | None]:
    """The normalizer settings in a BERT tokenizer_config.json, with transformers' defaults."""
    settings = {
        "do_lower_case": config.get("do_lower_case", True),
        "tokenize_chinese_chars": config.get("tokenize_chinese_chars", True),
        "strip_accents": config.get("strip_accents"),
    }
    for key, value in settings.items():
        if not isinstance(value, bool) and not (key == "strip_accents" and value is None):
            raise DataError(
                f"{str(config_path)!r} sets {key}={value!r}; it must be true or false"
                + (" (or null: follow do_lower_case)" if key == "strip_accents" else "")
            )
    return settings


def _bert_special_tokens(configs: list[dict[str, Any]]) -> dict[str, str | None]:
    """The unk/sep/pad/cls/mask token strings named in `configs` (first config wins), or BERT's."""
    tokens: dict[str, str | None] = {}
    for role, default in _BERT_SPECIALS.items():
        key = f"{role}_token"
        token = next((config[key] for config in configs if key in config), default)
        if isinstance(token, dict):  # a serialized AddedToken: {"content": ..., ...}
            token = token.get("content")
        tokens[role] = token if isinstance(token, str) and token else None
    return tokens
