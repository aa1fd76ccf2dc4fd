"""Tests for plm_jax.metrics: closed-form counts, FLOPs, peaks, MFU, timer and sinks."""

import io
import json
import math
import struct
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plm_jax import metrics
from plm_jax.config import MODEL_PRESETS, ModelConfig
from plm_jax.models import Decoder, param_count


def preset(name: str) -> ModelConfig:
    return ModelConfig(preset=name, **MODEL_PRESETS[name])


# --- parameter counts ------------------------------------------------------------------------


def test_gpt2_124m_nonembedding_params():
    # 124,439,808 total - wte 50257*768 - wpe 1024*768 (Kaplan's non-embedding count).
    cfg = preset("gpt2-124m")
    assert metrics.nonembedding_params(cfg, 50257) == 85_056_000
    parts = metrics.param_breakdown(cfg, 50257)
    assert parts == {
        "token_embedding": 50257 * 768,
        "position_embedding": 1024 * 768,
        "lm_head": 0,
        "nonembedding": 85_056_000,
        "total": 124_439_808,
    }


def test_llama_1b_nonembedding_params():
    # Llama 3.2 1B: 1,235,814,400 total with the tied 128256 x 2048 embedding.
    cfg = preset("llama-1b")
    assert metrics.nonembedding_params(cfg, 128256) == 1_235_814_400 - 128256 * 2048
    assert metrics.nonembedding_params(cfg, 128256) == 973_146_112
    assert metrics.param_breakdown(cfg, 128256)["position_embedding"] == 0


def test_swiglu_default_mlp_dim_and_gqa_by_hand():
    # D=8, N=4, K=2, H=2; SwiGLU mlp_dim 0 -> int(8*8/3)=21 rounded up to 256; no biases.
    cfg = ModelConfig(
        num_layers=1, embed_dim=8, num_heads=4, num_kv_heads=2, head_dim=2, mlp="swiglu",
        norm="rmsnorm", position="rope", use_bias=False,
    )  # fmt: skip
    attention = 8 * 4 * 2 + 2 * (8 * 2 * 2) + 4 * 2 * 8  # q, k+v, o
    mlp = 3 * 8 * 256
    norms = 2 * 8 + 8  # two per layer + final
    assert metrics.nonembedding_params(cfg, 32) == attention + mlp + norms == 6360


def test_breakdown_matches_built_model():
    # Untied head, learned positions and biases: every term of the breakdown is non-zero.
    cfg = ModelConfig(num_layers=2, embed_dim=16, num_heads=2, vocab_size=40, tie_embeddings=False)
    model = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    parts = metrics.param_breakdown(cfg, 40)
    assert parts["total"] == param_count(model)
    assert parts["lm_head"] == parts["token_embedding"] == 16 * 40
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")


# --- FLOPs and MFU ---------------------------------------------------------------------------


def test_train_flops_per_token_by_hand():
    # L=2, D=8, N=2 (H=4), GELU F=32, biases, LayerNorm; V=16, T=4.
    cfg = ModelConfig(num_layers=2, embed_dim=8, num_heads=2, max_seq_len=16)
    per_layer = (4 * 8 * 8 + 4 * 8) + (2 * 8 * 32 + 32 + 8) + 2 * (2 * 8)  # attn, mlp, norms
    nonemb = 2 * per_layer + 2 * 8
    assert nonemb == 1760
    out = metrics.train_flops_per_token(cfg, 16, 4)
    assert out["params_nonembedding"] == 1760
    assert out["attention_flops_per_token"] == 6 * 2 * 8 * 4 == 384
    assert out["flops_per_token"] == 6 * 1760 + 384 == 10944
    assert out["flops_per_token_noncausal"] == 6 * 1760 + 12 * 2 * 8 * 4 == 11328
    assert out["lm_head_flops_per_token"] == 6 * 8 * 16
    assert out["flops_per_token_with_head"] == 10944 + 768
    assert out["formula"].startswith("6*N_nonemb + 6*L*(N*H)*T")


def test_mfu_arithmetic():
    assert metrics.mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="must be positive"):
        metrics.mfu(1.0, 1.0, 0.0)


# --- peaks -----------------------------------------------------------------------------------


def fake_device(kind: str, platform: str = "gpu"):
    return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v4 lite", None),
        ("NVIDIA GeForce RTX 4090", None),
        ("cpu", None),
    ],
)
def test_device_peak_table(kind, peak):
    assert metrics.device_peak_flops(fake_device(kind)) == peak


def test_peak_flops_table_sums_chips_and_rejects_unknown():
    total, source = metrics.peak_flops([fake_device("NVIDIA H100 80GB HBM3")] * 8)
    assert total == 8 * 989e12
    assert source == "table: NVIDIA H100 80GB HBM3"
    with pytest.raises(ValueError, match="RTX 4090"):
        metrics.peak_flops([fake_device("NVIDIA GeForce RTX 4090")])


def test_cpu_peak_is_measured_once_for_the_host():
    per_host = metrics.measure_cpu_peak_flops(256, 2)
    assert math.isfinite(per_host) and per_host > 0
    devices = jax.devices("cpu")
    assert len(devices) == 8
    total, source = metrics.peak_flops(devices, cpu_matmul_size=256)
    # Fake devices share the host's cores: the peak is not multiplied by 8.
    assert total == metrics.measure_cpu_peak_flops(256)
    assert source.startswith("measured: f32 matmul 256")


def test_step_timer_rates(monkeypatch):
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    timer = metrics.StepTimer(flops_per_token=100.0, peak=1e6)
    out = timer.lap(num_steps=4, real_tokens=3000, padded_tokens=4096)
    assert out == {
        "perf/step_time": 0.5,
        "perf/tokens_per_sec": 1500.0,
        "perf/padded_tokens_per_sec": 2048.0,
        "perf/mfu": pytest.approx(0.15),
    }


# --- writers ---------------------------------------------------------------------------------


def read_tfrecords(path):
    """Events in a TensorBoard file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        events.append(Event.FromString(data[pos + 12 : pos + 12 + length]))
        pos += 12 + length + 4
    return events


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    writer = metrics.MetricsWriter(tmp_path)
    writer.write(10, {"train/loss": np.float32(2.5), "perf/tokens": 7, "train/lr": jnp.array(0.25)})
    writer.write(20, {"train/loss": float("nan"), "train/grad_norm": float("inf")})
    writer.write_text("compile/info", "took 3 s")
    writer.close()

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    for line in lines:  # strict JSON: the NaN/Infinity tokens of json.dumps would fail here
        json.loads(line, parse_constant=lambda token: pytest.fail(f"non-strict {token}"))
    records = metrics.read_metrics(tmp_path)
    assert records[0] == {"step": 10, "train/loss": 2.5, "perf/tokens": 7, "train/lr": 0.25}
    assert records[1] == {"step": 20, "train/loss": None, "train/grad_norm": None}

    (events_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    scalars = [
        (e.step, v.tag, v.simple_value)
        for e in read_tfrecords(events_file)
        for v in e.summary.value
        if v.tag.startswith("train/")
    ]
    assert (10, "train/loss", 2.5) in scalars
    assert any(step == 20 and tag == "train/loss" and math.isnan(x) for step, tag, x in scalars)


def test_metrics_writer_appends_after_a_cut_short_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "tr')
    writer = metrics.MetricsWriter(tmp_path, use_tensorboard=False)
    writer.write(3, {"train/loss": 1.0})
    writer.close()
    with pytest.warns(UserWarning, match="metrics.jsonl:2 is not valid JSON"):
        records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 3]
    assert not (tmp_path / "tensorboard").exists()


def test_metrics_writer_rejects_bad_values(tmp_path):
    writer = metrics.MetricsWriter(tmp_path, use_tensorboard=False)
    with pytest.raises(TypeError, match="'train/name' must be a number"):
        writer.write(1, {"train/name": "abc"})
    with pytest.raises(ValueError, match="'step' is reserved"):
        writer.write(1, {"step": 1})
    writer.close()


def test_disabled_writer_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    writer = metrics.MetricsWriter(run_dir, enabled=False)
    writer.write(1, {"train/loss": 1.0})
    writer.write_text("compile/info", "x")
    writer.close()
    assert not run_dir.exists()


# --- progress bar ----------------------------------------------------------------------------


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_shows_step_loss_and_throughput():
    stream = FakeTerminal()
    bar = metrics.ProgressBar(10, stream=stream)
    bar.update(3, loss=2.5, tokens_per_sec=12345.0)
    bar.close()
    text = stream.getvalue()
    assert "3/10" in text and "loss=2.5000" in text and "tok/s=12,345" in text


def test_progress_bar_is_silent_off_a_terminal_or_when_disabled():
    for stream, enabled in [(io.StringIO(), True), (FakeTerminal(), False)]:
        bar = metrics.ProgressBar(10, enabled=enabled, stream=stream)
        bar.update(5, loss=1.0)
        bar.close()
        assert stream.getvalue() == ""


def test_encoder_decoder_flops_match_a_hand_count_for_t5_small():
    cfg = ModelConfig(**{**MODEL_PRESETS["t5-small"], "family": "encoder_decoder"})
    f = metrics.train_flops_per_token(cfg, 32128, 512, 114)
    # t5-small: 6 + 6 layers, D = N*H = 512, ReLU MLP of 2048, no biases.
    attn, mlp = 4 * 512 * 512, 2 * 512 * 2048
    n_enc, n_dec = 6 * (attn + mlp), 6 * (2 * attn + mlp)
    assert f["params_nonembedding"] == n_enc + n_dec == 44_040_192
    ratio = 114 / 512
    hand = (
        6 * n_enc
        + 12 * 6 * 512 * 512  # encoder self-attention, bidirectional, S = 512
        + ratio * (6 * n_dec + 6 * 6 * 512 * 114 + 12 * 6 * 512 * 512)  # decoder per enc token
    )
    assert f["flops_per_token"] == pytest.approx(hand, rel=1e-12)
    assert f["lm_head_flops_per_token"] == pytest.approx(ratio * 6 * 512 * 32128)
    assert f["flops_per_token_noncausal"] > f["flops_per_token"]
    assert "per encoder token" in f["formula"]
