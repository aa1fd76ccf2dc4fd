"""Autoregressive generation with the KV cache: greedy, temperature, top-k and top-p sampling.

`generate_ids` runs one jitted program per call: it prefills every prompt of the batch at once
and then decodes one token per step in a `jax.lax.while_loop`, which exits early once every row
has produced its eos. Prompts are left-padded (segment id 0, never attended) to a power-of-two
bucket, so every row's next-token logits sit in the last column and all rows write the same
cache slot each step; the cache holds `bucket + max_new_tokens` slots. The program compiles
once per (batch size, prompt bucket, max_new_tokens, greedy or sampling); the seed,
temperature, top_k, top_p and eos id are traced, so changing them does not recompile.

Sampling runs in float32: logits / temperature, then top-k, then top-p (on the top-k
distribution, as Hugging Face does), then a categorical draw. The vocabulary is sorted only
when a filter is on (a `lax.cond` on the traced settings). Row `i`'s draw at step `t` uses
`fold_in(fold_in(key(seed), t), i)`, so a row's samples do not depend on the other rows.

What it leaves out: checkpoint loading (`plm_jax.load`), streaming output, beam search,
repetition penalties and batching of very many prompts (all prompts form one batch).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.errors import ConfigError, DataError
from plm_jax.infer.score import check_vocab, length_bucket
from plm_jax.models import Decoder
from plm_jax.tokenizer import Tokenizer

__all__ = ["Generation", "generate", "generate_ids"]

MIN_PROMPT_BUCKET = 8


@dataclasses.dataclass(frozen=True)
class Generation:
    """One prompt's continuation.

    Attributes:
      prompt: the prompt text.
      text: the continuation only (`tokenizer.decode(token_ids)`; a final eos decodes to "").
      token_ids: the new ids, ending with the eos when `finish_reason == "eos"`.
      finish_reason: "eos" when the model ended the text, "length" at `max_new_tokens`.
    """

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: Literal["eos", "length"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Sampling:
    """The traced sampling settings, all [] arrays: changing them does not recompile."""

    temperature: jax.Array  # float32; unused when greedy
    top_k: jax.Array  # int32; 0 = no limit
    top_p: jax.Array  # float32; 1 = no limit
    eos_id: jax.Array  # int32; -1 = never stop early
    vocab_size: jax.Array  # int32; ids at or above it are never produced


def generate(
    model: Decoder,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_at_eos: bool = True,
    add_bos: bool = True,
) -> list[Generation]:
    """Continues each prompt; see `generate_ids` for the sampling arguments.

    Args:
      model: the decoder.
      tokenizer: the tokenizer the model was trained with; only its ids are ever sampled.
      prompts: the prompt texts; all form one batch.
      max_new_tokens, temperature, top_k, top_p, seed: as in `generate_ids`.
      stop_at_eos: end a row at the tokenizer's eos (kept as the last id).
      add_bos: start each prompt with bos, as training documents start.

    Returns:
      One `Generation` per prompt, in order; [] for no prompts.

    Raises:
      DataError: a prompt plus `max_new_tokens` does not fit `model.cfg.max_seq_len`, a
        prompt is empty and `add_bos` is False, or a prompt is not valid Unicode.
      ConfigError: a sampling argument is out of range, or the tokenizer has more ids than the
        model.
    """
    check_vocab(model, tokenizer)
    prompts = list(prompts)
    bos = [tokenizer.bos_id] if add_bos else []
    prompt_ids = [bos + ids for ids in tokenizer.encode_batch(prompts)] if prompts else []
    eos_id = tokenizer.eos_id if stop_at_eos else None
    new_ids = generate_ids(
        model,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        eos_id=eos_id,
        vocab_size=tokenizer.vocab_size,
    )
    return [
        Generation(
            prompt=prompt,
            text=tokenizer.decode(ids),
            token_ids=ids,
            finish_reason="eos" if ids and ids[-1] == eos_id else "length",
        )
        for prompt, ids in zip(prompts, new_ids, strict=True)
    ]


def generate_ids(
    model: Decoder,
    prompt_ids: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> list[list[int]]:
    """Continues token-id prompts with the KV cache (bos, if wanted, is the caller's to add).

    Args:
      model: the decoder.
      prompt_ids: one non-empty id list per prompt; lengths may differ.
      max_new_tokens: new tokens per prompt, at least 1; every prompt needs
        `len(prompt) + max_new_tokens <= model.cfg.max_seq_len`.
      temperature: 0 for greedy (argmax) decoding, else the softmax temperature.
      top_k: sample among the k most likely ids; 0 = no limit.
      top_p: nucleus sampling: keep the most likely ids whose probability mass before them is
        below `top_p` (the top id always stays); 1.0 = no limit.
      seed: the sampling seed; the same seed gives the same samples.
      eos_id: a row stops after producing this id (which it keeps); None = never stop early.
      vocab_size: sample only ids below this (e.g. the tokenizer's size when the model's
        vocabulary is padded); None = the model's vocabulary.

    Returns:
      The new ids of each prompt: `max_new_tokens` of them, or fewer ending with `eos_id`.

    Raises:
      DataError: a prompt is empty, holds an id outside the vocabulary, or does not fit.
      ConfigError: a sampling argument is out of range.
    """
    model_vocab = model.cfg.vocab_size
    vocab_size = model_vocab if vocab_size is None else min(vocab_size, model_vocab)
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    _check_prompts(prompt_ids, max_new_tokens, model.cfg.max_seq_len, model_vocab)
    if not prompt_ids:
        return []
    longest = max(len(p) for p in prompt_ids)
    width = length_bucket(longest, min_len=MIN_PROMPT_BUCKET)
    tokens = np.zeros((len(prompt_ids), width), np.int32)
    segment_ids = np.zeros((len(prompt_ids), width), np.int32)
    for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends in the last column
        tokens[row, width - len(ids) :] = ids
        segment_ids[row, width - len(ids) :] = 1
    graphdef, state = nnx.split(model)
    sampling = _Sampling(
        temperature=jnp.float32(temperature if temperature > 0 else 1.0),
        top_k=jnp.int32(top_k),
        top_p=jnp.float32(top_p),
        eos_id=jnp.int32(-1 if eos_id is None else eos_id),
        vocab_size=jnp.int32(vocab_size),
    )
    program = _compiled_generate(graphdef, max_new_tokens, is_greedy=temperature == 0.0)
    out, lengths = program(state, tokens, segment_ids, jax.random.key(seed), sampling)
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[row, : lengths[row]].tolist() for row in range(len(prompt_ids))]


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Raises ConfigError for a sampling argument out of range."""
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be at least 1 (--max-new-tokens)")
    if not temperature >= 0.0:  # also rejects nan
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 means greedy decoding)")
    if top_k < 0:
        raise ConfigError(f"top_k={top_k} must be >= 0 (0 means no top-k limit)")
    if not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p={top_p} must be in (0, 1] (1 means no nucleus limit)")


def _check_prompts(
    prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, max_seq_len: int, vocab_size: int
) -> None:
    """Raises DataError for an empty prompt, an id outside the vocabulary, or a prompt that
    leaves no room for `max_new_tokens` within the model's positions."""
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise DataError(
                f"prompt {i} is empty: generation needs at least one token of context; "
                "keep add_bos=True (the default) or give a non-empty prompt"
            )
        if len(ids) + max_new_tokens > max_seq_len:
            raise DataError(
                f"prompt {i} has {len(ids)} tokens (bos included, if added) and max_new_tokens="
                f"{max_new_tokens}: {len(ids) + max_new_tokens} positions, more than the "
                f"model's max_seq_len={max_seq_len}; use a shorter prompt or fewer "
                f"--max-new-tokens (prompt + new tokens <= {max_seq_len})"
            )
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise DataError(
                f"prompt {i} holds token id {bad[0]}, outside the model's vocabulary "
                f"[0, {vocab_size}); encode prompts with the model's tokenizer"
            )


def _sample(logits: jax.Array, keys: jax.Array, sampling: _Sampling, is_greedy: bool) -> jax.Array:
    """Picks the next id of each row.

    Args:
      logits: [B, V] next-token logits.
      keys: [B] one PRNG key per row.
      sampling: the traced settings.
      is_greedy: argmax instead of sampling (static).

    Returns:
      [B] int32 ids.
    """
    vocab = logits.shape[-1]
    logits = jnp.where(jnp.arange(vocab) < sampling.vocab_size, logits, -jnp.inf)
    logits = logits.astype(jnp.float32)
    if is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    # A scalar predicate: only the chosen branch runs, so plain sampling never sorts the vocab.
    use_filters = (sampling.top_k > 0) | (sampling.top_p < 1.0)
    return jax.lax.cond(use_filters, _filtered_draw, _draw, logits, keys, sampling)


def _draw(logits: jax.Array, keys: jax.Array, sampling: _Sampling) -> jax.Array:
    """[B, V] logits -> [B] int32 ids drawn from softmax(logits); -inf logits are never drawn."""
    del sampling  # the signature matches `_filtered_draw` for lax.cond
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _filtered_draw(logits: jax.Array, keys: jax.Array, sampling: _Sampling) -> jax.Array:
    """Draws after top-k, then top-p (on the top-k distribution, as Hugging Face does)."""
    vocab = logits.shape[-1]
    # Filter in rank order: rank 0 is the argmax (ties keep the lower id, as argmax does).
    order = jnp.argsort(logits, axis=-1, descending=True, stable=True)
    ranked = jnp.take_along_axis(logits, order, axis=-1)
    rank = jnp.arange(vocab)
    ranked = jnp.where((rank < sampling.top_k) | (sampling.top_k == 0), ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # exactly 0 at rank 0: always kept
    keep = (mass_before < sampling.top_p) | (sampling.top_p >= 1.0)
    choice = _draw(jnp.where(keep, ranked, -jnp.inf), keys, sampling)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _generate_program(
    state: nnx.State,
    tokens: jax.Array,
    segment_ids: jax.Array,
    key: jax.Array,
    sampling: _Sampling,
    *,
    graphdef: nnx.GraphDef,
    max_new_tokens: int,
    is_greedy: bool,
) -> tuple[jax.Array, jax.Array]:
    """Prefill, then one token per step until `max_new_tokens` or every row has its eos.

    Args:
      state: the model's state (`nnx.split`).
      tokens, segment_ids: [B, P] int32 prompts, left-padded with segment id 0.
      key: the seed's PRNG key.
      sampling: the traced settings.
      max_new_tokens: the most steps (static).
      is_greedy: argmax decoding (static).

    Returns:
      (new ids [B, max_new_tokens] int32, valid lengths [B] int32); ids past a row's length
      are meaningless.
    """
    model = nnx.merge(graphdef, state)
    batch, width = tokens.shape
    steps = max_new_tokens
    rows = jnp.arange(batch)

    def pick(logits, step):
        step_key = jax.random.fold_in(key, step)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, rows)
        return _sample(logits, keys, sampling, is_greedy)

    def is_eos(ids):
        return ids == sampling.eos_id  # never true for eos_id -1

    cache = model.init_cache(batch, width + steps)
    prefill = model(tokens, segment_ids=segment_ids, cache=cache)
    first = pick(prefill.logits[:, -1], 0)  # left padding: every row's last prompt token
    new = jnp.zeros((batch, steps), jnp.int32).at[:, 0].set(first)
    lengths = jnp.ones((batch,), jnp.int32)

    def cond(carry):
        step, *_, done = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, cache, last, new, lengths, done = carry
        out = model(last[:, None], segment_ids=jnp.ones((batch, 1), jnp.int32), cache=cache)
        ids = pick(out.logits[:, 0], step)
        new = jax.lax.dynamic_update_slice(new, ids[:, None], (0, step))
        lengths = lengths + (~done).astype(jnp.int32)  # a finished row keeps its length
        return step + 1, out.cache, ids, new, lengths, done | is_eos(ids)

    # The prefill's token is step 0; each loop step feeds the previous token and samples one.
    init = (jnp.int32(1), prefill.cache, first, new, lengths, is_eos(first))
    _, _, _, new, lengths, _ = jax.lax.while_loop(cond, body, init)
    return new, lengths


@functools.lru_cache(maxsize=16)
def _compiled_generate(graphdef: nnx.GraphDef, max_new_tokens: int, *, is_greedy: bool):
    """One jitted program per model structure, step count and greedy-or-not; jit keys on
    [B, P] itself."""
    program = functools.partial(
        _generate_program, graphdef=graphdef, max_new_tokens=max_new_tokens, is_greedy=is_greedy
    )
    return jax.jit(program)
