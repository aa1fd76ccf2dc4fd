"""`train.evals`: multiple-choice accuracy at every evaluation of a pretraining run."""

import json

import numpy as np
import pytest

import plm_jax
from plm_jax.cli import main
from plm_jax.config import load_config
from plm_jax.errors import ConfigError, DataError
from plm_jax.evals.downstream import DownstreamEvals, load_jsonl_task
from plm_jax.evals.scoring import compiled_forward, loglikelihoods
from plm_jax.metrics import read_metrics
from plm_jax.train.loop import pretrain

EXAMPLES = [
    ("Return the", ["absolute value of x", "list", "number"], 0),
    ("A module is", ["a file", "red", "a list of values"], 1),
    ("Compute the", ["sum", "value", "length of the string"], 2),
    ("def", ["f(x):", "return", "class"], 0),
    ("Raise an", ["error", "exception", "value"], 1),
]


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("mc") / "tiny_mc.jsonl"
    rows = [{"context": c, "choices": ch, "label": y} for c, ch, y in EXAMPLES]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(tmp_path, small_corpus, small_tokenizer, mc_file, *extra):
    return load_config(
        None,
        [
            f"data.source={small_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
            f"tokenizer.path={small_tokenizer.path}",
            "model.max_seq_len=32",
            "model.num_layers=1",
            "model.embed_dim=32",
            "train.batch_size=8",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.log_every=2",
            "train.eval_every=2",
            "train.eval_batches=1",
            "checkpoint.save_every=2",
            f"train.evals=[{mc_file}]",
            *extra,
        ],
    )


def _downstream(run_dir):
    return {r["step"]: r for r in read_metrics(run_dir) if "eval/tiny_mc/acc" in r}


def test_each_evaluation_logs_task_accuracy(tmp_path, small_corpus, small_tokenizer, mc_file):
    cfg = _config(tmp_path, small_corpus, small_tokenizer, mc_file)
    final = pretrain(cfg, show_progress=False)
    logged = _downstream(cfg.run_dir)
    assert sorted(logged) == [0, 2, 4]  # the step-0 baseline, then every train.eval_every
    for record in logged.values():
        assert record["perf/evals_seconds"] > 0
        assert set(record) >= {"eval/tiny_mc/acc", "eval/tiny_mc/acc_norm"}
    assert final["eval/tiny_mc/acc"] == logged[4]["eval/tiny_mc/acc"]
    # The same numbers from the saved checkpoint, on one device instead of the 8-device mesh.
    lm = plm_jax.load(cfg.run_dir)
    task = load_jsonl_task(mc_file, lm.tokenizer, limit=100, add_bos=True)
    scores = loglikelihoods(compiled_forward(lm.model), task.requests, max_seq_len=32, batch_size=3)
    expected = task.metrics(scores)
    for key, value in expected.items():
        assert logged[4][key] == value
    # A hand check of acc: argmax over each example's choices against the labels.
    lls = np.array([s[0] for s in scores]).reshape(len(EXAMPLES), 3)
    hits = np.argmax(lls, axis=1) == np.array([y for _, _, y in EXAMPLES])
    assert logged[4]["eval/tiny_mc/acc"] == hits.mean()


@pytest.mark.e2e  # three short runs: about 40 s on 2 cores
def test_resumed_run_logs_the_same_accuracy(tmp_path, small_corpus, small_tokenizer, mc_file):
    whole = _config(tmp_path / "a", small_corpus, small_tokenizer, mc_file)
    pretrain(whole, show_progress=False)
    parts = _config(tmp_path / "b", small_corpus, small_tokenizer, mc_file)
    pretrain(parts, show_progress=False, until=2)
    assert sorted(_downstream(parts.run_dir)) == [0, 2]
    pretrain(parts, show_progress=False)  # resumes from the step-2 checkpoint
    a, b = _downstream(whole.run_dir), _downstream(parts.run_dir)
    assert sorted(a) == sorted(b) == [0, 2, 4]
    for step in a:
        for key in ("eval/tiny_mc/acc", "eval/tiny_mc/acc_norm", "eval/loss"):
            assert a[step].get(key) == b[step].get(key), (step, key)


def test_bad_train_evals_are_one_line_errors(tmp_path, small_tokenizer, mc_file, capsys):
    with pytest.raises(ConfigError, match="train.evals scores multiple-choice tasks"):
        load_config(None, ["model.family=encoder", f"train.evals=[{mc_file}]"])
    with pytest.raises(ConfigError, match="train.evals_limit=0 must be positive"):
        load_config(None, ["train.evals_limit=0"])
    tokenizer = plm_jax.tokenizer.Tokenizer.load(small_tokenizer.path)
    missing = load_config(None, [f"train.evals=[{tmp_path / 'nope.jsonl'}]"])
    with pytest.raises(DataError, match="nope.jsonl' does not exist"):
        DownstreamEvals.from_config(missing, tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "choices": ["x"], "label": 0}\n')
    with pytest.raises(DataError, match="bad.jsonl:1 needs"):
        DownstreamEvals.from_config(load_config(None, [f"train.evals=[{bad}]"]), tokenizer)
    bad.write_text('{"context": "a", "choices": ["x", "y"], "label": 2}\n')
    with pytest.raises(DataError, match="a label indexing them"):
        DownstreamEvals.from_config(load_config(None, [f"train.evals=[{bad}]"]), tokenizer)
    assert main(["pretrain", f"train.evals=[{mc_file}]", "model.family=encoder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.evals scores multiple-choice tasks" in err[0]


@pytest.mark.e2e  # indexes the harness's ~15k built-in tasks to look for the name: 10+ s
def test_unknown_harness_task_is_refused(tmp_path, small_tokenizer):
    pytest.importorskip("lm_eval", reason="needs lm-eval (the eval extra)")
    tokenizer = plm_jax.tokenizer.Tokenizer.load(small_tokenizer.path)
    (tmp_path / "tasks").mkdir()
    cfg = load_config(None, ["train.evals=[piqaa]", f"train.evals_include_path={tmp_path}/tasks"])
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['piqaa'\].*'piqa'"):
        DownstreamEvals.from_config(cfg, tokenizer)
