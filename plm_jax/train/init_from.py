"""Starting a run from another run's weights (`init_from`), honouring what the user set.

    resolve_init_from  the run's config: the source's architecture, with every `model.*` field
                       the user gave honoured when it keeps parameter shapes, and refused
                       (ConfigError, naming source value, user value and fix) when it does not
    load_init_params   the source's parameters in the new run's layout: a learned position
                       table cut to a shorter `max_seq_len`, layers stacked or unstacked for
                       `use_scan_layers`, cast to `param_dtype`

What this module leaves out: resuming a run from its own checkpoints (`Checkpointer`), and
importing Hugging Face weights (`convert/`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from plm_jax.checkpoint import Checkpointer, locate_checkpoint
from plm_jax.config import Config, ModelConfig, config_from_dict
from plm_jax.errors import ConfigError, DataError
from plm_jax.models.sizes import layer_stacks, resolve_model_config, stack_layers, unstack_layers
from plm_jax.train.state import model_graphdef

log = logging.getLogger(__name__)

# Model settings a run started from `init_from` always takes from its own config (given or
# default): they change how the step runs, not what the weights mean.
RUNTIME_MODEL_FIELDS = ("dropout", "attention", "remat", "dtype", "param_dtype")
# Fields that set parameter shapes or the tree of parameters: the source's value or an error.
SHAPE_FIELDS = (
    "family",
    "vocab_size",
    "num_layers",
    "num_decoder_layers",
    "embed_dim",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "mlp_dim",
    "position",
    "relative_buckets",
    "norm",
    "mlp",
    "use_bias",
    "tie_embeddings",
    "type_vocab_size",
    "use_pooler",
    "use_mlm_head",
)


def _shapes_of(model: ModelConfig) -> tuple:
    """The shape-setting fields with every `0 = derive it` filled in."""
    with contextlib.suppress(ValueError):  # heads that do not divide: validate() says so
        model = resolve_model_config(dataclasses.replace(model, vocab_size=model.vocab_size or 1))
    return tuple(getattr(model, name) for name in SHAPE_FIELDS)


def honoured_model(source: ModelConfig, user: ModelConfig, given: frozenset[str]) -> ModelConfig:
    """The model a run from `source`'s weights trains: `source` with the user's settings.

    Raises:
      ConfigError: a given field would change parameter shapes.
    """
    changes = {name: getattr(user, name) for name in RUNTIME_MODEL_FIELDS}
    shaped = {}
    for f in dataclasses.fields(ModelConfig):
        name = f.name
        if f"model.{name}" not in given or name in RUNTIME_MODEL_FIELDS or name == "preset":
            continue
        if name == "vocab_size" and user.vocab_size == 0:
            continue  # 0: the tokenizer's, i.e. the source's
        (shaped if name in SHAPE_FIELDS else changes)[name] = getattr(user, name)
    for name, value in shaped.items():
        if _shapes_of(dataclasses.replace(source, **{name: value})) != _shapes_of(source):
            raise ConfigError(
                f"model.{name}={value!r} does not fit init_from's weights, which have "
                f"{name}={getattr(source, name)!r}: it would change parameter shapes; remove "
                f"model.{name} to keep the source's, or train from scratch without init_from"
            )
    longest = source.max_seq_len
    if source.position == "learned" and changes.get("max_seq_len", longest) > longest:
        raise ConfigError(
            f"model.max_seq_len={changes['max_seq_len']} is longer than init_from's learned "
            f"position table ({longest} rows): positions past {longest} have no trained "
            f"embedding; set model.max_seq_len<={longest}"
        )
    return dataclasses.replace(source, **changes)


def resolve_init_from(cfg: Config) -> Config:
    """The config of a run that starts from `init_from`: its architecture and tokenizer.

    `model` is the source checkpoint's with the user's settings honoured (`honoured_model`),
    and `tokenizer.path` the source's tokenizer unless `cfg` names one. A run that already
    holds checkpoints takes them from its own newest checkpoint instead, so it resumes even
    when the source has since moved. Without `init_from`, `cfg` is returned unchanged.

    Raises:
      DataError: `init_from` is not a run directory or checkpoint, or it has no tokenizer.
      ConfigError: a given model setting would change the source's parameter shapes.
    """
    if not cfg.init_from:
        return cfg
    own = cfg.run_dir / "checkpoints"
    source_dir, step = (cfg.run_dir, None) if own.is_dir() else locate_checkpoint(cfg.init_from)
    checkpointer = Checkpointer(source_dir, cfg.checkpoint, read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.all_steps():
            raise DataError(f"init_from={cfg.init_from!r}: no committed checkpoint in {source_dir}")
        source = config_from_dict(checkpointer.restore_config(step))
    finally:
        checkpointer.close()
    model = honoured_model(source.model, cfg.model, cfg.given)
    tokenizer_path = cfg.tokenizer.path or source.tokenizer.path
    if not tokenizer_path:
        if not (source_dir / "tokenizer").is_dir():
            raise DataError(f"init_from={cfg.init_from!r}: {source_dir} has no tokenizer/")
        tokenizer_path = str((source_dir / "tokenizer").absolute())
    tokenizer = dataclasses.replace(cfg.tokenizer, path=tokenizer_path)
    return dataclasses.replace(cfg, model=model, tokenizer=tokenizer)


def load_init_params(cfg: Config, model: ModelConfig, params: Any, shardings: Any) -> Any:
    """The parameters of the `init_from` checkpoint, restored into the shapes, dtypes and
    shardings of `params` / `shardings` (a whole model's, or a task model's backbone), which
    `model` (the run's, vocabulary size resolved) describes."""
    source_dir, step = locate_checkpoint(cfg.init_from)
    checkpointer = Checkpointer(source_dir, cfg.checkpoint, read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        source = config_from_dict(checkpointer.restore_config(step)).model
        same_layout = (source.max_seq_len, source.use_scan_layers) == (
            model.max_seq_len,
            model.use_scan_layers,
        )
        if same_layout:
            abstract = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params, shardings
            )
            restored = checkpointer.restore_params(step, abstract)
        else:
            restored = _restore_relaid(checkpointer, step, source, model, params, shardings)
    finally:
        checkpointer.close()
    log.info("initialised from %s (step %d)", source_dir / "checkpoints" / str(step), step)
    return restored


def _restore_relaid(
    checkpointer: Checkpointer,
    step: int,
    source: ModelConfig,
    target: ModelConfig,
    params: Any,
    shardings: Any,
) -> Any:
    """Restores the source layout on the host, then cuts, (un)stacks and shards it."""
    layout = dataclasses.replace(
        target, max_seq_len=source.max_seq_len, use_scan_layers=source.use_scan_layers
    )
    host = SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    _, shapes = model_graphdef(layout)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=host), shapes)
    flat = {
        _names(p): np.asarray(x) for p, x in _leaves(checkpointer.restore_params(step, abstract))
    }
    stacks = layer_stacks(resolve_model_config(layout))
    if source.use_scan_layers and not target.use_scan_layers:
        flat = unstack_layers(flat, stacks)
    elif target.use_scan_layers and not source.use_scan_layers:
        flat = stack_layers(flat, stacks)
    if target.max_seq_len < source.max_seq_len:
        flat = {k: v[: target.max_seq_len] if k[0] == "pos_embed" else v for k, v in flat.items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for (path, like), sharding in zip(leaves, jax.tree.leaves(shardings), strict=True):
        value = flat[_names(path)].astype(like.dtype)
        assert value.shape == like.shape, (_names(path), value.shape, like.shape)
        out.append(jax.make_array_from_callback(like.shape, sharding, lambda i, v=value: v[i]))
    return jax.tree_util.tree_unflatten(treedef, out)


def _leaves(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _names(path: tuple) -> tuple:
    """(stack, 0, 'attn', 'w_q') for a parameter's key path (Variable `.value` dropped)."""
    keys = []
    for entry in path:
        if hasattr(entry, "key"):
            keys.append(entry.key)
        elif hasattr(entry, "idx"):
            keys.append(entry.idx)
    return tuple(keys)
