"""Scoring token continuations: log P(continuation | context) and whether greedy decoding
would produce it, batched with length bucketing.

This is the computation behind lm-evaluation-harness's `loglikelihood` requests (and its
rolling perplexity windows), shared by the harness adapter (`plm_jax.evals.harness`) and the
downstream evaluation that runs during training (`plm_jax.evals.downstream`). A request is two
token lists; as in the harness, `context + continuation` is cut from the left to the model's
`max_seq_len + 1` tokens, the model reads all but the last and each continuation token is
scored at its position.

Requests are sorted by length (longest first), cut into batches of `batch_size` rows and
right-padded with segment id 0 to a power-of-two length (at least `MIN_BUCKET`, at most
`max_seq_len`), so the forward pass compiles once per length bucket; a short last batch is
padded with empty rows, so the batch dimension never changes. Padding never changes a real
token's result.

`encode_request` turns a (context, continuation) text pair into a request by the rules of the
harness's `hf` model (`lm_eval.api.model.TemplateLM`), so that the downstream evaluation during
training needs no lm-eval for local tasks and still gives `plm-jax lm-eval`'s numbers.

What it leaves out: the harness's own request building (prompts, few-shot examples), loading
checkpoints (`plm_jax.load`), and encoder-decoders (decoders only). `plm_jax.infer.score`
scores whole texts the plm_jax way (`[bos] + text`, sliding windows); this module scores
(context, continuation) pairs the harness way.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.errors import ConfigError, DataError
from plm_jax.infer.score import length_bucket

__all__ = [
    "MIN_BUCKET",
    "Forward",
    "TokenRequest",
    "compiled_forward",
    "encode_request",
    "loglikelihoods",
    "starts_with_bos",
]

MIN_BUCKET = 16  # the shortest padded length; shorter buckets would only add compilations

# (inputs, targets, segment_ids), each [B, L] int32 -> (log-probs [B, L] f32, greedy [B, L] bool)
Forward = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class TokenRequest:
    """One continuation to score.

    Attributes:
      context: the conditioning ids (at least one: a bos or eos stands in for an empty text).
      continuation: the ids to score, at least one.
    """

    context: Sequence[int]
    continuation: Sequence[int]


def starts_with_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer's own framing of one text begins with its bos token.

    Hugging Face tokenizers frame a text with their post-processor (LLaMA: `<s> A`, GPT-2:
    `A`); plm_jax's SentencePiece tokenizer frames it `[bos] A [eos]`, as it wrote training
    documents. The harness's `hf` model prepends bos exactly when the tokenizer's framing does.
    """
    framed, _ = tokenizer.encode_pair("a")
    bare = tokenizer.encode("a")
    return bool(framed) and framed[0] == tokenizer.bos_id and bare[:1] != framed[:1]


def encode_request(
    tokenizer: Any, context: str, continuation: str, *, add_bos: bool
) -> TokenRequest:
    """The harness's tokenization of a (context, continuation) pair for a causal LM.

    Trailing spaces of the context move to the continuation; `context + continuation` is
    encoded whole and split where the context's own tokens end (so a merge across the
    boundary stays in the continuation); `add_bos` puts bos before the context. An empty
    context is the bos token alone, with the continuation encoded without bos.
    """
    if not context:
        ids = tokenizer.encode(continuation)
        if ids[:1] == [tokenizer.bos_id]:
            return TokenRequest(ids[:1], ids[1:])
        return TokenRequest([tokenizer.bos_id], ids)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    bos = [tokenizer.bos_id] if add_bos else []
    whole = bos + tokenizer.encode(context + continuation)
    split = len(bos) + len(tokenizer.encode(context))
    return TokenRequest(whole[:split], whole[split:])


def token_scores(
    state: nnx.State,
    inputs: jax.Array,
    targets: jax.Array,
    segment_ids: jax.Array,
    *,
    graphdef: nnx.GraphDef,
) -> tuple[jax.Array, jax.Array]:
    """log P(target | inputs up to it) and whether the target is the argmax, per position.

    Args:
      state: the decoder's state (`nnx.split(model)`; the train state's params during training).
      inputs, targets, segment_ids: [B, L] int32, right-padded (segment id 0).

    Returns:
      ([B, L] float32 log-probs, [B, L] bool greedy); padding positions hold meaningless values.
    """
    model = nnx.merge(graphdef, state)
    logits = model(inputs, segment_ids=segment_ids).logits  # [B, L, V] float32
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return picked, jnp.argmax(logp, axis=-1) == targets


@functools.lru_cache(maxsize=16)
def _jitted_scores(graphdef: nnx.GraphDef):
    """One jitted scorer per model structure; jit's own cache then keys on [B, L]."""
    return jax.jit(functools.partial(token_scores, graphdef=graphdef))


def compiled_forward(model: nnx.Module) -> Forward:
    """A `Forward` for a decoder whose arrays live on one device (or are replicated)."""
    graphdef, state = nnx.split(model)
    scores = _jitted_scores(graphdef)

    def forward(inputs, targets, segments):
        logp, greedy = scores(state, inputs, targets, segments)
        return np.asarray(logp), np.asarray(greedy)

    return forward


def loglikelihoods(
    forward: Forward,
    requests: Sequence[TokenRequest],
    *,
    max_seq_len: int,
    batch_size: int,
) -> list[tuple[float, bool]]:
    """Scores each request's continuation given its context.

    Args:
      forward: the model's scorer (`compiled_forward`, or a sharded one during training).
      requests: the (context, continuation) id lists.
      max_seq_len: the model's context; longer requests lose their leftmost context tokens.
      batch_size: rows per forward pass; each holds [batch_size, L, V] float32 logits.

    Returns:
      One `(log P(continuation | context), is_greedy)` per request, in order; the log-prob is a
      float64 sum of float32 token log-probs.

    Raises:
      ConfigError: `batch_size < 1`.
      DataError: a request with an empty context or continuation, or a continuation longer
        than `max_seq_len` (the model could not see it whole).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    rows = [_row(i, r, max_seq_len) for i, r in enumerate(requests)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]), reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        length = length_bucket(len(rows[chunk[0]][0]), min_len=MIN_BUCKET, max_len=max_seq_len)
        inputs = np.zeros((batch_size, length), np.int32)
        targets = np.zeros((batch_size, length), np.int32)
        segments = np.zeros((batch_size, length), np.int32)
        for row, i in enumerate(chunk):
            tokens = rows[i][0]
            inputs[row, : len(tokens) - 1] = tokens[:-1]
            targets[row, : len(tokens) - 1] = tokens[1:]
            segments[row, : len(tokens) - 1] = 1
        logp, greedy = forward(inputs, targets, segments)
        for row, i in enumerate(chunk):
            n, scored = len(rows[i][0]) - 1, rows[i][1]
            span = slice(n - scored, n)
            total = float(np.sum(logp[row, span], dtype=np.float64))
            results[i] = (total, bool(np.all(greedy[row, span])))
    return results


def _row(index: int, request: TokenRequest, max_seq_len: int) -> tuple[list[int], int]:
    """(the request's tokens cut to max_seq_len + 1 from the left, continuation length)."""
    context, continuation = list(request.context), list(request.continuation)
    if not context or not continuation:
        raise DataError(
            f"request {index} has an empty {'context' if not context else 'continuation'}; "
            "an empty text is scored after a bos (or eos) token, and a continuation needs at "
            "least one token"
        )
    if len(continuation) > max_seq_len:
        raise DataError(
            f"request {index}'s continuation has {len(continuation)} tokens, more than the "
            f"model's max_seq_len={max_seq_len}; shorten the task's answers"
        )
    return (context + continuation)[-(max_seq_len + 1) :], len(continuation)
