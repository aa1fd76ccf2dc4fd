"""Hugging Face checkpoints <-> plm_jax `Decoder` / `Encoder` / `EncoderDecoder` parameters,
without torch.

A Hugging Face checkpoint directory holds `config.json` and safetensors weights; reading and
writing it lives in `hf_files.py` (no torch, no unpickling). The pipeline, each step pure:
  read_hf_checkpoint(dir)           -> (hf_config dict, {name: np.ndarray})
  model_config_from_hf(hf_config, tensors) -> ModelConfig (every math-changing option
      checked; the tensors settle optional heads, e.g. BERT's pooler)
  params_from_hf(cfg, hf_config, tensors) -> params: the nested pure dict of numpy arrays that
      `nnx.to_pure_dict(nnx.state(model, nnx.Param))` gives, ready for
      `nnx.replace_by_pure_dict`; scanned layers (each stack's) are stacked on a leading axis
  params_to_hf(cfg, params)         -> (hf_config, tensors), the exact inverse
  write_hf_checkpoint(dir, hf_config, tensors)
`load_hf_model` and `save_hf_model` chain them for a whole model (`load_hf_decoder` and
`save_hf_decoder` are their older names).

Families are picked once from `FAMILIES` by config.json's `model_type` (import) or by which
family of the model's `model.family` can express the ModelConfig (export). Every HF tensor is
used exactly once (known non-parameter buffers, equal copies and named dropped heads aside) and
every plm_jax parameter is filled, or a `DataError` names what is missing, left over or
misshapen.

What it leaves out: the per-family names and layouts (`gpt2.py`, `llama.py`, `bert.py`,
`t5.py`, on the rules of `rules.py`), file I/O (`hf_files.py`), tokenizers, and sharded writing.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax.config import ModelConfig
from plm_jax.convert.bert import BERT
from plm_jax.convert.gpt2 import GPT2
from plm_jax.convert.hf_files import quote_names, read_hf_checkpoint, write_hf_checkpoint
from plm_jax.convert.llama import LLAMA
from plm_jax.convert.rules import Family, TensorRule
from plm_jax.convert.t5 import T5
from plm_jax.errors import ConfigError, DataError
from plm_jax.models import Decoder, Encoder, EncoderDecoder, resolve_model_config
from plm_jax.models.sizes import layer_stacks, stack_layers, unstack_layers
from plm_jax.train.state import model_graphdef

__all__ = [
    "FAMILIES",
    "load_hf_decoder",
    "load_hf_model",
    "model_config_from_hf",
    "params_from_hf",
    "params_to_hf",
    "read_hf_checkpoint",
    "save_hf_decoder",
    "save_hf_model",
    "write_hf_checkpoint",
]

log = logging.getLogger(__name__)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (GPT2, LLAMA, BERT, T5)}

Params = dict[Any, Any]  # nested pure dict of arrays, as `nnx.to_pure_dict` gives


# ---------------------------------------------------------------------------------------------
# Configs.


def _family(hf_config: dict[str, Any]) -> Family:
    """The family named by `model_type`, after checking `architectures`.

    Raises:
      ConfigError: an unknown model_type or an architecture the family does not accept.
    """
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        names = ", ".join(a for f in FAMILIES.values() for a in f.accepted)
        raise ConfigError(
            f"config.json: model_type={model_type!r} is not supported; plm_jax converts "
            f"{sorted(FAMILIES)} ({names})"
        )
    family = FAMILIES[model_type]
    architectures = hf_config.get("architectures") or [family.architecture]
    if len(architectures) != 1 or architectures[0] not in family.accepted:
        raise ConfigError(
            f"config.json: architectures={architectures!r} of model_type={model_type!r} is not "
            f"supported; plm_jax converts {' and '.join(map(repr, family.accepted))} for it"
        )
    return family


def model_config_from_hf(
    hf_config: dict[str, Any], tensors: dict[str, np.ndarray] | None = None
) -> ModelConfig:
    """The plm_jax `ModelConfig` that computes the same function as an HF model.

    Sizes are explicit (num_kv_heads, head_dim, mlp_dim set), dropout is 0, dtypes float32.

    Args:
      hf_config: the parsed config.json.
      tensors: the checkpoint's tensors by HF name, or None. A family whose optional parts
        config.json does not record (BERT's pooler and MLM head) reads them from here; without
        tensors they follow `architectures`.

    Returns:
      The ModelConfig (family "decoder" for GPT-2/LLaMA, "encoder" for BERT,
      "encoder_decoder" for T5).

    Raises:
      ConfigError: an unsupported model_type/architecture, or any option that changes the
        math in a way plm_jax does not compute, named with its value.
    """
    family = _family(hf_config)
    # float32 compute, as transformers computes the reference; not model.dtype's "auto" (a
    # run from these weights takes its own dtype: init_from's RUNTIME_MODEL_FIELDS).
    cfg = dataclasses.replace(family.config_from_hf(hf_config), dtype="float32")
    if tensors is not None and family.config_from_tensors is not None:
        names = _canonical(family, tensors).keys()
        cfg = family.config_from_tensors(cfg, _prefix(family, names), names)
    return cfg


def _resolved(model_cfg: ModelConfig) -> ModelConfig:
    try:
        return resolve_model_config(model_cfg)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def _export_family(cfg: ModelConfig) -> Family:
    """The family that can express a resolved ModelConfig.

    Raises:
      ConfigError: no family can; lists each family's mismatching settings.
    """
    reasons = {}
    for family in (f for f in FAMILIES.values() if f.model_family == cfg.family):
        reasons[family.model_type] = family.mismatches(cfg)
        if not reasons[family.model_type]:
            return family
    detail = "; ".join(f"{k}: {', '.join(v)}" for k, v in reasons.items())
    if not reasons:
        detail = f"no family converts model.family={cfg.family!r}"
    raise ConfigError(f"the model matches no Hugging Face architecture plm_jax exports ({detail})")


# ---------------------------------------------------------------------------------------------
# Parameters.


def _flatten(tree: Params, prefix: tuple = ()) -> dict[tuple, Any]:
    """{path tuple: leaf} of a nested dict."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _path_name(path: tuple) -> str:
    return "/".join(map(str, path))


def _unflatten(flat: dict[tuple, Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _abstract_params(cfg: ModelConfig) -> dict[tuple, Any]:
    """{path: ShapeDtypeStruct} of every parameter of `build_model(cfg)`, allocating nothing."""
    _, abstract = model_graphdef(cfg)
    return _flatten(nnx.to_pure_dict(abstract))


def _prefix(family: Family, names: Any) -> str:
    """The family's base-model prefix, or "" for a checkpoint saved from the bare base model."""
    return family.prefix if any(n.startswith(family.prefix) for n in names) else ""


def _canonical(family: Family, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`tensors` with older checkpoints' names (`family.legacy_names`) in today's spelling.

    Raises:
      DataError: an old and a new name for the same tensor.
    """
    if not family.legacy_names:
        return tensors
    out: dict[str, np.ndarray] = {}
    for name, value in tensors.items():
        new = name
        for pattern, replacement in family.legacy_names:
            new = re.sub(pattern, replacement, new)
        if new in out:
            raise DataError(
                f"the checkpoint holds {new!r} twice (also under an older name such as {name!r});"
                " keep one of them"
            )
        out[new] = value
    return out


def params_from_hf(
    model_cfg: ModelConfig, hf_config: dict[str, Any], tensors: dict[str, np.ndarray]
) -> Params:
    """Maps HF tensors onto plm_jax parameters.

    Args:
      model_cfg: the model's config, normally `model_config_from_hf(hf_config)` (its dtypes,
        `use_scan_layers` and `remat` may be changed).
      hf_config: the parsed config.json (picks the family).
      tensors: every tensor by HF name (`read_hf_checkpoint`).

    Returns:
      The nested pure dict `nnx.to_pure_dict(nnx.state(build_model(model_cfg), nnx.Param))`
      would give, of numpy arrays in `model_cfg.param_dtype`; put it into a model with
      `nnx.replace_by_pure_dict`. Scanned layers are stacked on a leading axis.

    Raises:
      ConfigError: a family or model config that cannot take these weights.
      DataError: a missing, left-over or misshapen tensor, named with both shapes.
    """
    family = _family(hf_config)
    architecture = (hf_config.get("architectures") or [family.architecture])[0]
    cfg = _resolved(model_cfg)
    wrong = family.mismatches(cfg)
    if wrong:
        raise ConfigError(f"model config cannot hold {architecture} weights: {wrong}")
    tensors = _canonical(family, tensors)
    prefix = _prefix(family, tensors)
    rules = family.rules(cfg, prefix)
    copies = family.copies(cfg, prefix)
    for copy, source in copies.items():  # a checkpoint may keep only the copy's name
        if source not in tensors and copy in tensors:
            tensors = {(source if n == copy else n): x for n, x in tensors.items()}
    missing = [r.hf_name for r in rules if r.hf_name not in tensors]
    if missing:
        raise DataError(f"{architecture} checkpoint lacks tensors {quote_names(missing)}")
    flat = {}
    for rule in rules:
        arrays = rule.to_plm(_checked(rule, tensors[rule.hf_name]))
        flat.update(zip(rule.paths, arrays, strict=True))
    used = {r.hf_name for r in rules} | _tied_head(family, cfg, tensors, prefix)
    used |= _equal_copies(copies, tensors) | _dropped(family, tensors)
    extra = sorted(n for n in tensors if n not in used and not family.buffers.fullmatch(n))
    if extra:
        raise DataError(
            f"tensors {quote_names(extra)} are not part of a {architecture} with this "
            "config; the checkpoint holds a variant plm_jax does not convert"
        )
    if cfg.use_scan_layers:
        flat = stack_layers(flat, layer_stacks(cfg))
    abstract = _abstract_params(cfg)
    if set(flat) != set(abstract):  # the rule tables and the model disagree: a bug here
        differ = sorted(_path_name(p) for p in set(flat) ^ set(abstract))
        raise ValueError(f"conversion rules and the model disagree on {differ}")
    return _unflatten({p: np.asarray(flat[p], dtype=abstract[p].dtype) for p in abstract})


def _checked(rule: TensorRule, x: np.ndarray) -> np.ndarray:
    if tuple(x.shape) != rule.hf_shape:
        raise DataError(
            f"tensor {rule.hf_name!r} has shape {tuple(x.shape)}, but config.json implies "
            f"{rule.hf_shape}; the config and the weights do not belong together"
        )
    return x


def _tied_head(
    family: Family, cfg: ModelConfig, tensors: dict[str, np.ndarray], prefix: str
) -> set[str]:
    """{head name} when a tied checkpoint also stores its head (it must equal the embedding).

    Raises:
      DataError: a stored head that differs from the embedding under tied embeddings.
    """
    head, embed_name = family.head_name, prefix + family.embed_name
    if not cfg.tie_embeddings or head not in tensors:
        return set()
    if not np.array_equal(tensors[head], tensors[embed_name]):
        raise DataError(
            f"tie_word_embeddings is true but {head!r} differs from {embed_name!r}; set "
            "tie_word_embeddings false in config.json if the head is really separate"
        )
    return {head}


def _equal_copies(copies: dict[str, str], tensors: dict[str, np.ndarray]) -> set[str]:
    """The stored copies (`Family.copies`); each must equal its source.

    Raises:
      DataError: a copy that differs from its source.
    """
    stored = {copy for copy in copies if copy in tensors}
    for copy in stored:
        if not np.array_equal(tensors[copy], tensors[copies[copy]]):
            raise DataError(
                f"{copy!r} differs from {copies[copy]!r}, but plm_jax keeps one tensor for both; "
                "the checkpoint is inconsistent: copy the one its model computes with over the "
                "other"
            )
    return stored


def _dropped(family: Family, tensors: dict[str, np.ndarray]) -> set[str]:
    """The tensors of heads plm_jax does not model (`Family.dropped`), logged by name."""
    if family.dropped is None:
        return set()
    names = {n for n in tensors if family.dropped.fullmatch(n)}
    if names:
        log.info("skipping %s: a head plm_jax does not model", quote_names(sorted(names)))
    return names


def params_to_hf(
    model_cfg: ModelConfig, params: Params
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Maps plm_jax parameters onto a Hugging Face checkpoint; the inverse of `params_from_hf`.

    Args:
      model_cfg: the model's config; it must be expressible as GPT-2, LLaMA, BERT or T5.
      params: the nested pure dict `nnx.to_pure_dict(nnx.state(model, nnx.Param))` (numpy or
        jax arrays; scanned layers stacked on a leading axis when `use_scan_layers`).

    Returns:
      (hf_config, tensors): config.json content and numpy arrays by HF name, in the
      parameters' dtype (`dtype` in the config names it).

    Raises:
      ConfigError: a model no supported HF architecture can express, with the reasons.
      DataError: parameters that do not match `model_cfg` (a missing, extra or misshapen one).
    """
    cfg = _resolved(model_cfg)
    family = _export_family(cfg)
    flat = _flatten(params)
    abstract = _abstract_params(cfg)
    missing = sorted(_path_name(p) for p in abstract.keys() - flat.keys())
    extra = sorted(_path_name(p) for p in flat.keys() - abstract.keys())
    if missing or extra:
        raise DataError(
            f"parameters do not match the model config: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}"
        )
    for path, leaf in abstract.items():
        if tuple(np.shape(flat[path])) != tuple(leaf.shape):
            raise DataError(
                f"parameter {_path_name(path)} has shape {tuple(np.shape(flat[path]))}, "
                f"but the model config implies {tuple(leaf.shape)}"
            )
    flat = {p: np.asarray(v) for p, v in flat.items()}
    if cfg.use_scan_layers:
        flat = unstack_layers(flat, layer_stacks(cfg))
    prefix = family.prefix if family.export_prefix is None else family.export_prefix(cfg)
    tensors = {}
    for rule in family.rules(cfg, prefix):
        tensors[rule.hf_name] = np.ascontiguousarray(rule.to_hf(*(flat[p] for p in rule.paths)))
    for copy, source in family.copies(cfg, prefix).items():
        if family.buffers.fullmatch(copy):  # read from older checkpoints only (T5's)
            continue
        tensors[copy] = tensors[source].copy()  # safetensors refuses shared memory
    hf_config = family.config_to_hf(cfg)
    dtypes = {str(x.dtype) for x in tensors.values()}
    if len(dtypes) == 1:  # transformers loads in this dtype when asked for dtype="auto"
        hf_config["dtype"] = dtypes.pop()
    return hf_config, tensors


# ---------------------------------------------------------------------------------------------
# Whole models.


def load_hf_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    param_dtype: str = "float32",
    use_scan_layers: bool = False,
) -> Decoder | Encoder | EncoderDecoder:
    """The plm_jax model holding a Hugging Face GPT-2, LLaMA, BERT or T5 checkpoint's weights.

    Args:
      path: the checkpoint directory (config.json + safetensors).
      dtype: compute dtype ("float32", "bfloat16", "float16").
      param_dtype: storage dtype of the parameters ("float32", "bfloat16").
      use_scan_layers: stack the layers for `nnx.scan`.

    Returns:
      The model (`Decoder`, `Encoder` or `EncoderDecoder`, built by `models.build_model`);
      `model.cfg` is its resolved config.

    Raises:
      DataError, ConfigError: as `read_hf_checkpoint`, `model_config_from_hf`,
        `params_from_hf`.
    """
    hf_config, tensors = read_hf_checkpoint(path)
    cfg = dataclasses.replace(
        model_config_from_hf(hf_config, tensors),
        dtype=dtype,
        param_dtype=param_dtype,
        use_scan_layers=use_scan_layers,
    )
    params = params_from_hf(cfg, hf_config, tensors)
    graphdef, state = model_graphdef(cfg)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def save_hf_model(model: Decoder | Encoder | EncoderDecoder, path: str | Path) -> None:
    """Writes a plm_jax model as a Hugging Face checkpoint directory (`params_to_hf` + write)."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    write_hf_checkpoint(path, *params_to_hf(model.cfg, params))


# The names from before encoders existed; they load and save any family.
load_hf_decoder = load_hf_model
save_hf_decoder = save_hf_model
