"""One writer per run directory: an exclusive OS lock on `RUN_DIR/.lock`.

    hold_run_dir   the context manager `pretrain` and `finetune` wrap a whole run in; a second
                   writer is refused at once with `RunDirLocked` (one line, exit code 2)
    lock_holder    who holds a run directory now (host, PID, since when), or None

The lock is `flock(2)` on an open file, so the kernel drops it when the holding process dies,
SIGKILL included: the file itself stays behind and never blocks a restart. In a multi-process
run only process 0 takes it, on behalf of all; it tells the others the outcome through the
cluster's key-value store, so that a refused run stops on every process, not only on process 0.

Read-only commands (eval, score, generate, embed, predict, checkpoint verify, plan) never take
the lock. What this module leaves out: who writes what inside a run (the loop) and file systems
without working locks, where the run goes on unprotected after a warning (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import itertools
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from plm_jax.errors import UserError

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_KV_KEY = "plm_jax/run_lock/{}"
_kv_ids = itertools.count()  # one key per hold: a process may train several runs in turn
# flock(2) on file systems that cannot lock: NFS without lockd, some FUSE mounts (gcsfuse, s3fs)
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunDirLocked(UserError):
    """Another process is training into the same run directory."""


def lock_holder(run_dir: Path) -> dict | None:
    """The holder's record (`host`, `pid`, `since`, `command`) if the run directory is locked now.

    Returns None when nobody holds the lock (a stale file from a dead process included).
    """
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_record(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_record(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        record = json.loads(raw)
    except ValueError:  # the holder is between truncating and writing its record
        record = None
    return record if isinstance(record, dict) else {}


def _describe(run_dir: Path, record: dict) -> str:
    who = f"PID {record.get('pid', '?')} on host {record.get('host', '?')}"
    since = record.get("since", "an unknown time")
    return (
        f"run directory {run_dir} is in use: {who} has been training into it since {since}; "
        "wait for that run to finish (or stop it), or set run.dir to another directory"
    )


def _try_lock(run_dir: Path) -> tuple[int | None, str]:
    """Takes the lock. Returns (fd, "") when held, (None, message) when refused, and
    (None, "") when the file system cannot lock (the run goes on unprotected)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        message = _describe(run_dir, _read_record(fd))
        os.close(fd)
        return None, message
    except OSError as e:
        os.close(fd)
        if e.errno not in _UNSUPPORTED:
            raise
        log.warning(
            "cannot lock %s (%s): this file system has no working flock(2), so nothing stops "
            "a second process from training into the same run directory",
            run_dir / LOCK_FILE,
            os.strerror(e.errno),
        )
        return None, ""
    record = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd, ""


def _release(fd: int) -> None:
    os.ftruncate(fd, 0)  # a reader never sees a dead holder's record
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _share_outcome(message: str, timeout: int) -> str:
    """Process 0's outcome (an error message, or "") as every process of the cluster sees it."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
        return message
    from jax._src import distributed as jax_distributed  # the client JAX's own barriers use

    client = jax_distributed.global_state.client
    key = _KV_KEY.format(next(_kv_ids))
    if jax.process_index() == 0:
        client.key_value_set(key, message or "ok")
        return message
    shared = client.blocking_key_value_get(key, timeout * 1000)
    return "" if shared == "ok" else shared


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, *, timeout: int = 600) -> Iterator[None]:
    """Holds the run directory's lock for the block (process 0 on behalf of the cluster).

    Args:
      run_dir: the run directory; created if missing.
      timeout: seconds the other processes of a multi-process run wait for process 0's outcome.

    Raises:
      RunDirLocked: another process holds the lock; on every process of the run.
    """
    run_dir = Path(run_dir)
    jax = sys.modules.get("jax")
    is_primary = jax is None or not jax.distributed.is_initialized() or jax.process_index() == 0
    fd, message = _try_lock(run_dir) if is_primary else (None, "")
    message = _share_outcome(message, timeout)
    if message:
        raise RunDirLocked(message)
    try:
        yield
    finally:
        if fd is not None:
            _release(fd)
