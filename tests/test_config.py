"""Config: defaults, YAML deltas, overrides, typo suggestions, types and cross-field checks."""

import pytest
import yaml

from plm_jax.config import (
    MODEL_PRESETS,
    Config,
    ConfigError,
    MeshConfig,
    all_keys,
    config_to_dict,
    load_config,
    resolve_mesh_shape,
    save_config,
    validate_for_devices,
)


def test_defaults_are_the_quick_start():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.run.name == "quickstart"
    assert str(cfg.run_dir) == "runs/quickstart"
    assert cfg.data.source == "builtin:python-stdlib"


def test_yaml_delta_and_overrides_win_in_order(tmp_path):
    path = tmp_path / "small.yaml"
    path.write_text("train:\n  steps: 50\n  lr: 3e-4\nmodel:\n  num_layers: 3\n")
    cfg = load_config(path, ["train.steps=70", "mesh.tensor=2"])
    assert cfg.run.name == "small"  # named after the file
    assert str(cfg.run_dir) == "runs/small"
    assert cfg.train.steps == 70
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string
    assert cfg.model.num_layers == 3
    assert cfg.mesh.tensor == 2


def test_preset_fills_model_and_explicit_keys_override_it():
    cfg = load_config(None, ["model.preset=gpt2-124m", "model.num_layers=6"])
    assert cfg.model.embed_dim == 768 and cfg.model.vocab_size == 50257
    assert cfg.model.num_layers == 6
    llama = load_config(None, ["model.preset=llama-1b", "model.max_seq_len=512"])
    assert llama.model.num_kv_heads == 8 and llama.model.position == "rope"


@pytest.mark.parametrize(
    "override, message",
    [
        ("not.a.key=1", r"unknown config key 'not\.a\.key'"),
        ("train.stepz=10", r"unknown config key 'train\.stepz'; did you mean 'train\.steps'\?"),
        ("model.num_layer=4", r"did you mean 'model\.num_layers'"),
        ("train.steps=abc", r"train\.steps='abc' must be an integer"),
        ("train.steps=1.5", r"must be an integer"),
        ("train.lr=fast", r"train\.lr='fast' must be a number"),
        ("model.use_bias=maybe", r"must be true or false"),
        ("model.norm=rms", r"choose one of \['layernorm', 'rmsnorm'\]; did you mean 'rmsnorm'"),
        ("model.preset=gpt3", r"not a known preset"),
        ("train.warmup_steps=600", r"warmup_steps=600 must be smaller than train\.steps=600"),
        ("train.grad_accum=5", r"not divisible by train\.grad_accum=5"),
        ("model.num_kv_heads=3", r"num_heads=4 is not divisible by model\.num_kv_heads=3"),
        ("model.embed_dim=130", r"embed_dim=130 is not divisible by model\.num_heads=4"),
        ("train.batch_size=0", r"train\.batch_size=0 must be positive"),
        ("data.eval_fraction=1.5", r"eval_fraction=1\.5 must be in \[0, 1\)"),
        ("mesh.rules.embed=fsdpp", r"unknown mesh axis"),
        ("mesh.data=0", r"mesh\.data=0 must be positive or -1"),
        ("tokenizer.mask_piece=</s>", r"special pieces must be distinct"),
        ("data.tokenize_threads=-1", r"must be >= 0"),
        ("model.vocab_size=1000", r"model\.vocab_size=1000 is smaller than tokenizer\.vocab_size"),
        ("train.steps", r"not of the form section\.key=value"),
        ("train=3", r"train must be a mapping"),
        ("train.steps.x=1", r"'train\.steps\.x': 'train\.steps' is a value, not a section"),
    ],
)
def test_bad_overrides_raise_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    code = tmp_path / "code.yaml"
    code.write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):  # safe_load refuses tags
        load_config(code)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trian.steps'; did you mean"):
        load_config(unknown)


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["train.steps=77", "data.source=[a.txt, b.jsonl]", "run.name=x"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == config_to_dict(cfg)


def test_every_key_is_overridable():
    keys = all_keys()
    assert "train.steps" in keys and "mesh.rules" in keys and "init_from" in keys
    for key in [
        "run.dir",
        "run.seed",
        "model.preset",
        "model.max_seq_len",
        "init_from",
        "data.source",
        "data.text_field",
        "tokenizer.path",
        "tokenizer.vocab_size",
        "train.steps",
        "train.batch_size",
        "train.grad_accum",
        "train.lr",
        "train.warmup_steps",
        "train.log_every",
        "train.eval_every",
        "checkpoint.save_every",
        "checkpoint.keep",
        "mesh.data",
        "mesh.fsdp",
        "mesh.tensor",
        "task.name",
        "task.train_file",
        "task.eval_file",
    ]:
        assert key in keys, key


def test_presets_resolve():
    for name in MODEL_PRESETS:
        load_config(None, [f"model.preset={name}"])


def test_mesh_shape_resolution():
    assert resolve_mesh_shape(MeshConfig(), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert resolve_mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=4), 8)["fsdp"] == 2
    with pytest.raises(ConfigError, match="multiply to 6, but there are 8 devices"):
        resolve_mesh_shape(MeshConfig(data=3, fsdp=2, tensor=1), 8)
    with pytest.raises(ConfigError, match="8 is not divisible by 3"):
        resolve_mesh_shape(MeshConfig(data=-1, tensor=3), 8)
    with pytest.raises(ConfigError, match="only one of"):
        load_config(None, ["mesh.fsdp=-1"])


def test_device_dependent_checks():
    cfg = load_config(None, ["train.batch_size=12", "mesh.data=8"])
    with pytest.raises(ConfigError, match="micro-batch .*=12 is not divisible by .*=8"):
        validate_for_devices(cfg, 8)
    cfg = load_config(None, ["mesh.tensor=8", "mesh.data=1"])
    with pytest.raises(ConfigError, match="num_heads=4 is not divisible by mesh.tensor=8"):
        validate_for_devices(cfg, 8)
    ok = load_config(None, ["mesh.fsdp=2", "mesh.tensor=4", "mesh.data=1"])
    assert validate_for_devices(ok, 8) == {"data": 1, "fsdp": 2, "tensor": 4}


def test_shipped_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files
    for path in files:
        cfg = load_config(path)
        assert cfg.run.name == path.stem
