"""Checkpoint integrity: a checksum manifest per committed checkpoint, and its verification.

Orbax commits a checkpoint by renaming its temporary directory, so a step directory that
exists was fully written once. What can still go wrong afterwards (a truncated copy, flipped
bytes, a deleted file) is caught by the manifest that `Checkpointer` writes into every step
directory right after Orbax commits it:

    checkpoints/<step>/plm_jax_manifest.json
        {"format": 1, "step": 400, "metrics": {...}, "files": {"state/...": [size, crc32], ...}}

Every file of the checkpoint (the arrays' OCDBT data files, Orbax's metadata, the data
iterator and config items) is listed with its size and CRC-32, so a changed byte anywhere in
the saved arrays is detected. A checkpoint's state is one of:

    ok           the manifest lists exactly the files on disk, with matching sizes and CRCs
    corrupt      a listed file is missing, shorter/longer, or its CRC differs; or the
                 manifest itself is unreadable
    unverified   committed by Orbax but without a manifest (the process died between Orbax's
                 commit and the manifest, or an older plm_jax wrote it): usable if it restores
    uncommitted  an Orbax temporary directory: an interrupted save, never restored
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from pathlib import Path
from typing import Any, Literal

MANIFEST = "plm_jax_manifest.json"
FORMAT = 1
TMP_MARKER = ".orbax-checkpoint-tmp"  # Orbax's suffix for a step directory being written
CHUNK = 16 * 2**20

State = Literal["ok", "corrupt", "unverified", "uncommitted"]


@dataclasses.dataclass(frozen=True)
class Status:
    """The state of one checkpoint directory, with a human-readable reason."""

    step: int
    path: Path
    state: State
    detail: str


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_table(step_dir: Path) -> dict[str, list[int]]:
    """{relative path: [size, crc32]} of every file of a checkpoint, manifest excluded."""
    table = {}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and not path.name.startswith(MANIFEST):
            table[path.relative_to(step_dir).as_posix()] = [path.stat().st_size, crc32(path)]
    return table


def write_manifest(step_dir: Path, step: int, metrics: dict[str, float] | None) -> None:
    """Writes the manifest atomically (temporary file, fsync, rename, fsync of the dir)."""
    record = {"format": FORMAT, "step": step, "metrics": metrics or {}}
    record["files"] = file_table(step_dir)
    tmp = step_dir / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / MANIFEST)
    fd = os.open(step_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_manifest(step_dir: Path) -> dict[str, Any] | None:
    """The manifest, None when there is none, or {} when it is unreadable."""
    path = step_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        return {}
    return record


def check(step_dir: Path, step: int) -> Status:
    """Verifies one committed step directory against its manifest."""
    if not step_dir.is_dir():
        return Status(step, step_dir, "corrupt", "the directory is missing")
    manifest = read_manifest(step_dir)
    if manifest is None:
        return Status(step, step_dir, "unverified", f"no {MANIFEST}")
    if not manifest:
        return Status(step, step_dir, "corrupt", f"{MANIFEST} is unreadable")
    expected = manifest["files"]
    for name, (size, crc) in expected.items():
        path = step_dir / name
        if not path.is_file():
            return Status(step, step_dir, "corrupt", f"{name} is missing")
        if path.stat().st_size != size:
            return Status(
                step, step_dir, "corrupt", f"{name} has {path.stat().st_size} bytes, not {size}"
            )
        if crc32(path) != crc:
            return Status(step, step_dir, "corrupt", f"{name}: checksum differs")
    total = sum(size for size, _ in expected.values())
    return Status(step, step_dir, "ok", f"{len(expected)} files, {total / 2**20:.1f} MiB verified")


def step_of(path: Path) -> int | None:
    """The step of a step directory name ('400' or '400.orbax-checkpoint-tmp-...')."""
    head = path.name.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def scan(directory: Path) -> list[Status]:
    """The state of every checkpoint directory under `directory`, oldest first."""
    found = []
    for path in directory.iterdir() if directory.is_dir() else ():
        step = step_of(path)
        if step is None or not path.is_dir():
            continue
        if TMP_MARKER in path.name:
            found.append(Status(step, path, "uncommitted", "an interrupted save"))
        else:
            found.append(check(path, step))
    return sorted(found, key=lambda s: (s.step, s.state != "uncommitted"))
