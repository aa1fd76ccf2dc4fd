"""Fine-tuning: classification, regression and QA runs, exact resume, accumulation, early
stopping, evaluation that counts every example once, prediction, and bad input."""

import json
import os
import random
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from plm_jax.checkpoint import Checkpointer
from plm_jax.cli import main
from plm_jax.config import ModelConfig, TrainConfig, load_config
from plm_jax.errors import DataError
from plm_jax.tasks import finetune as ft_mod
from plm_jax.tasks.model import TaskModel
from plm_jax.train.optimizer import layerwise_lr_factors, lr_schedule
from plm_jax.train.preemption import Preempted
from plm_jax.train.state import TrainState, empty_loss_window

POS = ["great", "excellent", "wonderful", "love", "happy", "good"]
NEG = ["terrible", "awful", "hate", "sad", "bad", "horrible"]
FILL = ["the", "a", "movie", "was", "really", "is", "it", "and", "of", "to"]


def sentiment_rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.choices(POS if label == "pos" else NEG, k=2) + rng.choices(
            FILL, k=rng.randint(2, 24)
        )
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    d = tmp_path_factory.mktemp("sentiment")
    return write_jsonl(d / "train.jsonl", sentiment_rows(180, 0)), write_jsonl(
        d / "eval.jsonl", sentiment_rows(37, 1)
    )


def ft_config(tmp_path, run, backbone, *extra, name="ft"):
    return load_config(
        None,
        [
            f"init_from={backbone}",
            f"run.dir={tmp_path / name}",
            "train.batch_size=16",
            "train.warmup_steps=2",
            "train.log_every=4",
            "train.eval_every=12",
            "train.lr=3e-3",
            "checkpoint.save_every=12",
            "model.dropout=0.1",
            *run,
            *extra,
        ],
    )


def cls_args(sentiment):
    train, held_out = sentiment
    return [
        "task.name=classification",
        f"task.train_file={train}",
        f"task.eval_file={held_out}",
    ]


def losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.mark.e2e
def test_classification_learns_predicts_and_evaluates(
    tmp_path, tiny_run, sentiment, capsys, monkeypatch
):
    cfg = ft_config(tmp_path, cls_args(sentiment), tiny_run, "train.steps=36")
    result = ft_mod.finetune(cfg, show_progress=False)
    assert result["eval/accuracy"] >= 0.9, result  # a decoder backbone, last-token pooling
    assert 0 < result["padding_fraction"] < 0.6 and result["compiled_shapes"] <= 2
    run = tmp_path / "ft"
    best = json.loads((run / "best.json").read_text())
    assert best["metric"] == "accuracy" and best["value"] == result["best"]
    assert json.loads((run / "labels.json").read_text()) == {"labels": ["neg", "pos"]}
    # plm-jax eval on the best checkpoint reproduces its logged metric.
    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["step"] == best["step"]
    assert evaluated["eval/accuracy"] == pytest.approx(best["value"], abs=1e-6)
    assert evaluated["examples"] == 37
    # --batch-size is honoured for a task run too (it was silently ignored); metrics keep.
    import plm_jax.tasks.predict as predict_mod

    seen, real = [], predict_mod.evaluate_task
    spy = lambda run, data: seen.append(run.config.train.batch_size) or real(run, data)  # noqa: E731
    monkeypatch.setattr(predict_mod, "evaluate_task", spy)
    assert main(["eval", str(run), "--json", "--batch-size", "5"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert seen == [5] and again["examples"] == 37
    assert again["eval/accuracy"] == pytest.approx(evaluated["eval/accuracy"], abs=1e-6)
    inputs = write_jsonl(tmp_path / "in.jsonl", [{"text": "great happy movie"}, {"text": "awful"}])
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run), "--input", str(inputs), "--output", str(out)]) == 0
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["label"] for p in preds] == ["pos", "neg"]
    assert all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)


@pytest.mark.e2e
def test_resume_mid_epoch_is_exact(tmp_path, tiny_run, sentiment):
    # 180 examples / 16 = 12 batches per epoch; the interruption falls mid-epoch 2.
    args = cls_args(sentiment) + ["train.steps=20", "checkpoint.save_every=5"]
    ft_mod.finetune(ft_config(tmp_path, args, tiny_run, name="whole"), show_progress=False)
    split = ft_config(tmp_path, args, tiny_run, name="split")
    ft_mod.finetune(split, show_progress=False, until=17)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "17")  # killed after step 15's save
    ft_mod.finetune(split, show_progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


@pytest.mark.faults  # two fine-tuning runs: CI's second step
def test_sigterm_stops_fine_tuning_with_a_checkpoint_and_resumes_exactly(
    tmp_path, tiny_run, sentiment, monkeypatch
):
    # Every step logged: the preempted run logs its last step, and a mean over a log
    # interval cut by the interruption would differ from the uninterrupted one.
    args = cls_args(sentiment) + ["train.steps=10", "checkpoint.save_every=5", "train.log_every=1"]
    ft_mod.finetune(ft_config(tmp_path, args, tiny_run, name="whole"), show_progress=False)
    real, calls = ft_mod.shard_batch, [0]

    def shard(local, mesh, rows):  # the 7th training batch arrives with a SIGTERM
        calls[0] += 1
        if calls[0] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(local, mesh, rows)

    monkeypatch.setattr(ft_mod, "shard_batch", shard)
    split = ft_config(tmp_path, args, tiny_run, name="split")
    with pytest.raises(Preempted, match="stopped by SIGTERM at step 7"):
        ft_mod.finetune(split, show_progress=False)
    ck = Checkpointer(split.run_dir, split.checkpoint, read_only=True)
    assert ck.latest_step() == 7 and ck.check(7).state == "ok"
    ck.close()
    monkeypatch.setattr(ft_mod, "shard_batch", real)
    ft_mod.finetune(split, show_progress=False)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")


@pytest.mark.e2e
def test_gradient_accumulation_matches_one_batch():
    cfg = ModelConfig(vocab_size=64, num_layers=1, embed_dim=16, num_heads=2, max_seq_len=16)
    model = TaskModel(cfg, "classification", 3, "mean", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(0)
    seg = np.ones((8, 12), np.int32)
    seg[:3, 6:] = 0  # padded rows of different lengths
    batch = {
        "inputs": rng.integers(1, 64, (8, 12)).astype(np.int32),
        "token_types": np.zeros((8, 12), np.int32),
        "segment_ids": seg,
        "positions": np.tile(np.arange(12, dtype=np.int32), (8, 1)),
        "label": rng.integers(0, 3, 8).astype(np.int32),
        "weights": np.array([1, 1, 1, 1, 1, 0, 1, 0], np.float32),  # two padding rows
    }
    tx = optax.sgd(1.0)
    state = TrainState(
        jnp.zeros((), jnp.int32),
        params,
        tx.init(params),
        jnp.zeros(2, jnp.uint32),
        empty_loss_window(),
    )
    out = []
    for accum in (1, 2, 4):
        new, metrics = ft_mod.task_train_step(
            state,
            batch,
            graphdef=graphdef,
            tx=tx,
            schedule=lr_schedule(TrainConfig(warmup_steps=0)),
            grad_accum=accum,
            task="classification",
            drop=False,
        )
        out.append((float(metrics["train/loss"]), jax.tree.leaves(new.params)))
    for loss, leaves in out[1:]:
        assert loss == pytest.approx(out[0][0], rel=1e-5)
        for a, b in zip(leaves, out[0][1], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_evaluation_counts_every_example_once(tmp_path, tiny_run, sentiment):
    cfg = ft_config(tmp_path, cls_args(sentiment), tiny_run, "train.steps=4")
    tuner = ft_mod.setup(cfg, show_progress=False)
    try:
        examples = tuner.data.eval  # 37 examples, batch 16: the last batch is mostly padding
        outputs = ft_mod.predict_outputs(
            tuner.graphdef,
            tuner.state.params,
            examples,
            mesh=tuner.mesh,
            batch_size=16,
            pad_id=tuner.data.pad_id,
            max_len=cfg.model.max_seq_len,
        )
        assert len(outputs) == 37
        model = nnx.merge(tuner.graphdef, jax.device_get(tuner.state.params))
        for i in (0, 17, 36):  # each example's output is its own, alone in a batch
            ids = jnp.asarray([examples[i]["ids"]], jnp.int32)
            alone = model(ids, segment_ids=jnp.ones_like(ids))
            np.testing.assert_allclose(outputs[i], np.asarray(alone[0]), atol=1e-5)
    finally:
        tuner.checkpointer.close()
        tuner.writer.close()


def test_early_stopping_and_regression(tmp_path, tiny_run):
    rows = [{"text": " ".join(["good"] * k + ["the"] * 3), "label": float(k)} for k in range(40)]
    data = write_jsonl(tmp_path / "reg.jsonl", rows)
    args = ["task.name=regression", f"task.train_file={data}", "task.holdout_fraction=0.25"]
    # An update of 1e-30 vanishes against every float32 parameter, so the eval metric is the
    # same at every evaluation: the best is set at step 2, steps 4 and 6 are no improvement.
    args += ["train.steps=60", "train.eval_every=2", "task.patience=2", "train.lr=1e-30"]
    result = ft_mod.finetune(ft_config(tmp_path, args, tiny_run), show_progress=False)
    assert result["early_stopped"] and result["step"] == 6
    assert {"eval/pearson", "eval/spearman", "eval/mse"} <= set(result)


def test_layerwise_lr_factors():
    cfg = ModelConfig(vocab_size=64, num_layers=3, embed_dim=16, num_heads=2, max_seq_len=16)
    _, params = nnx.split(TaskModel(cfg, "qa", 2, "auto", rngs=nnx.Rngs(0)), nnx.Param)
    f = layerwise_lr_factors(params, 3, 0.5, scanned=False)
    assert f["backbone"]["blocks"][2]["attn"]["w_q"] == 0.5
    assert f["backbone"]["blocks"][0]["attn"]["w_q"] == 0.125
    assert f["backbone"]["embed"]["embedding"] == 0.0625
    assert f["head_w"] == 1.0 and f["backbone"]["final_norm"]["scale"] == 1.0


SQUAD = {
    "version": "v2.0",
    "data": [
        {
            "paragraphs": [
                {
                    "context": f"The capital of {country} is {city}. It lies on a river.",
                    "qas": [
                        {
                            "id": f"q{i}",
                            "question": f"What is the capital of {country}?",
                            "answers": [
                                {
                                    "text": city,
                                    "answer_start": len(f"The capital of {country} is "),
                                }
                            ],
                        }
                    ],
                }
                for i, (country, city) in enumerate(
                    [
                        ("France", "Paris"),
                        ("Peru", "Lima"),
                        ("Japan", "Tokyo"),
                        ("Chile", "Santiago"),
                    ]
                    * 8
                )
            ]
        }
    ],
}


@pytest.mark.e2e
def test_qa_finetune_predicts_spans_with_offsets(tmp_path, tiny_run):
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(SQUAD))
    args = ["task.name=qa", f"task.train_file={data}", f"task.eval_file={data}"]
    args += ["train.steps=24", "task.doc_stride=8", "task.max_query_len=16"]
    result = ft_mod.finetune(ft_config(tmp_path, args, tiny_run), show_progress=False)
    assert {"eval/exact_match", "eval/f1"} <= set(result) and result["eval/f1"] > 50, result
    context = "The capital of Peru is Lima. It lies on a river."
    inputs = write_jsonl(
        tmp_path / "q.jsonl", [{"question": "What is the capital of Peru?", "context": context}]
    )
    from plm_jax.tasks.predict import load_task_run, predict_records

    (pred,) = predict_records(load_task_run(tmp_path / "ft"), [json.loads(inputs.read_text())])
    start = pred["answer_start"]
    assert start >= 0 and context[start : start + len(pred["answer"])] == pred["answer"]


def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_run, sentiment, capsys):
    train, _ = sentiment
    base = [f"init_from={tiny_run}", f"run.dir={tmp_path / 'bad'}"]
    cases = [
        (["finetune", *base], "task.name is empty"),
        (["finetune", *base, "task.name=classification"], "needs task.train_file"),
        (
            ["finetune", *base, "task.name=classification", f"task.train_file={tmp_path}/no.jsonl"],
            "does not exist",
        ),
        (
            ["finetune", *base, "task.name=translation", f"task.train_file={train}"],
            "no 'source' field (keys: ['label', 'text']); set task.source_field",
        ),
        (["predict", str(tiny_run), "--input", str(train)], "pretraining run"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)
    assert ft_mod.task_kind(load_config(None, ["task.name=translation", "task.train_file=x"]))
    # No init_from, no tokenizer.path: a tokenizer is trained on the task's text (issue 15),
    # and a vocabulary too large for 12 kB of tweets says so (tests/test_task_tokenizer.py).
    with pytest.raises(DataError, match="tokenizer vocab_size=4096 is too large for"):
        ft_mod.setup(
            load_config(
                None,
                ["task.name=classification", f"task.train_file={train}", f"run.dir={tmp_path}/x"],
            )
        )
    unlabeled = write_jsonl(tmp_path / "u.jsonl", [{"txt": "no text field"}])
    from plm_jax.tasks.predict import TaskRun, predict_records

    run = TaskRun(
        None, None, None, load_config(None, ["task.name=classification"]), None, 0, tmp_path, None
    )
    with pytest.raises(DataError, match="field 'text'"):
        predict_records(run, [json.loads(unlabeled.read_text())])
