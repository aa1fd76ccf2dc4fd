"""The train state and its sharded creation.

`TrainState` is a plain pytree (step, params, optimizer state, base RNG key). Its shardings are
derived, not written: `nnx.eval_shape` gives the parameters' logical axis names, the rule table
maps them to the mesh, and the optimizer state inherits each parameter's sharding through
`optax.tree_map_params`. `init_train_state` then runs the initialiser under `jax.jit` with those
`out_shardings`, so the full state never exists on one device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from plm_jax.config import MAX_SPIKE_WINDOW, ModelConfig
from plm_jax.models import build_model
from plm_jax.sharding import logical_to_sharding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """step: [] int32; params: nnx.State of parameter arrays; opt_state: optax state;
    rng: [2] uint32 base key (dropout keys are folded from it with the step);
    loss_window: [MAX_SPIKE_WINDOW] f32, the latest finite losses, newest last, NaN where
    not yet filled (loss-spike detection, `train.spike_window`)."""

    step: jax.Array
    params: nnx.State
    opt_state: Any
    rng: jax.Array
    loss_window: jax.Array


def empty_loss_window() -> jax.Array:
    return jnp.full((MAX_SPIKE_WINDOW,), jnp.nan, jnp.float32)


# What a train state is built from: a model config (its `build_model`), or a function from
# `nnx.Rngs` to a module (task models: a backbone plus a head).
ModelSpec = ModelConfig | Callable[[nnx.Rngs], nnx.Module]


def _build(spec: ModelSpec, rngs: nnx.Rngs) -> nnx.Module:
    return spec(rngs) if callable(spec) else build_model(spec, rngs=rngs)


def model_graphdef(model_cfg: ModelSpec) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's static structure and its abstract parameters (no memory allocated)."""
    abstract = nnx.eval_shape(lambda: _build(model_cfg, nnx.Rngs(params=0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    return graphdef, params


def _init(key: jax.Array, model_cfg: ModelSpec, tx: optax.GradientTransformation) -> TrainState:
    init_key, rng = jax.random.split(key)
    model = _build(model_cfg, nnx.Rngs(params=init_key))
    params = nnx.state(model, nnx.Param)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(rng),
        loss_window=empty_loss_window(),
    )


def abstract_train_state(
    model_cfg: ModelSpec, tx: optax.GradientTransformation, seed: int = 0
) -> TrainState:
    """Shapes and dtypes of the train state, computed without allocating it."""
    return jax.eval_shape(lambda: _init(jax.random.key(seed), model_cfg, tx))


def sharded_abstract_state(
    model_cfg: ModelSpec, tx: optax.GradientTransformation, shardings: TrainState
) -> TrainState:
    """`ShapeDtypeStruct`s carrying `shardings`: the target a checkpoint is restored into."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_train_state(model_cfg, tx),
        shardings,
    )


def state_shardings(
    model_cfg: ModelSpec,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    rules: Mapping[str, Any] | None = None,
) -> TrainState:
    """`NamedSharding`s for every leaf of the train state, from the logical axis rules."""
    replicated = NamedSharding(mesh, PartitionSpec())
    _, abstract_params = model_graphdef(model_cfg)
    logical = nnx.get_partition_spec(abstract_params)
    params = jax.tree.map(
        lambda spec, leaf: logical_to_sharding(tuple(spec), mesh, rules, leaf.shape),
        logical,
        abstract_params,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    abstract = abstract_train_state(model_cfg, tx)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        abstract.opt_state,
        params,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )
    return TrainState(
        step=replicated, params=params, opt_state=opt_state, rng=replicated, loss_window=replicated
    )


def init_train_state(
    model_cfg: ModelSpec,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    rules: Mapping[str, Any] | None = None,
) -> tuple[TrainState, TrainState]:
    """A freshly initialised state, created directly in its sharded layout.

    Returns:
      (state, shardings): the state and the matching tree of `NamedSharding`s.
    """
    shardings = state_shardings(model_cfg, tx, mesh, rules)
    init = jax.jit(lambda key: _init(key, model_cfg, tx), out_shardings=shardings)
    return init(jax.random.key(seed)), shardings
