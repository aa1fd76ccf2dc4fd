"""Task models: a pretrained backbone (encoder or decoder) with a classification, regression or
extractive-QA head.

    classification  logits [B, C] = W · dropout(pool(hidden)) + b
    regression      the same with C = 1; the prediction is the single output
    qa              start/end logits [B, L, 2] = W · dropout(hidden) + b, per token

Pooling picks one vector per sequence: `pooler` (BERT's tanh pooler over [CLS]; the default for
encoders that have one, as `BertForSequenceClassification`), `cls` (the first token; the
default for encoders without a pooler), `mean` (over real tokens), or `last` (the last real
token; the default for decoders, whose last token is the only one that saw the whole text).
The head's dropout is `model.dropout`, as BERT uses its hidden dropout there.

The parameters are `{"backbone": <the Encoder/Decoder's>, "head_w", "head_b"}`, so a
pretraining checkpoint fills `backbone` unchanged. The backbone's LM/MLM head is not
evaluated (`lm_logits=False`).

What it leaves out: losses and metrics (`finetune.py`, `metrics.py`) and the data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from plm_jax.config import ModelConfig
from plm_jax.models import build_model
from plm_jax.models.layers import INIT_STD, dropout, make_param, normal, zeros

__all__ = ["POOLINGS", "TaskModel", "resolve_pooling"]

POOLINGS = ("auto", "pooler", "cls", "mean", "last")


def resolve_pooling(cfg: ModelConfig, pooling: str) -> str:
    """The pooling `auto` stands for with this backbone; checks an explicit choice.

    Raises:
      ValueError: an unknown pooling, or `pooler` on a backbone without one.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"task.pooling={pooling!r} is not one of {list(POOLINGS)}")
    has_pooler = cfg.family == "encoder" and cfg.use_pooler
    if pooling == "auto":
        if cfg.family != "encoder":
            return "last"
        return "pooler" if has_pooler else "cls"
    if pooling == "pooler" and not has_pooler:
        raise ValueError(
            "task.pooling=pooler needs an encoder with a pooler; use cls, mean or last"
        )
    return pooling


class TaskModel(nnx.Module):
    """A backbone from `model` plus a task head.

    Args:
      cfg: the backbone's model config.
      task: "classification", "regression" or "qa".
      num_outputs: classes (classification); ignored for regression (1) and QA (2).
      pooling: one of `POOLINGS` (sequence tasks only).
      rngs: parameter (and dropout) randomness.
    """

    def __init__(
        self, cfg: ModelConfig, task: str, num_outputs: int, pooling: str, *, rngs: nnx.Rngs
    ):
        if task not in ("classification", "regression", "qa"):
            raise ValueError(f"unknown task {task!r}")
        self.backbone = build_model(cfg, rngs=rngs)
        self.cfg = self.backbone.cfg
        self.task = task
        self.pooling = resolve_pooling(self.cfg, pooling) if task != "qa" else "none"
        outputs = {"classification": num_outputs, "regression": 1, "qa": 2}[task]
        if outputs < 1:
            raise ValueError(f"a classification head needs at least 1 class, got {outputs}")
        d = self.cfg.embed_dim
        kw = dict(rngs=rngs, dtype=jnp.float32)
        self.head_w = make_param(normal(INIT_STD), (d, outputs), ("embed", None), **kw)
        self.head_b = make_param(zeros, (outputs,), (None,), **kw)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array,
        token_types: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """Head outputs in float32: [B, C] (classification), [B] (regression) or [B, L, 2] (QA).

        Args:
          tokens, segment_ids, token_types, positions: [B, L] int32 (segment 0 = padding;
            rows are right-padded).
          deterministic: no dropout when True.
          rngs: dropout randomness (its `dropout` stream), for training.
        """
        kw = dict(positions=positions, segment_ids=segment_ids, lm_logits=False)
        kw.update(deterministic=deterministic, rngs=rngs)
        if self.cfg.family == "encoder":
            out = self.backbone(tokens, token_types=token_types, **kw)
        else:
            out = self.backbone(tokens, **kw)
        hidden = out.hidden.astype(jnp.float32)
        key = None
        if not deterministic and self.cfg.dropout > 0 and rngs is not None:
            key = rngs.dropout()
        if self.task == "qa":
            x = dropout(hidden, self.cfg.dropout, key)
            return jnp.einsum("BLD,DK->BLK", x, self.head_w[...]) + self.head_b[...]
        real = (segment_ids != 0).astype(jnp.float32)
        if self.pooling == "pooler":
            pooled = out.pooled.astype(jnp.float32)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "mean":
            pooled = (hidden * real[..., None]).sum(1) / jnp.maximum(real.sum(1), 1.0)[:, None]
        else:  # last real token of right-padded rows
            last = jnp.maximum(real.sum(1).astype(jnp.int32) - 1, 0)
            pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
        logits = dropout(pooled, self.cfg.dropout, key) @ self.head_w[...] + self.head_b[...]
        return logits[:, 0] if self.task == "regression" else logits
