"""Document sources: text splitting, JSONL, gzip, directories, globs, builtin corpus, bad input."""

import gzip
import json
import logging

import pytest

from plm_jax.config import DataConfig
from plm_jax.data.sources import (
    SourceStats,
    check_stats,
    iter_documents,
    python_stdlib_docstrings,
    resolve_files,
    source_fingerprint,
)
from plm_jax.errors import DataError


def docs(source, **kw):
    data = DataConfig(source=source, **kw)
    stats = SourceStats()
    out = list(iter_documents(data, stats))
    check_stats(stats, data)
    return out


def test_text_split_modes(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one\nstill one\n\n\n  \ntwo\n\nthree")
    assert docs(str(f)) == ["one\nstill one", "two", "three"]
    assert docs(str(f), doc_split="line") == ["one", "still one", "two", "three"]
    assert docs(str(f), doc_split="file") == ["one\nstill one\n\n\n  \ntwo\n\nthree"]


def test_jsonl_gzip_directory_and_glob(tmp_path):
    (tmp_path / "d").mkdir()
    with gzip.open(tmp_path / "d" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "from gzip"}) + "\n\n")
    (tmp_path / "d" / "a.jsonl").write_text(
        json.dumps({"content": "first"}) + "\n" + json.dumps({"content": "second"}) + "\n"
    )
    (tmp_path / "d" / ".hidden.txt").write_text("never read")
    assert docs(str(tmp_path / "d"), text_field="content") == ["first", "second", "from gzip"]
    assert docs(str(tmp_path / "d" / "*.jsonl*"), text_field="content") == [
        "first",
        "second",
        "from gzip",
    ]
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"p1\n\np2\n"))
    assert docs(
        [str(tmp_path / "c.txt.gz"), str(tmp_path / "d" / "a.jsonl")], text_field="content"
    ) == ["p1", "p2", "first", "second"]


def test_jsonl_missing_field_is_counted_and_logged(tmp_path, caplog):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "kept"}\n{"body": "no text field"}\n{"text": 5}\n')
    with caplog.at_level(logging.WARNING):
        assert docs(str(f)) == ["kept"]
    assert "skipped 2 JSONL lines without a string field 'text'" in caplog.text
    assert "x.jsonl:2" in caplog.text


def test_jsonl_wrong_field_everywhere_names_the_keys(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"no JSONL line has .*'text'.*keys seen: \['body'\]"):
        docs(str(f))


def test_bad_input_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        docs(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="matches no files"):
        docs(str(tmp_path / "*.nothing"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        docs(str(tmp_path / "empty_dir"))
    with pytest.raises(DataError, match="not a built-in corpus"):
        docs("builtin:wikipedia")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    with pytest.raises(DataError, match="holds no documents"):
        docs(str(empty))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        docs(str(bad_json))
    truncated = tmp_path / "t.txt.gz"
    truncated.write_bytes(gzip.compress(b"some text\n" * 1000)[:50])
    with pytest.raises(DataError, match="cannot read .*t.txt.gz"):
        docs(str(truncated))


def test_non_utf8_is_an_error_or_replaced(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("ok line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(
        DataError, match=r"latin1.txt:2: not valid UTF-8 \(byte 0xe9.*encoding_errors=replace"
    ):
        docs(str(f))
    assert docs(str(f), encoding_errors="replace") == ["ok line\ncaf\ufffd"]


def test_fingerprint_follows_content_and_options(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    fp = source_fingerprint(DataConfig(source=str(f)))
    assert fp == source_fingerprint(DataConfig(source=str(f)))
    assert fp != source_fingerprint(DataConfig(source=str(f), doc_split="line"))
    f.write_text("hello, changed")
    assert fp != source_fingerprint(DataConfig(source=str(f)))


def test_auto_format_by_extension(tmp_path):
    for name in ["a.jsonl", "b.jsonl.gz", "c.txt", "d.txt.gz", "e.md"]:
        (tmp_path / name).write_bytes(b"")
    formats = {f.path.name: f.format for f in resolve_files(DataConfig(source=str(tmp_path)))}
    assert formats == {
        "a.jsonl": "jsonl",
        "b.jsonl.gz": "jsonl",
        "c.txt": "text",
        "d.txt.gz": "text",
        "e.md": "text",
    }


def test_builtin_python_stdlib_corpus():
    corpus = python_stdlib_docstrings()
    size = sum(len(d.encode()) for d in corpus)
    assert len(corpus) > 3000 and 1_000_000 < size < 4_000_000
    assert any(d.startswith("Return the absolute version of a path.") for d in corpus)  # posixpath
    assert corpus == python_stdlib_docstrings()
    first = next(iter_documents(DataConfig(source="builtin:python-stdlib")))
    assert first == corpus[0]
