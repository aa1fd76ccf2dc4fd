"""Batches with grain: global shuffle from a seed, per-process slices, checkpointable state.

The global order of windows is one seeded shuffle per epoch (grain `MapDataset.shuffle` before
`repeat`, reseeded each epoch), identical on every process. Global batch `s` is windows
`[s*G, (s+1)*G)` of that order; process `p` of `P` reads only rows `[p*G/P, (p+1)*G/P)`, i.e. the
rows its devices hold in the batch sharding (devices are ordered process by process in the
mesh). Together the processes read exactly the single-process batch.

The iterator state is grain's `{"next_index": k}`: small, JSON-serialisable, and restoring it
yields exactly batch k+1 onward. Evaluation reads every window once, in order, padded up to
full batches with weight-0 windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from plm_jax.data.packing import PackedWindows
from plm_jax.errors import ConfigError

EVAL_MASK_SEED = 0x5EED  # evaluation masks are the same in every run and at every step


class BatchLoader:
    """This process's slice of each global batch: dicts of `[G/P, T]` numpy arrays.

    Args:
      windows: a random-access source (`PackedWindows`).
      global_batch: G, rows per global batch.
      seed: shuffle seed; None keeps file order (evaluation).
      process_index, process_count: which slice this process reads.
      repeat: loop over epochs forever (training) or stop after one pass (evaluation).
      num_threads, prefetch: grain read threads and prefetch buffer.
      transform: `fn(example, rng) -> example` applied to each example after the shuffle and
        repeat (masked-LM masking), with an `np.random.Generator` that grain derives from
        `transform_seed` and the example's position in the stream: reproducible, different in
        each epoch, and exactly resumable from the iterator state.
      transform_seed: the seed of `transform`'s generators.
    """

    def __init__(
        self,
        windows: PackedWindows,
        *,
        global_batch: int,
        seed: int | None,
        process_index: int = 0,
        process_count: int = 1,
        repeat: bool = True,
        num_threads: int = 2,
        prefetch: int = 4,
        transform: Callable[[dict[str, np.ndarray], np.random.Generator], dict] | None = None,
        transform_seed: int = 0,
    ):
        if global_batch % process_count:
            raise ConfigError(
                f"train.batch_size={global_batch} is not divisible by the {process_count} "
                "processes; each process reads an equal slice of every batch"
            )
        if len(windows) == 0:
            raise ConfigError(
                "the data split holds no windows; add data or lower model.max_seq_len"
            )
        self.local_batch = global_batch // process_count
        self.global_batch = global_batch
        ds = grain.MapDataset.source(windows)
        if seed is not None:
            ds = ds.shuffle(seed=seed)
        if repeat:
            ds = ds.repeat(None)
        if transform is not None:
            ds = ds.random_map(transform, seed=transform_seed)
        # Consecutive local batches b*P + p for p = 0..P-1 form global batch b.
        ds = ds.batch(self.local_batch, drop_remainder=True)
        self.batches_per_epoch = len(windows) // global_batch
        self._dataset = ds.slice(slice(process_index, None, process_count))
        self._options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        self._iter = iter(self._dataset.to_iter_dataset(self._options))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        """The position in the stream; `set_state` of it resumes at the next batch."""
        return dict(self._iter.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._iter.set_state(dict(state))


def eval_loader(
    windows: PackedWindows,
    *,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
    transform: Callable[[dict[str, np.ndarray], np.random.Generator], dict] | None = None,
) -> BatchLoader:
    """One ordered pass over every window; `windows` must be padded to a multiple of the batch.

    A `transform` (masking) runs with a fixed seed, so every evaluation sees the same masks.
    """
    if len(windows) % global_batch:
        raise ValueError("eval windows must be padded to a multiple of the global batch")
    return BatchLoader(
        windows,
        global_batch=global_batch,
        seed=None,
        process_index=process_index,
        process_count=process_count,
        repeat=False,
        num_threads=1,
        prefetch=2,
        transform=transform,
        transform_seed=EVAL_MASK_SEED,
    )
