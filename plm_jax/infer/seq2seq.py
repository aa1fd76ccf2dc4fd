"""Greedy and beam-search decoding for the encoder-decoder (T5 style), with the KV cache.

Each search is one jitted program: the encoder runs once per batch (`model.encode`),
`model.init_cache` computes the cross-attention K/V once, and a `jax.lax.while_loop` feeds one
token per step (`model.decode(..., cache=...)`), exiting as soon as every row is finished. The
decoder starts from `pad_id` (T5's `decoder_start_token_id`), and positions after a
hypothesis's eos hold `pad_id`. A program compiles once per (model structure, batch size,
source length, max_len, beam_size, early_stopping); the length penalty and special ids are
traced, so changing them does not recompile.

Beam search follows Hugging Face's (transformers 5) `_beam_search`, so converted T5 models
give the same hypotheses:
  * each step takes the top `2 * beam_size` continuations of all live beams by summed
    log-probability; of these, the ones ending in eos *and* ranked below `beam_size` become
    finished hypotheses, and the best `beam_size` not ending in eos are the next live beams
    (their caches gathered with `cache.take_rows`). At step `max_len` every candidate counts
    as finished.
  * a finished hypothesis scores `sum log-probs / length ** length_penalty`, its length being
    the generated tokens including the eos (the start token excluded); each row keeps the best
    `beam_size` of them and returns the best.
  * `early_stopping=True` closes a row once it holds `beam_size` finished hypotheses.
    `early_stopping=False` (HF's heuristic) closes it once it holds `beam_size` and the best
    live beam's summed log-prob divided by its current length ** length_penalty is no better
    than the worst of them; "never" divides by `max_len` instead when length_penalty > 0.
    "never" is exact (no live beam could still enter the kept set), and so is False when
    length_penalty <= 0; False with length_penalty > 0 may stop before a longer, better
    hypothesis. A closed row accepts no more hypotheses.
Greedy decoding equals beam search with `beam_size=1, early_stopping=True`.

`Seq2SeqDecoder` is the host-side, batched API: fixed batch size (a short last batch is padded
with copies of its first source), sources right-padded to a few bucket lengths, fixed
`max_len`, so a whole corpus decodes with one compilation per bucket. `decode_texts` wraps it
with the tokenizer: sources are `encode(text) + [eos]`, outputs are cut at eos and decoded.

What it leaves out: sampling, n-best lists (only the best hypothesis is returned), a minimum
length, repetition penalties, constrained decoding and sharding (arrays stay where they are).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.errors import ConfigError, DataError
from plm_jax.infer.score import check_vocab
from plm_jax.tasks.batching import bucket_lengths
from plm_jax.tokenizer import Tokenizer

if TYPE_CHECKING:
    from plm_jax.models.encoder_decoder import EncoderDecoder

__all__ = [
    "DecodeOutput",
    "Hypothesis",
    "Seq2SeqDecoder",
    "beam_search",
    "decode_texts",
    "greedy_decode",
]

EarlyStopping = bool | Literal["never"]
MIN_SOURCE_BUCKET = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeOutput:
    """The best hypothesis of each row.

    Attributes:
      tokens: [B, max_len] int32 generated ids (start token excluded), `pad_id` after the eos.
      scores: [B] float32; beam search: sum log-probs / length ** length_penalty; greedy: the
        sum of log-probs.
      lengths: [B] int32 generated tokens, the eos included when there is one.
    """

    tokens: jax.Array
    scores: jax.Array
    lengths: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Settings:
    """Traced settings, all [] arrays: changing them does not recompile."""

    eos_id: jax.Array  # int32
    pad_id: jax.Array  # int32; also the decoder start id
    vocab_size: jax.Array  # int32; ids at or above it are never produced
    length_penalty: jax.Array  # float32


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    """One source's output: `token_ids` ends with the eos when `is_finished` (else it stopped at
    max_len); `score` as in `DecodeOutput.scores`."""

    token_ids: list[int]
    score: float
    is_finished: bool


def greedy_decode(
    model: EncoderDecoder,
    tokens: jax.Array,
    segment_ids: jax.Array,
    *,
    max_len: int,
    eos_id: int,
    pad_id: int,
    vocab_size: int | None = None,
) -> DecodeOutput:
    """Argmax decoding of a batch of sources (one jitted program per shape).

    Args:
      model: the encoder-decoder.
      tokens: [B, S] int32 source ids, right-padded.
      segment_ids: [B, S] int32, 1 on source tokens, 0 on padding.
      max_len: the most generated tokens per row (static), eos included.
      eos_id: a row ends after producing it.
      pad_id: the decoder start id and the filler after eos.
      vocab_size: produce only ids below this; None = the model's vocabulary.

    Returns:
      `DecodeOutput`; scores are the sums of log-probs.

    Raises:
      ConfigError: max_len < 1, or an id outside the vocabulary.
    """
    settings = _settings(model, max_len, 1, 0.0, eos_id, pad_id, vocab_size)
    graphdef, state = nnx.split(model)
    return _compiled(graphdef, "greedy", max_len)(state, tokens, segment_ids, settings)


def beam_search(
    model: EncoderDecoder,
    tokens: jax.Array,
    segment_ids: jax.Array,
    *,
    beam_size: int,
    max_len: int,
    eos_id: int,
    pad_id: int,
    length_penalty: float = 1.0,
    early_stopping: EarlyStopping = True,
    vocab_size: int | None = None,
) -> DecodeOutput:
    """Beam search over a batch of sources, with Hugging Face's semantics (module docstring).

    Args:
      model: the encoder-decoder.
      tokens: [B, S] int32 source ids, right-padded.
      segment_ids: [B, S] int32, 1 on source tokens, 0 on padding.
      beam_size: live beams and kept hypotheses per row (static).
      max_len: the most generated tokens per hypothesis (static), eos included.
      eos_id: ends a hypothesis.
      pad_id: the decoder start id and the filler after eos.
      length_penalty: hypotheses score sum log-probs / length ** length_penalty; > 0 favours
        longer outputs, 0 compares plain sums.
      early_stopping: True, False or "never" (static); see the module docstring.
      vocab_size: produce only ids below this; None = the model's vocabulary.

    Returns:
      `DecodeOutput` of each row's best finished hypothesis.

    Raises:
      ConfigError: a setting out of range.
    """
    settings = _settings(model, max_len, beam_size, length_penalty, eos_id, pad_id, vocab_size)
    _check_early_stopping(early_stopping)
    graphdef, state = nnx.split(model)
    program = _compiled(graphdef, "beam", max_len, beam_size, early_stopping)
    return program(state, tokens, segment_ids, settings)


def _settings(model, max_len, beam_size, length_penalty, eos_id, pad_id, vocab_size) -> _Settings:
    """Checks the settings shared by both searches; returns the traced ones."""
    _check_search(max_len, beam_size, length_penalty)
    model_vocab = model.cfg.vocab_size
    vocab_size = model_vocab if vocab_size is None else min(vocab_size, model_vocab)
    if 2 * beam_size > vocab_size:
        raise ConfigError(
            f"beam_size={beam_size} is more than half the vocabulary ({vocab_size} ids): each "
            "step keeps 2 * beam_size candidates; use a smaller beam_size"
        )
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if not 0 <= value < vocab_size:
            raise ConfigError(f"{name}={value} is outside the vocabulary [0, {vocab_size})")
    return _Settings(
        eos_id=jnp.int32(eos_id),
        pad_id=jnp.int32(pad_id),
        vocab_size=jnp.int32(vocab_size),
        length_penalty=jnp.float32(length_penalty),
    )


def _check_search(max_len: int, beam_size: int, length_penalty: float) -> None:
    """Raises ConfigError for a search setting out of range."""
    if max_len < 1:
        raise ConfigError(f"max_len={max_len} must be at least 1 (generated tokens, eos included)")
    if beam_size < 1:
        raise ConfigError(f"beam_size={beam_size} must be at least 1")
    if not math.isfinite(length_penalty):
        raise ConfigError(f"length_penalty={length_penalty} must be a finite number")


def _check_early_stopping(early_stopping: EarlyStopping) -> None:
    if not (isinstance(early_stopping, bool) or early_stopping == "never"):
        raise ConfigError(f"early_stopping={early_stopping!r} must be True, False or 'never'")


def _log_probs(logits: jax.Array, settings: _Settings) -> jax.Array:
    """[R, V] logits -> [R, V] float32 log-probabilities over the ids below `vocab_size`."""
    vocab = jnp.arange(logits.shape[-1])
    logits = jnp.where(vocab < settings.vocab_size, logits.astype(jnp.float32), -jnp.inf)
    return jax.nn.log_softmax(logits, axis=-1)


def _start(model, tokens, segment_ids, max_len):
    """Runs the encoder once: (encoded [B, S, D], cache with the cross-attention K/V)."""
    encoded = model.encode(tokens, segment_ids=segment_ids)
    return encoded, model.init_cache(encoded, segment_ids, max_len)


def _step_logits(model, last, step, encoded, segment_ids, cache):
    """Feeds `last` [R] at position `step`: ([R, V] logits, updated cache)."""
    rows = last.shape[0]
    out = model.decode(
        last[:, None],
        encoded,
        encoder_segment_ids=segment_ids,
        positions=jnp.full((rows, 1), step, jnp.int32),
        segment_ids=jnp.ones((rows, 1), jnp.int32),
        cache=cache,
    )
    return out.logits[:, 0], out.cache


def _output_lengths(tokens: jax.Array, eos_id: jax.Array) -> jax.Array:
    """[B, T] hypotheses -> [B] generated lengths, through the first eos or all T."""
    is_eos = tokens == eos_id
    return jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, tokens.shape[1])


def _greedy_program(state, tokens, segment_ids, settings: _Settings, *, graphdef, max_len):
    """The jitted greedy search; see `greedy_decode`."""
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    encoded, cache = _start(model, tokens, segment_ids, max_len)
    out = jnp.full((batch, max_len), settings.pad_id, jnp.int32)
    scores = jnp.zeros((batch,), jnp.float32)
    last = jnp.full((batch,), settings.pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry):
        step, *_, done = carry
        return (step < max_len) & ~jnp.all(done)

    def body(carry):
        step, cache, last, out, scores, done = carry
        logits, cache = _step_logits(model, last, step, encoded, segment_ids, cache)
        logp = _log_probs(logits, settings)
        ids = jnp.argmax(logp, axis=-1).astype(jnp.int32)
        ids = jnp.where(done, settings.pad_id, ids)  # a finished row writes padding
        picked = jnp.take_along_axis(logp, ids[:, None], axis=1)[:, 0]
        scores = scores + jnp.where(done, 0.0, picked)
        out = jax.lax.dynamic_update_slice(out, ids[:, None], (0, step))
        return step + 1, cache, ids, out, scores, done | (ids == settings.eos_id)

    init = (jnp.int32(0), cache, last, out, scores, done)
    _, _, _, out, scores, _ = jax.lax.while_loop(cond, body, init)
    return DecodeOutput(out, scores, _output_lengths(out, settings.eos_id))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Beams:
    """The beam-search loop state; B rows of K beams, T = max_len."""

    step: jax.Array  # [] int32, tokens generated so far by the live beams
    cache: object  # the model's Seq2SeqCache over B * K rows
    live_tokens: jax.Array  # [B, K, T] int32, pad_id after the step
    live_scores: jax.Array  # [B, K] float32 summed log-probs, best first; -inf = no beam
    done_tokens: jax.Array  # [B, K, T] int32 finished hypotheses, best first
    done_scores: jax.Array  # [B, K] float32 length-penalised; -inf = empty slot
    is_done: jax.Array  # [B, K] bool, the slot holds a finished hypothesis
    is_open: jax.Array  # [B] bool, the row still accepts hypotheses


def _beam_program(
    state, tokens, segment_ids, settings: _Settings, *, graphdef, max_len, beam_size, early_stopping
):
    """The jitted beam search; see `beam_search`."""
    model = nnx.merge(graphdef, state)
    batch, beams = tokens.shape[0], beam_size
    encoded, cache = _start(model, tokens, segment_ids, max_len)
    expand = jnp.repeat(jnp.arange(batch), beams)  # row b -> rows b*K .. b*K + K-1
    encoded, segment_ids, cache = encoded[expand], segment_ids[expand], cache.take_rows(expand)
    filler = jnp.full((batch, beams, max_len), settings.pad_id, jnp.int32)
    # Only beam 0 is live at first, so the K starts do not yield K copies of one continuation.
    live = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)
    init = _Beams(
        step=jnp.int32(0),
        cache=cache,
        live_tokens=filler,
        live_scores=jnp.broadcast_to(live, (batch, beams)).astype(jnp.float32),
        done_tokens=filler,
        done_scores=jnp.full((batch, beams), -jnp.inf, jnp.float32),
        is_done=jnp.zeros((batch, beams), bool),
        is_open=jnp.ones((batch,), bool),
    )

    def cond(s: _Beams):
        return (s.step < max_len) & jnp.any(s.is_open)

    def body(s: _Beams) -> _Beams:
        prev = jax.lax.dynamic_index_in_dim(s.live_tokens, s.step - 1, axis=2, keepdims=False)
        last = jnp.where(s.step == 0, settings.pad_id, prev).reshape(-1)
        logits, cache = _step_logits(model, last, s.step, encoded, segment_ids, s.cache)
        logp = _log_probs(logits, settings).reshape(batch, beams, -1)
        return _beam_update(s, cache, logp, settings, max_len, early_stopping)

    final = jax.lax.while_loop(cond, body, init)
    best = final.done_tokens[:, 0]
    return DecodeOutput(best, final.done_scores[:, 0], _output_lengths(best, settings.eos_id))


def _beam_update(s: _Beams, cache, logp, settings: _Settings, max_len, early_stopping) -> _Beams:
    """One beam step from the live beams' next-token log-probs `logp` [B, K, V]."""
    batch, beams, vocab = logp.shape
    total = (s.live_scores[:, :, None] + logp).reshape(batch, beams * vocab)
    cand_scores, flat = jax.lax.top_k(total, 2 * beams)  # [B, 2K], best first
    parent, cand_ids = flat // vocab, (flat % vocab).astype(jnp.int32)
    cand_tokens = jnp.take_along_axis(s.live_tokens, parent[:, :, None], axis=1)
    at_step = jnp.arange(max_len) == s.step
    cand_tokens = jnp.where(at_step, cand_ids[:, :, None], cand_tokens)
    ends = (cand_ids == settings.eos_id) | (s.step == max_len - 1)

    # Finished: only candidates ranked below K, and only while the row is open.
    length = (s.step + 1).astype(jnp.float32)  # generated tokens, the new one included
    is_new = ends & (jnp.arange(2 * beams) < beams) & s.is_open[:, None]
    penalised = jnp.where(is_new, cand_scores / length**settings.length_penalty, -jnp.inf)
    merged = jnp.concatenate([s.done_scores, penalised], axis=1)
    done_scores, keep = jax.lax.top_k(merged, beams)  # ties keep the earlier hypothesis
    done_tokens = jnp.take_along_axis(
        jnp.concatenate([s.done_tokens, cand_tokens], axis=1), keep[:, :, None], axis=1
    )
    is_done = jnp.take_along_axis(jnp.concatenate([s.is_done, is_new], axis=1), keep, axis=1)

    # Live: the best K candidates that did not end.
    live_scores, pick = jax.lax.top_k(jnp.where(ends, -jnp.inf, cand_scores), beams)
    live_tokens = jnp.take_along_axis(cand_tokens, pick[:, :, None], axis=1)
    rows = jnp.arange(batch)[:, None] * beams + jnp.take_along_axis(parent, pick, axis=1)
    cache = cache.take_rows(rows.reshape(-1))

    is_full = jnp.all(is_done, axis=1)
    is_open = s.is_open & _can_improve(
        live_scores[:, 0], done_scores, is_full, length, settings, max_len, early_stopping
    )
    if early_stopping is True:
        is_open = is_open & ~is_full
    return _Beams(
        step=s.step + 1,
        cache=cache,
        live_tokens=live_tokens,
        live_scores=live_scores,
        done_tokens=done_tokens,
        done_scores=done_scores,
        is_done=is_done,
        is_open=is_open,
    )


def _can_improve(best_live, done_scores, is_full, length, settings, max_len, early_stopping):
    """[B] bool: HF's heuristic that the best live beam could still beat the worst kept
    hypothesis (always True while fewer than K are kept)."""
    lp = settings.length_penalty
    if early_stopping == "never":  # the most favourable length a live beam could reach
        length = jnp.where(lp > 0, jnp.float32(max_len), length)
    worst = jnp.where(is_full, jnp.min(done_scores, axis=1), -jnp.inf)
    return best_live / length**lp > worst


@functools.lru_cache(maxsize=32)
def _compiled(graphdef: nnx.GraphDef, kind: str, max_len: int, beam_size=1, early_stopping=True):
    """One jitted program per model structure and static settings; jit keys on [B, S]."""
    if kind == "greedy":
        program = functools.partial(_greedy_program, graphdef=graphdef, max_len=max_len)
    else:
        program = functools.partial(
            _beam_program,
            graphdef=graphdef,
            max_len=max_len,
            beam_size=beam_size,
            early_stopping=early_stopping,
        )
    return jax.jit(program)


class Seq2SeqDecoder:
    """Decodes any number of sources with a fixed set of compiled shapes.

    Sources are sorted by length, cut into batches of `batch_size` (the last one filled with
    copies of its first source) and right-padded to the smallest bucket of
    `bucket_lengths(max_source_len, min_len=min_bucket)` that holds the batch's longest, so
    decoding compiles at most once per bucket (`shapes`), whatever the data. Results come back
    in input order and do not depend on batching (up to float rounding, about 1e-6).

    Args:
      batch_size: sources per compiled batch.
      max_len: the most generated tokens per source, eos included.
      max_source_len: the longest source in tokens (its eos included); the largest bucket.
      eos_id: ends a hypothesis.
      pad_id: the decoder start id and source/output padding.
      beam_size: beams per source; 1 with `early_stopping=True` runs the cheaper greedy
        program (the same result).
      length_penalty, early_stopping: as in `beam_search`; greedy scores are penalised too.
      vocab_size: produce only ids below this (the tokenizer's size); None = the model's.
      min_bucket: the shortest source bucket.

    Raises:
      ConfigError: a setting out of range.
    """

    def __init__(
        self,
        *,
        batch_size: int,
        max_len: int,
        max_source_len: int,
        eos_id: int,
        pad_id: int,
        beam_size: int = 4,
        length_penalty: float = 1.0,
        early_stopping: EarlyStopping = True,
        vocab_size: int | None = None,
        min_bucket: int = MIN_SOURCE_BUCKET,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        _check_search(max_len, beam_size, length_penalty)
        _check_early_stopping(early_stopping)
        self.buckets = bucket_lengths(max_source_len, min_len=min_bucket)
        self.batch_size, self.max_len, self.beam_size = batch_size, max_len, beam_size
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size
        self.length_penalty, self.early_stopping = length_penalty, early_stopping

    @property
    def shapes(self) -> tuple[tuple[int, int], ...]:
        """The `(batch_size, source length)` shapes decoding may compile, one per bucket."""
        return tuple((self.batch_size, length) for length in self.buckets)

    def decode_ids(
        self, model: EncoderDecoder, sources: Sequence[Sequence[int]]
    ) -> list[Hypothesis]:
        """The best hypothesis for each source.

        Args:
          model: the encoder-decoder.
          sources: token-id lists (the caller appends the eos), 1 to `max_source_len` long.

        Returns:
          One `Hypothesis` per source, in order; [] for no sources.

        Raises:
          DataError: a source is empty, longer than `max_source_len`, or holds an id outside
            the model's vocabulary.
          ConfigError: a setting out of range for this model.
        """
        self._check_sources(sources, model.cfg.vocab_size)
        order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
        results: list[Hypothesis | None] = [None] * len(sources)
        for lo in range(0, len(order), self.batch_size):
            chunk = order[lo : lo + self.batch_size]
            tokens, segment_ids = self._pad_batch([sources[i] for i in chunk])
            out = self._run(model, tokens, segment_ids)
            out = jax.tree_util.tree_map(np.asarray, out)
            for row, i in enumerate(chunk):
                n = int(out.lengths[row])
                ids = out.tokens[row, :n].tolist()
                is_finished = n > 0 and ids[-1] == self.eos_id
                results[i] = Hypothesis(ids, float(out.scores[row]), is_finished)
        return results

    def _run(self, model, tokens, segment_ids) -> DecodeOutput:
        common = dict(max_len=self.max_len, eos_id=self.eos_id, pad_id=self.pad_id)
        common["vocab_size"] = self.vocab_size
        if self.beam_size == 1 and self.early_stopping is True:
            out = greedy_decode(model, tokens, segment_ids, **common)
            penalty = out.lengths.astype(jnp.float32) ** self.length_penalty
            return dataclasses.replace(out, scores=out.scores / penalty)
        return beam_search(
            model,
            tokens,
            segment_ids,
            beam_size=self.beam_size,
            length_penalty=self.length_penalty,
            early_stopping=self.early_stopping,
            **common,
        )

    def _pad_batch(self, chunk: list[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """[batch_size, bucket] int32 ids (pad_id after each source) and segment ids (1 on
        source tokens); rows past the chunk repeat its first source, so they finish with it."""
        chunk = chunk + [chunk[0]] * (self.batch_size - len(chunk))
        longest = max(len(ids) for ids in chunk)
        width = next(b for b in self.buckets if b >= longest)
        tokens = np.full((self.batch_size, width), self.pad_id, np.int32)
        segment_ids = np.zeros((self.batch_size, width), np.int32)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)] = ids
            segment_ids[row, : len(ids)] = 1
        return tokens, segment_ids

    def _check_sources(self, sources: Sequence[Sequence[int]], model_vocab: int) -> None:
        for i, ids in enumerate(sources):
            if not ids:
                raise DataError(f"source {i} is empty; give at least one token (e.g. the eos)")
            if len(ids) > self.buckets[-1]:
                raise DataError(
                    f"source {i} has {len(ids)} tokens, more than max_source_len="
                    f"{self.buckets[-1]}; shorten it, raise max_source_len, or truncate"
                )
            bad = [t for t in ids if not 0 <= t < model_vocab]
            if bad:
                raise DataError(
                    f"source {i} holds token id {bad[0]}, outside the model's vocabulary "
                    f"[0, {model_vocab}); encode sources with the model's tokenizer"
                )


def decode_texts(
    model: EncoderDecoder,
    tokenizer: Tokenizer,
    sources: Sequence[str],
    *,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    early_stopping: EarlyStopping = True,
    max_len: int | None = None,
    batch_size: int = 8,
    max_source_len: int | None = None,
    truncate: bool = False,
) -> list[str]:
    """Translates (or otherwise transforms) each source text; see `Seq2SeqDecoder`.

    Args:
      model: the encoder-decoder.
      tokenizer: the tokenizer the model was trained with; only its ids are produced.
      sources: the input texts; each is fed as `tokenizer.encode(text) + [eos]`.
      beam_size, length_penalty, early_stopping: as in `beam_search`.
      max_len: the most generated tokens per text, eos included; None = model.max_seq_len.
      batch_size: sources per compiled batch.
      max_source_len: the longest source in tokens, eos included; None = model.max_seq_len.
      truncate: cut longer sources to `max_source_len` (keeping the eos) instead of raising.

    Returns:
      The decoded output of each source, in order, cut before its eos.

    Raises:
      DataError: a source is too long (without `truncate`) or not valid Unicode.
      ConfigError: a setting out of range, or the tokenizer has more ids than the model.
    """
    check_vocab(model, tokenizer)
    max_source_len = max_source_len or model.cfg.max_seq_len
    decoder = Seq2SeqDecoder(
        batch_size=batch_size,
        max_len=max_len or model.cfg.max_seq_len,
        max_source_len=max_source_len,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        beam_size=beam_size,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        vocab_size=tokenizer.vocab_size,
    )
    sources = list(sources)
    ids = [row + [tokenizer.eos_id] for row in tokenizer.encode_batch(sources)] if sources else []
    if truncate:
        ids = [
            row if len(row) <= max_source_len else row[: max_source_len - 1] + row[-1:]
            for row in ids
        ]
    hypotheses = decoder.decode_ids(model, ids)
    return [
        tokenizer.decode(h.token_ids[:-1] if h.is_finished else h.token_ids) for h in hypotheses
    ]
