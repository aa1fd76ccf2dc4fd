"""Two local processes (gloo CPU collectives) read disjoint slices that form the global batch."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from plm_jax.data.loader import BatchLoader
from plm_jax.data.packing import PackedWindows
from plm_jax.data.prepare import TokenStore
from tests.test_packing import make_store

WORKER = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, store_dir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    from jax.experimental import multihost_utils
    from plm_jax.config import MeshConfig
    from plm_jax.data.loader import BatchLoader
    from plm_jax.data.packing import PackedWindows
    from plm_jax.data.prepare import TokenStore
    from plm_jax.sharding import make_mesh, shard_batch

    assert jax.process_count() == 2 and jax.device_count() == 8
    windows = PackedWindows(TokenStore(__import__("pathlib").Path(store_dir)), 8, 0)
    loader = BatchLoader(windows, global_batch=8, seed=11, process_index=jax.process_index(),
                         process_count=jax.process_count())
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    saved = {}
    for step in range(3):
        local = next(loader)
        batch = shard_batch(local, mesh, global_rows=8)
        for key, arr in batch.items():
            saved[f"local_{step}_{key}"] = local[key]
            saved[f"global_{step}_{key}"] = multihost_utils.process_allgather(arr, tiled=True)
    np.savez(out, **saved)
    jax.distributed.shutdown()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_read_disjoint_slices_of_the_single_process_batch(tmp_path):
    rng = np.random.default_rng(1)
    docs = [[2, *rng.integers(5, 1000, rng.integers(1, 30)), 3] for _ in range(80)]
    make_store(tmp_path / "store", docs)
    reference = BatchLoader(
        PackedWindows(TokenStore(tmp_path / "store"), 8, 0), global_batch=8, seed=11
    )
    expected = [next(reference) for _ in range(3)]

    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WORKER,
                str(port),
                str(pid),
                str(tmp_path / "store"),
                str(tmp_path / f"out{pid}.npz"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a worker process hung")
        assert proc.returncode == 0, output[-3000:]

    outs = [np.load(tmp_path / f"out{pid}.npz") for pid in range(2)]
    for step in range(3):
        for key, want in expected[step].items():
            a, b = (o[f"local_{step}_{key}"] for o in outs)
            assert a.shape == b.shape == (4, 8)
            np.testing.assert_array_equal(np.concatenate([a, b]), want)
            for o in outs:  # the assembled global array is the single-process batch
                np.testing.assert_array_equal(o[f"global_{step}_{key}"], want)
        # disjoint: the two processes hold different windows
        a, b = (o[f"local_{step}_inputs"] for o in outs)
        assert not {r.tobytes() for r in a} & {r.tobytes() for r in b}


EVAL_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=60)
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec
    from plm_jax.config import MeshConfig
    from plm_jax.sharding import make_mesh
    from tests.test_multihost import eval_model_and_examples
    from plm_jax.tasks.finetune import predict_outputs

    graphdef, params, examples = eval_model_and_examples()
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    replicated = NamedSharding(mesh, PartitionSpec())
    params = jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, replicated, lambda i: np.asarray(x)[i]),
        params,
    )
    outputs = predict_outputs(graphdef, params, examples, mesh=mesh, batch_size=8, pad_id=0,
                              max_len=32)
    np.save(out, np.stack(outputs))
    jax.distributed.shutdown()
    """
)


def eval_model_and_examples():
    """A tiny classification model and 23 examples of mixed lengths (not a multiple of 8)."""
    from flax import nnx

    from plm_jax.config import ModelConfig
    from plm_jax.tasks.model import TaskModel

    cfg = ModelConfig(vocab_size=64, num_layers=1, embed_dim=16, num_heads=2, max_seq_len=32)
    model = TaskModel(cfg, "classification", 3, "mean", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(3)
    examples = [
        {"ids": rng.integers(1, 64, rng.integers(2, 30)).tolist(), "label": int(i % 3)}
        for i in range(23)
    ]
    return graphdef, jax.device_get(params), examples


@pytest.mark.e2e
def test_two_process_evaluation_counts_every_example_once(tmp_path):
    from plm_jax.config import MeshConfig
    from plm_jax.sharding import make_mesh
    from plm_jax.tasks.finetune import predict_outputs

    graphdef, params, examples = eval_model_and_examples()
    single = predict_outputs(
        graphdef,
        params,
        examples,
        mesh=make_mesh(MeshConfig()),
        batch_size=8,
        pad_id=0,
        max_len=32,
    )
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", EVAL_WORKER, str(port), str(pid), str(tmp_path / f"e{pid}.npy")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for pid in range(2)
    ]
    for proc in procs:
        try:
            output, _ = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail("a worker process hung")
        assert proc.returncode == 0, output[-3000:]
    for pid in range(2):
        got = np.load(tmp_path / f"e{pid}.npy")
        assert got.shape == (23, 3)  # every example once, in order, on both processes
        np.testing.assert_allclose(got, np.stack(single), atol=1e-5)
