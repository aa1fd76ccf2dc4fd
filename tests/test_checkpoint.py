"""Checkpointer: retention, best-by-eval-loss, shape checks, unreadable checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest

from plm_jax.checkpoint import Checkpointer
from plm_jax.config import CheckpointConfig
from plm_jax.errors import DataError


def state(scale=1.0, width=4):
    return {"params": {"w": jnp.full((width, 3), scale)}, "step": jnp.int32(0)}


def test_keeps_the_newest_and_restores_what_was_saved(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=2))
    for step in (1, 2, 3):
        ck.save(step, state(step), {"next_index": step}, {"run": {"name": "x"}})
    ck.wait()
    assert ck.all_steps() == [2, 3] and ck.latest_step() == 3
    restored, data, config = ck.restore(3, state())
    np.testing.assert_array_equal(restored["params"]["w"], np.full((4, 3), 3.0))
    assert data == {"next_index": 3} and config == {"run": {"name": "x"}}
    ck.close()


def test_keep_best_keeps_the_lowest_eval_loss_too(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig(keep=1, keep_best=True, use_async=False))
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 2.5)]:
        metrics = None if loss is None else {"eval/loss": loss}
        ck.save(step, state(step), {}, {}, metrics=metrics)
    ck.wait()
    assert ck.all_steps() == [2, 5]
    ck.close()


def test_shape_mismatch_names_the_arrays(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig())
    ck.save(1, state(), {}, {})
    ck.wait()
    with pytest.raises(DataError, match=r"params\.w: checkpoint \(4, 3\) vs model \(8, 3\)"):
        ck.restore(1, state(width=8))
    ck.close()


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    ck = Checkpointer(tmp_path, CheckpointConfig())
    ck.save(1, state(), {}, {})
    ck.wait()
    (tmp_path / "checkpoints" / "1" / "config" / "metadata").unlink(missing_ok=True)
    for item in (tmp_path / "checkpoints" / "1").iterdir():
        if item.is_dir():
            for f in item.rglob("*"):
                if f.is_file():
                    f.write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"checkpoint .*1 is corrupt \(.* bytes, not"):
        ck.restore(1, state())  # the manifest catches it before Orbax reads anything
    with pytest.raises(DataError, match="checkpoint .*1 is incomplete or corrupt"):
        ck.restore(1, state(), verify=False)  # and Orbax's read errors are one clear line too
    ck.close()


def test_read_only_without_checkpoints(tmp_path):
    with pytest.raises(DataError, match="no checkpoints in"):
        Checkpointer(tmp_path, CheckpointConfig(), read_only=True)
