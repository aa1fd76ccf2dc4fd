"""`plm_jax.host_malloc.tune`: a jitted CPU program stops page-faulting its temporary buffer on
every call, and the processes and settings it must leave alone are left alone."""

import json
import os
import subprocess
import sys

import pytest

from plm_jax import host_malloc

# The quick start's train step at 2 layers: XLA allocates its 148 MB temporary buffer on every
# step (from its worker threads' arenas, hence with mmap) and frees it after.
STEP = ["--preset", "tiny", "--layers", "2", "--embed-dim", "128", "--heads", "4"]
STEP += ["--vocab", "4096", "--seq-len", "128", "--batch", "16", "--steps", "8", "--warmup", "3"]
STEP += ["--peak-matmul-size", "256"]


def _step_record(malloc: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    env.update(JAX_PLATFORMS="cpu", PLM_JAX_MALLOC=malloc)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", *STEP],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="glibc only",
)
@pytest.mark.e2e
def test_a_tuned_train_step_stops_faulting_its_buffer_in():
    default, tuned = _step_record("default"), _step_record("tuned")
    assert default["host_malloc"] is None
    assert tuned["host_malloc"] == {"M_ARENA_MAX": 1, "M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": -1}
    temp_pages = default["compiled_memory_bytes"]["temp"] / 4096
    # untuned, the temporary buffer is mapped afresh every step (37k faults of 36k pages here);
    # tuned, most steps reuse it from the heap with no fault, and about one step in six maps
    # it again where the small allocations between steps fragmented the heap (0 to 12.5k
    # faults per step on average over 6 steps in 5 runs)
    assert default["minor_page_faults_per_step"] > 0.5 * temp_pages, default
    assert tuned["minor_page_faults_per_step"] < 0.5 * default["minor_page_faults_per_step"]


@pytest.mark.parametrize(
    "env",
    [
        {"PLM_JAX_MALLOC": "default"},
        {"MALLOC_ARENA_MAX": "4"},
        {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
        {"JAX_PLATFORMS": "cuda,cpu"},
    ],
)
def test_left_alone_where_the_user_or_an_accelerator_decides(env, monkeypatch):
    monkeypatch.setattr(host_malloc, "_applied", None)
    for name in ("PLM_JAX_MALLOC", "MALLOC_ARENA_MAX", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert host_malloc.tune() is None


def test_cpu_process_reads_jax_platforms_then_the_installed_plugins(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.cpu_process()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert not host_malloc.cpu_process()
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(host_malloc, "_installed", lambda name: name == "jax_cuda13_plugin")
    assert not host_malloc.cpu_process()
    monkeypatch.setattr(host_malloc, "_installed", lambda name: False)
    assert host_malloc.cpu_process()
