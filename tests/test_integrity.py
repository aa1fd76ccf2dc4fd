"""Checkpoint integrity: manifests, fallback past corrupt checkpoints, retention, verify CLI."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from plm_jax import integrity
from plm_jax.checkpoint import CORRUPT, TRASH, Checkpointer
from plm_jax.cli import main
from plm_jax.config import CheckpointConfig
from plm_jax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def state(step: int) -> dict:
    rng = np.random.default_rng(step)  # random values: OCDBT cannot compress them away
    return {
        "params": {"w": jnp.asarray(rng.normal(size=(64, 32)).astype(np.float32))},
        "step": jnp.int32(step),
    }


def saved_run(tmp_path, steps=(1, 2, 3), **cfg) -> Checkpointer:
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=5, **cfg))
    for step in steps:
        ck.save(step, state(step), {"next_index": step}, {"run": {"name": "x"}})
    ck.wait()
    return ck


def largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def test_every_committed_checkpoint_has_a_manifest_that_verifies(tmp_path):
    ck = saved_run(tmp_path)
    for step in (1, 2, 3):
        manifest = json.loads(
            (tmp_path / "checkpoints" / str(step) / integrity.MANIFEST).read_text()
        )
        assert manifest["step"] == step
        assert any(name.startswith("state/") for name in manifest["files"])
        assert {"data", "config"} <= {name.split("/")[0] for name in manifest["files"]}
        assert ck.check(step).state == "ok"
    ck.close()


def corrupt_by(kind: str, step_dir: Path) -> None:
    if kind == "truncated":
        path = largest_data_file(step_dir)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "flipped":
        path = largest_data_file(step_dir)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit
        path.write_bytes(bytes(data))
    elif kind == "metadata_deleted":
        for path in step_dir.rglob("*metadata*"):
            if path.is_file():
                path.unlink()
    elif kind == "manifest_garbled":
        (step_dir / integrity.MANIFEST).write_text("{not json")


@pytest.mark.parametrize("kind", ["truncated", "flipped", "metadata_deleted", "manifest_garbled"])
def test_restore_latest_falls_back_past_a_corrupt_newest_checkpoint(tmp_path, kind, caplog):
    saved_run(tmp_path).close()
    corrupt_by(kind, tmp_path / "checkpoints" / "3")
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=5))
    assert ck.check(3).state == "corrupt"
    step, restored, data, _ = ck.restore_latest(state(0))
    assert step == 2 and data == {"next_index": 2}
    np.testing.assert_array_equal(restored["params"]["w"], state(2)["params"]["w"])
    assert "skipping checkpoint 3" in caplog.text
    # The corrupt checkpoint is kept, out of the way: step 3 can be saved again.
    assert ck.all_steps() == [1, 2] and len(list((ck.directory / CORRUPT).iterdir())) == 1
    ck.save(3, state(3), {"next_index": 3}, {})
    ck.wait()
    assert ck.check(3).state == "ok"
    ck.close()


def test_a_corrupt_checkpoint_is_refused_where_there_is_no_fallback(tmp_path):
    saved_run(tmp_path).close()
    corrupt_by("flipped", tmp_path / "checkpoints" / "3")
    ck = Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
    with pytest.raises(DataError, match=r"checkpoints/3 is corrupt \(state/.*checksum differs"):
        ck.restore(3, state(0))
    ck.close()


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    saved_run(tmp_path, steps=(1, 2)).close()
    for step in (1, 2):
        corrupt_by("truncated", tmp_path / "checkpoints" / str(step))
    ck = Checkpointer(tmp_path, CheckpointConfig())
    with pytest.raises(DataError, match=r"every checkpoint in .* is corrupt \(moved to"):
        ck.restore_latest(state(0))
    assert len(list((ck.directory / CORRUPT).iterdir())) == 2  # nothing deleted
    ck.close()


def test_a_checkpoint_without_manifest_is_usable_when_it_restores(tmp_path):
    """The process died between Orbax's commit and the manifest: the data is complete."""
    saved_run(tmp_path).close()
    (tmp_path / "checkpoints" / "3" / integrity.MANIFEST).unlink()
    ck = Checkpointer(tmp_path, CheckpointConfig())
    assert ck.check(3).state == "unverified"
    step, restored, _, _ = ck.restore_latest(state(0))
    assert step == 3
    np.testing.assert_array_equal(restored["params"]["w"], state(3)["params"]["w"])
    ck.close()


def test_retention_deletes_old_checkpoints_only_after_the_new_one_commits(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=2, use_async=True))
    ck.save(1, state(1), {}, {})
    ck.save(2, state(2), {}, {})
    ck.save(3, state(3), {}, {})  # 3 is in flight: 1 must still exist
    assert (tmp_path / "checkpoints" / "1").is_dir()
    ck.wait()
    assert ck.all_steps() == [2, 3]
    ck.close()


def test_an_interrupted_deletion_is_finished_at_the_next_start(tmp_path):
    saved_run(tmp_path).close()
    trash = tmp_path / "checkpoints" / TRASH / "1-dead"
    trash.parent.mkdir()
    (tmp_path / "checkpoints" / "1").rename(trash)
    ck = Checkpointer(tmp_path, CheckpointConfig())
    assert not (tmp_path / "checkpoints" / TRASH).exists() and ck.all_steps() == [2, 3]
    ck.close()


def test_checkpoint_verify_reports_each_state(tmp_path, capsys):
    saved_run(tmp_path, steps=(1, 2, 3, 4)).close()
    checkpoints = tmp_path / "checkpoints"
    assert main(["checkpoint", "verify", str(tmp_path)]) == 0
    assert capsys.readouterr().out.count(" ok ") == 4
    corrupt_by("flipped", checkpoints / "3")
    (checkpoints / "2" / integrity.MANIFEST).unlink()
    (checkpoints / "5.orbax-checkpoint-tmp-123").mkdir()
    assert main(["checkpoint", "verify", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    lines = {int(line.split()[1]): line for line in out.splitlines() if line.startswith("step")}
    assert "ok" in lines[1] and "unverified" in lines[2] and "ok" in lines[4]
    assert "corrupt" in lines[3] and "checksum differs" in lines[3]
    assert "uncommitted" in lines[5]
    assert err.count("\n") == 1 and "checkpoints [3] are corrupt" in err
    assert main(["checkpoint", "verify", str(tmp_path / "nowhere")]) == 2


FULL_DISK = textwrap.dedent(
    """
    import resource, sys
    from plm_jax.checkpoint import Checkpointer, CheckpointError
    from plm_jax.config import CheckpointConfig
    from tests.test_integrity import state
    ck = Checkpointer(sys.argv[1], CheckpointConfig(keep=1, use_async=sys.argv[2] == "1"))
    ck.save(1, state(1), {}, {})
    ck.wait()
    # Files may not grow past 4 kB from here on: the array file of step 2 cannot be written.
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:
        ck.save(2, state(2), {}, {})
        ck.wait()
    except CheckpointError as e:
        print("ERROR", e)
    """
)


@pytest.mark.faults  # a subprocess each: CI's second step
@pytest.mark.parametrize("use_async", [True, False])
def test_a_full_disk_reaches_the_user_and_keeps_the_previous_checkpoint(tmp_path, use_async):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path), str(int(use_async))],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert "ERROR could not write checkpoint 2" in proc.stdout, proc.stderr[-2000:]
    assert "checkpoint 1 is intact" in proc.stdout and "File too large" in proc.stdout
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=1))  # the rerun: 1 is still there
    assert ck.check(1).state == "ok"
    step, restored, _, _ = ck.restore_latest(state(0))
    assert step == 1
    np.testing.assert_array_equal(restored["params"]["w"], state(1)["params"]["w"])
    assert not any(".orbax-checkpoint-tmp" in p.name for p in ck.directory.iterdir())
    ck.close()
