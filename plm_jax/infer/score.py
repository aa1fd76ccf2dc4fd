"""Scoring text with a trained decoder: per-token log-probabilities, totals and perplexity.

Each text is scored as `[bos] + ids (+ eos)`: the bos is context only, every later token is a
target, matching how training documents were written (`[bos] tokens eos`). A text longer than
the model's context is scored with a sliding window (the Hugging Face perplexity recipe):
windows of `max_seq_len` inputs, advanced by `max_seq_len // 2`, each scoring only the targets
the previous window did not reach, so every token is scored exactly once with at least half a
window of left context (the first window's tokens with all of theirs).

Windows from all texts are sorted by length, batched `batch_size` at a time and right-padded
with segment id 0 to a few fixed lengths (powers of two up to `max_seq_len`), so the forward
pass compiles once per length bucket, and padding never changes a real token's result.

What it leaves out: checkpoint loading (`plm_jax.load` builds the model and tokenizer), sharding
(the model's arrays are used where they are), and generation (`generate.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.errors import ConfigError, DataError
from plm_jax.models import Decoder
from plm_jax.tokenizer import Tokenizer

__all__ = ["TextScore", "check_vocab", "length_bucket", "score_texts", "sliding_windows"]

MIN_BUCKET = 16  # the shortest padded length; shorter buckets would only add compilations


@dataclasses.dataclass(frozen=True)
class TextScore:
    """The score of one text under the model.

    Attributes:
      text: the input text.
      token_ids: the scored tokens: the text's ids, plus eos when `add_eos` (bos excluded).
      pieces: the piece string of each scored token.
      token_logprobs: natural-log `log P(w_i | bos, w_<i)` of each scored token, float32
        precision; with several windows the context is the window's, not the whole prefix.
      total_logprob: the sum of `token_logprobs`.
      num_tokens: `len(token_ids)`.
      perplexity: `exp(-total_logprob / num_tokens)`.
      windows: number of model windows used; 1 when `num_tokens <= max_seq_len`, more when the
        text was scored with a sliding window (see the module docstring).
    """

    text: str
    token_ids: list[int]
    pieces: list[str]
    token_logprobs: list[float]
    total_logprob: float
    num_tokens: int
    perplexity: float
    windows: int


def sliding_windows(length: int, window: int) -> list[tuple[int, int, int]]:
    """The windows that score `length` targets with a model of context `window`.

    Input token `j` predicts target `j`; a window holds inputs `[begin, end)` and scores the
    targets `[first, end)`, those no earlier window scored. Consecutive windows start
    `window // 2` apart, so every target is scored exactly once, with at least
    `window - window // 2` inputs of context once past the first window.

    Args:
      length: the number of targets (= inputs), at least 1.
      window: the model's `max_seq_len`, at least 1.

    Returns:
      `[(begin, end, first), ...]`, one window when `length <= window`.
    """
    stride = max(window // 2, 1)
    windows, begin, scored_to = [], 0, 0
    while scored_to < length:
        end = min(begin + window, length)
        windows.append((begin, end, scored_to))
        scored_to, begin = end, begin + stride
    return windows


def length_bucket(length: int, *, min_len: int, max_len: int | None = None) -> int:
    """The padded length for `length` tokens: the next power of two, at least `min_len` and at
    most `max_len` (None: no cap). A few fixed lengths mean a few compilations."""
    bucket = max(min_len, 1 << max(length - 1, 0).bit_length())
    return bucket if max_len is None else min(bucket, max_len)


def score_texts(
    model: Decoder,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    *,
    add_eos: bool = False,
    batch_size: int = 8,
) -> list[TextScore]:
    """Scores each text as `[bos] + ids (+ eos)` under `model`.

    Texts of more than `model.cfg.max_seq_len` scored tokens are scored with a sliding window
    (window `max_seq_len`, stride `max_seq_len // 2`, each token once); `TextScore.windows`
    says how many windows a text took. Results do not depend on batching or padding (up to
    float rounding of differently shaped matmuls, about 1e-6).

    Args:
      model: the decoder; its `cfg.max_seq_len` is the window.
      tokenizer: the tokenizer the model was trained with.
      texts: the texts to score.
      add_eos: also score the end of the text (`P(eos | text)`), as training documents end.
      batch_size: windows per forward pass; each pass holds [batch_size, L, V] float32 logits.

    Returns:
      One `TextScore` per text, in order.

    Raises:
      DataError: a text has nothing to score (empty, and `add_eos` is False), or is not valid
        Unicode.
      ConfigError: `batch_size < 1`, or the tokenizer has more ids than the model.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    check_vocab(model, tokenizer)
    texts = list(texts)
    ids = tokenizer.encode_batch(texts) if texts else []
    targets = [row + [tokenizer.eos_id] if add_eos else row for row in ids]
    for i, row in enumerate(targets):
        if not row:
            raise DataError(
                f"text {i} is empty: it has no tokens to score; drop empty texts, or pass "
                "add_eos=True (--add-eos) to score P(eos | bos)"
            )
    # Window (text index, begin, end, first) over each text's inputs [bos] + targets[:-1].
    window = model.cfg.max_seq_len
    jobs = [(t, *w) for t, row in enumerate(targets) for w in sliding_windows(len(row), window)]
    logprobs = [np.zeros(len(row), np.float32) for row in targets]
    sequences = [[tokenizer.bos_id, *row] for row in targets]
    jobs.sort(key=lambda job: job[2] - job[1], reverse=True)
    graphdef, state = nnx.split(model)
    forward = _compiled_token_logprobs(graphdef)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        length = length_bucket(chunk[0][2] - chunk[0][1], min_len=MIN_BUCKET, max_len=window)
        inputs, labels, segments = _pack_windows(chunk, sequences, batch_size, length)
        out = np.asarray(forward(state, inputs, labels, segments))
        for row, (t, begin, end, first) in enumerate(chunk):
            logprobs[t][first:end] = out[row, first - begin : end - begin]
    return [
        _text_score(text, row, lp, len(sliding_windows(len(row), window)), tokenizer)
        for text, row, lp in zip(texts, targets, logprobs, strict=True)
    ]


def check_vocab(model: Decoder, tokenizer: Tokenizer) -> None:
    """Raises ConfigError when the tokenizer has ids the model's embedding does not."""
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is "
            f"model.vocab_size={model.cfg.vocab_size}; use the tokenizer the model was "
            "trained with"
        )


def _pack_windows(chunk, sequences, batch_size: int, length: int):
    """Right-padded inputs, targets and segment ids, each [batch_size, length] int32; rows past
    the chunk are all padding (segment id 0)."""
    inputs = np.zeros((batch_size, length), np.int32)
    labels = np.zeros((batch_size, length), np.int32)
    segments = np.zeros((batch_size, length), np.int32)
    for row, (t, begin, end, _) in enumerate(chunk):
        n = end - begin
        inputs[row, :n] = sequences[t][begin:end]
        labels[row, :n] = sequences[t][begin + 1 : end + 1]
        segments[row, :n] = 1
    return inputs, labels, segments


def _text_score(
    text: str, token_ids: list[int], logprobs: np.ndarray, windows: int, tokenizer: Tokenizer
) -> TextScore:
    total = float(np.sum(logprobs, dtype=np.float64))
    mean_nll = -total / len(token_ids)
    return TextScore(
        text=text,
        token_ids=list(token_ids),
        pieces=[tokenizer.id_to_piece(i) for i in token_ids],
        token_logprobs=[float(x) for x in logprobs],
        total_logprob=total,
        num_tokens=len(token_ids),
        perplexity=math.exp(mean_nll) if mean_nll < 709.0 else math.inf,  # exp overflows past 709
        windows=windows,
    )


def _token_logprobs(
    state: nnx.State,
    inputs: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    *,
    graphdef: nnx.GraphDef,
) -> jax.Array:
    """log P(target | inputs up to it) for every position.

    Args:
      state: the model's state (`nnx.split`).
      inputs, targets, segment_ids: [B, L] int32, right-padded (segment id 0).

    Returns:
      [B, L] float32; padding positions hold meaningless finite values.
    """
    model = nnx.merge(graphdef, state)
    logits = model(inputs, segment_ids=segment_ids).logits  # [B, L, V] float32
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.lru_cache(maxsize=16)
def _compiled_token_logprobs(graphdef: nnx.GraphDef):
    """One jitted scorer per model structure; jit's own cache then keys on [B, L]."""
    return jax.jit(functools.partial(_token_logprobs, graphdef=graphdef))
