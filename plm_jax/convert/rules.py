"""Tensor rules: how one Hugging Face tensor becomes plm_jax parameters, and back.

A `TensorRule` pairs one HF tensor name and shape with the plm_jax parameter paths it fills
and two pure functions, one per direction. Each family (`gpt2.py`, `llama.py`, `bert.py`) lists
its rules once, so import and export read from the same table and are inverse by construction:
every function below only reshapes, transposes, splits or concatenates, so a round trip is
exact.

Paths are tuples into the pure-dict form of the model's parameters
(`nnx.to_pure_dict(nnx.state(model, nnx.Param))`), with the layer index after "blocks", e.g.
`("blocks", 0, "attn", "w_q")`. Scanned stacks are handled by the caller (`hf.py`).

`Family` bundles what one HF architecture needs (names, config mapping, rule table);
`option`/`require` read config.json fields with typed, named errors.

What it leaves out: reading and writing files and the checks that every tensor and parameter
is used exactly once (all in `hf.py`); the families themselves (`gpt2.py`, `llama.py`,
`bert.py`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from plm_jax.config import ModelConfig
from plm_jax.errors import ConfigError

__all__ = [
    "Family",
    "Path",
    "TensorRule",
    "conv1d",
    "linear",
    "option",
    "require",
    "reshaped",
    "same",
    "split_columns",
]

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor <-> one or more plm_jax parameters.

    Attributes:
      hf_name: the full HF name, e.g. `model.layers.0.self_attn.q_proj.weight`.
      hf_shape: its expected shape.
      paths: the plm_jax parameter paths it fills, in the order `to_plm` returns them.
      to_plm: HF array -> tuple of plm_jax arrays (one per path).
      to_hf: plm_jax arrays (one per path, as positional arguments) -> the HF array.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    paths: tuple[Path, ...]
    to_plm: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]


def same(hf_name: str, path: Path, shape: tuple[int, ...]) -> TensorRule:
    """Identical layout on both sides (norm scales, embeddings, biases of one matrix)."""
    return TensorRule(hf_name, shape, (path,), lambda x: (x,), lambda y: y)


def reshaped(
    hf_name: str, hf_shape: tuple[int, ...], path: Path, shape: tuple[int, ...]
) -> TensorRule:
    """Same values, another shape: e.g. a head-major bias [N*H] -> [N, H]."""
    return TensorRule(
        hf_name,
        hf_shape,
        (path,),
        lambda x: (x.reshape(shape),),
        lambda y: y.reshape(hf_shape),
    )


def conv1d(
    hf_name: str, hf_shape: tuple[int, ...], path: Path, shape: tuple[int, ...]
) -> TensorRule:
    """GPT-2 `Conv1D` weights are stored [in, out], already plm_jax's order: only a reshape,
    e.g. c_proj [N*H, D] -> w_o [N, H, D], or a bias [N*H] -> [N, H]."""
    return TensorRule(
        hf_name,
        hf_shape,
        (path,),
        lambda x: (x.reshape(shape),),
        lambda y: y.reshape(hf_shape),
    )


def linear(
    hf_name: str, hf_shape: tuple[int, int], path: Path, shape: tuple[int, ...]
) -> TensorRule:
    """`torch.nn.Linear` weights are stored [out, in]: transpose to [in, out], then reshape,
    e.g. q_proj [N*H, D] -> w_q [D, N, H], o_proj [D, N*H] -> w_o [N, H, D]."""
    transposed = hf_shape[::-1]
    return TensorRule(
        hf_name,
        hf_shape,
        (path,),
        lambda x: (x.T.reshape(shape),),
        lambda y: y.reshape(transposed).T,
    )


def split_columns(
    hf_name: str, hf_shape: tuple[int, ...], paths: tuple[Path, ...], shape: tuple[int, ...]
) -> TensorRule:
    """One packed tensor split evenly along its last axis, each part reshaped to `shape`.

    GPT-2's c_attn packs q, k, v: weight [D, 3*N*H] -> w_q, w_k, w_v [D, N, H]; bias [3*N*H]
    -> b_q, b_k, b_v [N, H].
    """
    part = (*hf_shape[:-1], hf_shape[-1] // len(paths))

    def to_plm(x: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(p.reshape(shape) for p in np.split(x, len(paths), axis=-1))

    def to_hf(*ys: np.ndarray) -> np.ndarray:
        return np.concatenate([y.reshape(part) for y in ys], axis=-1)

    return TensorRule(hf_name, hf_shape, paths, to_plm, to_hf)


@dataclasses.dataclass(frozen=True)
class Family:
    """What one HF architecture needs: its names, its config mapping and its rule table.

    The fields after `rules` have defaults that fit a decoder LM (GPT-2, LLaMA); an encoder
    (BERT) sets them for its optional heads and its several accepted architectures.

    Attributes:
      model_type: `model_type` in config.json, e.g. "gpt2".
      architecture: the HF class written on export when `config_to_hf` names none, and accepted
        on import.
      prefix: the base model's name prefix, e.g. "transformer."; checkpoints saved from the
        bare base model omit it.
      embed_name: the token embedding's name after the prefix (compared with a tied head).
      buffers: matches non-parameter buffers that older checkpoints carry (causal masks, RoPE
        frequencies); they are skipped, everything else must be used.
      config_from_hf: config.json dict -> ModelConfig; raises ConfigError for what it can't map.
      config_to_hf: resolved ModelConfig -> config.json dict.
      mismatches: resolved ModelConfig -> the settings this family cannot express (empty if
        it can export the model).
      rules: (resolved ModelConfig, prefix) -> every TensorRule of the checkpoint.
      model_family: the plm_jax `model.family` it maps to; export only tries families of the
        model's own.
      architectures: further HF classes accepted on import (same weights, other heads).
      head_name: the output head's name, which a tied checkpoint may store as a copy of the
        embedding.
      legacy_names: (regex, replacement) pairs renaming tensors of older checkpoints before
        matching, e.g. BERT's `LayerNorm.gamma` -> `LayerNorm.weight`.
      copies: (resolved ModelConfig, prefix) -> {copy: source}: tensors that repeat another
        tensor. Export writes them; import accepts them absent, or present and equal.
      config_from_tensors: (ModelConfig, prefix, tensor names) -> ModelConfig, finishing what
        config.json leaves open (BERT: whether the pooler and MLM head exist), or None.
      export_prefix: resolved ModelConfig -> the prefix export writes (default `prefix`).
      dropped: matches tensors of heads plm_jax does not model (BERT's next-sentence head);
        they are skipped with a log line naming them.
    """

    model_type: str
    architecture: str
    prefix: str
    embed_name: str
    buffers: re.Pattern[str]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    mismatches: Callable[[ModelConfig], list[str]]
    rules: Callable[[ModelConfig, str], list[TensorRule]]
    model_family: str = "decoder"
    architectures: tuple[str, ...] = ()
    head_name: str = "lm_head.weight"
    legacy_names: tuple[tuple[str, str], ...] = ()
    copies: Callable[[ModelConfig, str], dict[str, str]] = lambda cfg, prefix: {}
    config_from_tensors: Callable[[ModelConfig, str, Collection[str]], ModelConfig] | None = None
    export_prefix: Callable[[ModelConfig], str] | None = None
    dropped: re.Pattern[str] | None = None

    @property
    def accepted(self) -> tuple[str, ...]:
        """Every HF class accepted on import."""
        return (self.architecture, *self.architectures)


_KINDS: dict[type, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    bool: (bool,),
    str: (str,),
}


def option(hf: dict[str, Any], key: str, default: Any, kind: type) -> Any:
    """`hf[key]` (or `default` when absent or null) checked to be of `kind`.

    Raises:
      ConfigError: a value of the wrong type, naming the key.
    """
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) is not (kind is bool) or not isinstance(value, _KINDS[kind]):
        raise ConfigError(
            f"config.json: {key}={value!r} must be a {kind.__name__}; fix the checkpoint's config"
        )
    return float(value) if kind is float else value


def require(hf: dict[str, Any], key: str, default: Any, allowed: tuple[Any, ...], why: str) -> Any:
    """`option(...)` that must be one of `allowed`; anything else would change the math.

    Raises:
      ConfigError: naming the key, its value, what plm_jax supports and why.
    """
    value = option(hf, key, default, type(allowed[0]))
    if value not in allowed:
        raise ConfigError(
            f"config.json: {key}={value!r} is not supported: {why}. Supported: "
            f"{', '.join(repr(a) for a in allowed)}"
        )
    return value
