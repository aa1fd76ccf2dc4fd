"""T5 span corruption: one packed window of documents in, encoder inputs and decoder targets out.

`SpanCorruption` is a per-example numpy transform for grain's `MapDataset.random_map`, the
encoder-decoder counterpart of `masking.py`. It reads a raw window of `PackedWindows(...,
causal=False)` (`inputs` and `segment_ids`: documents kept apart by segment ids, 0 = padding)
and corrupts each document on its own, as T5 does (Raffel et al. 2020, section 3.1.4;
`t5.data.preprocessors.span_corruption` with `random_spans_noise_mask`):

    content     the document's tokens without its final eos (the end-of-document marker);
                c = len(content)
    num_noise   n = round(c * noise_density), clipped to [1, c - 1]
    num_spans   s = max(1, round(n / mean_span_length)), at most min(n, c - n) (every span holds
                a token) and at most the number of sentinels (spans then get longer)
    mask        the n noise tokens cut into s non-empty spans and the c - n others into s
                non-empty spans, at uniformly random cut points ("random segmentation"); the
                spans alternate, kept tokens first, so a document always starts with kept
                tokens and ends with a noise span (T5 without `random_roll`)
    encoder     content with noise span k replaced by sentinel k (<extra_id_k>), then eos
    decoder     sentinel 0, span 0, sentinel 1, span 1, ..., span s-1, then eos

For example, content "a b c d e f g h" with noise {c, d, h} gives the encoder input
"a b <extra_id_0> e f g <extra_id_1> </s>" and the target "<extra_id_0> c d <extra_id_1> h </s>".
Sentinels restart at <extra_id_0> in each document. Rounding is half-to-even, as in T5. A
document's bos (data.add_bos) is content like any token; being first, it is always kept.

Output (int32 except `weights`): `inputs`, `segment_ids`, `positions` of length
`encoder_len` (model.max_seq_len), and `decoder_inputs`, `decoder_segment_ids`,
`decoder_positions`, `targets`, `weights` of length `decoder_len`. The k-th document placed
gets segment id k on both sides, positions restart at 0, `decoder_inputs` are the targets
shifted right within the document behind the pad id (T5's decoder start id), and `weights` are
1.0 at real target tokens. Padding: pad id, segment 0, position 0, weight 0. The window's other
fields (`targets`, `weights`) are dropped.

Documents left out (they become padding on both sides): a document with fewer than 2 content
tokens, which cannot be split into kept and noise tokens (nothing to predict); and, when short
documents crowd a window, any document whose corrupted form no longer fits the room the
documents before it left. `span_corruption_lengths` sizes the window so that the second never
happens unless whole documents are shorter than `min_doc_len` tokens.

Reproducibility: as in `masking.py`, the transform draws only from the generator grain derives
from the seed and the element's index, so element k's corruption is a pure function of (seed,
k), restored exactly on resume, and fresh in each epoch. What it leaves out: T5's chunks that
run across document boundaries (`reduce_concat_tokens`), the mask's random roll, and other
denoising objectives (prefix LM, UL2 mixtures).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# Whole documents at least this many content tokens long never overflow a window sized by
# `span_corruption_lengths`. Shorter ones have proportionally more overhead (their own eos,
# at least one sentinel and noise token, rounding up); a lower value grows the decoder and
# shrinks the raw window, a higher one leaves out more short documents (see the table there).
MIN_DOC_LEN = 24

_KEPT, _NOISE, _EOS = 0, 1, 2  # kinds of token runs in a corrupted document


def span_counts(
    content_len: np.ndarray | int,
    noise_density: float,
    mean_span_length: float,
    max_spans: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Noise tokens n and noise spans s of documents with `content_len` >= 2 tokens.

    Returns:
      (n, s), int64 arrays shaped like `content_len` (see the module docstring for the rule).
    """
    c = np.asarray(content_len, np.int64)
    n = np.minimum(np.maximum(np.rint(c * noise_density).astype(np.int64), 1), c - 1)
    s = np.maximum(np.rint(n / mean_span_length).astype(np.int64), 1)
    s = np.minimum(s, np.minimum(n, c - n))
    if max_spans is not None:
        s = np.minimum(s, max_spans)
    return n, s


def span_corruption_lengths(
    encoder_len: int,
    noise_density: float,
    mean_span_length: float,
    *,
    min_doc_len: int = MIN_DOC_LEN,
) -> tuple[int, int]:
    """The raw window length R to read and the decoder length that hold its corrupted documents.

    T5's `random_spans_helper` sizes one chunk of text: the longest R whose corrupted form,
    R - n + s + 1 tokens with its eos, fits the encoder ((568, 114) for (512, 0.15, 3.0)).
    A packed window holds several documents, and each pays its own eos and rounding, so the
    sizes here are bounded over packings. A document of c content tokens takes
    e(c) = c - n + s + 1 encoder and d(c) = n + s + 1 decoder tokens, and w(c) = c + 1 raw
    tokens with its eos. Only the piece cut by the window's end lacks its eos (prepared data
    ends every document with one), so the pieces of a window have sum(w) <= R + 1. With

        a = max e(c) / w(c) over min_doc_len <= c,   b = max(0, max e(c) - a * w(c) over c >= 2)

    every window whose whole documents have at least min_doc_len content tokens (the two
    pieces cut by the window's edges may be any length) needs at most
    a * sum(w over whole documents) + (a * w + b) for each edge piece <= a * (R + 1) + 2 b
    encoder tokens. R is the largest with a * (R + 1) + 2 b <= encoder_len, and the decoder
    length is floor(r * (R + 1) + 2 q) with r, q the same maxima for d. Both are computed in
    exact integer arithmetic. Clamping the span count to the number of sentinels shortens
    both sides, so it keeps the bound. Other windows are fitted by leaving documents out.

        encoder_len, density, span   T5 (R, decoder)   here (R, decoder)
        512, 0.15, 3.0               568, 114          554, 143
        128, 0.15, 3.0               141, 29           136, 38

    Measured on documents of the builtin stdlib-docstring corpus (median 28 tokens), windows
    sized this way are about 97% full on the encoder side and 80% on the decoder side, and
    leave out under 0.1% of the tokens.

    Args:
      encoder_len: the encoder length, model.max_seq_len.
      noise_density: share of content tokens replaced, in (0, 1).
      mean_span_length: mean noise span length, >= 1.
      min_doc_len: content length above which no whole document is ever left out.

    Returns:
      (raw_len, decoder_len).

    Raises:
      ValueError: an argument out of range, or an encoder too short for any corruption.
    """
    _check_args(encoder_len, noise_density, mean_span_length, min_doc_len)
    # e(c) >= c (1 - d) + 1.5, so no document of `limit` or more content tokens fits alone.
    limit = int((encoder_len - 1.5) / (1 - noise_density)) + 1
    c = np.arange(2, max(limit, 3) + 1, dtype=np.int64)
    n, s = span_counts(c, noise_density, mean_span_length)
    enc, dec, w = c - n + s + 1, n + s + 1, c + 1
    whole = c >= min(min_doc_len, c[-1])
    enc_num, enc_den = _max_ratio(enc[whole], w[whole])
    enc_slack = max(0, int(np.max(enc * enc_den - enc_num * w)))  # b * enc_den
    raw_len = min((encoder_len * enc_den - 2 * enc_slack) // enc_num - 1, limit - 1)
    if raw_len < 2:
        raise ValueError(
            f"encoder_len={encoder_len} is too short for span corruption: a window must hold "
            "a document of at least 2 tokens; use a longer model.max_seq_len"
        )
    dec_num, dec_den = _max_ratio(dec[whole], w[whole])
    dec_slack = max(0, int(np.max(dec * dec_den - dec_num * w)))
    decoder_len = (dec_num * (raw_len + 1) + 2 * dec_slack) // dec_den
    return int(raw_len), int(decoder_len)


class SpanCorruption:
    """Corrupts the documents of one raw packed window into T5 inputs and targets.

    Pass it to grain's `random_map` (or as `transform` of `BatchLoader`) over windows of
    `raw_len` tokens; shorter windows work too.

    Args:
      sentinel_ids: ids of <extra_id_0>, <extra_id_1>, ..., in that order.
      eos_id: end of sequence; ends each document's encoder input and target.
      pad_id: padding, and the decoder start id in front of each target.
      encoder_len: encoder length of the output, model.max_seq_len.
      noise_density: share of each document's content tokens replaced, in (0, 1).
      mean_span_length: mean length of a noise span, >= 1.
      min_doc_len: see `span_corruption_lengths`.

    Attributes:
      raw_len, decoder_len: from `span_corruption_lengths`.

    Raises:
      ValueError: an argument out of range; no sentinels, repeated ones, or eos/pad among them.
    """

    def __init__(
        self,
        *,
        sentinel_ids: Sequence[int],
        eos_id: int,
        pad_id: int,
        encoder_len: int,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
        min_doc_len: int = MIN_DOC_LEN,
    ):
        self.raw_len, self.decoder_len = span_corruption_lengths(
            encoder_len, noise_density, mean_span_length, min_doc_len=min_doc_len
        )
        sentinels = [int(i) for i in sentinel_ids]
        if not sentinels:
            raise ValueError(
                "span corruption needs sentinel ids (<extra_id_0>, ...); got none. Use a "
                "tokenizer with sentinels (tokenizer.num_sentinels for one trained by plm_jax)"
            )
        if len(set(sentinels)) != len(sentinels) or {eos_id, pad_id} & set(sentinels):
            raise ValueError(
                f"sentinel ids must be distinct and differ from eos_id={eos_id} and "
                f"pad_id={pad_id}; got {sentinels}"
            )
        if min(sentinels) < 0 or min(eos_id, pad_id) < 0:
            raise ValueError("sentinel, eos and pad ids must be >= 0")
        self.sentinel_ids = np.asarray(sentinels, np.int32)
        self.eos_id, self.pad_id, self.encoder_len = eos_id, pad_id, encoder_len
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        *,
        encoder_len: int,
        noise_density: float = 0.15,
        mean_span_length: float = 3.0,
    ) -> SpanCorruption:
        """A transform with `tokenizer`'s sentinel, eos and pad ids.

        Raises:
          ConfigError: the tokenizer has no sentinels (from `tokenizer.sentinel_ids`).
        """
        return cls(
            sentinel_ids=tokenizer.sentinel_ids,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
            encoder_len=encoder_len,
            noise_density=noise_density,
            mean_span_length=mean_span_length,
        )

    def __call__(
        self, example: dict[str, np.ndarray], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Corrupts one window.

        Args:
          example: `inputs` ([T] int ids) and `segment_ids` ([T] int, 0 = padding).
          rng: the generator grain derives from the seed and the element's index.

        Returns:
          A new dict of the eight fields in the module docstring: `[encoder_len]` encoder
          fields, `[decoder_len]` decoder fields.
        """
        tokens = np.asarray(example["inputs"])
        starts, lengths = _documents(np.asarray(example["segment_ids"]))
        content = lengths - (tokens[starts + lengths - 1] == self.eos_id)
        n, s = span_counts(
            np.maximum(content, 2),  # shorter documents are never placed
            self.noise_density,
            self.mean_span_length,
            max_spans=len(self.sentinel_ids),
        )
        enc_len, dec_len = content - n + s + 1, n + s + 1
        placed = _place(content >= 2, enc_len, dec_len, self.encoder_len, self.decoder_len)
        starts, content, n, s = starts[placed], content[placed], n[placed], s[placed]
        enc_len, dec_len = enc_len[placed], dec_len[placed]

        # Each document as runs of tokens: kept span 0, noise span 0, ..., noise span s-1,
        # then its eos. Counting spans over all documents, kept span g is run 2g + (the index
        # of its document, for the eos runs before it) and its noise span the run after it.
        num_docs, num_spans = len(s), int(s.sum())
        lengths = _random_segmentation(np.concatenate([content - n, n]), np.tile(s, 2), rng)
        span_doc = np.repeat(np.arange(num_docs), s)
        kept_run = 2 * np.arange(num_spans) + span_doc
        run_len = np.ones(2 * num_spans + num_docs, np.int64)  # eos runs keep length 1
        run_len[kept_run], run_len[kept_run + 1] = lengths[:num_spans], lengths[num_spans:]
        run_kind = np.full(run_len.size, _EOS, np.int8)
        run_kind[kept_run], run_kind[kept_run + 1] = _KEPT, _NOISE
        kind = np.repeat(run_kind, run_len)  # [C + P] per token
        run_start = np.cumsum(run_len) - run_len
        # The window's tokens with each document's eos slot (past a piece cut by the window's
        # end it holds another token, or none: clipped, then overwritten with eos).
        slots = content + 1
        index = np.arange(int(slots.sum())) + np.repeat(starts - (np.cumsum(slots) - slots), slots)
        toks = tokens[np.minimum(index, tokens.size - 1)].astype(np.int32)
        toks[kind == _EOS] = self.eos_id
        sentinel = self.sentinel_ids[np.arange(num_spans) - np.repeat(np.cumsum(s) - s, s)]

        out = {}
        out["inputs"], out["segment_ids"], out["positions"] = self._side(
            toks, kind, _NOISE, run_start[kept_run + 1], sentinel, enc_len, self.encoder_len
        )
        targets, dec_seg, dec_pos = self._side(
            toks, kind, _KEPT, run_start[kept_run], sentinel, dec_len, self.decoder_len
        )
        decoder_inputs = np.full_like(targets, self.pad_id)
        decoder_inputs[1:] = targets[:-1]
        decoder_inputs[dec_pos == 0] = self.pad_id  # T5's decoder start; padding too
        out["decoder_inputs"], out["decoder_segment_ids"] = decoder_inputs, dec_seg
        out["decoder_positions"], out["targets"] = dec_pos, targets
        out["weights"] = (dec_seg != 0).astype(np.float32)
        return out

    def _side(
        self,
        toks: np.ndarray,
        kind: np.ndarray,
        replaced: int,
        span_starts: np.ndarray,
        sentinel: np.ndarray,
        lengths: np.ndarray,
        size: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One side's row, T5's `noise_span_to_unique_sentinel`: spans of `replaced` kind
        become their sentinels; the other tokens and each eos stay.

        Args:
          toks: [C + P] the documents' content tokens, each followed by eos.
          kind: [C + P] _KEPT, _NOISE or _EOS per token.
          replaced: _NOISE for the encoder, _KEPT for the decoder.
          span_starts: [S] index in `toks` of the first token of each span of `replaced` kind.
          sentinel: [S] its sentinel id.
          lengths: per document, its length on this side; sum(lengths) <= size.

        Returns:
          (tokens, segment_ids, positions), each `[size]` int32, padded.
        """
        keep = kind != replaced
        keep[span_starts] = True
        ids = toks.copy()
        ids[span_starts] = sentinel
        used = int(lengths.sum())
        row = np.full(size, self.pad_id, np.int32)
        row[:used] = ids[keep]
        segment = np.zeros(size, np.int32)
        segment[:used] = np.repeat(np.arange(1, lengths.size + 1, dtype=np.int32), lengths)
        positions = np.zeros(size, np.int32)
        positions[:used] = np.arange(used) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return row, segment, positions


def _check_args(
    encoder_len: int, noise_density: float, mean_span_length: float, min_doc_len: int
) -> None:
    if not 0.0 < noise_density < 1.0:
        raise ValueError(
            f"noise_density={noise_density} must be in (0, 1); T5 uses 0.15 (noise tokens "
            "per content token)"
        )
    if not 1.0 <= mean_span_length < float("inf"):
        raise ValueError(f"mean_span_length={mean_span_length} must be >= 1; T5 uses 3.0")
    if encoder_len < 3:
        raise ValueError(f"encoder_len={encoder_len} must be at least 3 (kept, sentinel, eos)")
    if min_doc_len < 2:
        raise ValueError(f"min_doc_len={min_doc_len} must be at least 2")


def _max_ratio(num: np.ndarray, den: np.ndarray) -> tuple[int, int]:
    """The largest num[i] / den[i] (den > 0) as an exact (numerator, denominator) pair."""
    i = int(np.argmax(num / den))
    while True:  # floats find it; integers confirm it (each step strictly raises the ratio)
        j = int(np.argmax(num * den[i] - num[i] * den))
        if num[j] * den[i] <= num[i] * den[j]:
            return int(num[i]), int(den[i])
        i = j


def _documents(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of each run of one nonzero segment id, left to right."""
    real = segments != 0
    start, end = real.copy(), real.copy()
    start[1:] &= segments[1:] != segments[:-1]
    end[:-1] &= segments[:-1] != segments[1:]
    starts = np.flatnonzero(start)
    return starts, np.flatnonzero(end) + 1 - starts


def _place(
    eligible: np.ndarray, enc_len: np.ndarray, dec_len: np.ndarray, enc_room: int, dec_room: int
) -> np.ndarray:
    """Indices of the documents kept: in window order, each one that still fits both sides."""
    placed = []
    for j, (ok, e, d) in enumerate(
        zip(eligible.tolist(), enc_len.tolist(), dec_len.tolist(), strict=True)
    ):
        if ok and e <= enc_room and d <= dec_room:
            placed.append(j)
            enc_room -= e
            dec_room -= d
    return np.asarray(placed, np.int64)


def _random_segmentation(
    items: np.ndarray, segments: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Cuts each group of `items[g]` >= `segments[g]` >= 1 items into that many non-empty runs.

    The `segments[g] - 1` cut points are a uniformly random subset of the `items[g] - 1` gaps
    between the group's items (the smallest of one uniform key per gap), as T5's
    `_random_segmentation` chooses them by shuffling a vector of ones and zeros.

    Returns:
      [sum(segments)] int64: the run lengths, group after group.
    """
    total = int(items.sum())
    group = np.repeat(np.arange(len(items)), items)
    first = np.cumsum(items) - items
    # Keys in [2g, 2g + 1) for the gaps of group g; its first item (no gap before it) gets
    # 2g + 1.5, last in the group. One sort then ranks the gaps of every group at once.
    keys = rng.random(total) + 2 * group
    keys[first] = 2 * np.arange(len(items)) + 1.5
    order = np.argsort(keys)
    rank = np.arange(total) - np.repeat(first, items)  # rank within the group, sorted order
    starts = np.zeros(total, bool)
    starts[order[rank < np.repeat(segments - 1, items)]] = True
    starts[first] = True
    bounds = np.flatnonzero(starts)
    return np.diff(bounds, append=total)
