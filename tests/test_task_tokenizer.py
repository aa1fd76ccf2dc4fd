"""Fine-tuning from random weights trains its tokenizer on the task's text
(plm_jax/tasks/task_tokenizer.py)."""

from __future__ import annotations

import json
import logging

import pytest

from plm_jax.config import load_config
from plm_jax.errors import DataError
from plm_jax.tasks import finetune as ft_mod
from plm_jax.tasks.task_tokenizer import ensure_task_tokenizer, task_texts
from plm_jax.tokenizer import Tokenizer
from tests.test_finetune import sentiment_rows, write_jsonl


def scratch_config(tmp_path, *extra):
    return load_config(
        None,
        [
            f"run.dir={tmp_path / 'run'}",
            "model.num_layers=1",
            "model.embed_dim=32",
            "model.max_seq_len=32",
            "tokenizer.vocab_size=320",
            "train.batch_size=8",
            "train.steps=4",
            "train.warmup_steps=1",
            "train.eval_every=1000",
            "checkpoint.save_every=4",
            *extra,
        ],
    )


def test_a_classification_run_without_tokenizer_trains_one_on_its_texts(tmp_path, caplog):
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(60, 0))
    cfg = scratch_config(tmp_path, "task.name=classification", f"task.train_file={train}")
    caplog.set_level(logging.INFO)
    result = ft_mod.finetune(cfg, show_progress=False)
    assert result["step"] == 4
    tokenizer = Tokenizer.load(tmp_path / "run" / "tokenizer")
    assert tokenizer.vocab_size == 320
    assert "trained a 320-piece SentencePiece tokenizer on the task's training text" in caplog.text
    assert load_config(tmp_path / "run" / "config.yaml").tokenizer.path.endswith("run/tokenizer")
    pieces = {tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)}
    assert {"▁movie", "▁really"} <= pieces and "▁pos" not in pieces  # text, not labels
    stamp = (tmp_path / "run" / "tokenizer" / "tokenizer.model").stat().st_mtime_ns
    ensure_task_tokenizer(cfg, show_progress=False)  # a later segment loads it, trains nothing
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.model").stat().st_mtime_ns == stamp


def test_translation_texts_are_both_sides_and_squad_strings_skip_ids(tmp_path):
    pairs = [{"source": "the red house", "target": "das rote Haus", "id": "p1"}]
    train = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    cfg = scratch_config(tmp_path, "task.name=translation", f"task.train_file={train}")
    assert list(task_texts(cfg)) == ["the red house", "das rote Haus"]
    (tmp_path / "src.txt").write_text("one\ntwo\n")
    (tmp_path / "tgt.txt").write_text("eins\nzwei\n")
    files = [f"task.source_file={tmp_path / 'src.txt'}", f"task.target_file={tmp_path / 'tgt.txt'}"]
    cfg = scratch_config(tmp_path, "task.name=translation", *files)
    assert list(task_texts(cfg)) == ["one", "two", "eins", "zwei"]
    squad = {
        "data": [
            {
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where is Paris?",
                                "answers": [{"text": "France"}],
                            }
                        ],
                    }
                ]
            }
        ]
    }
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    cfg = scratch_config(tmp_path, "task.name=qa", f"task.train_file={tmp_path / 'squad.json'}")
    assert list(task_texts(cfg)) == ["Paris is in France.", "Where is Paris?", "France"]
    (tmp_path / "t.tsv").write_text("text\tlabel\nso good\tpos\n")
    cfg = scratch_config(
        tmp_path, "task.name=classification", f"task.train_file={tmp_path / 't.tsv'}"
    )
    assert list(task_texts(cfg)) == ["so good"]


def test_a_bad_training_file_is_one_clear_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine", "label": 1}\n{"text": \n')
    cfg = scratch_config(
        tmp_path, "task.name=classification", f"task.train_file={tmp_path / 'bad.jsonl'}"
    )
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        ensure_task_tokenizer(cfg, show_progress=False)
    assert not (tmp_path / "run" / "tokenizer" / "tokenizer.model").exists()
