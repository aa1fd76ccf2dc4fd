"""Fault injection: SIGKILL and SIGTERM/SIGINT at precise points of a pretraining run.

Every case runs `plm-jax pretrain` in a subprocess with one fault (tests/fault_driver.py),
checks what the fault left on disk, reruns the same command, and requires the final
parameters to equal those of the uninterrupted run, bit for bit, and its final evaluation
loss to equal the uninterrupted one. Run with `pytest -m faults` (CI's second step).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from plm_jax import integrity
from plm_jax.checkpoint import TRASH
from plm_jax.run_lock import LOCK_FILE, lock_holder
from plm_jax.train.preemption import PREEMPTED_EXIT_CODE

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_corpus, small_tokenizer):
    base = tmp_path_factory.mktemp("faults")
    overrides = [
        f"data.source={small_corpus}",
        f"data.cache_dir={base / 'cache'}",
        f"tokenizer.path={small_tokenizer.path}",
        "model.max_seq_len=32",
        "model.num_layers=1",
        "model.embed_dim=32",
        "train.batch_size=8",
        "train.steps=6",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=2",
        "train.eval_batches=2",
        "checkpoint.save_every=2",
        "checkpoint.keep=1",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "JAX_COMPILATION_CACHE_DIR": str(base / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    }
    reference = run_driver(base / "reference", "none", overrides, env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    return base, overrides, env


def driver_command(run_dir: Path, fault: str, overrides: list[str]) -> list[str]:
    out = run_dir / f"params-{fault.replace(':', '-')}.npz"
    return [
        sys.executable,
        "-m",
        "tests.fault_driver",
        fault,
        str(out),
        *overrides,
        f"run.dir={run_dir}",
    ]


def run_driver(run_dir: Path, fault: str, overrides: list[str], env: dict):
    return subprocess.run(
        driver_command(run_dir, fault, overrides),
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )


def final_eval_loss(run_dir: Path) -> float:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["eval/loss"] for r in records if "eval/loss" in r and r["step"] == 6][-1]


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def states(run_dir: Path) -> dict[int, str]:
    return {s.step: s.state for s in integrity.scan(run_dir / "checkpoints")}


def assert_resumes_to_the_reference(setup, run_dir: Path) -> subprocess.CompletedProcess:
    base, overrides, env = setup
    rerun = run_driver(run_dir, "none", overrides, env)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    reference = np.load(base / "reference" / "params-none.npz")
    resumed = np.load(run_dir / "params-none.npz")
    assert sorted(reference.files) == sorted(resumed.files)
    for name in reference.files:
        np.testing.assert_array_equal(resumed[name], reference[name], err_msg=name)
    assert final_eval_loss(run_dir) == final_eval_loss(base / "reference")
    assert states(run_dir) == {6: "ok"}  # keep=1: the newest, verified
    return rerun


KILLS = {
    # fault: the checkpoint states that must be on disk afterwards. Asynchronous saves
    # commit in the background, so a checkpoint saved just before the kill may be
    # uncommitted or committed without its manifest yet ("unverified"); only what is
    # certain at each point is listed.
    "kill_step:5": {2: "ok"},  # 4 is in flight
    "kill_async_save:4": {2: "ok"},  # and 4 is not "ok": its manifest was never written
    "kill_commit:4": {2: "ok", 4: "unverified"},  # Orbax committed 4, no manifest yet
    "kill_retention:2": {4: "ok"},  # 2 was half deleted, out of Orbax's view in .trash
    "kill_eval:6": {},  # mid step-4 evaluation: step 4 was never saved
}


@pytest.mark.parametrize("fault", list(KILLS))
def test_sigkill_loses_nothing(setup, tmp_path, fault):
    base, overrides, env = setup
    run_dir = tmp_path / "run"
    killed = run_driver(run_dir, fault, overrides, env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    found = states(run_dir)
    assert set(found.values()) <= {"ok", "unverified", "uncommitted"}  # nothing corrupt
    assert KILLS[fault].items() <= found.items()
    assert found.get(4) != "ok" or fault != "kill_async_save:4"
    assert 4 not in found or fault != "kill_eval:6"
    if fault == "kill_retention:2":
        assert 2 not in found and any((run_dir / "checkpoints" / TRASH).iterdir())
    restorable = [step for step, state in found.items() if state != "uncommitted"]
    # The killed writer's lock file stays behind, but the kernel dropped its lock.
    assert (run_dir / LOCK_FILE).is_file() and lock_holder(run_dir) is None
    rerun = assert_resumes_to_the_reference(setup, run_dir)
    if restorable:
        newest = max(restorable)
        assert f"checkpoints/{newest} at step {newest}" in rerun.stderr


SIGNALS = {
    # fault: (exit code, the newest checkpoint afterwards, its state)
    "term_step:3": (PREEMPTED_EXIT_CODE, 3, "ok"),
    "int_step:3": (PREEMPTED_EXIT_CODE, 3, "ok"),
    "term_compile:1": (PREEMPTED_EXIT_CODE, 1, "ok"),
    "term_eval:5": (PREEMPTED_EXIT_CODE, 4, "ok"),  # the step-4 evaluation is cut short
    "term_save:2": (PREEMPTED_EXIT_CODE, 3, "ok"),  # the in-flight save of 2 commits first
    # The second signal exits at once: 2 was committed when the save of 4 started; 4 may
    # be in flight, committed without its manifest, or ok.
    "term_twice:5": (128 + signal.SIGTERM, None, None),
}


@pytest.mark.parametrize("fault", list(SIGNALS))
def test_signals_stop_with_a_committed_checkpoint(setup, tmp_path, fault):
    base, overrides, env = setup
    run_dir = tmp_path / "run"
    stopped = run_driver(run_dir, fault, overrides, env)
    code, newest, state = SIGNALS[fault]
    assert stopped.returncode == code, stopped.stderr[-3000:]
    found = states(run_dir)
    assert set(found.values()) <= {"ok", "unverified", "uncommitted"}
    committed = {k: v for k, v in found.items() if v != "uncommitted"}
    if newest is None:
        assert committed.get(2) == "ok" or committed.get(4) in ("ok", "unverified")
    else:
        assert max(committed) == newest and committed[newest] == state
    if code == PREEMPTED_EXIT_CODE:
        name = "SIGINT" if fault.startswith("int") else "SIGTERM"
        assert f"stopped by {name} at step {newest} with a committed checkpoint" in stopped.stderr
    assert_resumes_to_the_reference(setup, run_dir)


def test_one_writer_per_run_directory_while_readers_keep_working(setup, tmp_path):
    """A second `pretrain` into a training run's directory exits 2 at once, naming the holder;
    `eval` reads the run meanwhile; the first run ends exactly as a lone run ends."""
    base, overrides, env = setup
    run_dir = tmp_path / "run"
    command = driver_command(run_dir, "pause_step:3", overrides)
    out = Path(command[4])
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not Path(f"{out}.paused").exists():
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first run never reached step 3"
            time.sleep(0.1)
        assert lock_holder(run_dir)["pid"] == first.pid
        second = run_driver(run_dir, "none", overrides, env)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("plm-jax: error")]
        assert len(errors) == 1 and f"is in use: PID {first.pid} on host" in errors[0], errors
        reader = subprocess.run(
            [sys.executable, "-m", "plm_jax.cli", "eval", str(run_dir)],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
            cwd=ROOT,
        )
        assert reader.returncode == 0 and "step 2: loss" in reader.stdout, reader.stderr[-3000:]
    finally:
        Path(f"{out}.go").touch()
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-3000:]
    reference = np.load(base / "reference" / "params-none.npz")
    alone = np.load(out)
    for name in reference.files:
        np.testing.assert_array_equal(alone[name], reference[name], err_msg=name)
    assert logged_steps(run_dir) == logged_steps(base / "reference")  # no second writer's rows
    assert final_eval_loss(run_dir) == final_eval_loss(base / "reference")
    assert lock_holder(run_dir) is None
