"""Parallel (source, target) data for seq2seq fine-tuning: read, encode, pack and bucket.

`read_parallel` reads pairs from a JSONL file (`source`/`target` fields, names configurable) or
from two aligned UTF-8 text files (one sentence a line). `encode_parallel` turns each pair into
token ids that end with eos, truncating overlong ones (and counting them) or rejecting them.
Two batchers cut the encoded pairs into batches of numpy arrays:

- `Seq2SeqBatcher`, for encoder-decoders: sources on the encoder side, targets on the decoder
  side, with `decoder_inputs` = targets shifted right within each example and the pad id as
  the decoder start (T5 / Hugging Face: decoder_start_token_id = pad).
- `PromptCompletionBatcher`, for decoder-only models: `[bos] source target` as one causal
  sequence (the source's eos separates the two), a loss only on the completion.

Packing. In training, a row holds several examples: segment ids 1..k (the same ids on the
encoder and decoder side, so cross-attention stays within an example), positions restarting at
0, 0 = padding. The packing is computed once from the seed: a seeded shuffle (for ties) sorted
by length, each row taking the longest example left, then the shortest ones while they fit.
Packed examples never see each other (segment masks), so keeping a packing across epochs only
keeps which examples share a row; the rows are reshuffled into different batches every epoch,
and a fixed packing keeps `batches_per_epoch` (and so the steps of `task.epochs`) exact.

Bucketing, multi-process reading and state follow `plm_jax.tasks.batching.BucketBatcher`: each
epoch shuffles the rows with `(seed, epoch)`, sorts chunks of `group_chunk` batches by length,
cuts them into global batches and shuffles the batch order; each side of a global batch is
padded to the smallest of its buckets that fits (`bucket_lengths`), and every process builds
the same plan and keeps rows `[p*G/P, (p+1)*G/P)`. The state is `{"epoch", "batch"}`.
Evaluation (`shuffle=False`) keeps one example a row, in file order, with `example_index`, so
predictions can be matched to references.

What it leaves out: the loss (label smoothing, normalisation by real target tokens over the
accumulated batch: the training step does both from `weights`), decoding, BLEU, and reading
the config (`plm_jax.tasks.finetune` maps task fields to these arguments).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from plm_jax.errors import ConfigError, DataError
from plm_jax.tasks.batching import EpochBatches, _check_args
from plm_jax.tasks.classification import _jsonl_records, _longest_first

__all__ = [
    "EncodedPairs",
    "ParallelExample",
    "PromptCompletionBatcher",
    "Seq2SeqBatcher",
    "count_target_tokens",
    "encode_parallel",
    "read_parallel",
]

_PACK_STREAM = 2**32 - 1  # the packing's random stream: [seed, this], a number no epoch reaches


@dataclass(frozen=True)
class ParallelExample:
    """One translation pair.

    Attributes:
      source, target: the texts; never empty.
      where: "file:line" it was read from, for error messages.
    """

    source: str
    target: str
    where: str = ""


# ---------------------------------------------------------------------------------------------
# Reading.


def read_parallel(
    path: str | Path | None = None,
    *,
    source_field: str = "source",
    target_field: str = "target",
    source_file: str | Path | None = None,
    target_file: str | Path | None = None,
) -> list[ParallelExample]:
    """Reads pairs from a JSONL file, or from two aligned plain-text files.

    Args:
      path: a JSONL file, one object a line holding `source_field` and `target_field`.
      source_field, target_field: the JSON fields holding the two texts.
      source_file, target_file: instead of `path`, two UTF-8 files with one sentence a line;
        line i of the target file translates line i of the source file.

    Returns:
      The pairs, in file order.

    Raises:
      ConfigError: neither or both of `path` and the file pair, or only one of the pair.
      DataError: a missing or empty file, not UTF-8, invalid JSON, a missing, non-string or
        empty field or line, or text files with different line counts. The message names the
        file and line.
    """
    has_pair = bool(source_file) or bool(target_file)
    if bool(path) == has_pair:
        raise ConfigError(
            "give parallel data either as one JSONL file (task.train_file) or as "
            f"task.source_file and task.target_file, not {'both' if path else 'neither'}"
        )
    if has_pair and not (source_file and target_file):
        raise ConfigError(
            "task.source_file and task.target_file go together (two aligned text files); set "
            "both, or neither and a JSONL task.train_file"
        )
    if path:
        return _read_jsonl(Path(path), source_field, target_field)
    return _read_text_pair(Path(source_file), Path(target_file))


def _read_jsonl(path: Path, source_field: str, target_field: str) -> list[ParallelExample]:
    if not path.is_file():
        raise DataError(f"task data file {str(path)!r} does not exist; check the path")
    examples = []
    for lineno, record in _jsonl_records(path):
        where = f"{path}:{lineno}"
        source = _field(record, source_field, "source", where)
        target = _field(record, target_field, "target", where)
        examples.append(ParallelExample(source, target, where))
    if not examples:
        raise DataError(
            f"{path} holds no pairs (it is empty); give one JSON object a line with "
            f"{source_field!r} and {target_field!r} fields"
        )
    return examples


def _field(record: Mapping[str, Any], field: str, side: str, where: str) -> str:
    value = record.get(field)
    if value is None:
        keys = sorted(record)
        raise DataError(
            f"{where}: no {field!r} field (keys: {keys}); set task.{side}_field to the field "
            f"holding the {side} text"
        )
    if not isinstance(value, str):
        raise DataError(f"{where}: {field!r} is a {type(value).__name__}, not a string")
    if not value.strip():
        raise DataError(f"{where}: {field!r} is empty; fill in the {side} text or remove the line")
    return value


def _read_lines(path: Path, side: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"task.{side}_file {str(path)!r} does not exist; check the path")
    lines = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 ({e.reason}); convert the file to UTF-8"
                ) from None
            lines.append(line.rstrip("\r\n"))
    if not lines:
        raise DataError(f"{path} is empty; it needs one {side} sentence a line")
    return lines


def _read_text_pair(source_file: Path, target_file: Path) -> list[ParallelExample]:
    sources, targets = _read_lines(source_file, "source"), _read_lines(target_file, "target")
    if len(sources) != len(targets):
        raise DataError(
            f"{source_file} has {len(sources)} lines but {target_file} has {len(targets)}; the "
            "files must be aligned line by line (line i of one translates line i of the other): "
            "remove the extra lines or fix the misaligned ones"
        )
    examples = []
    for lineno, (source, target) in enumerate(zip(sources, targets, strict=True), start=1):
        for path, side, text in ((source_file, "source", source), (target_file, "target", target)):
            if not text.strip():
                raise DataError(
                    f"{path}:{lineno}: empty {side} line; every line needs a sentence (remove "
                    f"line {lineno} from both files)"
                )
        examples.append(ParallelExample(source, target, f"{source_file}:{lineno}"))
    return examples


# ---------------------------------------------------------------------------------------------
# Encoding.


@dataclass
class EncodedPairs:
    """Token ids of parallel examples, each ending with eos, and how many were truncated.

    Attributes:
      sources, targets: per example, int32 ids ending with the tokenizer's eos.
      num_truncated_sources, num_truncated_targets: examples whose side lost tokens.
      max_source_len, max_target_len, max_total_len: the limits they were encoded with.
    """

    sources: list[np.ndarray]
    targets: list[np.ndarray]
    num_truncated_sources: int
    num_truncated_targets: int
    max_source_len: int
    max_target_len: int
    max_total_len: int = 0

    def __len__(self) -> int:
        return len(self.sources)

    def truncation_summary(self) -> str:
        """E.g. "truncated 12 of 5000 sources to 128 tokens"; "" when nothing was truncated."""
        n, parts = len(self), []
        if self.num_truncated_sources:
            parts.append(f"{self.num_truncated_sources} of {n} sources to {self.max_source_len}")
        if self.num_truncated_targets:
            parts.append(f"{self.num_truncated_targets} of {n} targets to {self.max_target_len}")
        if not parts:
            return ""
        total = f" (source + target to {self.max_total_len})" if self.max_total_len else ""
        return f"truncated {' and '.join(parts)} tokens{total}"


def encode_parallel(
    examples: Sequence[ParallelExample],
    tokenizer: Any,
    *,
    max_source_len: int,
    max_target_len: int,
    overlong: Literal["truncate", "error"] = "truncate",
    max_total_len: int = 0,
) -> EncodedPairs:
    """`tokenizer.encode(text) + [eos]` for both sides, within the length limits.

    Truncation cuts the end of the text and keeps the eos. With `max_total_len` (decoder-only
    models, which read source and target as one sequence: pass model.max_seq_len), a pair
    still longer than that loses tokens longest side first.

    Args:
      examples: from `read_parallel`.
      tokenizer: has `encode_batch`, `eos_id`.
      max_source_len: the longest source, eos included (model.max_seq_len).
      max_target_len: the longest target, eos included (task.max_target_len).
      overlong: "truncate" cuts and counts overlong sides; "error" rejects the first one.
      max_total_len: 0, or the longest source + target together.

    Returns:
      The ids and truncation counts; log `truncation_summary()`.

    Raises:
      ConfigError: an unknown `overlong`, or a limit that leaves no room for text.
      DataError: `overlong="error"` and a pair is too long; names its line and both fixes.
    """
    if overlong not in ("truncate", "error"):
        raise ConfigError(f"overlong={overlong!r} must be 'truncate' or 'error'")
    if min(max_source_len, max_target_len) < 2 or 0 < max_total_len < 4:
        raise ConfigError(
            f"length limits source={max_source_len}, target={max_target_len}, "
            f"total={max_total_len} leave no room for text beside eos; use at least 2 per side"
        )
    eos = tokenizer.eos_id
    source_ids = tokenizer.encode_batch([ex.source for ex in examples])
    target_ids = tokenizer.encode_batch([ex.target for ex in examples])
    out = EncodedPairs([], [], 0, 0, max_source_len, max_target_len, max_total_len)
    for i, (ex, src, tgt) in enumerate(zip(examples, source_ids, target_ids, strict=True)):
        keep_src, keep_tgt = min(len(src), max_source_len - 1), min(len(tgt), max_target_len - 1)
        if max_total_len and keep_src + keep_tgt + 2 > max_total_len:
            keep_src, keep_tgt = _longest_first(keep_src, keep_tgt, max_total_len - 2)
        cut_src, cut_tgt = keep_src < len(src), keep_tgt < len(tgt)
        if overlong == "error" and (cut_src or cut_tgt):
            raise DataError(_overlong_message(ex.where or f"example {i}", out, len(src), len(tgt)))
        out.num_truncated_sources += cut_src
        out.num_truncated_targets += cut_tgt
        out.sources.append(np.array([*src[:keep_src], eos], dtype=np.int32))
        out.targets.append(np.array([*tgt[:keep_tgt], eos], dtype=np.int32))
    return out


def _overlong_message(where: str, limits: EncodedPairs, len_src: int, len_tgt: int) -> str:
    fix = "or set task.overlong=truncate to cut overlong pairs to fit"
    if len_src + 1 > limits.max_source_len:
        return (
            f"{where}: the source is {len_src + 1} tokens with eos, more than "
            f"model.max_seq_len={limits.max_source_len}; raise model.max_seq_len, {fix}"
        )
    if len_tgt + 1 > limits.max_target_len:
        return (
            f"{where}: the target is {len_tgt + 1} tokens with eos, more than "
            f"task.max_target_len={limits.max_target_len}; raise task.max_target_len (0: "
            f"model.max_seq_len), {fix}"
        )
    return (
        f"{where}: source and target are {len_src + 1} + {len_tgt + 1} tokens, more than "
        f"model.max_seq_len={limits.max_total_len} together (a decoder-only model reads them "
        f"as one sequence); raise model.max_seq_len, {fix}"
    )


def count_target_tokens(batch: Mapping[str, np.ndarray]) -> int:
    """Real target tokens (the loss's denominator) in a batch from either batcher."""
    return int(np.asarray(batch["weights"]).sum())


# ---------------------------------------------------------------------------------------------
# Batching: the plan and the iterator, shared by both layouts.


class _PackedBatcher(EpochBatches):
    """Packed, length-bucketed global batches; subclasses write the rows (see module docstring).

    `lengths` is [N, d]: the tokens each example takes on each of the d sides of a row, and
    `buckets` one increasing tuple of padded lengths per side.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        target_lengths: np.ndarray,
        buckets: Sequence[Sequence[int]],
        *,
        global_batch: int,
        seed: int,
        shuffle: bool,
        pack: bool | None,
        process_index: int,
        process_count: int,
        pad_id: int,
        group_chunk: int,
    ):
        for side in buckets:
            _check_args(global_batch, side, seed, process_index, process_count, group_chunk)
        if not len(lengths):
            raise DataError("no examples to batch: the task data split is empty; add data")
        self.pack = shuffle if pack is None else pack
        if self.pack and not shuffle:
            raise ConfigError(
                "evaluation (shuffle=False) keeps one example a row so predictions match "
                "references; pass pack=False"
            )
        self.global_batch, self.local_batch = global_batch, global_batch // process_count
        self.buckets = tuple(tuple(int(b) for b in side) for side in buckets)
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.group_chunk = group_chunk
        self.lengths = lengths
        self._target_lengths = target_lengths
        capacity = np.array([side[-1] for side in self.buckets])
        too_long = np.flatnonzero((lengths > capacity).any(axis=1))
        if too_long.size:
            i = int(too_long[0])
            raise ConfigError(
                f"example {i} takes {lengths[i].tolist()} tokens, more than the largest buckets "
                f"{capacity.tolist()}; encode with limits within the largest buckets, or add "
                "larger buckets"
            )
        self.num_examples = len(lengths)
        self._rows = self._pack(capacity) if self.pack else [[i] for i in range(len(lengths))]
        self._fill = np.array([lengths[row].sum(axis=0) for row in self._rows])  # [R, d]
        self.num_rows = len(self._rows)
        self.batches_per_epoch = math.ceil(self.num_rows / global_batch)
        self._epoch, self._batch = 0, 0
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _pack(self, capacity: np.ndarray) -> list[list[int]]:
        """Rows of example indices: the longest example left, then the shortest while they fit."""
        rng = np.random.default_rng([self.seed, _PACK_STREAM])
        order = rng.permutation(self.num_examples)  # random ties
        keys = self.lengths[order].T[::-1]  # np.lexsort sorts by its last key first
        order = order[np.lexsort(keys)[::-1]].tolist()  # longest first (side 0, then 1)
        sizes = self.lengths.tolist()
        cap = capacity.tolist()
        rows, lo, hi = [], 0, len(order) - 1
        while lo <= hi:
            row, fill = [order[lo]], list(sizes[order[lo]])
            lo += 1
            while lo <= hi and all(
                f + s <= c for f, s, c in zip(fill, sizes[order[hi]], cap, strict=True)
            ):
                row.append(order[hi])
                fill = [f + s for f, s in zip(fill, sizes[order[hi]], strict=True)]
                hi -= 1
            rows.append(row)
        return rows

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """`([batches, G] row indices with -1 padding, [batches, d] padded lengths)`."""
        key = epoch if self.shuffle else 0  # evaluation reads the same order every epoch
        if self._plan_cache is None or self._plan_cache[0] != key:
            rows = self._epoch_rows(epoch)
            fill = np.where((rows >= 0)[..., None], self._fill[np.maximum(rows, 0)], 0)
            longest = fill.max(axis=1)  # [batches, d]
            padded = np.stack(
                [
                    np.asarray(b)[np.searchsorted(b, longest[:, k])]
                    for k, b in enumerate(self.buckets)
                ],
                axis=1,
            )
            self._plan_cache = (key, rows, padded)
        return self._plan_cache[1], self._plan_cache[2]

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        r, g = self.num_rows, self.global_batch
        order = np.arange(r)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(r)
            chunk = self.group_chunk * g  # a multiple of G: no batch straddles two chunks
            for lo in range(0, r, chunk):
                part = order[lo : lo + chunk]
                order[lo : lo + chunk] = part[np.lexsort(self._fill[part].T[::-1])[::-1]]
        rows = np.full(self.batches_per_epoch * g, -1, dtype=np.int64)
        rows[:r] = order
        rows = rows.reshape(self.batches_per_epoch, g)
        if self.shuffle:
            rows = rows[rng.permutation(self.batches_per_epoch)]
        return rows

    # -- batches --------------------------------------------------------------------------------

    def _empty(self, lengths: Sequence[int]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _write(self, batch: dict[str, np.ndarray], r: int, k: int, i: int, at: list[int]) -> None:
        """Writes example `i` as segment `k` of row `r` at offsets `at` (advanced in place)."""
        raise NotImplementedError

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `index` of `epoch`; does not move the iterator."""
        rows, padded = self._plan(epoch)
        lo = self.process_index * self.local_batch
        local = rows[index, lo : lo + self.local_batch]
        batch = self._empty([int(n) for n in padded[index]])
        for r, row in enumerate(local):
            at = [0] * len(self.buckets)
            for k, i in enumerate(self._rows[row] if row >= 0 else (), start=1):
                self._write(batch, r, k, i, at)
        if not self.pack:  # row j holds example j
            batch["example_index"] = local.astype(np.int32)
        return batch

    def global_target_tokens(self, epoch: int, index: int) -> int:
        """Real target tokens of global batch `index` of `epoch`, over all processes."""
        rows, _ = self._plan(epoch)
        members = [i for row in rows[index] if row >= 0 for i in self._rows[row]]
        return int(self._target_lengths[members].sum())

    @property
    def padding_fraction(self) -> float:
        """Padded tokens / all tokens (every side) over the current epoch's global batches."""
        _, padded = self._plan(self._epoch)
        return 1.0 - float(self.lengths.sum()) / float(padded.sum() * self.global_batch)

    @property
    def shapes(self) -> frozenset[tuple[int, ...]]:
        """`(Bl, *padded lengths)` of the current epoch's batches (one compile each)."""
        _, padded = self._plan(self._epoch)
        return frozenset((self.local_batch, *map(int, p)) for p in padded)


class Seq2SeqBatcher(_PackedBatcher):
    """This process's slice of packed, bucketed encoder-decoder batches.

    Each batch is a dict of numpy arrays with `Bl = global_batch // process_count` rows, an
    encoder length `S` from `source_buckets` and a decoder length `T` from `target_buckets`:
      "inputs", "segment_ids", "positions" [Bl, S] int32: source ids (pad after them), segment
        ids 1..k of the examples in the row (0 = padding), positions from 0 in each example.
      "decoder_inputs" [Bl, T] int32: each target shifted right by one within its segment,
        with `pad_id` (the decoder start) in front.
      "targets", "decoder_segment_ids", "decoder_positions" [Bl, T] int32: target ids (ending
        with eos), the same segment ids as the encoder side, positions from 0.
      "weights" [Bl, T] float32: 1 on real target tokens, 0 on padding.
      "example_index" [Bl] int32 (one example a row, i.e. evaluation): the example, -1 on padding.

    Args:
      encoded: from `encode_parallel`.
      global_batch: G, rows per global batch, over all processes.
      source_buckets, target_buckets: padded lengths per side, increasing (`bucket_lengths`);
        the last ones are a packed row's capacity.
      seed: the packing and shuffling seed.
      shuffle: training (shuffled, grouped by length) or evaluation (file order).
      pack: several examples a row; default: when training.
      process_index, process_count: which row slice of every global batch this process reads.
      pad_id: the padding id and decoder start id (the tokenizer's pad id).
      group_chunk: batches per length-sorted chunk.

    Raises:
      ConfigError: bad sizes, buckets or seed, an example longer than the largest buckets, or
        `pack` in evaluation.
      DataError: there are no examples.
    """

    def __init__(
        self,
        encoded: EncodedPairs,
        *,
        global_batch: int,
        source_buckets: Sequence[int],
        target_buckets: Sequence[int],
        seed: int = 0,
        shuffle: bool = True,
        pack: bool | None = None,
        process_index: int = 0,
        process_count: int = 1,
        pad_id: int = 0,
        group_chunk: int = 50,
    ):
        self._src, self._tgt = encoded.sources, encoded.targets
        tgt_lengths = np.array([len(t) for t in self._tgt], dtype=np.int64)
        lengths = np.stack([np.array([len(s) for s in self._src], np.int64), tgt_lengths], axis=1)
        super().__init__(
            lengths.reshape(-1, 2),
            tgt_lengths,
            (source_buckets, target_buckets),
            global_batch=global_batch,
            seed=seed,
            shuffle=shuffle,
            pack=pack,
            process_index=process_index,
            process_count=process_count,
            pad_id=pad_id,
            group_chunk=group_chunk,
        )

    def _empty(self, lengths: Sequence[int]) -> dict[str, np.ndarray]:
        (s, t), b = lengths, self.local_batch
        return {
            "inputs": np.full((b, s), self.pad_id, np.int32),
            "segment_ids": np.zeros((b, s), np.int32),
            "positions": np.zeros((b, s), np.int32),
            "decoder_inputs": np.full((b, t), self.pad_id, np.int32),
            "decoder_segment_ids": np.zeros((b, t), np.int32),
            "decoder_positions": np.zeros((b, t), np.int32),
            "targets": np.full((b, t), self.pad_id, np.int32),
            "weights": np.zeros((b, t), np.float32),
        }

    def _write(self, batch: dict[str, np.ndarray], r: int, k: int, i: int, at: list[int]) -> None:
        src, tgt = self._src[i], self._tgt[i]
        s = slice(at[0], at[0] + len(src))
        batch["inputs"][r, s] = src
        batch["segment_ids"][r, s] = k
        batch["positions"][r, s] = np.arange(len(src))
        t = slice(at[1], at[1] + len(tgt))
        batch["targets"][r, t] = tgt
        batch["decoder_inputs"][r, t] = np.concatenate([[self.pad_id], tgt[:-1]])
        batch["decoder_segment_ids"][r, t] = k
        batch["decoder_positions"][r, t] = np.arange(len(tgt))
        batch["weights"][r, t] = 1.0
        at[0], at[1] = s.stop, t.stop


class PromptCompletionBatcher(_PackedBatcher):
    """This process's slice of packed, bucketed prompt -> completion batches for a causal LM.

    Example i is the sequence `[bos] source target` (the source's eos separates prompt and
    completion); a row holds `inputs = sequence[:-1]` and `targets = sequence[1:]` of each of
    its examples, as in decoder pretraining. Each batch, `L` from `buckets`:
      "inputs", "targets", "segment_ids", "positions" [Bl, L] int32: as in pretraining
        (segment ids 1..k, 0 = padding; positions from 0 in each example).
      "weights" [Bl, L] float32: 1 where the target is a completion token (the target ids and
        their eos), 0 on the prompt and padding.
      "example_index" [Bl] int32 (one example a row): the example, -1 on padding rows.

    Args:
      encoded: from `encode_parallel` (with `max_total_len`).
      buckets: padded row lengths, increasing; the last one is a packed row's capacity.
      bos_id: the id put before each prompt, as pretraining's `data.add_bos` did; None: none.
      The others as `Seq2SeqBatcher`.

    Raises:
      As `Seq2SeqBatcher`.
    """

    def __init__(
        self,
        encoded: EncodedPairs,
        *,
        global_batch: int,
        buckets: Sequence[int],
        bos_id: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        pack: bool | None = None,
        process_index: int = 0,
        process_count: int = 1,
        pad_id: int = 0,
        group_chunk: int = 50,
    ):
        self._prefix = np.array([] if bos_id is None else [bos_id], dtype=np.int32)
        self._src, self._tgt = encoded.sources, encoded.targets
        tgt_lengths = np.array([len(t) for t in self._tgt], dtype=np.int64)
        src_lengths = np.array([len(s) for s in self._src], dtype=np.int64)
        lengths = len(self._prefix) + src_lengths + tgt_lengths - 1  # inputs drop the last token
        super().__init__(
            lengths.reshape(-1, 1),
            tgt_lengths,
            (buckets,),
            global_batch=global_batch,
            seed=seed,
            shuffle=shuffle,
            pack=pack,
            process_index=process_index,
            process_count=process_count,
            pad_id=pad_id,
            group_chunk=group_chunk,
        )

    def _empty(self, lengths: Sequence[int]) -> dict[str, np.ndarray]:
        shape = (self.local_batch, lengths[0])
        return {
            "inputs": np.full(shape, self.pad_id, np.int32),
            "targets": np.full(shape, self.pad_id, np.int32),
            "segment_ids": np.zeros(shape, np.int32),
            "positions": np.zeros(shape, np.int32),
            "weights": np.zeros(shape, np.float32),
        }

    def _write(self, batch: dict[str, np.ndarray], r: int, k: int, i: int, at: list[int]) -> None:
        sequence = np.concatenate([self._prefix, self._src[i], self._tgt[i]])
        n = len(sequence) - 1
        span = slice(at[0], at[0] + n)
        batch["inputs"][r, span] = sequence[:-1]
        batch["targets"][r, span] = sequence[1:]
        batch["segment_ids"][r, span] = k
        batch["positions"][r, span] = np.arange(n)
        prompt = len(self._prefix) + len(self._src[i]) - 1  # targets before this are the prompt
        batch["weights"][r, at[0] + prompt : span.stop] = 1.0
        at[0] = span.stop
