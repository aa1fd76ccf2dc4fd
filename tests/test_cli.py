"""The command line: help, one-line user errors with exit 2, tokenizer training, prepare."""

import re
import subprocess
import sys

import pytest
import yaml

from plm_jax.cli import main
from plm_jax.errors import ConfigError

COMMANDS = [
    "tokenizer",
    "prepare",
    "pretrain",
    "finetune",
    "eval",
    "score",
    "generate",
    "embed",
    "predict",
    "convert",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: plm-jax " + command in capsys.readouterr().out


def run_cli(*args):
    """The real entry point in a fresh interpreter: exit code and stderr lines."""
    proc = subprocess.run(
        [sys.executable, "-m", "plm_jax.cli", *args], capture_output=True, text=True, timeout=120
    )
    return proc.returncode, proc.stderr.strip().splitlines()


def test_unknown_keys_exit_2_with_one_line():
    code, err = run_cli("pretrain", "not.a.key=1")
    assert code == 2 and len(err) == 1 and "'not.a.key'" in err[0], err
    code, err = run_cli("pretrain", "train.stepz=10")
    assert code == 2 and len(err) == 1, err
    assert "'train.stepz'" in err[0] and "did you mean 'train.steps'" in err[0]


def test_debug_shows_the_traceback():
    with pytest.raises(ConfigError, match="train.stepz"):
        main(["--debug", "pretrain", "train.stepz=10"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["finetune", "x.yaml"], "config file 'x.yaml' not found"),
        (["predict", "ckpt", "--input", "a.jsonl"], "'a.jsonl' does not exist"),
        (["embed", "ckpt", "--text", "hi"], "'ckpt' does not exist"),
    ],
)
def test_missing_inputs_say_so_in_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_tokenizer_train(tmp_path, small_corpus, capsys):
    out = tmp_path / "tok"
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(small_corpus),
                "--vocab-size",
                "600",
                "--output",
                str(out),
                "--model-type",
                "unigram",
            ]
        )
        == 0
    )
    assert "600 pieces" in capsys.readouterr().out
    from plm_jax.tokenizer import Tokenizer

    tok = Tokenizer.load(out)
    assert tok.vocab_size == 600 and tok.mask_id == 4
    text = "Return the value of x.\n\tTabs, 'quotes' and ünïcödé ✓"
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_train_bad_input(tmp_path, capsys):
    assert (
        main(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "missing.txt"),
                "--vocab-size",
                "100",
                "--output",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert not (tmp_path / "o").exists()


def test_prepare_writes_config_and_reports_the_splits(
    tmp_path, small_corpus, small_tokenizer, capsys
):
    run_dir = tmp_path / "run"
    argv = [
        "prepare",
        f"data.source={small_corpus}",
        f"data.cache_dir={tmp_path / 'c'}",
        f"run.dir={run_dir}",
        f"tokenizer.path={small_tokenizer.path}",
        "model.max_seq_len=64",
        "train.batch_size=8",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "windows of 65" in out and "batches per epoch" in out
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["max_seq_len"] == 64 and saved["data"]["source"] == str(small_corpus)


def test_prepare_with_a_config_file(tmp_path, small_corpus, small_tokenizer, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "run": {"dir": str(tmp_path / "run")},
                "data": {"source": str(small_corpus), "cache_dir": str(tmp_path / "c")},
                "tokenizer": {"path": str(small_tokenizer.path)},
            }
        )
    )
    assert main(["prepare", str(path), "train.batch_size=4"]) == 0
    assert "of 4 sequences" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["eval", "score", "generate"])
def test_checkpoint_commands_on_a_missing_path_exit_2(command, tmp_path, capsys):
    extra = {"eval": [], "score": ["--text", "hi"], "generate": ["--prompt", "hi"]}[command]
    assert main([command, str(tmp_path / "nothing"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_tokenizer_train_on_jsonl_without_the_text_field_names_it(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"body": "some text"}\n' * 5)
    argv = ["tokenizer", "train", "--input", str(corpus), "--vocab-size", "64"]
    assert main([*argv, "--output", str(tmp_path / "tok")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("plm-jax: error")]
    assert len(err) == 1 and "data.text_field='text'" in err[0] and "['body']" in err[0], err


def _tiny_pretrain(tmp_path, small_corpus, small_tokenizer, *flags):
    return [
        *flags,
        "pretrain",
        f"run.dir={tmp_path / 'run'}",
        f"data.source={small_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"tokenizer.path={small_tokenizer.path}",
        "model.max_seq_len=32",
        "model.num_layers=1",
        "model.embed_dim=32",
        "train.batch_size=8",
        "train.steps=2",
        "train.warmup_steps=1",
        "train.eval_every=1000",
        "checkpoint.save_every=2",
    ]


def test_pretrain_prints_a_short_summary_and_the_full_config_only_with_verbose(
    tmp_path, small_corpus, small_tokenizer
):
    import os
    import subprocess
    import sys
    from pathlib import Path

    def terminal(argv):
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        done = subprocess.run(
            [sys.executable, "-m", "plm_jax.cli", *argv],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stderr

    err = terminal(_tiny_pretrain(tmp_path, small_corpus, small_tokenizer))
    assert "resolved config" not in err and "encoding_errors" not in err
    (summary,) = [line for line in err.splitlines() if " parameters, " in line]
    assert re.search(r"decoder, [\d.]+ K parameters, 1 layers x 32 wide", summary), summary
    assert "8 x 32 = 256 tokens per step" in summary
    assert "mesh data=8 fsdp=1 tensor=1 on 8 cpu device(s); 2 steps" in summary
    assert f"full config: {tmp_path / 'run' / 'config.yaml'}" in summary
    assert len(err.splitlines()) < 25, err  # the whole start-up and training log
    again = _tiny_pretrain(tmp_path, small_corpus, small_tokenizer)
    err = terminal([*again[:1], "--verbose", *again[1:]])  # `pretrain --verbose`
    assert "resolved config:" in err and "encoding_errors: strict" in err
