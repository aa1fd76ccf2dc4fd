"""AdamW with warmup + decay, weight-decay masking and global-norm clipping.

Weight decay applies to weight matrices and embeddings only; norms' scales and all biases are
not decayed, as in GPT-2/nanoGPT and most LLaMA recipes. Biases are recognised by name (the
model names them `bias` or `b_*`), since per-head biases such as `b_q` [N, H] are 2-D.
"""

from __future__ import annotations

import jax
import optax

from plm_jax.config import TrainConfig


def lr_schedule(train: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine/linear decay to `lr * min_lr_ratio` at `steps`."""
    peak, floor = train.lr, train.lr * train.min_lr_ratio
    decay_steps = max(train.steps - train.warmup_steps, 1)
    decays = {
        "cosine": lambda: optax.cosine_decay_schedule(peak, decay_steps, alpha=train.min_lr_ratio),
        "linear": lambda: optax.linear_schedule(peak, floor, decay_steps),
        "constant": lambda: optax.constant_schedule(peak),
    }
    warmup = optax.linear_schedule(0.0, peak, train.warmup_steps)
    return optax.join_schedules([warmup, decays[train.lr_schedule]()], [train.warmup_steps])


def _is_bias(path: tuple) -> bool:
    names = [e.key for e in path if isinstance(e, jax.tree_util.DictKey)]
    name = str(names[-1]) if names else ""
    return name == "bias" or name.startswith("b_")


def decay_mask(params):
    """True for leaves that get weight decay: matrices that are not biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: p.ndim >= 2 and not _is_bias(path), params
    )


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule and the decay mask."""
    parts = []
    if train.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(train.grad_clip))
    parts.append(
        optax.adamw(
            lr_schedule(train),
            b1=train.beta1,
            b2=train.beta2,
            weight_decay=train.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)
