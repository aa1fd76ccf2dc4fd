"""Tokenize a corpus once into binary token shards, cached by source and tokenizer.

Layout of one prepared corpus, `<cache>/tokens/<key>/`:

    meta.json               counts, dtype, key inputs; written last, so its presence = complete
    train/tokens-00000.bin  raw uint16/uint32 token ids, documents back to back as
    train/doc_starts.npy      [bos] tokens... eos; int64 offset of each document's first token
    eval/...                the held-out documents (chosen by a hash of their text)

Documents stream through in chunks; each chunk is encoded by SentencePiece's own thread pool
(all cores) and appended to the current shard, so memory does not grow with the corpus. The
directory is built under a temporary name and renamed into place, so an interrupted run never
leaves a cache entry that looks complete.

What it leaves out: windows and batches (see `packing.py` and `loader.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from plm_jax.config import DataConfig
from plm_jax.data.sources import SourceStats, check_stats, iter_documents, source_fingerprint
from plm_jax.errors import DataError
from plm_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "eval")
_CHUNK_DOCS = 4096
_CHUNK_CHARS = 8 << 20


def cache_root(data: DataConfig) -> Path:
    """`data.cache_dir`, else `$PLM_JAX_CACHE`, else `~/.cache/plm_jax`."""
    root = data.cache_dir or os.environ.get("PLM_JAX_CACHE") or "~/.cache/plm_jax"
    return Path(root).expanduser()


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Deterministic held-out choice from the document's content (duplicates stay together)."""
    if eval_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < eval_fraction * 2**64


class TokenStore:
    """Read-only view of one split: a long token stream plus document start offsets."""

    def __init__(self, root: Path):
        meta = json.loads((root / "split.json").read_text())
        self.root = root
        self.num_tokens: int = meta["num_tokens"]
        self.num_docs: int = meta["num_docs"]
        self.max_doc_len: int = meta["max_doc_len"]
        dtype = np.dtype(meta["dtype"])
        self._shards = [
            np.memmap(root / name, dtype=dtype, mode="r") if size else np.zeros(0, dtype)
            for name, size in zip(meta["shards"], meta["shard_sizes"], strict=True)
        ]
        self._offsets = np.cumsum([0, *meta["shard_sizes"]])
        self.doc_starts: np.ndarray = np.load(root / "doc_starts.npy", mmap_mode="r")
        if self._offsets[-1] != self.num_tokens or len(self.doc_starts) != self.num_docs:
            raise DataError(f"prepared data in {root} is inconsistent; delete it to re-prepare")

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens `[start, stop)` of the stream as int32 (may span shards)."""
        parts = []
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        for i in range(max(first, 0), len(self._shards)):
            lo, hi = self._offsets[i], self._offsets[i + 1]
            if lo >= stop:
                break
            parts.append(self._shards[i][max(start, lo) - lo : min(stop, hi) - lo])
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


@dataclass(frozen=True)
class PreparedData:
    """A prepared corpus: its directory, its metadata and the two splits."""

    path: Path
    meta: dict
    train: TokenStore
    eval: TokenStore | None


class _SplitWriter:
    """Appends documents to size-capped shard files and records where each document starts."""

    def __init__(self, root: Path, dtype: np.dtype, shard_tokens: int):
        root.mkdir(parents=True)
        self.root, self.dtype, self.shard_tokens = root, dtype, shard_tokens
        self.doc_starts = array("q")
        self.shard_sizes: list[int] = []
        self.num_tokens = self.max_doc_len = 0
        self._file = None

    def add(self, ids: np.ndarray) -> None:
        self.doc_starts.append(self.num_tokens)
        self.max_doc_len = max(self.max_doc_len, len(ids))
        written = 0
        while written < len(ids):
            if self._file is None or self.shard_sizes[-1] >= self.shard_tokens:
                self._open_shard()
            room = self.shard_tokens - self.shard_sizes[-1]
            part = ids[written : written + room]
            self._file.write(part.astype(self.dtype).tobytes())
            self.shard_sizes[-1] += len(part)
            written += len(part)
        self.num_tokens += len(ids)

    def _open_shard(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.root / f"tokens-{len(self.shard_sizes):05d}.bin", "wb")  # noqa: SIM115 - closed in close()
        self.shard_sizes.append(0)

    def close(self) -> dict:
        if self._file is not None:
            self._file.close()
        np.save(self.root / "doc_starts.npy", np.frombuffer(self.doc_starts, dtype=np.int64))
        meta = {
            "num_tokens": self.num_tokens,
            "num_docs": len(self.doc_starts),
            "max_doc_len": self.max_doc_len,
            "dtype": self.dtype.name,
            "shards": [f"tokens-{i:05d}.bin" for i in range(len(self.shard_sizes))],
            "shard_sizes": self.shard_sizes,
        }
        (self.root / "split.json").write_text(json.dumps(meta))
        return meta


def prepare_data(
    data: DataConfig, tokenizer: Tokenizer, *, show_progress: bool = True
) -> PreparedData:
    """Tokenizes `data.source` into the cache (or reuses it) and opens the splits.

    Raises:
      DataError: missing, empty or corrupt sources (see `sources.py`).
    """
    key_inputs = {
        "format_version": FORMAT_VERSION,
        "source": source_fingerprint(data),
        "tokenizer": tokenizer.fingerprint,
        "eval_fraction": data.eval_fraction,
        "add_bos": data.add_bos,
    }
    key = hashlib.sha256(json.dumps(key_inputs, sort_keys=True).encode()).hexdigest()[:20]
    path = cache_root(data) / "tokens" / key
    if (path / "meta.json").is_file():
        log.info("reusing prepared data %s", path)
        return open_prepared(path)
    tmp = path.with_name(f"{key}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        meta = _tokenize_into(tmp, data, tokenizer, show_progress=show_progress)
        meta["key_inputs"] = key_inputs
        meta["source"] = data.source
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(path)
        except OSError:  # another process finished the same key first; theirs is complete
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_prepared(path)


def open_prepared(path: Path) -> PreparedData:
    """Opens a complete prepared corpus directory."""
    try:
        meta = json.loads((path / "meta.json").read_text())
        train = TokenStore(path / "train")
        evals = TokenStore(path / "eval") if meta["eval"]["num_docs"] else None
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"prepared data in {path} is unreadable ({e}); delete it to re-prepare"
        ) from None
    return PreparedData(path, meta, train, evals)


def _chunks(docs: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _tokenize_into(root: Path, data: DataConfig, tok: Tokenizer, *, show_progress: bool) -> dict:
    dtype = np.dtype(np.uint16 if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    writers = {s: _SplitWriter(root / s, dtype, data.shard_tokens) for s in SPLITS}
    stats = SourceStats()
    threads = data.tokenize_threads or os.cpu_count() or 1
    bos = [tok.bos_id] if data.add_bos else []
    start = time.perf_counter()
    bar = tqdm(desc="tokenizing", unit="doc", disable=not show_progress, file=sys.stderr)
    for chunk in _chunks(iter_documents(data, stats)):
        for doc, ids in zip(chunk, tok.encode_batch(chunk, num_threads=threads), strict=True):
            split = "eval" if is_eval_document(doc, data.eval_fraction) else "train"
            writers[split].add(np.asarray([*bos, *ids, tok.eos_id], dtype=np.int64))
        bar.update(len(chunk))
        bar.set_postfix(tokens=writers["train"].num_tokens + writers["eval"].num_tokens)
    bar.close()
    check_stats(stats, data)
    meta = {s: w.close() for s, w in writers.items()}
    meta["skipped_missing_field"] = stats.skipped_missing_field
    meta["skipped_empty"] = stats.skipped_empty
    meta["seconds"] = round(time.perf_counter() - start, 3)
    log.info(
        "prepared %d documents, %d train / %d eval tokens in %.1f s",
        stats.documents,
        meta["train"]["num_tokens"],
        meta["eval"]["num_tokens"],
        meta["seconds"],
    )
    return meta
