"""One writer per run directory (plm_jax/run_lock.py).

The in-process tests pin the lock's semantics; the multi-process case runs two processes
through `plm-jax launch`; whole training runs (two writers, a SIGKILLed holder, a reader during
training) are in tests/test_faults.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from plm_jax import run_lock
from plm_jax.cli import main
from plm_jax.launch import launch
from plm_jax.run_lock import LOCK_FILE, RunDirLocked, hold_run_dir, lock_holder

REPO = Path(__file__).resolve().parents[1]

# Holds the lock from another process until its stdin closes (flock is per open file, and a
# second process is what a real second writer is).
HOLDER = textwrap.dedent(
    """
    import sys
    from plm_jax.run_lock import hold_run_dir
    with hold_run_dir(sys.argv[1]):
        print("held", flush=True)
        sys.stdin.read()
    """
)


def start_holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_second_writer_is_refused_with_who_holds_it_and_the_fix(tmp_path):
    holder = start_holder(tmp_path / "run")
    try:
        record = lock_holder(tmp_path / "run")
        assert record["pid"] == holder.pid and record["host"] and record["since"]
        with pytest.raises(RunDirLocked) as refused, hold_run_dir(tmp_path / "run"):
            pytest.fail("the block ran while another process held the lock")
        message = str(refused.value)
        assert f"run directory {tmp_path / 'run'} is in use: PID {holder.pid} on host" in message
        assert record["since"] in message and "set run.dir to another directory" in message
    finally:
        holder.communicate("")
    assert holder.returncode == 0
    assert lock_holder(tmp_path / "run") is None  # released: the next writer gets it
    with hold_run_dir(tmp_path / "run"):
        assert lock_holder(tmp_path / "run")["pid"] == os.getpid()


def test_a_stale_lock_file_of_a_killed_holder_never_blocks(tmp_path):
    holder = start_holder(tmp_path)
    holder.kill()
    holder.wait()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid  # left behind
    assert lock_holder(tmp_path) is None
    with hold_run_dir(tmp_path):
        assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert (tmp_path / LOCK_FILE).read_text() == ""  # released: no holder's record remains


def test_the_cli_turns_a_held_run_directory_into_one_line_and_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        code = main(["pretrain", f"run.dir={run_dir}", "data.source=/nonexistent/corpus.txt"])
    finally:
        holder.communicate("")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and f"is in use: PID {holder.pid}" in err[0], err
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing else written


def test_a_file_system_without_locks_warns_and_runs_unprotected(tmp_path, monkeypatch, caplog):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with hold_run_dir(tmp_path):
        pass
    assert "no working flock(2)" in caplog.text


def test_other_lock_failures_are_not_mistaken_for_a_missing_lock(tmp_path, monkeypatch):
    def broken(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(run_lock.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"), hold_run_dir(tmp_path):
        pass


def test_lock_is_exclusive_at_the_os_level(tmp_path):
    """Any flock-respecting tool sees the run as busy (what `lock_holder` relies on)."""
    with hold_run_dir(tmp_path):
        fd = os.open(tmp_path / LOCK_FILE, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


# Two processes of one cluster: process 0 takes the lock for both, and a refusal reaches both.
CLUSTER = textwrap.dedent(
    """
    import sys
    import jax
    from plm_jax.config import DistributedConfig
    from plm_jax.distributed import initialize
    from plm_jax.run_lock import RunDirLocked, hold_run_dir, lock_holder
    assert initialize(DistributedConfig(initialization_timeout=60))
    free, busy = sys.argv[-2:]
    with hold_run_dir(free, timeout=60):
        print("held", lock_holder(free) is not None or jax.process_index() == 0, flush=True)
    try:
        with hold_run_dir(busy, timeout=60):
            print("ran")
    except RunDirLocked as e:
        print("refused", "is in use" in str(e))
    """
)


def test_process_zero_locks_for_the_cluster_and_a_refusal_stops_every_process(
    tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    holder = start_holder(tmp_path / "busy")
    try:
        paths = [str(tmp_path / "free"), str(tmp_path / "busy")]
        code = launch(
            ["pretrain", *paths], num_processes=2, program=[sys.executable, "-c", CLUSTER]
        )
    finally:
        holder.communicate("")
    out = capfd.readouterr().out
    assert code == 0, out
    lines = sorted(line for line in out.splitlines() if "Gloo" not in line)
    # Process 1 sees the lock held (by process 0) while it is inside the block.
    assert lines == ["[0] held True", "[0] refused True", "[1] held True", "[1] refused True"]
    assert lock_holder(tmp_path / "free") is None
