"""`plm-jax plan` (plm_jax/plan): the run's own step, compiled from shapes, reported per device."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from plm_jax.cli import main
from plm_jax.config import load_config
from plm_jax.data.pipeline import batch_shapes, build_pipeline
from plm_jax.errors import ConfigError
from plm_jax.plan import format_plan, parse_topology, plan
from plm_jax.plan.hlo import collectives
from plm_jax.plan.planner import _fit_batch, plan_model
from plm_jax.sharding import use_mesh
from plm_jax.train import loop
from tests.test_span_corruption import seq2seq_run  # noqa: F401  (a fixture)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("v5e-8", ("v5e", "2x4")),
        ("v5litepod-16", ("v5e", "4x4")),
        ("v5p-8", ("v5p", "2x2x1")),  # v5p counts TensorCores: 4 chips
        ("v5p-32", ("v5p", "2x2x4")),
        ("v6e-256", ("v6e", "16x16")),
        ("v5p:2x2x4", ("v5p", "2x2x4")),
        ("V6E:4x4", ("v6e", "4x4")),
    ],
)
def test_topology_names_give_libtpu_slices(name, expected):
    assert parse_topology(name) == expected


@pytest.mark.parametrize(
    "name, match",
    [
        ("v5e-12", r"sizes \[1, 4, 8"),
        ("v5p-6", r"sizes \[8, 16, 32"),
        ("v5e:2x2x2", "2-D"),
        ("h100-8", "not a TPU slice"),
    ],
)
def test_a_topology_that_is_not_a_slice_is_refused(name, match):
    with pytest.raises(ConfigError, match=match):
        parse_topology(name)


HLO = """HloModule step

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.1: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p.1 = (s32[], f32[8]) parameter(0)
  %x = f32[8] get-tuple-element(%p.1), index=1
  %all-gather.1 = bf16[4,256]{1,0} all-gather(%x), dimensions={0}
  %ars = (f32[8], f32[8]) all-reduce-start(%x), to_apply=%add
  %ard = f32[8]{0} all-reduce-done(%ars)
  ROOT %t = (s32[], f32[8]) tuple(%i, %ard)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8] parameter(0)
  %rs = f32[2]{0} reduce-scatter(%a), dimensions={0}, to_apply=%add
  %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_collectives_count_each_trip_of_a_loop_and_an_async_pair_once():
    out = collectives(HLO)
    assert out["all-gather"] == {"count": 12, "bytes": 12 * 4 * 256 * 2}
    assert out["all-reduce"] == {"count": 12, "bytes": 12 * 8 * 4}
    assert out["reduce-scatter"] == {"count": 1, "bytes": 8}
    assert out["all-to-all"]["count"] == 0


def test_collectives_read_unsigned_loop_bounds_too():
    """XLA's windowed einsums (collective matmuls) count their trips in u32."""
    text = HLO.replace("s32[]{:T(128)} constant(12)", "u32[]{:T(128)} constant(4)")
    assert collectives(text)["all-gather"]["count"] == 4


def test_collectives_fall_back_to_the_layer_count_when_the_bound_is_not_a_constant():
    text = HLO.replace(
        "%n = s32[]{:T(128)} constant(12)", "%n = s32[] get-tuple-element(%p), index=0"
    )
    assert collectives(text, default_trips=3)["all-gather"]["count"] == 3


def small(tmp_path, corpus, *extra):
    return load_config(
        None,
        [
            f"data.source={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
            "model.max_seq_len=32",
            "model.num_layers=2",  # one compile of a small program per test
            "train.batch_size=8",
            *extra,
        ],
    )


@pytest.mark.parametrize("family", ["decoder", "encoder"])
def test_batch_shapes_are_the_pipelines(tmp_path, small_corpus, small_tokenizer, family):
    extra = [f"tokenizer.path={small_tokenizer.path}", f"model.family={family}"]
    cfg = small(tmp_path, small_corpus, *extra)
    batch = next(build_pipeline(cfg, small_tokenizer, show_progress=False).train)
    model = loop.resolve_vocab(cfg.model, small_tokenizer)
    expected = batch_shapes(cfg, model)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected


def test_batch_shapes_are_the_span_corruption_pipelines(seq2seq_run):  # noqa: F811
    cfg, tok = seq2seq_run
    batch = next(build_pipeline(cfg, tok, show_progress=False).train)
    model = loop.resolve_vocab(cfg.model, tok)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == batch_shapes(cfg, model)


def test_the_plan_compiles_the_program_pretrain_runs(tmp_path, small_corpus, small_tokenizer):
    """Same function, shardings and donation: the compiler's memory figures are equal."""
    cfg = small(tmp_path, small_corpus, f"tokenizer.path={small_tokenizer.path}", "mesh.fsdp=2")
    report = plan(cfg)
    tr = loop.setup(cfg, show_progress=False)
    try:
        first = loop.shard_batch(next(tr.pipeline.train), tr.mesh, 8)
        loop.compile_steps(tr, first)
        memory = tr.step_fn.memory_analysis()
        with use_mesh(tr.mesh, cfg.mesh.rules):  # as loop.evaluate runs it
            evaluated = tr.eval_fn.lower(tr.state.params, first).compile().memory_analysis()
    finally:
        tr.checkpointer.close()
        tr.writer.close()
    mem = report["memory_per_device"]
    assert mem["temporaries"] == memory.temp_size_in_bytes
    assert report["eval_step_per_device"]["temporaries"] == evaluated.temp_size_in_bytes
    assert mem["parameters"] + mem["optimizer_state"] + mem["other_state"] + mem["batch"] == (
        memory.argument_size_in_bytes
    )
    assert report["devices"] == {
        "count": 8,
        "kind": jax.devices()[0].device_kind,
        "platform": "cpu",
        "mesh": {"data": 4, "fsdp": 2, "tensor": 1},
    }
    assert report["batch"]["per_device"] == 1 and report["batch"]["tokens_per_step"] == 8 * 32
    assert report["fits"] is True and mem["headroom"] > 0
    # FSDP over 2: weights are gathered, gradients reduced; unrolled layers are counted each.
    assert report["collectives_per_step"]["all-gather"]["count"] > 0
    text = format_plan(report)
    assert "fits" in text and "mesh data=4 fsdp=2 tensor=1" in text


def test_the_plan_reads_no_data_and_trains_no_tokenizer(tmp_path):
    cfg = small(tmp_path, tmp_path / "missing.txt", "tokenizer.vocab_size=1000")
    report = plan(cfg)
    assert report["model"]["vocab_size"] == 1024  # 1000 pieces, padded as pretrain pads them
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()


def test_plan_flops_agree_with_xla_when_no_layer_is_scanned(tmp_path):
    cfg = small(tmp_path, tmp_path / "none.txt", "model.use_scan_layers=false")
    flops = plan(cfg)["flops_per_device"]
    assert not flops["xla_counts_scanned_layer_once"]
    # XLA counts the masked half of attention and the head, as the "computed" formula does;
    # elementwise work (norms, softmax, AdamW) adds a few percent on a model this small.
    assert 1.0 <= flops["xla"] / flops["computed_formula"] < 1.3
    assert flops["model"] < flops["computed_formula"]


def test_a_step_that_cannot_fit_exits_2_with_the_numbers(tmp_path, capsys, caplog):
    args = [f"run.dir={tmp_path / 'run'}", "train.batch_size=1024", "model.max_seq_len=512"]
    args.append("model.num_layers=1")
    assert main(["plan", *args]) == 2
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert "GiB per device, more than the" in caplog.text and "--fit batch" in caplog.text


def test_plan_json_is_one_object(tmp_path, capsys):
    assert main(["plan", f"run.dir={tmp_path / 'run'}", "model.num_layers=1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is True and report["model"]["family"] == "decoder"


def test_plan_refuses_a_fine_tuning_config(tmp_path, capsys):
    cfg = ["task.name=classification", "task.train_file=x.jsonl", f"run.dir={tmp_path}"]
    assert main(["plan", *cfg]) == 2
    assert "plm-jax plan compiles pretraining steps" in capsys.readouterr().err


def test_a_topology_without_libtpu_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_libtpu(name, *args, **kwargs):
        if name == "libtpu":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_libtpu)
    assert main(["plan", f"run.dir={tmp_path}", "--topology", "v5e-8"]) == 2
    assert "pip install 'plm-jax[tpu]'" in capsys.readouterr().err


def test_fit_batch_doubles_then_bisects_to_the_largest_that_fits(tmp_path):
    cfg, model = plan_model(small(tmp_path, tmp_path / "none.txt", "mesh.data=8"))
    seen = []

    def at(c, m):  # fits up to 22 rows per device
        rows = c.train.batch_size // 8
        seen.append(rows)
        need = rows * 100
        return {"fits": need <= 2200, "memory_per_device": {"total": need}, "rows": rows}

    report = _fit_batch(cfg, model, at, jax.devices())
    assert report["rows"] == 22
    assert seen[:6] == [1, 2, 4, 8, 16, 32]  # doubling until 32 does not fit, then bisect
    assert [t["per_device_batch"] for t in report["tried"]] == seen
    assert np.all([t["fits"] == (t["per_device_batch"] <= 22) for t in report["tried"]])
