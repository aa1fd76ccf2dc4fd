"""Pure train and eval steps: next-token prediction (decoders), masked LM (encoders) and
span corruption or translation (encoder-decoders).

All objectives are the same weighted cross-entropy: a decoder's batch holds the next tokens
as targets, an encoder's the original tokens, with weight 1 only at the masked positions, an
encoder-decoder's the decoder targets (its batch also holds the `decoder_*` inputs).

Loss normalisation: every micro-batch's loss is its *sum* of token cross-entropies divided by
the number of real (weight-1) target tokens (for a masked LM: masked tokens) in the whole
accumulated batch, and the micro-batch
gradients are summed. So k micro-batches give the same gradient as one batch k times larger
(up to float rounding), however the padding is spread among them.

`train.loss_chunk` > 0 (decoders): the model returns its final hidden states and
`chunked_next_token_loss` applies the head and the loss a chunk of positions at a time, so the
[B, L, V] float32 logits are never whole; 0 computes them at once, as before the option.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from plm_jax.config import TrainConfig
from plm_jax.sharding import constrain
from plm_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]  # inputs/targets/segment_ids/positions: [B, L] int32; weights f32
Metrics = dict[str, jax.Array]


def next_token_loss(
    logits: jax.Array, targets: jax.Array, weights: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Sum over tokens of weighted cross-entropy, in float32.

    With `label_smoothing` e, each token's loss is (1 - e) * -log p(target) + e * the mean over
    the vocabulary of -log p(v) (Szegedy et al. 2016, as Hugging Face's `label_smoothing_factor`
    and fairseq compute it), without materialising a [B, L, V] target distribution.

    Args:
      logits: [B, L, V]; targets: [B, L] int32; weights: [B, L] (0 for padding and
        cross-document targets); label_smoothing: e in [0, 1).

    Returns:
      [] the weighted sum of the per-token losses.
    """
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if label_smoothing:
        log_z = jax.nn.logsumexp(logits, axis=-1)
        uniform = log_z - jnp.mean(logits, axis=-1)  # mean over v of -log p(v)
        ce = (1.0 - label_smoothing) * ce + label_smoothing * uniform
    return jnp.sum(ce * weights)


def chunked_next_token_loss(
    hidden: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    targets: jax.Array,
    weights: jax.Array,
    chunk: int,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """`next_token_loss(head(hidden), ...)` computed `chunk` positions at a time, so that the
    [B, L, V] float32 logits and their gradient never exist whole.

    Each chunk's logits [B, C, V] are made, reduced to its loss sum and dropped; under
    `jax.checkpoint` the backward pass recomputes them chunk by chunk (one more head matmul,
    2*B*C*D*V FLOPs per chunk) instead of keeping them. The chunks are slices of the sequence
    axis, so every batch-sharded device works on its rows of every chunk, and vocabulary
    sharding of the logits is kept. This is MaxText's "vocabulary tiling" (tiles of the hidden
    states); a length that `chunk` does not divide is padded with zero-weight positions.

    Args:
      hidden: [B, L, D] final hidden states; head: [B, C, D] -> [B, C, V] float32 logits
        (`Decoder.lm_head`); targets: [B, L] int32; weights: [B, L]; chunk: C > 0, positions
        per chunk (at most L are used); label_smoothing: as in `next_token_loss`.

    Returns:
      [] the weighted sum of the per-token losses (the plain sum up to float32 rounding).
    """
    batch, length = targets.shape
    chunk = min(chunk, length)
    pad = -length % chunk

    def split(x: jax.Array) -> jax.Array:  # [B, L, ...] -> [L/C, B, C, ...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = jnp.moveaxis(x.reshape(batch, -1, chunk, *x.shape[2:]), 1, 0)
        return constrain(x, (None, "act_batch", "act_seq", *(["act_embed"] * (x.ndim - 3))))

    @jax.checkpoint  # saves only the inputs: the backward pass recomputes this chunk's logits
    def chunk_loss(h, t, w):
        return next_token_loss(head(h), t, w, label_smoothing)

    def add_chunk(total, chunk_inputs):
        return total + chunk_loss(*chunk_inputs), None

    chunks = (split(hidden), split(targets), split(weights))
    total, _ = jax.lax.scan(add_chunk, jnp.zeros((), jnp.float32), chunks)
    return total


def lm_forward(
    model, batch: Batch, *, deterministic: bool, rngs: nnx.Rngs | None, lm_logits: bool = True
):
    """The model's output (`LmOutput`/`EncoderOutput`) on a batch of either layout.

    A batch with `decoder_inputs` is an encoder-decoder batch (inputs, segment_ids and
    positions feed the encoder; the `decoder_*` keys the decoder); any other feeds `inputs`
    to a decoder or encoder. `lm_logits=False` leaves the head out (logits None).
    """
    if "decoder_inputs" in batch:
        return model(
            batch["inputs"],
            batch["decoder_inputs"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            decoder_positions=batch["decoder_positions"],
            decoder_segment_ids=batch["decoder_segment_ids"],
            deterministic=deterministic,
            rngs=rngs,
            lm_logits=lm_logits,
        )
    return model(
        batch["inputs"],
        positions=batch["positions"],
        segment_ids=batch["segment_ids"],
        deterministic=deterministic,
        rngs=rngs,
        lm_logits=lm_logits,
    )


def _forward_loss(
    params, graphdef, batch: Batch, key: jax.Array | None, loss_chunk: int = 0
) -> jax.Array:
    """The batch's loss sum; `loss_chunk` > 0 (decoders) applies the head in chunks."""
    model = nnx.merge(graphdef, params)
    rngs = None if key is None else nnx.Rngs(dropout=key)
    deterministic = key is None
    if loss_chunk:
        out = lm_forward(model, batch, deterministic=deterministic, rngs=rngs, lm_logits=False)
        return chunked_next_token_loss(
            out.hidden, model.lm_head, batch["targets"], batch["weights"], loss_chunk
        )
    out = lm_forward(model, batch, deterministic=deterministic, rngs=rngs)
    return next_token_loss(out.logits, batch["targets"], batch["weights"])


def split_micro(batch: Batch, grad_accum: int) -> Batch:
    """[B, ...] -> [A, B/A, ...], micro-batch a = rows a, a+A, a+2A, ...

    Strided rows keep each micro-batch spread over every batch-sharded device (contiguous
    blocks would put a whole micro-batch on a few devices).
    """

    def split(x):
        x = x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)
        return constrain(x, (None, "act_batch", *([None] * (x.ndim - 2))))

    return {k: split(v) for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class Guard:
    """What a step does with a bad update (static: part of the compiled step).

    skip_nonfinite: a NaN/Inf loss or gradient norm leaves params and optimizer state
      unchanged (`train.nonfinite: skip`); otherwise the update is applied and the loop
      aborts when it fetches the metrics, before anything is saved.
    spike_window / spike_zscore: skip a finite loss above mean + zscore * std of the previous
      `spike_window` finite losses, once that many exist (0 disables).
    """

    skip_nonfinite: bool = False
    spike_window: int = 0
    spike_zscore: float = 6.0

    @classmethod
    def from_config(cls, t: TrainConfig) -> Guard:
        return cls(t.nonfinite == "skip", t.spike_window, t.spike_zscore)


NO_GUARD = Guard()  # apply every update; the loop aborts on non-finite values


def accumulate(loss_fn, params, batch: Batch, grad_accum: int, step_key, use_dropout: bool):
    """Summed gradients and per-micro-batch losses of `loss_fn(params, micro_batch, key)`
    over `grad_accum` micro-batches (`key` is None without dropout)."""

    def micro_grad(grads, micro):
        mb, index = micro
        key = jax.random.fold_in(step_key, index) if use_dropout else None
        loss, g = jax.value_and_grad(loss_fn)(params, mb, key)
        return jax.tree.map(jnp.add, grads, g), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    micro = (split_micro(batch, grad_accum), jnp.arange(grad_accum))
    return jax.lax.scan(micro_grad, zeros, micro)


def apply_update(
    state: TrainState,
    grads,
    losses: jax.Array,
    total: jax.Array,
    tx: optax.GradientTransformation,
    guard: Guard,
) -> tuple[TrainState, Metrics]:
    """The next state from summed gradients and micro-batch loss sums (both divided by
    `total`), with `guard` applied; metrics loss, grad_norm, skipped and bad_micro (the first
    micro-batch with a non-finite loss, -1 if none)."""
    grads = jax.tree.map(lambda g: g / total, grads)
    loss, grad_norm = jnp.sum(losses) / total, optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    skip = jnp.logical_not(finite) if guard.skip_nonfinite else jnp.zeros((), bool)
    if guard.spike_window:
        history = state.loss_window[-guard.spike_window :]
        limit = jnp.mean(history) + guard.spike_zscore * jnp.std(history)
        skip = skip | (jnp.all(jnp.isfinite(history)) & (loss > limit))
    if guard.skip_nonfinite or guard.spike_window:
        keep_old = lambda new, old: jnp.where(skip, old, new)  # noqa: E731
        params = jax.tree.map(keep_old, params, state.params)
        opt_state = jax.tree.map(keep_old, opt_state, state.opt_state)
    window = jnp.concatenate([state.loss_window[1:], loss[None].astype(jnp.float32)])
    bad = jnp.logical_not(jnp.isfinite(losses))
    new_state = TrainState(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        rng=state.rng,
        loss_window=jnp.where(finite, window, state.loss_window),
    )
    return new_state, {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/skipped": skip.astype(jnp.float32),
        "train/bad_micro": jnp.where(jnp.any(bad), jnp.argmax(bad), -1),
    }


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    grad_accum: int,
    use_dropout: bool,
    guard: Guard = NO_GUARD,
    loss_chunk: int = 0,
) -> tuple[TrainState, Metrics]:
    """One optimizer step over `grad_accum` micro-batches. Pure: no I/O, no host transfers.
    `loss_chunk` > 0: the head and loss run that many positions at a time."""
    total = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params, mb, key):
        return _forward_loss(params, graphdef, mb, key, loss_chunk)

    grads, losses = accumulate(loss_fn, state.params, batch, grad_accum, step_key, use_dropout)
    new_state, metrics = apply_update(state, grads, losses, total, tx, guard)
    metrics.update(
        {
            "train/lr": schedule(state.step),
            "train/tokens": jnp.sum(batch["weights"]),
            "train/input_tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32),
        }
    )
    return new_state, metrics


def eval_step(
    params: nnx.State, batch: Batch, *, graphdef: nnx.GraphDef, loss_chunk: int = 0
) -> Metrics:
    """Summed loss and token count of one batch (summed again over batches by the caller)."""
    loss = _forward_loss(params, graphdef, batch, None, loss_chunk)
    return {"loss_sum": loss, "tokens": jnp.sum(batch["weights"])}
