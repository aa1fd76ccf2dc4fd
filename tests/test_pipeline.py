"""The data stage end to end: tokenizer + corpus -> cached shards -> windows -> loaders."""

import logging

import numpy as np
import pytest

from plm_jax.config import load_config
from plm_jax.data.pipeline import build_pipeline, load_or_train_tokenizer
from plm_jax.data.prepare import cache_root, is_eval_document, prepare_data
from plm_jax.data.sources import iter_documents
from plm_jax.errors import DataError


def config(tmp_path, corpus, *extra):
    return load_config(
        None,
        [
            f"data.source={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
            "model.max_seq_len=32",
            "train.batch_size=4",
            "data.eval_fraction=0.1",
            *extra,
        ],
    )


def test_prepare_tokenizes_once_and_reuses_the_cache(tmp_path, small_corpus, small_tokenizer):
    cfg = config(tmp_path, small_corpus)
    first = prepare_data(cfg.data, small_tokenizer, show_progress=False)
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    again = prepare_data(cfg.data, small_tokenizer, show_progress=False)
    assert again.path == first.path
    assert (again.path / "meta.json").stat().st_mtime_ns == stamp  # not rewritten
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp-*"))  # no leftovers
    # every document appears in exactly one split, as [bos] ids... eos
    docs = list(iter_documents(cfg.data))
    n_eval = sum(is_eval_document(d, 0.1) for d in docs)
    assert first.meta["eval"]["num_docs"] == n_eval > 0
    assert first.meta["train"]["num_docs"] == len(docs) - n_eval
    train_docs = [d for d in docs if not is_eval_document(d, 0.1)]
    start = int(first.train.doc_starts[3])
    stop = int(first.train.doc_starts[4])
    ids = first.train.read(start, stop)
    assert ids[0] == small_tokenizer.bos_id and ids[-1] == small_tokenizer.eos_id
    assert small_tokenizer.decode(ids[1:-1].tolist()) == train_docs[3]


def test_cache_key_changes_with_source_and_tokenizer(tmp_path, small_corpus, small_tokenizer):
    cfg = config(tmp_path, small_corpus)
    a = prepare_data(cfg.data, small_tokenizer, show_progress=False).path
    b = prepare_data(
        config(tmp_path, small_corpus, "data.eval_fraction=0.2").data,
        small_tokenizer,
        show_progress=False,
    ).path
    other = tmp_path / "other.txt"
    other.write_text("a different corpus\n\nwith two documents\n")
    c = prepare_data(config(tmp_path, other).data, small_tokenizer, show_progress=False).path
    assert len({a, b, c}) == 3


def test_multi_shard_store_reads_like_one(tmp_path, small_corpus, small_tokenizer):
    one = prepare_data(config(tmp_path, small_corpus).data, small_tokenizer, show_progress=False)
    # the shard size is a storage detail, not part of the cache key: use another cache
    many_cfg = config(
        tmp_path, small_corpus, "data.shard_tokens=1000", f"data.cache_dir={tmp_path / 'cache2'}"
    )
    many = prepare_data(many_cfg.data, small_tokenizer, show_progress=False)
    assert len(list((many.path / "train").glob("tokens-*.bin"))) > 5
    n = one.train.num_tokens
    assert many.train.num_tokens == n
    np.testing.assert_array_equal(one.train.read(0, n), many.train.read(0, n))
    np.testing.assert_array_equal(one.train.read(995, 2017), many.train.read(995, 2017))


def test_interrupted_prepare_leaves_no_complete_looking_entry(tmp_path, small_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 10 + "not json\n")
    cfg = config(tmp_path, bad)
    with pytest.raises(DataError, match="not valid JSON"):
        prepare_data(cfg.data, small_tokenizer, show_progress=False)
    assert list((cache_root(cfg.data) / "tokens").iterdir()) == []


def test_pipeline_batches(tmp_path, small_corpus, small_tokenizer):
    cfg = config(tmp_path, small_corpus)
    pipe = build_pipeline(cfg, small_tokenizer, show_progress=False)
    batch = next(pipe.train)
    assert batch["inputs"].shape == (4, 32)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    evals = list(pipe.eval_batches())
    assert sum(b["weights"].sum() for b in evals) == sum(
        pipe.eval_windows[i]["weights"].sum() for i in range(pipe.eval_windows.num_real)
    )


def test_max_seq_len_longer_than_every_document_packs_and_logs(tmp_path, small_tokenizer, caplog):
    short = tmp_path / "short.txt"
    short.write_text("\n\n".join(f"document number {i} is short." for i in range(300)))
    cfg = config(tmp_path, short, "model.max_seq_len=256", "data.eval_fraction=0")
    with caplog.at_level(logging.INFO):
        pipe = build_pipeline(cfg, small_tokenizer, show_progress=False)
    assert "every document is shorter than model.max_seq_len=256" in caplog.text
    example = pipe.train_windows[0]
    assert example["segment_ids"].max() > 5  # many documents in one window


def test_corpus_smaller_than_one_window_is_an_error(tmp_path, small_tokenizer):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words")
    cfg = config(tmp_path, tiny, "model.max_seq_len=64", "data.eval_fraction=0")
    with pytest.raises(DataError, match=r"fewer than one window of 65 \(model.max_seq_len=64\)"):
        build_pipeline(cfg, small_tokenizer, show_progress=False)


def test_empty_corpus_is_an_error(tmp_path, small_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="holds no documents"):
        build_pipeline(config(tmp_path, empty), small_tokenizer, show_progress=False)


def test_run_trains_its_tokenizer_once(tmp_path, small_corpus):
    cfg = config(tmp_path, small_corpus, "tokenizer.vocab_size=400")
    tok = load_or_train_tokenizer(cfg, show_progress=False)
    assert tok.vocab_size == 400 and tok.path.parent == tmp_path / "run" / "tokenizer"
    again = load_or_train_tokenizer(cfg, show_progress=False)
    assert again.fingerprint == tok.fingerprint
    with pytest.raises(DataError, match="tokenizer not found"):
        load_or_train_tokenizer(config(tmp_path, small_corpus, "tokenizer.path=/nope"))


def test_a_jsonl_corpus_without_the_text_field_names_the_field_file_and_keys(tmp_path):
    """Training the run's tokenizer on JSONL whose lines lack `data.text_field` (docs/data.md)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(f'{{"x": "document {i}", "id": {i}}}\n' for i in range(20)))
    cfg = config(tmp_path, corpus, "tokenizer.vocab_size=64")
    message = (
        r"no JSONL line has a string field data.text_field='text' "
        rf"\(first at {corpus}:1, keys seen: \['id', 'x'\]\); set data.text_field"
    )
    with pytest.raises(DataError, match=message):
        load_or_train_tokenizer(cfg, show_progress=False)
    assert not (tmp_path / "run" / "tokenizer" / "tokenizer.model").exists()
