"""Batches: seeded determinism, exact resume from state, per-process slices, mesh layout."""

import numpy as np
import pytest

from plm_jax.data.loader import BatchLoader, eval_loader
from plm_jax.data.packing import PackedWindows
from plm_jax.errors import ConfigError
from tests.test_packing import make_store

SEQ = 8


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [[2, *rng.integers(5, 1000, rng.integers(1, 40)), 3] for _ in range(120)]
    return PackedWindows(make_store(tmp_path_factory.mktemp("l") / "s", docs), SEQ, 0)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_same_seed_same_batches_and_shapes(windows):
    a = take(BatchLoader(windows, global_batch=4, seed=7), 30)  # > 1 epoch
    b = take(BatchLoader(windows, global_batch=4, seed=7), 30)
    assert_same(a, b)
    assert a[0]["inputs"].shape == (4, SEQ) and a[0]["inputs"].dtype == np.int32
    c = take(BatchLoader(windows, global_batch=4, seed=8), 30)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, c, strict=True))


def test_one_epoch_visits_every_window_once(windows):
    loader = BatchLoader(windows, global_batch=1, seed=3)
    rows = [next(loader)["inputs"][0] for _ in range(len(windows))]
    expected = sorted(windows[i]["inputs"].tobytes() for i in range(len(windows)))
    assert sorted(r.tobytes() for r in rows) == expected
    # the second epoch is shuffled differently
    second = [next(loader)["inputs"][0].tobytes() for _ in range(len(windows))]
    assert second != [r.tobytes() for r in rows] and sorted(second) == expected


@pytest.mark.parametrize("k", [0, 1, 5, 17])
def test_restore_after_k_batches_continues_exactly(windows, k):
    reference = take(BatchLoader(windows, global_batch=4, seed=1), k + 8)
    first = BatchLoader(windows, global_batch=4, seed=1)
    take(first, k)
    state = first.get_state()
    assert set(state) == {"next_index"} and state["next_index"] == k  # small, JSON-friendly
    resumed = BatchLoader(windows, global_batch=4, seed=1)
    resumed.set_state(state)
    assert_same(take(resumed, 8), reference[k:])


def test_process_slices_are_disjoint_and_reassemble_the_global_batch(windows):
    whole = take(BatchLoader(windows, global_batch=8, seed=5), 6)
    parts = [
        take(BatchLoader(windows, global_batch=8, seed=5, process_index=p, process_count=4), 6)
        for p in range(4)
    ]
    for step in range(6):
        for key in whole[step]:
            joined = np.concatenate([parts[p][step][key] for p in range(4)])
            np.testing.assert_array_equal(joined, whole[step][key])
    assert parts[0][0]["inputs"].shape == (2, SEQ)


def test_batch_not_divisible_by_processes(windows):
    with pytest.raises(ConfigError, match="batch_size=6 is not divisible by the 4 processes"):
        BatchLoader(windows, global_batch=6, seed=0, process_count=4)


def test_eval_loader_reads_each_window_once_in_order(tmp_path):
    store = make_store(tmp_path / "s", [[2, *range(10, 60), 3]])
    win = PackedWindows(store, SEQ, 0, pad_to_multiple=4)  # 51 targets -> 7 windows -> 8
    assert win.num_real == 7 and len(win) == 8
    batches = list(eval_loader(win, global_batch=4))
    assert len(batches) == 2
    got = np.concatenate([b["inputs"] for b in batches])
    np.testing.assert_array_equal(got, np.stack([win[i]["inputs"] for i in range(8)]))
    assert sum(b["weights"].sum() for b in batches) == 51


def test_batches_on_the_8_device_mesh_carry_the_batch_sharding(windows):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from plm_jax.config import MeshConfig
    from plm_jax.sharding import make_mesh, shard_batch

    assert jax.device_count() == 8
    for mesh_cfg in [MeshConfig(), MeshConfig(data=2, fsdp=2, tensor=2)]:
        mesh = make_mesh(mesh_cfg)
        local = next(BatchLoader(windows, global_batch=8, seed=0))
        batch = shard_batch(local, mesh, global_rows=8)
        for key, arr in batch.items():
            assert arr.sharding == NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
            np.testing.assert_array_equal(np.asarray(arr), local[key])
        rows_per_shard = 8 // (mesh.shape["data"] * mesh.shape["fsdp"])
        assert {s.data.shape for s in batch["inputs"].addressable_shards} == {(rows_per_shard, SEQ)}
