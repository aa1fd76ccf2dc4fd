"""Packing: the token stream of one split cut into fixed windows.

Causal (next-token) windows hold `max_seq_len + 1` tokens, as described below. Masked-LM
windows (`causal=False`) hold exactly `T` tokens, `[i*T, (i+1)*T)`, without overlap: `inputs`
and `targets` are both the window, `weights` are all zero, and the masking transform
(`masking.py`) corrupts the inputs and sets a weight on each position to predict.

Window `i` covers stream tokens `[i*T, i*T + T + 1)` for `T = max_seq_len`, so consecutive
windows overlap by one token and every token is a prediction target exactly once. Each window
becomes one example (all `[T]`, int32 unless noted):

    inputs       window[:-1]
    targets      window[1:]
    segment_ids  1, 2, ... for each document (piece) in the window; 0 marks padding
    positions    position within the document, restarting at 0 at each document start and at
                 the window start (a document cut by a window boundary continues as a new piece)
    weights      float32 1.0 where the target belongs to the same document as the input, else
                 0.0 (no loss across documents or on padding)

Documents were written as `[bos] tokens eos`, so `eos -> bos` of the next document is the only
masked pair and every real token of a document is learned. The last window is padded with the
pad id. Random access by index (no state), so grain can shuffle globally.
"""

from __future__ import annotations

import numpy as np

from plm_jax.data.prepare import TokenStore

FIELDS = ("inputs", "targets", "segment_ids", "positions", "weights")


class PackedWindows:
    """A grain-compatible random-access source of packed examples.

    Args:
      store: one split of a prepared corpus.
      seq_len: T, the model's `max_seq_len`.
      pad_id: token id written into padding.
      pad_to_multiple: append fully padded windows (weight 0) until the length is a multiple of
        this, so evaluation batches are all full and no real window is dropped.
    """

    def __init__(
        self,
        store: TokenStore,
        seq_len: int,
        pad_id: int,
        pad_to_multiple: int = 1,
        *,
        causal: bool = True,
    ):
        self.store, self.seq_len, self.pad_id, self.causal = store, seq_len, pad_id, causal
        shift = int(causal)  # causal windows reach one token further, for the last target
        n = store.num_tokens
        self.num_real = -(-(n - shift) // seq_len) if n >= 1 + shift else 0
        self._len = -(-self.num_real // pad_to_multiple) * pad_to_multiple

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        T, shift = self.seq_len, int(self.causal)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} out of range [0, {self._len})")
        start = index * T
        stop = min(start + T + shift, self.store.num_tokens) if index < self.num_real else start
        window = np.full(T + shift, self.pad_id, np.int32)
        segment = np.zeros(T + shift, np.int32)
        positions = np.zeros(T + shift, np.int32)
        count = max(stop - start, 0)
        if count:
            window[:count] = self.store.read(start, stop)
            idx = np.arange(start, stop)
            starts = self.store.doc_starts
            doc = np.searchsorted(starts, idx, side="right") - 1
            segment[:count] = doc - doc[0] + 1
            positions[:count] = idx - np.maximum(np.asarray(starts[doc]), start)
        if not self.causal:
            return {
                "inputs": window,
                "targets": window.copy(),
                "segment_ids": segment,
                "positions": positions,
                "weights": np.zeros(T, np.float32),
            }
        same_doc = (segment[:-1] == segment[1:]) & (segment[1:] != 0)
        return {
            "inputs": window[:-1],
            "targets": window[1:],
            "segment_ids": segment[:-1],
            "positions": positions[:-1],
            "weights": same_doc.astype(np.float32),
        }
