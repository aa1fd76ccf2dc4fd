"""`python -m benchmarks.compare`: which peer each preset gets, with which sizes, and one real
alternating run at a tiny shape (no timing asserted)."""

import pytest

from benchmarks import compare


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_the_quick_start_shape_is_the_default():
    args = compare.parse_args([])
    cmds = compare.systems(args)
    assert set(cmds) == {"plm_jax", "torch-eager", "torch-hf"}
    assert _flag(cmds["plm_jax"], "--preset") == "tiny"
    for cmd in cmds.values():
        sizes = [_flag(cmd, f) for f in ("--layers", "--embed-dim", "--heads", "--vocab")]
        assert sizes == ["4", "128", "4", "4096"]
        assert _flag(cmd, "--seq-len") == "128" and _flag(cmd, "--batch") == "16"
    assert "benchmarks.peers.torch_gpt" in cmds["torch-eager"]


@pytest.mark.parametrize(
    "preset, peer, extra",
    [
        ("gpt2-124m", "torch_gpt", {"--max-seq-len": "1024"}),
        ("gpt2-350m", "torch_gpt", {"--max-seq-len": "1024"}),
        ("bert-base", "torch_bert", {"--mlp-dim": "3072", "--max-seq-len": "512"}),
        ("bert-tiny", "torch_bert", {"--mlp-dim": "512", "--max-seq-len": "512"}),
        (
            "llama-1b",
            "torch_llama",
            {
                "--mlp-dim": "8192",
                "--kv-heads": "8",
                "--head-dim": "64",
                "--rope-theta": "500000.0",
            },
        ),
    ],
)
def test_each_family_gets_its_peer_with_the_presets_sizes(preset, peer, extra):
    from plm_jax.config import MODEL_PRESETS

    args = compare.parse_args(["--preset", preset, "--seq-len", "64", "--batch", "2"])
    cmds = compare.systems(args)
    p = MODEL_PRESETS[preset]
    want = [str(p[k]) for k in ("num_layers", "embed_dim", "num_heads", "vocab_size")]
    for name, cmd in cmds.items():
        assert [_flag(cmd, f) for f in ("--layers", "--embed-dim", "--heads", "--vocab")] == want
        if name != "plm_jax":
            assert f"benchmarks.peers.{peer}" in cmd
            assert {k: _flag(cmd, k) for k in extra} == extra
    assert _flag(cmds["plm_jax"], "--preset") == preset


def test_overrides_reach_every_system_and_compile_is_gpt_only():
    argv = ["--preset", "gpt2-124m", "--layers", "2", "--vocab", "1000", "--with-compile"]
    cmds = compare.systems(compare.parse_args(argv))
    assert set(cmds) == {"plm_jax", "torch-eager", "torch-hf", "torch-compile"}
    assert all(_flag(c, "--layers") == "2" and _flag(c, "--vocab") == "1000" for c in cmds.values())
    cmds = compare.systems(compare.parse_args(["--preset", "bert-tiny", "--with-compile"]))
    assert set(cmds) == {"plm_jax", "torch-eager", "torch-hf"}


@pytest.mark.parametrize("argv", [["--preset", "t5-small"], ["--rounds", "0"]])
def test_what_has_no_peer_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        compare.parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert ("no PyTorch peer for the encoder_decoder family" in err) or ("--rounds" in err)


@pytest.mark.hf
@pytest.mark.e2e
def test_an_alternating_run_reports_medians_and_ratios(capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    argv = ["--layers", "1", "--embed-dim", "32", "--heads", "2", "--vocab", "64"]
    argv += ["--seq-len", "16", "--batch", "4", "--steps", "2", "--warmup", "1", "--rounds", "1"]
    record = compare.main(argv)
    assert capsys.readouterr().out.count("\n") == 1
    assert record["preset"] == "tiny" and record["peer"] == "benchmarks.peers.torch_gpt"
    rounds = record["tokens_per_sec_rounds"]
    assert set(rounds) == {"plm_jax", "torch-eager", "torch-hf"}
    assert all(len(v) == 1 and v[0] > 0 for v in rounds.values())
    for name in ("torch-eager", "torch-hf"):
        want = rounds["plm_jax"][0] / rounds[name][0]
        assert record["ratio_plm_jax_over"][name] == pytest.approx(want)
    assert len(set(record["params_total"].values())) == 1  # the same model everywhere
