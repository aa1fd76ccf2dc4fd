"""The four explanations, as numbers: attention maps, the logit lens, token attributions
(gradient x input and integrated gradients) and ablations.

Every method reads one score: `log P(target)` under the subject's output (`subject.py`).

- Attention: the softmax weights of every layer and head of every attention site.
- Logit lens (nostalgebraist 2020): each layer's residual stream read through the model's own
  final norm and head; the last layer's reading is the model's output.
- Gradient x input: `(e - e0) . d score / d e` per token, with e the token embeddings and
  e0 the baseline.
- Integrated gradients (Sundararajan et al. 2017): `(e - e0) . integral_0^1 d score(e0 +
  a (e - e0)) / d e da`, the integral by `steps`-point Gauss-Legendre quadrature (exact for
  polynomials of degree 2 * steps - 1; Captum's default rule). Completeness says the
  attributions sum to `score(e) - score(e0)`; the error of that sum is reported, absolute and
  relative to the difference. Baselines: "pad" (every token's embedding replaced by the pad
  token's; the default) or "zero" (all token embeddings 0). Positions, token types and the
  decoder side stay. The zero baseline is ill-posed for models without biases whose first
  layer normalises its input (LLaMA, T5): RMSNorm(0) = 0 makes the output uniform exactly at
  a = 0 but not as a -> 0, so no quadrature reaches completeness there; the reported error
  shows it.
- Ablations: the score's change when one head (or one layer's whole attention, cross-attention
  or MLP branch) is zeroed or mean-ablated (`trace.Knobs`), all in one mapped call.

What it leaves out: figures and files (`figures.py`, `report.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.explain.subject import ClassHead, Readout, output_logits
from plm_jax.explain.trace import Inputs, Knobs, default_knobs, trace, unrolled

__all__ = ["BASELINES", "Attributions", "Probe"]

BASELINES = ("zero", "pad")
ABLATION_BATCH = 8  # ablated forward passes per vmapped chunk


@dataclasses.dataclass
class Attributions:
    """Per attributed token: `integrated` and `gradient_x_input` ([L] float64, summed over
    the embedding); `score`/`baseline_score` (the score at the input and at the baseline);
    `completeness_error`: |sum(integrated) - (score - baseline_score)|, and
    `relative_error`: that divided by |score - baseline_score|."""

    integrated: np.ndarray
    gradient_x_input: np.ndarray
    score: float
    baseline_score: float
    completeness_error: float
    relative_error: float
    baseline: str
    steps: int


def _score(logits: jax.Array, target: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32))[target]


def _forward(state, head, inputs, embeds, knobs, *, graphdef, readout, mode):
    model = nnx.merge(graphdef, state)
    t = trace(model, inputs, embeds=embeds, knobs=knobs, mode=mode)
    return t, output_logits(model, head, readout, t.streams[readout.stack][-1])


def _lens(state, head, inputs, *, graphdef, readout):
    model = nnx.merge(graphdef, state)
    t = trace(model, inputs)
    streams = t.streams[readout.stack]  # [layers + 1, L, D]
    if readout.kind == "none":  # no output head to read through
        return t, jnp.zeros((streams.shape[0], 0), jnp.float32)
    lens = jax.vmap(lambda s: output_logits(model, head, readout, s))(streams)
    return t, lens


def _embeds(state, inputs, *, graphdef):
    return nnx.merge(graphdef, state).embed(inputs.tokens)


def _integrated(state, head, inputs, embeds, baseline, alphas, weights, target, **static):
    """(IG [1, L, D], gradient x input [1, L, D], score, baseline score)."""

    def score(e):
        return _score(_forward(state, head, inputs, e, None, **static)[1], target)

    grad = jax.grad(score)
    diff = embeds - baseline
    path_grads = jax.vmap(lambda a: grad(baseline + a * diff))(alphas)  # [steps, 1, L, D]
    integral = jnp.tensordot(weights, path_grads, axes=1)
    return diff * integral, diff * grad(embeds), score(embeds), score(baseline)


def _ablated(state, head, inputs, knobs, target, **static):
    def one(k):
        return _score(_forward(state, head, inputs, None, k, **static)[1], target)

    return jax.lax.map(one, knobs, batch_size=ABLATION_BATCH)


def ig_nodes(steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) of `steps`-point Gauss-Legendre quadrature on [0, 1]; the weights
    sum to 1."""
    nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
    return (nodes + 1) / 2, weights / 2


class Probe:
    """A model (and classifier head) with jitted explanation passes over one subject.

    Args:
      model: Decoder, Encoder or EncoderDecoder (a scanned one is unrolled first).
      head: a classifier's `ClassHead`, or None.
      readout: what is read (`Subject.readout`).
      mode: ablation "zero" or "mean".
    """

    def __init__(self, model: Any, head: ClassHead | None, readout: Readout, mode: str):
        model = unrolled(model)
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self.head, self.readout, self.mode = head, readout, mode
        static = dict(graphdef=self.graphdef, readout=readout, mode=mode)
        self._forward = jax.jit(functools.partial(_forward, **static))
        self._lens = jax.jit(functools.partial(_lens, graphdef=self.graphdef, readout=readout))
        self._embeds = jax.jit(functools.partial(_embeds, graphdef=self.graphdef))
        self._integrated = jax.jit(functools.partial(_integrated, **static))
        self._ablated = jax.jit(functools.partial(_ablated, **static))

    def lens(self, inputs: Inputs) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(attention site -> [layers, N, L, S] weights, lens logits [layers + 1, V or C]):
        the readout of the stream entering each block, then of the last one (the output)."""
        t, lens = self._lens(self.state, self.head, inputs)
        return {k: np.asarray(v) for k, v in t.attention.items()}, np.asarray(lens)

    def output(self, inputs: Inputs) -> np.ndarray:
        """The model's output logits at the readout ([V] or [C] float32)."""
        return np.asarray(self._forward(self.state, self.head, inputs, None, None)[1])

    def attributions(
        self, inputs: Inputs, target: int, *, baseline: str, steps: int, pad_id: int
    ) -> Attributions:
        """Integrated gradients and gradient x input over the attributed tokens."""
        embeds = self._embeds(self.state, inputs)
        if baseline == "zero":
            base = jnp.zeros_like(embeds)
        else:
            pad = Inputs(jnp.full_like(inputs.tokens, pad_id))
            base = self._embeds(self.state, pad)
        nodes, node_weights = ig_nodes(steps)
        alphas = jnp.asarray(nodes, jnp.float32)
        weights = jnp.asarray(node_weights, jnp.float32)
        ig, gxi, score, base_score = jax.device_get(
            self._integrated(
                self.state, self.head, inputs, embeds, base, alphas, weights, jnp.int32(target)
            )
        )
        integrated = ig[0].astype(np.float64).sum(-1)
        diff = float(score) - float(base_score)
        error = abs(float(integrated.sum()) - diff)
        return Attributions(
            integrated=integrated,
            gradient_x_input=gxi[0].astype(np.float64).sum(-1),
            score=float(score),
            baseline_score=float(base_score),
            completeness_error=error,
            relative_error=error / max(abs(diff), 1e-12),
            baseline=baseline,
            steps=len(nodes),
        )

    def ablation_knobs(self) -> tuple[list[tuple[str, str, int, int | None]], Knobs]:
        """Every single ablation: ([(stack, part, layer, head or None)], stacked knobs with a
        leading axis of that length)."""
        base = default_knobs(self.cfg)
        labels, batch = [], []
        for stack, parts in base.items():
            for part, keep in parts.items():
                if keep.ndim == 2:
                    cells = [
                        (layer, h) for layer in range(keep.shape[0]) for h in range(keep.shape[1])
                    ]
                else:
                    cells = [(layer, None) for layer in range(keep.shape[0])]
                for layer, h in cells:
                    k = jax.tree.map(np.array, base)
                    k[stack][part] = k[stack][part].copy()
                    k[stack][part][(layer,) if h is None else (layer, h)] = 0.0
                    labels.append((stack, part, layer, h))
                    batch.append(k)
        return labels, jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *batch)

    def ablations(self, inputs: Inputs, target: int) -> dict[str, Any]:
        """{"clean": score, stack: {part: [layers, N] or [layers] score changes}}."""
        clean = _score(jnp.asarray(self.output(inputs)), target)
        labels, knobs = self.ablation_knobs()
        scores = np.asarray(self._ablated(self.state, self.head, inputs, knobs, jnp.int32(target)))
        base = default_knobs(self.cfg)
        out: dict[str, Any] = {"clean": float(clean)}
        for stack, parts in base.items():
            out[stack] = {part: np.zeros(keep.shape, np.float64) for part, keep in parts.items()}
        for (stack, part, layer, h), s in zip(labels, scores, strict=True):
            out[stack][part][(layer,) if h is None else (layer, h)] = float(s) - float(clean)
        return out

    def ablated_output(self, inputs: Inputs, knobs: Knobs) -> np.ndarray:
        """The output logits with the given keep values (for checks and scripts)."""
        return np.asarray(self._forward(self.state, self.head, inputs, None, knobs)[1])
