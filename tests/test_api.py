"""Using a trained run: plm_jax.load, score/generate/evaluate, and their CLI commands."""

import json
import shutil

import jax
import numpy as np
import pytest

import plm_jax
from plm_jax.cli import main
from plm_jax.errors import DataError
from plm_jax.metrics import read_metrics


def test_run_directory_has_metrics_config_and_checkpoints(tiny_run):
    assert (tiny_run / "config.yaml").is_file()
    assert sorted(p.name for p in (tiny_run / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
    records = read_metrics(tiny_run / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [2, 4]
    for key in ["train/grad_norm", "train/lr", "perf/tokens_per_sec", "perf/mfu", "perf/step_time"]:
        assert key in train[-1]
    evals = [r for r in records if "eval/loss" in r]
    assert evals and evals[-1]["eval/perplexity"] == pytest.approx(np.exp(evals[-1]["eval/loss"]))
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))


def test_load_newest_or_a_given_checkpoint(tiny_run):
    newest = plm_jax.load(tiny_run)
    assert newest.step == 4 and newest.config.model.num_layers == 1
    older = plm_jax.load(tiny_run / "checkpoints" / "2")
    assert older.step == 2
    a = jax.tree.leaves(newest.model)[0]
    b = jax.tree.leaves(older.model)[0]
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_score_is_the_sum_of_token_logprobs(tiny_run):
    lm = plm_jax.load(tiny_run)
    (s,) = lm.score("Return the absolute value of x.")
    assert s.total_logprob == pytest.approx(sum(s.token_logprobs), rel=1e-6)
    assert s.num_tokens == len(lm.tokenizer.encode("Return the absolute value of x."))
    assert s.perplexity == pytest.approx(np.exp(-s.total_logprob / s.num_tokens), rel=1e-6)


def test_evaluate_matches_the_logged_eval_loss(tiny_run):
    lm = plm_jax.load(tiny_run)
    result = lm.evaluate()
    logged = [r for r in read_metrics(tiny_run / "metrics.jsonl") if "eval/loss" in r][-1]
    assert result["eval/loss"] == pytest.approx(logged["eval/loss"], rel=1e-5)


def test_load_errors(tmp_path, tiny_run):
    with pytest.raises(DataError, match="does not exist"):
        plm_jax.load(tmp_path / "nope")
    with pytest.raises(DataError, match="neither a run directory"):
        plm_jax.load(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        plm_jax.load(tiny_run / "checkpoints" / "3")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    (copy / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # a save cut short
    assert plm_jax.load(copy).step == 4
    (copy / "checkpoints" / "7").mkdir()  # a committed-looking but empty checkpoint
    with pytest.raises(DataError, match="checkpoint .*7 is incomplete or corrupt"):
        plm_jax.load(copy / "checkpoints" / "7")
    shutil.rmtree(copy / "checkpoints" / "7")


def test_cli_score_generate_eval(tiny_run, capsys):
    assert main(["score", str(tiny_run), "--text", "Return x.", "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["total_logprob"] == pytest.approx(sum(scored["token_logprobs"]), rel=1e-6)
    assert (
        main(
            [
                "generate",
                str(tiny_run),
                "--prompt",
                "Return",
                "--prompt",
                "The value",
                "--max-new-tokens",
                "5",
                "--json",
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [g["prompt"] for g in lines] == ["Return", "The value"]
    assert all(1 <= len(g["token_ids"]) <= 5 for g in lines)
    assert main(["eval", str(tiny_run)]) == 0
    assert "loss" in capsys.readouterr().out


def test_cli_prompt_too_long_is_one_line_exit_2(tiny_run, capsys):
    assert main(["generate", str(tiny_run), "--prompt", "word " * 40, "--max-new-tokens", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "max-new-tokens" in err[0]


def test_pretrain_on_a_complete_run_says_so_and_samples(tiny_run, capsys):
    assert main(["pretrain", str(tiny_run / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert f"run {tiny_run} is already complete at step 4" in out
    assert "sample (temperature 0.8, top-k 40): Return the" in out
    assert [r["step"] for r in read_metrics(tiny_run) if "train/loss" in r] == [2, 4]
