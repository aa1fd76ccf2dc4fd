"""`init_from` honours the user's model settings or refuses them (plm_jax/train/init_from.py)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from plm_jax.config import load_config
from plm_jax.errors import ConfigError
from plm_jax.tasks import finetune as ft_mod
from plm_jax.train import loop
from plm_jax.train.init_from import resolve_init_from
from tests.test_finetune import cls_args, ft_config, sentiment  # noqa: F401  (a fixture)


def pretrain_cfg(tmp_path, tiny_run, *extra):
    return load_config(
        None,
        [
            f"init_from={tiny_run}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"data.source={loop_source(tiny_run)}",
            f"run.dir={tmp_path / 'new'}",
            "train.batch_size=8",
            "train.steps=2",
            "train.warmup_steps=1",
            *extra,
        ],
    )


def loop_source(run):
    return load_config(run / "config.yaml").data.source


def source_params(run):
    from plm_jax.api import load

    return nnx.to_pure_dict(nnx.state(load(run).model, nnx.Param))


def test_settings_the_user_gives_are_honoured_and_recorded(tmp_path, tiny_run):
    """tiny_run: 1 layer, 32 wide, learned positions for 32 tokens, unrolled layers."""
    given = ["model.max_seq_len=16", "model.use_scan_layers=true", "model.norm_eps=1e-6"]
    cfg = pretrain_cfg(tmp_path, tiny_run, *given, "model.embed_dim=32")  # same as the source's
    resolved = resolve_init_from(cfg)
    assert resolved.model.max_seq_len == 16 and resolved.model.use_scan_layers
    assert resolved.model.norm_eps == 1e-6 and resolved.model.embed_dim == 32
    assert resolved.model.num_layers == 1  # not given: the source's, not the default 4
    tr = loop.setup(cfg, show_progress=False)
    try:
        got = jax.device_get(nnx.to_pure_dict(tr.state.params))
    finally:
        tr.checkpointer.close()
        tr.writer.close()
    want = source_params(tiny_run)
    np.testing.assert_array_equal(
        got["pos_embed"]["embedding"], want["pos_embed"]["embedding"][:16]
    )
    assert got["pos_embed"]["embedding"].shape == (16, 32)
    w_q = want["blocks"][0]["attn"]["w_q"]
    np.testing.assert_array_equal(got["blocks"]["attn"]["w_q"], w_q[None])  # stacked layers
    saved = load_config(tmp_path / "new" / "config.yaml")
    assert saved.model.max_seq_len == 16 and saved.model.use_scan_layers
    assert saved.model.num_layers == 1


@pytest.mark.parametrize(
    "override, match",
    [
        (
            "model.max_seq_len=64",
            r"model.max_seq_len=64 is longer than init_from's learned position table \(32 rows\)"
            r".*set model.max_seq_len<=32",
        ),
        (
            "model.embed_dim=64",
            r"model.embed_dim=64 does not fit init_from's weights, which have embed_dim=32: it "
            r"would change parameter shapes; remove model.embed_dim",
        ),
        ("model.num_layers=2", r"model.num_layers=2 does not fit .* num_layers=1"),
        ("model.mlp=swiglu", r"model.mlp='swiglu' does not fit .* mlp='gelu'"),
    ],
)
def test_settings_that_change_shapes_are_refused(tmp_path, tiny_run, override, match):
    with pytest.raises(ConfigError, match=match):
        resolve_init_from(pretrain_cfg(tmp_path, tiny_run, override))


def test_fine_tuning_honours_a_shorter_max_seq_len(tmp_path, tiny_run, sentiment):  # noqa: F811
    cfg = ft_config(tmp_path, cls_args(sentiment), tiny_run, "train.steps=4", "model.max_seq_len=8")
    tuner = ft_mod.setup(cfg, show_progress=False)
    try:
        assert tuner.cfg.model.max_seq_len == 8
        assert max(len(x["ids"]) for x in tuner.data.train) <= 8  # truncated to what was asked
        table = jax.device_get(tuner.state.params["backbone"]["pos_embed"]["embedding"].value)
    finally:
        tuner.checkpointer.close()
        tuner.writer.close()
    np.testing.assert_array_equal(table, source_params(tiny_run)["pos_embed"]["embedding"][:8])
    assert load_config(tmp_path / "ft" / "config.yaml").model.max_seq_len == 8


def test_resume_honours_new_steps_and_refuses_other_changes(tmp_path, tiny_run, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    saved = run / "config.yaml"  # what tiny_run trained with (4 steps, lr 2e-3, batch 8)
    changed = load_config(saved, [f"run.dir={run}", "train.lr=1e-2", "train.batch_size=16"])
    with pytest.raises(ConfigError) as refused:
        loop.setup(changed, show_progress=False)
    message = str(refused.value)
    assert "cannot change within a run (train.batch_size: 8 -> 16; train.lr: 0.002 -> 0.01)" in (
        message
    )
    assert "start a new run with another run.dir" in message
    longer = load_config(saved, [f"run.dir={run}", "train.steps=6", "train.eval_every=6"])
    caplog.set_level("INFO")
    result = loop.pretrain(longer, show_progress=False)
    assert result["step"] == 6
    assert "resuming with new values of run.dir, train.eval_every, train.steps" in caplog.text


def test_a_step_0_checkpoint_takes_new_data_and_training_settings_but_not_a_new_model():
    """`plm-jax convert` writes a step-0 checkpoint: nothing has been trained with its data or
    schedule, so a run continuing from it chooses them; the weights still fix the model."""
    from plm_jax.config import check_resume, config_to_dict

    saved = config_to_dict(load_config(None, ["model.preset=tiny"]))
    new = load_config(None, ["model.preset=tiny", "train.batch_size=8", "data.source=corpus.txt"])
    assert check_resume(saved, new, "ckpt/0", 0) == ["data.source", "train.batch_size"]
    with pytest.raises(ConfigError, match=r"ckpt/3.*train.batch_size: 16 -> 8"):
        check_resume(saved, new, "ckpt/3", 3)
    wider = load_config(None, ["model.preset=tiny", "model.embed_dim=64"])
    with pytest.raises(ConfigError, match=r"model.embed_dim: 128 -> 64"):
        check_resume(saved, wider, "ckpt/0", 0)
