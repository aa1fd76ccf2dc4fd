"""Hugging Face tokenizers: a `tokenizer.json` behind the same interface as `Tokenizer`.

Holds `HfTokenizer`, which loads a Hugging Face `tokenizer.json` (GPT-2 and LLaMA 3 byte-level
BPE, BERT WordPiece, ...) with the `tokenizers` library and produces exactly the ids Hugging Face
produces, so a model converted from the Hub sees the token ids it was trained on. It leaves out
training tokenizers (`plm_jax.tokenizer.train_tokenizer` trains SentencePiece models), chat
templates, and adding bos/eos to sequences (`plm_jax.data` and the scorer do that themselves).

`Tokenizer.load` returns an `HfTokenizer` for a directory that holds a Hugging Face tokenizer.json
(and no SentencePiece tokenizer.model), or for the path of such a file.

Differences from the SentencePiece `Tokenizer`:

- `encode` never adds the post-processor's special tokens (`add_special_tokens=False`): no
  `<|begin_of_text|>` for LLaMA 3 and no [CLS]/[SEP] for BERT.
- Literal special-token strings in text (e.g. "<|endoftext|>") are matched as those tokens, as
  Hugging Face does; `decode` then drops them, so such text does not round-trip.
- Round trip: byte-level BPE is lossless, `decode(encode(text)) == text` for any valid Unicode
  text without special-token strings. `decode` is the `tokenizers` decoder alone, without
  transformers' `clean_up_tokenization_spaces`, which would turn " ." into ".". WordPiece with
  lowercasing (BERT uncased) is not reversible: case, accents and spacing around punctuation
  are lost.
- `unk_id`: byte-level BPE never emits an unknown token; a tokenizer that names none (LLaMA 3)
  gets `unk_id = eos_id`, the convention of GPT-2's own config.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plm_jax.errors import DataError
from plm_jax.tokenizer import _check_unicode

__all__ = ["HfTokenizer", "HF_TOKENIZER_FILE"]

HF_TOKENIZER_FILE = "tokenizer.json"
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
      fingerprint: sha256 hex digest of the tokenizer.json bytes; a key for token caches.
      path: the tokenizer.json file.
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

    @classmethod
    def load(cls, path: str | Path) -> HfTokenizer:
        """Loads a Hugging Face tokenizer directory or its tokenizer.json file.

        Special tokens come from tokenizer_config.json, else special_tokens_map.json, beside the
        tokenizer.json, else from well-known tokens in the vocabulary (see the module docstring).
        Padding and truncation stored in the tokenizer.json are switched off: sequences are
        packed and cut by the data pipeline.

        Raises:
          DataError: the file is missing or is not a Hugging Face tokenizer, a config names a
            special token that is not in the vocabulary, or no end-of-sequence token is found.
        """
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        json_path = path / HF_TOKENIZER_FILE if path.is_dir() else path
        if not json_path.is_file():
            raise DataError(
                f"Hugging Face tokenizer not found: {str(json_path)!r} does not exist; point "
                "tokenizer.path at a directory holding tokenizer.json (e.g. a model downloaded "
                "from the Hub) or at the tokenizer.json file itself"
            )
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
