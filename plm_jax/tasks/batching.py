"""Length-bucketed batches of tokenized task examples for fine-tuning and evaluation.

Fine-tuning examples vary in length, so padding every batch to `max_seq_len` wastes most of the
compute, while padding each batch to its own longest example compiles a new shape per batch.
`BucketBatcher` pads each batch to the smallest of a few fixed lengths (`bucket_lengths`:
powers of two up to `max_seq_len`), and in training groups examples of similar length into one
batch, as Hugging Face's `group_by_length` does: each epoch is a seeded shuffle, cut into chunks
of `group_chunk` batches; each chunk is sorted by length and cut into batches, and the order of
all the batches is shuffled again. Evaluation reads every example once, in order.

Multi-process. Every process builds the same global plan (the plan depends only on the seed,
the epoch and the data) and keeps rows `[p*G/P, (p+1)*G/P)` of each global batch, as
`plm_jax.data.loader` does; the padded length is chosen from the whole global batch, so every
process gets the same shape. An epoch that does not fill its last batch pads it with weight-0
rows (`example_index == -1`), in training as in evaluation, so every example is read exactly once
per epoch.

The iterator state is `{"epoch": e, "batch": k}`, the next batch to read; batches are a pure
function of (seed, epoch, k), so restoring a state continues exactly. It leaves out tokenizing
(`plm_jax.tasks.classification`) and moving batches to devices (the training loop).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from plm_jax.errors import ConfigError, DataError

__all__ = ["BucketBatcher", "EpochBatches", "bucket_lengths"]

# Per-example keys that are token sequences or bookkeeping, not [B] batch fields.
_SEQUENCE_KEYS = ("ids", "token_types")
_SKIPPED_KEYS = ("truncated",)


def bucket_lengths(max_seq_len: int, *, min_len: int = 16) -> tuple[int, ...]:
    """Padded lengths `min_len, 2*min_len, 4*min_len, ...` below `max_seq_len`, then `max_seq_len`.

    Args:
      max_seq_len: the longest input; always the last bucket.
      min_len: the shortest bucket (clipped to `max_seq_len`).

    Returns:
      Strictly increasing lengths, e.g. (16, 32, 64, 128, 200) for max_seq_len=200.

    Raises:
      ConfigError: a length is below 1.
    """
    if max_seq_len < 1 or min_len < 1:
        raise ConfigError(
            f"bucket lengths need max_seq_len >= 1 and min_len >= 1, got {max_seq_len} and "
            f"{min_len}"
        )
    out = []
    length = min_len
    while length < max_seq_len:
        out.append(length)
        length *= 2
    return (*out, max_seq_len)


class EpochBatches:
    """The position of a batcher that reads batch `k` of epoch `e` as `batch_at(e, k)`.

    Subclasses define `batch_at(epoch, index)`, `batches_per_epoch` and `shuffle`, and start
    with `self._epoch = self._batch = 0`. Iterating reads batches forever when training
    (`shuffle`), one epoch from the current position otherwise; the state is the next batch.
    """

    _epoch: int
    _batch: int
    shuffle: bool
    batches_per_epoch: int

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self._epoch, self._batch)
        self._batch += 1
        if self._batch == self.batches_per_epoch:  # the state always names the next batch
            self._epoch, self._batch = self._epoch + 1, 0
        return batch

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """Batches forever when training (`shuffle`); one epoch from the current position else."""
        if not self.shuffle:
            yield from self.epoch_iter()
            return
        while True:
            yield next(self)

    def epoch_iter(self) -> Iterator[dict[str, np.ndarray]]:
        """The remaining batches of the current epoch; afterwards the state is the next epoch."""
        epoch = self._epoch
        while self._epoch == epoch:
            yield next(self)

    def get_state(self) -> dict[str, int]:
        """`{"epoch": e, "batch": k}`: the next batch read is batch k of epoch e. JSON-able."""
        return {"epoch": self._epoch, "batch": self._batch}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a `get_state()` result: the following batches are exactly the same.

        Raises:
          ConfigError: the state is malformed or does not fit this data and batch size.
        """
        epoch, batch = state.get("epoch"), state.get("batch")
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, batch))
        if not ok or batch >= self.batches_per_epoch:
            raise ConfigError(
                f"batcher state {dict(state)} does not fit {self.batches_per_epoch} batches per "
                "epoch; resume with the same task data, seed and batch size"
            )
        self._epoch, self._batch = epoch, batch


class BucketBatcher(EpochBatches):
    """This process's slice of length-bucketed global batches of encoded examples.

    Each batch is a dict of numpy arrays with `Bl = global_batch // process_count` rows and a
    length `L` from `buckets`:
      "inputs" [Bl, L] int32: token ids, `pad_id` after the example.
      "token_types" [Bl, L] int32: segment type ids (0 where absent or padding).
      "segment_ids" [Bl, L] int32: 1 on real tokens, 0 on padding.
      "positions" [Bl, L] int32: 0..L-1 on every row.
      "example_index" [Bl] int32: the example's index in `examples`, -1 on padding rows.
      "weights" [Bl] float32: 1 on real rows, 0 on padding rows.
      and every scalar field of the examples (e.g. "label", "start", "end") as a [Bl] array:
      int32 when all its values are integers, else float32; 0 on padding rows.

    Iterating gives batches forever in training (`shuffle=True`) and one pass in evaluation;
    `epoch_iter()` gives the rest of the current epoch.

    Args:
      examples: dicts with "ids" (token ids), optionally "token_types", and scalar fields; as
        written by `encode_examples`. Non-scalar fields and "truncated" are not batched.
      global_batch: G, rows per global batch, over all processes.
      buckets: the allowed padded lengths, strictly increasing (`bucket_lengths`).
      seed: the shuffle seed (training only).
      shuffle: shuffle and group by length each epoch (training), or keep file order (eval).
      process_index, process_count: which row slice of every global batch this process reads.
      pad_id: the id written in padded positions.
      group_chunk: batches per length-sorted chunk; larger groups lengths more tightly but makes
        batch contents less random.

    Raises:
      ConfigError: a bad batch size, process, bucket list or seed, or an example longer than the
        largest bucket.
      DataError: there are no examples, or an example lacks a scalar field the first one has.
    """

    def __init__(
        self,
        examples: Sequence[Mapping[str, Any]],
        *,
        global_batch: int,
        buckets: Sequence[int],
        seed: int = 0,
        shuffle: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        pad_id: int = 0,
        group_chunk: int = 50,
    ):
        _check_args(global_batch, buckets, seed, process_index, process_count, group_chunk)
        if not examples:
            raise DataError("no examples to batch: the task data split is empty; add data")
        self.global_batch = global_batch
        self.local_batch = global_batch // process_count
        self.buckets = tuple(int(b) for b in buckets)
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.process_index, self.process_count = process_index, process_count
        self.group_chunk = group_chunk
        self._ids = [np.asarray(e["ids"], dtype=np.int32) for e in examples]
        self._types = [np.asarray(e.get("token_types", ()), dtype=np.int32) for e in examples]
        self.lengths = np.array([len(ids) for ids in self._ids], dtype=np.int64)
        longest = int(self.lengths.argmax())
        if self.lengths[longest] > self.buckets[-1]:
            raise ConfigError(
                f"example {longest} has {self.lengths[longest]} tokens, more than the largest "
                f"bucket {self.buckets[-1]}; encode with max_seq_len <= {self.buckets[-1]} or "
                "add a larger bucket"
            )
        self._fields = _scalar_fields(examples)
        self.num_examples = len(examples)
        self.batches_per_epoch = math.ceil(self.num_examples / global_batch)
        self._epoch, self._batch = 0, 0
        self._plan_cache: tuple[int, np.ndarray, np.ndarray] | None = None

    # -- the plan: which examples form each global batch, and its padded length ----------------

    def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """`([batches, G] example indices with -1 padding, [batches] padded lengths)`."""
        key = epoch if self.shuffle else 0  # evaluation reads the same order every epoch
        if self._plan_cache is None or self._plan_cache[0] != key:
            rows = self._epoch_rows(key)
            real = np.where(rows >= 0, self.lengths[np.maximum(rows, 0)], 0)
            bucket_ids = np.searchsorted(self.buckets, real.max(axis=1))  # smallest bucket >= max
            self._plan_cache = (key, rows, np.asarray(self.buckets)[bucket_ids])
        return self._plan_cache[1], self._plan_cache[2]

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        n, g = self.num_examples, self.global_batch
        if not self.shuffle:
            order = np.arange(n)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            chunk = self.group_chunk * g  # a multiple of G: no batch straddles two chunks
            for lo in range(0, n, chunk):
                part = order[lo : lo + chunk]
                order[lo : lo + chunk] = part[np.argsort(-self.lengths[part], kind="stable")]
        rows = np.full(self.batches_per_epoch * g, -1, dtype=np.int64)
        rows[:n] = order
        rows = rows.reshape(self.batches_per_epoch, g)
        if self.shuffle:
            rows = rows[rng.permutation(self.batches_per_epoch)]
        return rows

    # -- batches --------------------------------------------------------------------------------

    def batch_at(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `index` of `epoch`; does not move the iterator."""
        rows, seq_lens = self._plan(epoch)
        lo = self.process_index * self.local_batch
        local = rows[index, lo : lo + self.local_batch]
        seq_len = int(seq_lens[index])
        shape = (self.local_batch, seq_len)
        inputs = np.full(shape, self.pad_id, dtype=np.int32)
        token_types = np.zeros(shape, dtype=np.int32)
        segment_ids = np.zeros(shape, dtype=np.int32)
        for r, i in enumerate(local):
            if i >= 0:
                n = self.lengths[i]
                inputs[r, :n] = self._ids[i]
                token_types[r, : len(self._types[i])] = self._types[i]
                segment_ids[r, :n] = 1
        is_real = local >= 0
        batch = {
            "inputs": inputs,
            "token_types": token_types,
            "segment_ids": segment_ids,
            "positions": np.tile(np.arange(seq_len, dtype=np.int32), (self.local_batch, 1)),
            "example_index": local.astype(np.int32),
            "weights": is_real.astype(np.float32),
        }
        for name, values in self._fields.items():
            batch[name] = np.where(is_real, values[np.maximum(local, 0)], 0).astype(values.dtype)
        return batch

    # -- statistics -----------------------------------------------------------------------------

    @property
    def padding_fraction(self) -> float:
        """Padded tokens / all tokens over the current epoch's global batches (all processes)."""
        _, seq_lens = self._plan(self._epoch)
        return 1.0 - float(self.lengths.sum()) / float(seq_lens.sum() * self.global_batch)

    @property
    def shapes(self) -> frozenset[tuple[int, int]]:
        """The `(Bl, L)` input shapes of the current epoch's batches (one compile each)."""
        _, seq_lens = self._plan(self._epoch)
        return frozenset((self.local_batch, int(n)) for n in seq_lens)


def _check_args(
    global_batch: int,
    buckets: Sequence[int],
    seed: int,
    process_index: int,
    process_count: int,
    group_chunk: int,
) -> None:
    if global_batch < 1 or process_count < 1 or global_batch % process_count:
        raise ConfigError(
            f"batch size {global_batch} must be a positive multiple of the {process_count} "
            "processes; each process reads an equal slice of every batch"
        )
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is outside [0, {process_count})")
    buckets = list(buckets)
    if not buckets or buckets[0] < 1 or np.any(np.diff(buckets) <= 0):
        raise ConfigError(
            f"buckets={buckets} must be positive and strictly increasing; use bucket_lengths()"
        )
    if seed < 0:
        raise ConfigError(f"seed={seed} must be >= 0")
    if group_chunk < 1:
        raise ConfigError(f"group_chunk={group_chunk} must be >= 1")


def _scalar_fields(examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """`{name: [N] array}` for each scalar int/float field of the first example."""
    first = examples[0]
    names = [
        k
        for k, v in first.items()
        if k not in _SEQUENCE_KEYS + _SKIPPED_KEYS
        and isinstance(v, int | float | np.integer | np.floating)
        and not isinstance(v, bool | np.bool_)
    ]
    fields = {}
    for name in names:
        try:
            values = np.asarray([e[name] for e in examples])
        except KeyError:
            missing = next(i for i, e in enumerate(examples) if name not in e)
            raise DataError(
                f"example {missing} has no {name!r} field, which example 0 has; encode all "
                "examples the same way"
            ) from None
        if values.ndim != 1 or values.dtype.kind not in "iuf":
            raise DataError(f"field {name!r} is not a number in every example")
        fields[name] = values.astype(np.int32 if values.dtype.kind in "iu" else np.float32)
    return fields
