"""Smoke tests of the PyTorch peer benchmark (benchmarks/peers/torch_gpt.py); no timing asserted."""

import dataclasses

import pytest

pytestmark = pytest.mark.hf

TINY = [
    "--layers", "1", "--embed-dim", "32", "--heads", "2", "--vocab", "64",
    "--seq-len", "16", "--batch", "4", "--steps", "2", "--warmup", "1",
]  # fmt: skip


def _plm_jax_total() -> int:
    from plm_jax import metrics
    from plm_jax.config import MODEL_PRESETS, ModelConfig

    cfg = ModelConfig(**{**MODEL_PRESETS["tiny"], "preset": "tiny"})
    cfg = dataclasses.replace(
        cfg, num_layers=1, embed_dim=32, num_heads=2, vocab_size=64, max_seq_len=16
    )
    assert cfg.position == "learned" and cfg.tie_embeddings
    return metrics.param_breakdown(cfg, 64)["total"]


@pytest.mark.parametrize("impl", ["eager", "hf"])
def test_torch_peer_record(impl, capsys):
    pytest.importorskip("torch")
    if impl == "hf":
        pytest.importorskip("transformers")
    from benchmarks.peers import torch_gpt

    record = torch_gpt.main(TINY + ["--impl", impl])
    assert capsys.readouterr().out.count("\n") == 1
    assert record["impl"] == impl
    assert record["steps"] == 2 and record["batch"] == 4 and record["seq_len"] == 16
    assert record["real_tokens_per_step"] == 64.0
    assert record["tokens_per_sec"] > 0
    assert record["step_time_min_s"] <= record["step_time_median_s"] <= record["step_time_max_s"]
    assert record["threads"] >= 1 and record["versions"]["torch"]
    assert record["final_loss"] > 0
    assert record["params_total"] == _plm_jax_total()
