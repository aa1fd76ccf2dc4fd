"""`python -m benchmarks.scaling`: the sweeps' points, the fits (recovering known rates from
synthetic records) and one real two-point sweep."""

import json

import pytest

from benchmarks import scaling
from plm_jax import metrics
from plm_jax.config import MODEL_PRESETS, ModelConfig


def test_linear_fit_recovers_a_line_and_flags_outliers():
    x = [1.0, 2.0, 4.0, 8.0]
    out = scaling.linear_fit(x, [3.0 + 0.5 * v for v in x])
    assert out["a"] == pytest.approx(3.0) and out["b"] == pytest.approx(0.5)
    assert out["r2"] == pytest.approx(1.0)
    assert max(abs(r) for r in out["relative_residuals"]) < 1e-12
    bent = scaling.linear_fit(x, [3.0 + 0.5 * v for v in x[:3]] + [20.0])
    assert bent["r2"] < 0.99
    assert abs(bent["relative_residuals"][3]) > 0.05
    with pytest.raises(ValueError, match="two distinct"):
        scaling.linear_fit([2.0, 2.0], [1.0, 1.0])


def _record(cfg, seq_len, weights_rate, attention_rate, overhead=0.0):
    """A train_throughput-like record whose time per token is known exactly."""
    flops = metrics.train_flops_per_token(cfg, cfg.vocab_size, seq_len)
    attention = flops["flops_per_token_noncausal"] - flops["flops_per_token"]
    weights = flops["flops_per_token_with_head"] - attention
    seconds = overhead + weights / weights_rate + attention / attention_rate
    return {**flops, "seq_len": seq_len, "tokens_per_sec": 1.0 / seconds}


GPT2 = ModelConfig(**MODEL_PRESETS["gpt2-124m"])


def test_the_seq_fit_separates_the_weights_from_attention():
    records = [_record(GPT2, t, 40e9, 10e9) for t in (128, 256, 512, 1024, 2048)]
    out = scaling.fit("seq", records)
    assert out["weights_flops_per_s"] == pytest.approx(40e9, rel=1e-9)
    assert out["attention_flops_per_s"] == pytest.approx(10e9, rel=1e-9)
    # 6*L*D per unit of T (causal-halved), GPT-2 small: 6 * 12 * 768
    assert out["attention_flops_per_token_per_t"] == 6 * 12 * 768
    assert out["r2"] == pytest.approx(1.0)


def test_the_size_fit_gives_the_rate_and_the_per_token_constant():
    sizes = [(4, 128), (6, 384), (12, 768), (24, 1024)]
    cfgs = [ModelConfig(**{**MODEL_PRESETS["gpt2-124m"], "num_layers": n, "embed_dim": d,
                           "num_heads": d // 64}) for n, d in sizes]  # fmt: skip
    records = [_record(c, 256, 30e9, 30e9, overhead=2e-6) for c in cfgs]
    out = scaling.fit("size", records)
    assert out["flops_per_s"] == pytest.approx(30e9, rel=1e-9)
    assert out["a"] == pytest.approx(2e-6, rel=1e-6)
    assert scaling.fit("remat", records) is None


def test_points_and_commands():
    args = scaling.parse_args(["--sweep", "seq", "--tokens", "1024", "--seq-lens", "256,512"])
    assert args.points == [{"seq_len": 256, "batch": 4}, {"seq_len": 512, "batch": 2}]
    cmd = scaling.command(args, args.points[0])
    assert cmd[cmd.index("--preset") + 1] == "gpt2-124m"
    assert cmd[cmd.index("--batch") + 1] == "4" and cmd[cmd.index("--seq-len") + 1] == "256"
    args = scaling.parse_args(["--sweep", "size", "--sizes", "2x128,24x1024"])
    assert args.points[1] == {"layers": 24, "embed_dim": 1024, "heads": 16, "seq_len": 256,
                              "batch": 4}  # fmt: skip
    args = scaling.parse_args(["--sweep", "remat", "--remats", "none,full", "--scan"])
    assert [p["remat"] for p in args.points] == ["none", "full"]
    assert "--scan" in scaling.command(args, args.points[1])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sweep", "seq", "--tokens", "1000", "--seq-lens", "256"], "does not divide"),
        (["--sweep", "size", "--sizes", "12-768"], "LAYERSxWIDTH"),
        (["--sweep", "size", "--sizes", "2x100"], "LAYERSxWIDTH"),
    ],
)
def test_bad_points_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        scaling.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.e2e
def test_a_real_size_sweep(capsys, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device per point, not the 8 here
    argv = ["--sweep", "size", "--preset", "tiny", "--vocab", "64", "--sizes", "1x64,2x64"]
    argv += ["--seq-len", "8", "--batch", "2", "--steps", "1", "--warmup", "0", "--markdown"]
    summary = scaling.main(argv)
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 3 and lines[-1] == summary
    assert [r["model"]["num_layers"] for r in lines[:2]] == [1, 2]
    assert [r["params_total"] for r in summary["rows"]] == [r["params_total"] for r in lines[:2]]
    assert summary["rows"][1]["params_total"] > summary["rows"][0]["params_total"]
    assert all(r["host_max_rss_bytes"] > 0 and r["xla_temp_bytes"] > 0 for r in summary["rows"])
    assert len(summary["fit"]["relative_residuals"]) == 2
    assert "| 2 x 64 |" in captured.err
