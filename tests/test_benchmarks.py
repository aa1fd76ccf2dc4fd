"""Smoke tests of the benchmark scripts: the record's fields exist and agree with each other.

No wall-clock assertions: only that the reported rates follow from the reported times.
"""

import json

import pytest

from benchmarks import infer_throughput, train_throughput
from plm_jax import metrics
from plm_jax.config import ModelConfig

MODEL_ARGS = ["--preset", "tiny", "--layers", "2", "--embed-dim", "32", "--heads", "4"]
MODEL_ARGS += ["--vocab", "256", "--peak-matmul-size", "128"]


def _printed_record(capsys) -> dict:
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_train_throughput_record(capsys):
    argv = MODEL_ARGS + ["--seq-len", "16", "--batch", "8", "--steps", "2", "--warmup", "1"]
    record = train_throughput.main(argv)
    assert _printed_record(capsys) == record

    for key in (
        "preset", "overrides", "params_total", "params_nonembedding", "device_kind",
        "device_count", "dtype", "batch", "seq_len", "tokens_per_sec", "padded_tokens_per_sec",
        "step_time_median_s", "step_time_min_s", "step_time_max_s", "step_time_stdev_s",
        "flops_per_token", "flops_formula", "mfu", "peak_flops", "peak_flops_source",
        "compile_s", "peak_memory_bytes", "compiled_memory_bytes", "versions", "date",
    ):  # fmt: skip
        assert key in record, key
    assert record["batch"] == 8 and record["seq_len"] == 16
    median = record["step_time_median_s"]
    assert record["step_time_min_s"] <= median <= record["step_time_max_s"]
    assert record["tokens_per_sec"] == pytest.approx(8 * 16 / median, rel=1e-6)
    assert record["padded_tokens_per_sec"] == pytest.approx(record["tokens_per_sec"], rel=1e-6)
    expected_mfu = record["tokens_per_sec"] * record["flops_per_token"] / record["peak_flops"]
    assert record["mfu"] == pytest.approx(expected_mfu, rel=1e-6)
    cfg = ModelConfig(num_layers=2, embed_dim=32, num_heads=4, vocab_size=256)
    breakdown = metrics.param_breakdown(cfg, 256)
    assert record["params_total"] == breakdown["total"] == record["params_measured"]
    assert record["params_nonembedding"] == breakdown["nonembedding"]
    flops = metrics.train_flops_per_token(cfg, 256, 16)
    assert record["flops_per_token"] == flops["flops_per_token"]
    assert record["flops_formula"] == flops["formula"]
    assert record["peak_flops_source"].startswith("measured")
    assert record["device_count"] == record["mesh"]["data"] >= 1
    # the process's peak RSS holds at least the compiled program's buffers
    assert record["host_max_rss_bytes"] >= record["compiled_memory_bytes"]["total_excl_alias"] > 0


def test_infer_throughput_record(capsys):
    argv = MODEL_ARGS + ["--batch", "2", "--prompt-len", "8", "--new-tokens", "2"]
    record = infer_throughput.main(argv + ["--repeats", "2"])
    assert _printed_record(capsys) == record

    for key in (
        "prefill_tokens_per_sec", "prefill_time_median_s", "decode_tokens_per_sec",
        "decode_time_s", "params_total", "device_kind", "peak_flops", "prefill_mfu",
        "prefill_flops_formula", "versions", "date",
    ):  # fmt: skip
        assert key in record, key
    assert record["prefill_tokens_per_sec"] == pytest.approx(
        2 * 8 / record["prefill_time_median_s"], rel=1e-6
    )
    assert record["decode_tokens_per_sec"] == pytest.approx(
        2 * 2 / record["decode_time_s"], rel=1e-6
    )
    expected_mfu = (
        record["prefill_tokens_per_sec"] * record["prefill_flops_per_token"] / record["peak_flops"]
    )
    assert record["prefill_mfu"] == pytest.approx(expected_mfu, rel=1e-6)
    assert record["params_total"] == record["params_measured"]
