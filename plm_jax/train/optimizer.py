"""AdamW with warmup + decay, weight-decay masking and global-norm clipping.

Weight decay applies to weight matrices and embeddings only; norms' scales and all biases are
not decayed, as in GPT-2/nanoGPT and most LLaMA recipes. Biases are recognised by name (the
model names them `bias` or `b_*`), since per-head biases such as `b_q` [N, H] are 2-D.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def scale_by_tree(factors) -> optax.GradientTransformation:
    """Multiplies each update by its factor (a tree like the params of floats or arrays that
    broadcast against them): per-parameter learning-rate multipliers."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * f, updates, factors), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def layerwise_lr_factors(params, num_layers: int, decay: float, scanned: bool):
    """Layer-wise learning-rate decay (Clark et al. 2020, ELECTRA) for a task model's params.

    Block i of L gets `decay^(L - i)`, the backbone's embeddings `decay^(L + 1)`, everything
    else (final norms, pooler, the task head) 1. Scanned blocks get a [L, 1, ...] array.
    """
    import numpy as np

    def factor(path, leaf):
        names = [str(e.key) for e in path if isinstance(e, jax.tree_util.DictKey)]
        if "blocks" in names:
            if scanned:
                powers = num_layers - np.arange(num_layers, dtype=np.float32)
                return (decay**powers).reshape((num_layers,) + (1,) * (leaf.ndim - 1))
            i = int(names[names.index("blocks") + 1])
            return float(decay ** (num_layers - i))
        if any(n in names for n in ("embed", "pos_embed", "type_embed", "embed_norm")):
            return float(decay ** (num_layers + 1))
        return 1.0

    return jax.tree_util.tree_map_with_path(factor, params)


MU_DTYPES = {"": None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}  # train.mu_dtype


def make_optimizer(train: TrainConfig, lr_factors=None) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with the schedule and the decay mask; `lr_factors` (a
    tree from `layerwise_lr_factors`) scales each parameter's update. `train.mu_dtype` stores
    the first moment in bfloat16 (half its memory) when asked; the second moment keeps the
    parameters' dtype, since its square-root in the denominator is where precision matters."""
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
            # None: the first moment in the parameters' dtype; the update itself is computed
            # in float32 and applied to the float32 master weights either way.
            mu_dtype=MU_DTYPES[train.mu_dtype],
        )
    )
    if lr_factors is not None:
        parts.append(scale_by_tree(lr_factors))
    return optax.chain(*parts)
