"""Config fuzzing: every invalid config is a ConfigError before anything is compiled (issue 8).

Hypothesis starts from valid configs (the defaults, every model preset, every file in configs/)
and mutates them: wrong types, out-of-range numbers, NaN/inf, unknown keys and sections, bad
choices, and inconsistent combinations (heads, mesh sizes, batch divisibility, warmup, vocab,
task lengths and pooling, axis rules). Each config goes through what a run does before its
first compilation:

    config_from_dict -> validate -> validate_for_devices(8)            may raise ConfigError
    -> seed, lr schedule, optimizer, mesh, axis rules, pooling, RoPE   `before_the_model`
    -> eval_shape(build_model) -> state_shardings                      `up_to_compile`
    -> lower(train_step)                                               (a few examples)

An exception other than ConfigError anywhere after the first line is a bug. Most examples run
only the cheap stages; the configs the fuzzer means to be valid (small models, cross-field
combinations without junk) run them all. The default profile (derandomized: the same examples
every run) takes about half a minute; PLM_JAX_FUZZ_EXAMPLES=1000 runs ten times the examples
for a longer search. The regression tests for the bugs found are at the end of the file.
"""

import copy
import dataclasses
import inspect
import math
import os
import typing
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec

from plm_jax.config import (
    DEFAULT_AXIS_RULES,
    MODEL_PRESETS,
    Config,
    ConfigError,
    all_keys,
    config_from_dict,
    load_config,
    validate,
    validate_for_devices,
)
from plm_jax.models import count_params, resolve_model_config
from plm_jax.models.layers import rope_frequencies, rope_scaling_from_config
from plm_jax.sharding import batch_sharding, logical_to_sharding, make_mesh, use_mesh
from plm_jax.tasks.model import TaskModel, resolve_pooling
from plm_jax.train import step as train_step_module
from plm_jax.train.optimizer import layerwise_lr_factors, lr_schedule, make_optimizer
from plm_jax.train.state import model_graphdef, sharded_abstract_state, state_shardings

NUM_DEVICES = 8  # conftest.py's fake CPU devices
PARAM_BUDGET = 400_000  # larger models skip the jax stages (eval_shape cost grows with size)
MAX_LAYERS = 3  # unscanned layers are Python objects: keep eval_shape cheap
FALLBACK_VOCAB = 512  # model.vocab_size=0 with a tokenizer file whose size is not known here
SCALE = int(os.environ.get("PLM_JAX_FUZZ_EXAMPLES", "100")) / 100  # percent of the default
FUZZ = settings(
    max_examples=int(400 * SCALE),
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CONFIG_FILES = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
BASES: list[dict[str, Any]] = [
    {},
    *({"model": {"preset": name}} for name in MODEL_PRESETS),
    *(yaml.safe_load(p.read_text()) or {} for p in CONFIG_FILES),
]
KEYS = all_keys()


def _annotations(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> its type annotation, e.g. {'train.steps': int, ...}."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.update(_annotations(kind, prefix + f.name + "."))
        else:
            out[prefix + f.name] = kind
    return out


KINDS = _annotations()

# ---------------------------------------------------------------------------------------------
# Strategies.

NASTY_INTS = [0, -1, -2, 1, 2, 3, 7, 100, 2**31, 2**32, 2**63, 2**64, 10**30, 10**400]
NASTY_FLOATS = [0.0, -0.0, -1.0, 1e-30, 0.5, 1.0, 1.5, 2.0, 1e30, math.nan, math.inf, -math.inf]
NASTY_TEXT = ["", " ", "nan", "inf", "-1", "1e3", "3e-4", "true", "null", "[1]", "a.b", "<pad>"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 10),
    st.sampled_from(NASTY_INTS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(NASTY_FLOATS),
    st.sampled_from(NASTY_TEXT),
    st.text(max_size=6),
)
junk = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=4), scalars, max_size=2),
)
MESH_AXES = ["data", "fsdp", "tensor"]
RULE_TARGETS = [None, "data", "fsdp", "tensor", [], ["data", "fsdp"]]
RULE_TARGETS += [["fsdp", "fsdp"], ["tensor", None], ["fsdp", "tensor", "fsdp"], "fsdpp"]
rule_targets = st.one_of(
    st.none(),
    st.sampled_from(MESH_AXES),
    st.lists(st.sampled_from([*MESH_AXES, None]), max_size=3),  # duplicates and nulls included
    scalars,
)
rule_tables = st.dictionaries(
    st.sampled_from([*DEFAULT_AXIS_RULES, "embd", "experts"]), rule_targets, max_size=4
)


def typed_value(kind: Any) -> st.SearchStrategy:
    """Values of roughly the right type for an annotation, with its edge cases."""
    origin = typing.get_origin(kind)
    if origin is typing.Literal:
        choices = list(typing.get_args(kind))
        return st.one_of(st.sampled_from(choices), st.sampled_from([*NASTY_TEXT, "RMSNorm"]))
    if kind is bool:
        return st.booleans()
    if kind is int:
        return st.one_of(
            st.integers(-4, 70), st.sampled_from(NASTY_INTS), st.sampled_from([4.0, 2.5, 1e20])
        )
    if kind is float:
        return st.one_of(
            st.sampled_from(NASTY_FLOATS),
            st.floats(allow_nan=True, allow_infinity=True),
            st.sampled_from(["3e-4", "nan", "-inf", "1e400"]),
        )
    if kind is str:
        return st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=8))
    if origin is dict:
        return rule_tables
    return st.lists(st.sampled_from(NASTY_TEXT), max_size=3)  # list[str], str | list[str]


def _combo(**choices: list[Any]) -> st.SearchStrategy:
    """Several keys set together (one cross-field constraint), each from its own list."""
    return st.fixed_dictionaries(
        {k.replace("__", "."): st.sampled_from(v) for k, v in choices.items()}
    )


# Cross-field constraints: each draws all the keys one constraint reads, from short lists of
# values around its boundary (a quarter or so on the wrong side), so that combinations that
# pass validation reach the model and sharding stages and the bad ones turn up often.
combos = st.one_of(
    _combo(
        model__embed_dim=[8, 12, 16, 24, 32, 48, 64],
        model__num_heads=[1, 2, 3, 4, 6, 8, 16],
        model__num_kv_heads=[0, 1, 2, 3, 4, 8],
        model__head_dim=[0, 0, 2, 3, 4, 8],
        model__position=["learned", "rope"],
        model__rope_scaling=["", "", "llama3"],
    ),
    _combo(mesh__data=[-1, 1, 2, 8], mesh__fsdp=[-1, 1, 2, 3, 4], mesh__tensor=[-1, 1, 2, 4, 8]),
    _combo(train__batch_size=[1, 2, 3, 4, 8, 12, 16, 64], train__grad_accum=[1, 2, 3, 4, 8]),
    _combo(
        train__steps=[10, 600, 2**31 + 10, 2**32, 2**40],
        train__warmup_steps=[0, 9, 50, 2**31, 2**35],
        train__lr_schedule=["cosine", "linear", "constant"],
        train__min_lr_ratio=[0.0, 0.1, 1.0],
    ),
    _combo(
        train__nonfinite=["abort", "skip"],
        train__spike_window=[0, 1, 8, 1024, 1025],
        train__spike_zscore=[0.0, 6.0],
        train__max_skipped=[0, 1, 10],
        train__beta1=[0.9, 0.0, 1.0],
        train__beta2=[0.95, 0.999, 1.5],
    ),
    _combo(
        model__vocab_size=[0, 0, 15, 16, 100, 127, 128, 512],
        tokenizer__vocab_size=[8, 16, 100, 512, 4096],
        tokenizer__path=["", "", "tok.model"],
    ),
    _combo(
        task__name=["classification", "regression", "qa"],
        task__pooling=["pooler", "pooler", "auto", "cls", "mean", "last"],
        model__family=["decoder", "encoder"],
        model__use_pooler=[True, False],
    ),
    _combo(
        task__name=["", "classification", "regression", "qa", "translation"],
        task__layer_lr_decay=[1.0, 0.8, 0.0, 1.5],
        task__metric=["", "f1", "exact_match", "accuracy", "mse", "accuarcy"],
        model__family=["decoder", "encoder", "encoder_decoder"],
    ),
    _combo(
        task__name=["qa"],
        model__max_seq_len=[8, 16, 64, 128, 384],
        task__max_query_len=[1, 8, 64, 200],
        task__doc_stride=[0, 1, 8, 128],
    ),
    _combo(
        tokenizer__pad_piece=["<pad>", "", "<s>"],
        tokenizer__mask_piece=["<mask>", "", "</s>"],
        tokenizer__user_defined_symbols=[[], ["<sep>"], ["<pad>"], [""], ["<x>", "<x>"]],
    ),
    _combo(
        run__seed=[0, 1, 2**31, 2**32 - 1, 2**32, 2**63, -1],
        model__use_scan_layers=[False, True],
        model__remat=["none", "full", "dots"],
        model__dropout=[0.0, 0.1],
        model__family=["decoder", "encoder"],
        model__type_vocab_size=[0, 2],
        model__use_mlm_head=[True, False],
        model__tie_embeddings=[True, False],
        model__use_bias=[True, False],
    ),
    # One rule of the sharding table, with the mesh it applies to.
    st.fixed_dictionaries(
        {
            "mesh.data": st.sampled_from([-1, 1, 2]),
            "mesh.fsdp": st.sampled_from([1, 2, 4]),
            "mesh.tensor": st.sampled_from([1, 2, 4]),
            "mesh.rules": st.tuples(
                st.sampled_from(sorted(DEFAULT_AXIS_RULES)), st.sampled_from(RULE_TARGETS)
            ).map(lambda rule: {rule[0]: rule[1]}),
        }
    ),
)

unknown_keys = st.tuples(
    st.sampled_from(
        ["run.", "model.", "train.", "mesh.rules.", "", "bogus.", "train.steps."]
    ).flatmap(
        lambda prefix: st.text("abcdefghijklmnopqrstuvwxyz_.", min_size=1, max_size=8).map(
            prefix.__add__
        )
    ),
    scalars,
)
# (dotted key, value); key "" sets several keys at once. Cross-field combinations and values of
# roughly the right type come twice as often as junk: one junk value is enough for a rejection,
# and the interesting bugs hide behind configs that pass validation.
mutation = st.one_of(
    combos.map(lambda c: ("", c)),
    st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), typed_value(KINDS[k]))),
    combos.map(lambda c: ("", c)),
    st.sampled_from(KEYS).flatmap(lambda k: st.tuples(st.just(k), typed_value(KINDS[k]))),
    st.tuples(st.sampled_from(KEYS), junk),  # wrong types anywhere
    unknown_keys,
    st.tuples(st.sampled_from(["model", "train", "mesh", "task", "run"]), junk),  # a bad section
)

# Presets are large: most examples shrink the model first, so the jax stages run on them too.
SMALL_MODEL = {
    "model.num_layers": 1,
    "model.embed_dim": 32,
    "model.num_heads": 4,
    "model.num_kv_heads": 0,
    "model.head_dim": 0,
    "model.mlp_dim": 64,
    "model.max_seq_len": 32,
    "model.vocab_size": 0,
    "tokenizer.vocab_size": 256,
    "task.max_query_len": 8,  # QA windows that fit in max_seq_len=32
    "task.doc_stride": 8,
}


def _put(raw: dict[str, Any], key: str, value: Any) -> None:
    """Sets a dotted key, turning anything in the way into a section."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


@st.composite
def raw_configs(draw, mutations: st.SearchStrategy = mutation, small: bool = False) -> dict:
    """A base config, its model usually shrunk, then up to 3 mutations."""
    raw = copy.deepcopy(draw(st.sampled_from(BASES)))
    if small or draw(st.integers(0, 3)):  # 3 in 4
        for key, value in SMALL_MODEL.items():
            _put(raw, key, value)
    for key, value in draw(st.lists(mutations, max_size=3)):
        if key:
            _put(raw, key, value)
        else:
            for k, v in value.items():
                _put(raw, k, v)
    return raw


# ---------------------------------------------------------------------------------------------
# What a run does before it compiles.


def accepted(raw: dict[str, Any]) -> Config | None:
    """The config if it passes every check, None on a ConfigError (anything else propagates)."""
    try:
        cfg = config_from_dict(raw)
        validate(cfg)
        validate_for_devices(cfg, NUM_DEVICES)
    except ConfigError:
        return None
    return cfg


def model_config(cfg: Config):
    """The model config as a run resolves it: vocab_size 0 takes the tokenizer's (padded)."""
    m = cfg.model
    if m.vocab_size:
        return m
    vocab = FALLBACK_VOCAB if cfg.tokenizer.path else -(-cfg.tokenizer.vocab_size // 128) * 128
    return dataclasses.replace(m, vocab_size=vocab)


def before_the_model(cfg: Config) -> None:
    """The cheap steps that read the config before the model is built."""
    jax.random.key(cfg.run.seed)  # init_train_state's key
    lr_schedule(cfg.train)(0)  # the schedule's constants become int32 arrays
    make_optimizer(cfg.train)
    mesh = make_mesh(cfg.mesh)
    for name in DEFAULT_AXIS_RULES:  # every logical axis the models name
        logical_to_sharding((name,), mesh, cfg.mesh.rules)
    m = resolve_model_config(model_config(cfg))
    if cfg.task.name in ("classification", "regression"):
        resolve_pooling(m, cfg.task.pooling)
    if m.position == "rope" and count_params(m) <= PARAM_BUDGET:
        scaling = rope_scaling_from_config(m) if m.family == "decoder" else None
        with np.errstate(all="ignore"):
            frequencies = rope_frequencies(m.head_dim, m.rope_theta, scaling)
        assert np.isfinite(frequencies).all(), f"RoPE frequencies {frequencies}"


_REACHED: dict[str, bool] = {}  # the jax stages' results, by what they read of the config


def up_to_compile(cfg: Config, *, lower: bool = False) -> bool:
    """Everything after validation and before compilation; False when skipped as too large."""
    before_the_model(cfg)
    t = cfg.train
    task = (cfg.task.name, cfg.task.pooling, cfg.task.layer_lr_decay)
    key = repr((model_config(cfg), cfg.mesh, task, t.grad_clip > 0, lower and t))
    if key not in _REACHED:
        _REACHED[key] = _up_to_compile(cfg, lower)
    return _REACHED[key]


def _up_to_compile(cfg: Config, lower: bool) -> bool:
    m = model_config(cfg)
    if count_params(m) > PARAM_BUDGET or (m.num_layers > MAX_LAYERS and not m.use_scan_layers):
        return False
    _, params = model_graphdef(m)  # nnx.eval_shape of build_model
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == count_params(m)
    spec: Any = m
    factors = None
    if cfg.task.name in ("classification", "regression", "qa"):
        task, pooling = cfg.task.name, cfg.task.pooling
        spec = lambda rngs: TaskModel(m, task, 3, pooling, rngs=rngs)  # noqa: E731
        if cfg.task.layer_lr_decay < 1.0:
            _, params = model_graphdef(spec)
            decay = cfg.task.layer_lr_decay
            factors = layerwise_lr_factors(params, m.num_layers, decay, m.use_scan_layers)
    mesh = make_mesh(cfg.mesh)
    tx = make_optimizer(cfg.train, factors)
    with use_mesh(mesh, cfg.mesh.rules):
        shardings = state_shardings(spec, tx, mesh, cfg.mesh.rules)
        if lower and spec is m:
            _lower_train_step(cfg, m, tx, mesh, shardings)
    return True


def _lower_train_step(cfg, m, tx, mesh, shardings) -> None:
    """Traces and lowers (does not compile) the pretraining step on abstract inputs."""
    graphdef, _ = model_graphdef(m)
    kwargs = dict(
        graphdef=graphdef,
        tx=tx,
        schedule=lr_schedule(cfg.train),
        grad_accum=cfg.train.grad_accum,
        use_dropout=m.dropout > 0,
    )
    if "guard" in inspect.signature(train_step_module.train_step).parameters:
        kwargs["guard"] = train_step_module.Guard.from_config(cfg.train)
    rows, length = cfg.train.batch_size, m.max_seq_len
    batch = {
        k: jax.ShapeDtypeStruct((rows, length), jnp.int32)
        for k in ("inputs", "targets", "segment_ids", "positions")
    }
    batch["weights"] = jax.ShapeDtypeStruct((rows, length), jnp.float32)
    if m.family == "encoder_decoder":  # span corruption's decoder side (length: any)
        for k in ("decoder_inputs", "decoder_segment_ids", "decoder_positions"):
            batch[k] = batch["inputs"]
    step = jax.jit(
        partial(train_step_module.train_step, **kwargs),
        in_shardings=(shardings, batch_sharding(mesh)),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
    )
    step.lower(sharded_abstract_state(m, tx, shardings), batch)


# ---------------------------------------------------------------------------------------------
# The properties.


@FUZZ
@given(raw_configs())
def test_fuzzed_config_dicts_fail_only_with_config_error(raw):
    cfg = accepted(raw)
    event("accepted" if cfg is not None else "rejected")
    if cfg is not None:
        before_the_model(cfg)


# The configs the fuzzer means to be valid: small models with cross-field combinations.
combined_configs = raw_configs(combos.map(lambda c: ("", c)), small=True)


@settings(FUZZ, max_examples=int(40 * SCALE))
@given(combined_configs)
def test_fuzzed_valid_looking_configs_reach_the_jax_stages(raw):
    cfg = accepted(raw)
    assume(cfg is not None)
    event(f"reached the jax stages: {up_to_compile(cfg)}")


def _override(key: str, value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return f"{key}={text.removesuffix('...').strip()}"


def _overrides(key: str, value: Any) -> list[str]:
    pairs = value.items() if key == "" else [(key, value)]
    return [_override(k, v) for k, v in pairs]


override_groups = st.one_of(
    mutation.map(lambda m: _overrides(*m)),
    st.text("abcdefgmnprstu.=[]{},:- 0123456789", max_size=20).map(lambda text: [text]),
    st.sampled_from(["train.steps=", "=1", "model.=3", "model..num_layers=2", "a.b.c.d=1"]).map(
        lambda text: [text]
    ),
)


@settings(FUZZ, max_examples=int(100 * SCALE))
@given(st.sampled_from([None, *CONFIG_FILES]), st.lists(override_groups, max_size=3))
def test_fuzzed_overrides_fail_only_with_config_error(path, groups):
    items = [item for group in groups for item in group]
    try:
        cfg = load_config(path, [*_small(), *items])
        validate_for_devices(cfg, NUM_DEVICES)
    except ConfigError:
        return
    before_the_model(cfg)


@settings(FUZZ, max_examples=int(8 * SCALE))
@given(combined_configs)
def test_fuzzed_configs_lower_the_train_step(raw):
    cfg = accepted(raw)
    assume(cfg is not None)
    event(f"lowered: {up_to_compile(cfg, lower=True)}")


def test_every_base_config_reaches_the_jax_stages():
    """The seeds of the fuzzer are valid, so mutations start from configs that work."""
    reached = 0
    for raw in BASES:
        small = copy.deepcopy(raw)
        for key, value in SMALL_MODEL.items():
            _put(small, key, value)
        cfg = accepted(small)
        assert cfg is not None, raw
        reached += up_to_compile(cfg)
    assert reached == len(BASES)


SWEEP_VALUES = [
    *[None, True, False, 0, -1, 1, 3, 2**31, 2**32, 2**63, 10**400],
    *[0.5, 1.5, math.nan, math.inf, -math.inf, "", "x", "nan", [], ["x"], {}, {"a": 1}],
]


SWEEP_BASES = [
    {},
    {"model.position": "rope", "model.rope_scaling": "llama3"},
    {"model.preset": "bert-tiny", "task.name": "classification"},
]


@pytest.mark.parametrize("base", SWEEP_BASES, ids=["decoder", "rope", "encoder"])
def test_every_key_with_every_kind_of_bad_value(base):
    """Not random: every key once with each value above, on a small model."""
    for key in KEYS:
        for value in SWEEP_VALUES:
            raw = {}
            for k, v in [*base.items(), *SMALL_MODEL.items(), (key, value)]:
                _put(raw, k, v)
            try:
                cfg = accepted(raw)
                if cfg is not None:
                    before_the_model(cfg)
            except Exception as e:
                pytest.fail(f"{key}={value!r}: {type(e).__name__}: {e}")


# ---------------------------------------------------------------------------------------------
# Regression tests: one per bug found by the fuzzer, or by reading the code it runs ("read").


def _rejected(overrides: list[str], match: str) -> None:
    """The overrides fail validation (with or without the device checks) naming `match`."""
    with pytest.raises(ConfigError, match=match):
        validate_for_devices(load_config(None, overrides), NUM_DEVICES)


def test_a_preset_that_is_not_a_name_is_a_config_error():
    # was TypeError: unhashable type: 'list'
    for preset in (["gpt2-124m"], {"a": 1}, 3):
        with pytest.raises(ConfigError, match="model.preset=.* is not a known preset"):
            config_from_dict({"model": {"preset": preset}})


def test_integers_too_long_for_yaml_or_64_bits(tmp_path):
    # were ValueError (PyYAML: more than 4300 digits) and OverflowError (int -> float)
    digits = "9" * 5000
    _rejected([f"train.steps={digits}"], "must be an integer")
    path = tmp_path / "long.yaml"
    path.write_text(f"train:\n  steps: {digits}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    _rejected([f"train.steps={2**64}"], "must fit in 64 bits")
    _rejected([f"train.lr=1{'0' * 400}"], "must be a finite number")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan", "1e400"])
def test_non_finite_floats_are_rejected(value):
    # were accepted: train.lr=inf, train.weight_decay=nan, model.rope_theta=nan, ...
    for key in [k for k, kind in KINDS.items() if kind is float]:
        _rejected([f"{key}={value}"], f"{key}=.* must be a finite number")


def test_seed_fits_32_bits():
    # was OverflowError from jax.random.key (>= 2**63) and ValueError from grain (>= 2**32)
    _rejected([f"run.seed={2**32}"], r"run.seed=4294967296 must be below 2\*\*32")
    _rejected([f"run.seed={2**63}"], "run.seed")
    assert up_to_compile(load_config(None, [*_small(), f"run.seed={2**32 - 1}"]))


def test_step_counts_fit_int32():
    # was OverflowError while lowering the lr schedule (warmup_steps >= 2**31)
    _rejected([f"train.steps={2**40}", f"train.warmup_steps={2**35}"], r"below 2\*\*31")
    _rejected([f"train.steps={2**31}"], r"train.steps=2147483648 must be below 2\*\*31")


def test_a_partial_rule_table_keeps_the_other_rules():
    # `mesh.rules.embed=null` replaced the whole table: ConfigError in state_shardings
    cfg = load_config(None, [*_small(), "mesh.rules.embed=null", "mesh.fsdp=2"])
    assert cfg.mesh.rules == {**DEFAULT_AXIS_RULES, "embed": None}
    assert up_to_compile(cfg, lower=True)
    _rejected(["mesh.rules.embd=fsdp"], "mesh.rules.embd is not a logical axis; did you mean")
    # were DuplicateSpecError and ValueError from jax
    _rejected(["mesh.rules.embed=[fsdp, fsdp]"], "repeats one")
    _rejected(["mesh.rules.mlp=[tensor, null]"], "unknown mesh axis")


def test_pooler_pooling_needs_an_encoder_with_a_pooler():
    # was ValueError from TaskModel while building the train state
    _rejected(["task.name=classification", "task.pooling=pooler"], "needs an encoder")
    encoder = ["model.preset=bert-tiny", "task.name=regression", "task.pooling=pooler"]
    _rejected([*encoder, "model.use_pooler=false"], "model.use_pooler=False")
    assert up_to_compile(load_config(None, [*encoder, *_small()]))


def test_an_encoder_without_its_mlm_head_is_not_pretrained():
    # was AttributeError ('NoneType' object has no attribute 'astype') tracing the train step
    _rejected(["model.preset=bert-tiny", "model.use_mlm_head=false"], "cannot be pretrained")
    finetune = ["model.preset=bert-tiny", "model.use_mlm_head=false", "task.name=classification"]
    assert up_to_compile(load_config(None, [*finetune, *_small()]))


def test_qa_windows_leave_room_for_context():
    # read: a ConfigError only once the tokenizer was loaded and the data read
    _rejected(["task.name=qa"], "model.max_seq_len=128 leaves no context")
    ok = load_config(None, ["task.name=qa", "model.max_seq_len=256"])
    assert validate_for_devices(ok, NUM_DEVICES)


def test_task_metric_is_one_the_task_reports():
    # read: a KeyError at the first evaluation, after training
    _rejected(["task.name=classification", "task.metric=accuarcy"], "did you mean 'accuracy'")
    _rejected(["task.name=qa", "model.max_seq_len=256", "task.metric=mse"], "choose one of")
    load_config(None, ["task.name=regression", "task.metric=spearman"])


def test_task_metrics_table_matches_the_tasks():
    from plm_jax.config import TASK_METRICS
    from plm_jax.tasks.metrics import classification_metrics, regression_metrics
    from plm_jax.tasks.qa import QAExample
    from plm_jax.tasks.squad_metrics import squad_evaluate

    ids = np.array([0, 1, 1])
    reported = {
        "classification": {*classification_metrics(ids, ids, 2), "loss"},
        "regression": {*regression_metrics(ids, ids), "loss"},
        "qa": set(
            squad_evaluate(
                [QAExample("a", "q", "c", [("c", 0)], False), QAExample("b", "q", "c", [], True)],
                {"a": "c", "b": ""},
                version_2=True,
            )
        ),
    }
    for task, names in reported.items():
        assert {n for n in names if not n.endswith("total")} == set(TASK_METRICS[task]), task


def test_optimizer_and_norm_constants_in_range():
    # read: accepted, then NaN/inf in training (the finiteness check above found rope_theta=0)
    _rejected(["train.beta1=1.0"], r"train.beta1=1.0 must be in \[0, 1\)")
    _rejected(["train.beta2=-0.5"], "train.beta2=-0.5 must be")
    _rejected(["model.norm_eps=0"], "model.norm_eps=0.0 must be positive")
    _rejected(["model.rope_theta=-1", "model.position=rope"], "model.rope_theta=-1.0 must be")


def test_tokenizer_symbols_and_sample_size():
    # read: a ConfigError only when the tokenizer was trained
    for symbols in ("['<pad>']", "['']", "[a, a]"):
        _rejected([f"tokenizer.user_defined_symbols={symbols}"], "special pieces must be distinct")
    _rejected(["tokenizer.max_train_bytes=0"], "max_train_bytes=0 must be positive")


def test_a_date_is_a_valid_run_name():
    # read: YAML reads 2024-05-01 as a date: "run.name=datetime.date(2024, 5, 1) must be a string"
    assert load_config(None, ["run.name=2024-05-01"]).run.name == "2024-05-01"


def _small() -> list[str]:
    return [f"{k}={v}" for k, v in SMALL_MODEL.items()]
