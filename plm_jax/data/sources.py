"""Text sources: files, directories, globs, JSONL and the built-in corpus, as a document stream.

A *document* is the unit that packing keeps apart with `segment_ids`. How files become
documents:

- plain text (`.txt` or any non-JSONL file, optionally `.gz`): by `data.doc_split`:
  `blank_line` (default) - documents are separated by one or more blank lines;
  `file` - each file is one document; `line` - each non-empty line is one document.
- JSONL (`.jsonl`/`.ndjson`/`.json`, optionally `.gz`): one JSON object per line, the document is
  the string under `data.text_field`. Lines without that field are skipped, counted and logged.
- `builtin:python-stdlib`: the docstrings of the installed Python standard library (one
  docstring, one document), read from its source files with `ast`; nothing is imported.

Directories are read recursively in sorted order (hidden files skipped); globs are expanded and
sorted, so the document order never depends on the file system. Tokenizing and packing live in
`prepare.py` and `packing.py`.
"""

from __future__ import annotations

import ast
import functools
import glob
import gzip
import hashlib
import json
import logging
import sys
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from plm_jax.config import DataConfig
from plm_jax.errors import DataError

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTINS = ("python-stdlib",)
_JSONL_SUFFIXES = {".jsonl", ".ndjson", ".json"}
# Folders of the stdlib that are tests, demos or vendored packages rather than library docs.
_STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "__pycache__",
}


@dataclass(frozen=True)
class SourceFile:
    """One input file and how to read it."""

    path: Path
    format: str  # "text" or "jsonl"

    @property
    def is_gzip(self) -> bool:
        return self.path.suffix == ".gz"


@dataclass
class SourceStats:
    """Counts of what reading skipped, so skips are logged rather than silent."""

    documents: int = 0
    skipped_missing_field: int = 0
    skipped_empty: int = 0
    first_missing_field: str = ""
    field_keys_seen: list[str] = field(default_factory=list)


def resolve_files(data: DataConfig) -> list[SourceFile | str]:
    """Expands `data.source` into files (and builtin names), in a deterministic order.

    Raises:
      DataError: a path that does not exist, a glob that matches nothing, an unknown builtin.
    """
    sources = [data.source] if isinstance(data.source, str) else list(data.source)
    out: list[SourceFile | str] = []
    for src in sources:
        if src.startswith(BUILTIN_PREFIX):
            name = src[len(BUILTIN_PREFIX) :]
            if name not in BUILTINS:
                raise DataError(
                    f"data.source={src!r} is not a built-in corpus; available: "
                    f"{[BUILTIN_PREFIX + b for b in BUILTINS]}"
                )
            out.append(src)
            continue
        if any(c in src for c in "*?["):
            matches = sorted(Path(p) for p in glob.glob(src, recursive=True))
            paths = [p for p in matches if p.is_file()]
            if not paths:
                raise DataError(f"data.source glob {src!r} matches no files; check the pattern")
        else:
            path = Path(src).expanduser()
            if path.is_dir():
                paths = sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(path).parts)
                )
                if not paths:
                    raise DataError(f"data.source directory {src!r} holds no files")
            elif path.is_file():
                paths = [path]
            else:
                raise DataError(
                    f"data.source {src!r} does not exist; give an existing file, directory or "
                    "glob, or builtin:python-stdlib"
                )
        out += [SourceFile(p, _format_of(p, data.format)) for p in paths]
    return out


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffixes = path.suffixes[-2:] if path.suffix == ".gz" else path.suffixes[-1:]
    return "jsonl" if suffixes and suffixes[0] in _JSONL_SUFFIXES else "text"


def source_fingerprint(data: DataConfig) -> str:
    """A hash of what the source holds: paths, sizes and modification times of its files.

    Reading options (format, field, split) are part of it, so changing them re-prepares.
    """
    h = hashlib.sha256()
    for item in resolve_files(data):
        if isinstance(item, str):  # a builtin: changes with the Python installation
            h.update(f"{item}|{sys.version}|{sysconfig.get_paths()['stdlib']}\n".encode())
        else:
            st = item.path.stat()
            h.update(
                f"{item.path.resolve()}|{item.format}|{st.st_size}|{st.st_mtime_ns}\n".encode()
            )
    h.update(f"{data.text_field}|{data.doc_split}|{data.encoding_errors}".encode())
    return h.hexdigest()


def iter_documents(data: DataConfig, stats: SourceStats | None = None) -> Iterator[str]:
    """Streams the documents of `data.source`; memory use does not grow with corpus size.

    Raises:
      DataError: unreadable or corrupt files, non-UTF-8 text under `encoding_errors=strict`,
        malformed JSON lines.
    """
    stats = stats if stats is not None else SourceStats()
    for item in resolve_files(data):
        if isinstance(item, str):
            docs = iter(python_stdlib_docstrings())
        elif item.format == "jsonl":
            docs = _read_jsonl(item, data, stats)
        else:
            docs = _read_text(item, data)
        for doc in docs:
            if not doc.strip():
                stats.skipped_empty += 1
                continue
            stats.documents += 1
            yield doc


def _lines(item: SourceFile, errors: str) -> Iterator[tuple[int, str]]:
    """(line number, decoded line with its newline) of a possibly gzip'd file."""
    try:
        opener = gzip.open if item.is_gzip else open
        with opener(item.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    yield lineno, raw.decode("utf-8", errors=errors)
                except UnicodeDecodeError as e:
                    raise DataError(
                        f"{item.path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at "
                        f"column {e.start}); convert the file to UTF-8 or set "
                        "data.encoding_errors=replace"
                    ) from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {item.path}: {e}; check the file is complete") from None


def _read_text(item: SourceFile, data: DataConfig) -> Iterator[str]:
    lines = (line for _, line in _lines(item, data.encoding_errors))
    if data.doc_split == "file":
        yield "".join(lines)
    elif data.doc_split == "line":
        for line in lines:
            yield line.rstrip("\r\n")
    else:
        para: list[str] = []
        for line in lines:
            if line.strip():
                para.append(line)
            elif para:
                yield "".join(para).rstrip("\r\n")
                para = []
        if para:
            yield "".join(para).rstrip("\r\n")


def _read_jsonl(item: SourceFile, data: DataConfig, stats: SourceStats) -> Iterator[str]:
    for lineno, line in _lines(item, data.encoding_errors):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{item.path}:{lineno}: not valid JSON ({e.msg}); each line of a JSONL file "
                "must be one JSON object"
            ) from None
        text = record.get(data.text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            stats.skipped_missing_field += 1
            if not stats.first_missing_field:
                stats.first_missing_field = f"{item.path}:{lineno}"
                if isinstance(record, dict):
                    stats.field_keys_seen = sorted(map(str, record))[:10]
            continue
        yield text


@functools.cache
def python_stdlib_docstrings() -> tuple[str, ...]:
    """The docstrings of the installed standard library's modules, classes and functions.

    Source files are parsed with `ast`, never imported; files that do not parse are skipped.
    The order is fixed (sorted paths, `ast.walk` order), so the corpus is reproducible for a
    given Python installation.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    for path in sorted(root.rglob("*.py")):
        if _STDLIB_SKIP.intersection(path.relative_to(root).parts[:-1]):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    docs.append(doc)
    return tuple(docs)


def check_stats(stats: SourceStats, data: DataConfig) -> None:
    """Logs counted skips and fails when nothing usable was read.

    Raises:
      DataError: the source produced no documents.
    """
    if stats.skipped_missing_field:
        log.warning(
            "skipped %d JSONL lines without a string field %r (first at %s)",
            stats.skipped_missing_field,
            data.text_field,
            stats.first_missing_field,
        )
    if stats.documents == 0:
        if stats.skipped_missing_field:
            raise DataError(
                f"no JSONL line has a string field data.text_field={data.text_field!r} "
                f"(first at {stats.first_missing_field}, keys seen: {stats.field_keys_seen}); "
                "set data.text_field to the field holding the text"
            )
        raise DataError(
            f"data.source={data.source!r} holds no documents (empty or whitespace only); "
            "point it at text"
        )
