"""The GPU path: XLA GPU flags, cuDNN attention against XLA, a train step that compiles once.

On CPU (the default run): `plm_jax.xla_flags` is a no-op off GPU, composes XLA_FLAGS without
duplicating the user's flags, and its flags parse in this jaxlib; the throughput benchmark's
train step does not recompile after the first step and draws no donation warnings;
benchmarks/gpu.sh is syntactically valid and its CPU dry run writes a summary (slow).

On a GPU (`pytest -m gpu`; skipped without a CUDA device of compute capability >= 8.0):
`model.attention=cudnn` against `xla` in bfloat16, for the attention kernel and for a small
decoder's logits, gradients and KV-cache decoding, with causal, padded (segment 0) and packed
(several segments per row) masks. The GPU machine may lack pytest: `python -m
tests.test_gpu_path` runs the GPU tests without it.

How the GPU tests judge bf16 (FlashAttention's own test rule): a float32 XLA computation
(matmuls at "highest" precision, so no TF32) is the reference; the cuDNN result's error
against it must be at most twice the error of XLA's own bfloat16 computation, plus 1e-3 of the
reference's scale. Both bf16 paths round q, k, v and the probabilities to bf16 (relative
rounding 2^-9, about 0.2%), so a correct kernel, which differs from XLA only in summation order
and in where it rounds, lands within a small factor of XLA's error; a wrong mask (attending
across documents, to padding or to the future) is off by O(1). The 1e-3 slack is below half a
bf16 ulp at the largest value, so it only matters where XLA's own error happens to be ~0.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from plm_jax import xla_flags
from plm_jax.config import ModelConfig
from plm_jax.models import Decoder, attention_segments
from plm_jax.models.attention import KERNELS

try:
    import pytest
except ModuleNotFoundError:  # the GPU image may lack pytest; see _main at the bottom
    pytest = None

REPO = Path(__file__).resolve().parents[1]


class _Skipped(Exception):
    """A skip when running without pytest."""


def _skip(reason: str) -> None:
    if pytest is not None:
        pytest.skip(reason)
    raise _Skipped(reason)


def gpu(test):
    """pytest's `gpu` marker (deselected by default), or just a tag without pytest."""
    test.needs_gpu = True
    return pytest.mark.gpu(test) if pytest is not None else test


def slow(test):
    """pytest's `slow` marker (deselected by default), or nothing without pytest."""
    return pytest.mark.slow(test) if pytest is not None else test


# ---------------------------------------------------------------------------------------------
# plm_jax.xla_flags (CPU)

USER_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_gpu_enable_latency_hiding_scheduler=false"
)


def test_apply_gpu_flags_is_a_noop_on_cpu():
    if os.environ.get("JAX_PLATFORMS") != "cpu":  # tests/conftest.py sets it by default
        _skip("JAX_PLATFORMS is not cpu")
    before = os.environ.get("XLA_FLAGS")
    assert xla_flags.apply_gpu_flags() == []
    assert os.environ.get("XLA_FLAGS") == before
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": USER_FLAGS}
    assert xla_flags.apply_gpu_flags(env) == []
    assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": USER_FLAGS}


def test_is_gpu_platform_rules(monkeypatch):
    monkeypatch.setattr(xla_flags, "_cuda_plugin_installed", lambda: True)
    monkeypatch.setattr(xla_flags, "_nvidia_device_present", lambda: True)
    assert xla_flags.is_gpu_platform({})
    assert xla_flags.is_gpu_platform({"JAX_PLATFORMS": "cuda"})
    assert xla_flags.is_gpu_platform({"JAX_PLATFORMS": "cpu,cuda"})
    assert not xla_flags.is_gpu_platform({"JAX_PLATFORMS": "cpu"})
    assert not xla_flags.is_gpu_platform({"JAX_PLATFORMS": "tpu"})
    assert not xla_flags.is_gpu_platform({"CUDA_VISIBLE_DEVICES": ""})
    assert not xla_flags.is_gpu_platform({"CUDA_VISIBLE_DEVICES": "-1"})
    monkeypatch.setattr(xla_flags, "_nvidia_device_present", lambda: False)
    assert not xla_flags.is_gpu_platform({})
    monkeypatch.setattr(xla_flags, "_nvidia_device_present", lambda: True)
    monkeypatch.setattr(xla_flags, "_cuda_plugin_installed", lambda: False)
    assert not xla_flags.is_gpu_platform({})


def test_cuda_plugin_found_like_jax_finds_it(tmp_path, monkeypatch):
    if xla_flags._cuda_plugin_installed():
        _skip("a jax CUDA plugin is installed here")
    (tmp_path / "jax_plugins" / "xla_cuda13").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda13" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))  # a namespace package, as jax[cuda13] installs
    assert xla_flags._cuda_plugin_installed()


def test_flags_compose_without_duplicating_user_flags():
    env = {"XLA_FLAGS": USER_FLAGS}
    added = xla_flags.apply_gpu_flags(env, force=True)
    assert added == [
        "--xla_gpu_enable_pipelined_all_gather=true",
        "--xla_gpu_enable_pipelined_all_reduce=true",
    ]  # the user's latency-hiding setting (false) wins over ours
    assert env["XLA_FLAGS"] == USER_FLAGS + " " + " ".join(added)
    assert xla_flags.apply_gpu_flags(env, force=True) == []  # idempotent
    assert env["XLA_FLAGS"] == USER_FLAGS + " " + " ".join(added)
    names = [t[2:].split("=")[0] for t in env["XLA_FLAGS"].split()]
    assert len(names) == len(set(names))

    empty: dict[str, str] = {}
    added = xla_flags.apply_gpu_flags(empty, force=True)
    assert len(added) == len(xla_flags.GPU_FLAGS)
    assert empty["XLA_FLAGS"] == " ".join(added)  # no stray leading blank

    assert xla_flags.flag_names("--a=1 --b '--c=x y' --nod") == {"a", "b", "c", "nod", "d"}
    assert xla_flags.compose_xla_flags("--x=1", {"x": "2", "y": "3"}) == ("--x=1 --y=3", ["--y=3"])


def test_validate_drops_unknown_flags(monkeypatch):
    monkeypatch.setattr(xla_flags, "unknown_flags", lambda flags: ["--xla_b=1"])
    env = {"XLA_FLAGS": "--u=0"}
    assert xla_flags.set_flags({"xla_a": "1", "xla_b": "1"}, env, validate=True) == ["--xla_a=1"]
    assert env["XLA_FLAGS"] == "--u=0 --xla_a=1"


def test_gpu_flags_parse_in_this_jaxlib():
    """XLA parses every flag (GPU ones too) when any backend starts; an unknown one aborts."""
    flags = [f"--{name}={value}" for name, value in xla_flags.GPU_FLAGS.items()]
    assert xla_flags.unknown_flags(flags) == []
    assert not xla_flags._parses(["--xla_gpu_no_such_flag_for_this_test=true"], 120.0)


# ---------------------------------------------------------------------------------------------
# The benchmark's train step (CPU): one compilation, no donation warnings

TINY = ["--preset", "tiny", "--layers", "2", "--embed-dim", "32", "--heads", "4"]
TINY += ["--vocab", "256", "--peak-matmul-size", "128"]


def test_compile_counter_and_donation_warnings_can_fail():
    from benchmarks import common

    f = jax.jit(lambda x: x * 2)
    with common.CompileCounter() as compiles:
        f(np.ones(3, np.float32))
        f(np.ones(3, np.float32))
        f(np.ones(5, np.float32))  # a new shape compiles again
    assert compiles.count == 2
    with common.donation_warnings() as donated:
        jax.jit(lambda x: x.sum(), donate_argnums=0)(np.ones(4, np.float32))  # nothing reuses x
    assert len(donated) == 1 and "donated buffers were not usable" in donated[0]


def test_train_step_compiles_once_without_donation_warnings():
    from benchmarks import train_throughput

    argv = TINY + ["--seq-len", "16", "--batch", "8", "--steps", "3", "--warmup", "0"]
    record = train_throughput.main(argv)
    assert record["attention"] == "xla" and record["xla_gpu_flags"] is True
    assert record["xla_gpu_flags_added"] == []  # CPU
    assert record["compiles_first_step"] == 0  # lower().compile() filled the jit cache
    assert record["compiles_after_first_step"] == 0
    assert record["recompiled_after_first_step"] is False
    assert record["train_step_cache_size"] == 1
    assert record["donation_warnings"] == []


# ---------------------------------------------------------------------------------------------
# benchmarks/gpu.sh (CPU)

GPU_SH = REPO / "benchmarks" / "gpu.sh"


def test_gpu_sh_syntax():
    result = subprocess.run(["bash", "-n", str(GPU_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@slow  # ~40 s of CPU benchmarks: python -m pytest -m slow
def test_gpu_sh_dry_run(tmp_path):
    """GPU_SH_DRY_RUN=1: every essential step runs on CPU with a tiny model (about 45 s on a
    shared 2-core machine), and the summary is built from the records."""
    env = {**os.environ, "GPU_SH_DRY_RUN": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(GPU_SH), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    status = (tmp_path / "status.tsv").read_text().splitlines()
    ran = {line.split("\t")[0]: line.split("\t")[2] for line in status[1:]}
    essential = ["preflight_devices", "preflight_xla_flags", "gpu_tests", "infer_gpt2-124m_cudnn"]
    essential += ["train_gpt2-124m_T1024_b16", "train_llama-1b_T2048_b8"]
    for name in essential:
        assert ran[name] == "0", (name, status)
    assert ran["train_gpt2-124m_T1024_b16_xla-attention"] == ""  # optional: skipped in dry run
    record = json.loads((tmp_path / "train_llama-1b_T2048_b8.json").read_text())
    assert record["preset"] == "tiny" and record["attention"] == "xla"  # dry-run overrides won
    summary = (tmp_path / "summary.md").read_text()
    assert "| train_gpt2-124m_T1024_b16 | ok | tiny | 32 | 8 |" in summary
    assert "| infer_gpt2-124m_cudnn | ok | tiny | 2 | 8 | 4 |" in summary
    assert record["flops_formula"] in summary


def test_gpu_sh_without_gpu_says_so(tmp_path):
    """Not a dry run, and no nvidia-smi on PATH: a clear message and exit code 2."""
    if shutil.which("nvidia-smi"):
        _skip("this machine has nvidia-smi")
    env = {k: v for k, v in os.environ.items() if k != "GPU_SH_DRY_RUN"}
    result = subprocess.run(
        ["bash", str(GPU_SH), str(tmp_path)], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "nvidia-smi is missing" in result.stderr and "GPU_SH_DRY_RUN=1" in result.stderr


# ---------------------------------------------------------------------------------------------
# cuDNN against XLA attention (GPU)

# Each row written out as runs of (segment id, length); segment 0 is padding. L = 256.
# "padded" has right padding (as packing leaves it) and left padding (as prompts get it),
# so that a mask ignoring segment ids would let real queries see padding keys.
LENGTH = 256
SEGMENT_RUNS = {
    "causal": [[(1, 256)]] * 4,
    "padded": [[(1, 256)], [(1, 200), (0, 56)], [(0, 125), (1, 131)], [(1, 17), (0, 239)]],
    "packed": [
        [(1, 100), (2, 60), (3, 96)],
        [(1, 256)],
        [(1, 10), (2, 20), (3, 30), (4, 150), (0, 46)],
        [(0, 28), (1, 128), (2, 100)],
    ],
}


def _segments(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids, positions), each [B, L] int32; positions restart in each document."""
    rows = SEGMENT_RUNS[kind]
    segment_ids = np.zeros((len(rows), LENGTH), np.int32)
    positions = np.zeros((len(rows), LENGTH), np.int32)
    for b, runs in enumerate(rows):
        start = 0
        for segment, n in runs:
            segment_ids[b, start : start + n] = segment
            positions[b, start : start + n] = np.arange(n) if segment else 0
            start += n
        assert start == LENGTH, (kind, b)
    return segment_ids, positions


def _cuda_device() -> jax.Device:
    """The first CUDA device with compute capability >= 8.0 (cuDNN flash attention), or skip."""
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        devices = []
    if not devices:
        _skip("no GPU visible to jax")
    capability = getattr(devices[0], "compute_capability", None)
    if capability is not None and float(capability) < 8.0:
        _skip(f"cuDNN flash attention needs compute capability >= 8.0, not {capability}")
    return devices[0]


def _max_err(x, ref, rows=None) -> tuple[float, float]:
    """(max |x - ref|, max |ref|) in float32, over the [B, L] `rows` mask when given."""
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    if rows is not None:
        x, ref = x[rows], ref[rows]
    return float(np.abs(x - ref).max()), float(np.abs(ref).max())


def _assert_close_as_bf16(name, cudnn, xla_bf16, ref, rows=None):
    """The module docstring's rule: err(cuDNN) <= 2 err(XLA bf16) + 1e-3 scale, all finite."""
    assert np.isfinite(np.asarray(cudnn, np.float32)).all(), f"{name}: non-finite cuDNN values"
    err_cudnn, scale = _max_err(cudnn, ref, rows)
    err_xla, _ = _max_err(xla_bf16, ref, rows)
    bound = 2 * err_xla + 1e-3 * scale
    assert err_cudnn <= bound, (
        f"{name}: cuDNN error {err_cudnn:.3g} > {bound:.3g} (XLA bf16 {err_xla:.3g})"
    )


@functools.cache
def _attention_vjp(kernel: str, dtype: str):
    """Jitted (q, k, v, mask, cotangent) -> (out, dq, dk, dv) in `dtype`, through the kernel
    `Attention` runs for model.attention=kernel (cudnn: the causal flag plus the segment mask)."""

    def run(q, k, v, mask, cotangent):
        q, k, v, cotangent = (x.astype(dtype) for x in (q, k, v, cotangent))

        def attend(q, k, v):
            return KERNELS[kernel](q, k, v, mask, None)

        out, vjp = jax.vjp(attend, q, k, v)
        return (out, *vjp(cotangent))

    return jax.jit(run)


def _check_attention_kernel(kind: str) -> None:
    device = _cuda_device()
    segment_ids, _ = _segments(kind)
    batch, (n, k, h) = segment_ids.shape[0], (8, 2, 64)  # GQA: 4 query heads per kv head
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (batch, LENGTH, n, h), jnp.float32).astype(jnp.bfloat16)
    kk = jax.random.normal(keys[1], (batch, LENGTH, k, h), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, LENGTH, k, h), jnp.float32).astype(jnp.bfloat16)
    real = segment_ids != 0
    # Padding rows get no gradient, as in training, where their loss weight is 0.
    cotangent = jax.random.normal(keys[3], q.shape, jnp.float32) * real[:, :, None, None]
    index = jnp.arange(LENGTH)
    segments = jax.device_put(jnp.asarray(segment_ids), device)
    mask = attention_segments(segments, segments, index, index)  # aligned: is_causal=True
    args = jax.device_put((q, kk, v, mask, cotangent.astype(jnp.bfloat16)), device)
    with jax.default_matmul_precision("highest"):
        ref = _attention_vjp("xla", "float32")(*args)
    cudnn = _attention_vjp("cudnn", "bfloat16")(*args)
    xla = _attention_vjp("xla", "bfloat16")(*args)
    for name, c, x, r, rows in zip(
        ("out", "dq", "dk", "dv"), cudnn, xla, ref, (real, real, None, None), strict=True
    ):
        _assert_close_as_bf16(f"{kind} {name}", c, x, r, rows)


@gpu
def test_cudnn_attention_kernel_causal():
    _check_attention_kernel("causal")


@gpu
def test_cudnn_attention_kernel_padded():
    _check_attention_kernel("padded")


@gpu
def test_cudnn_attention_kernel_packed():
    _check_attention_kernel("packed")


# A small Llama-style decoder: GQA (4 query heads, 2 kv heads), RoPE, RMSNorm, SwiGLU.
SMALL = ModelConfig(
    vocab_size=512,
    num_layers=2,
    embed_dim=256,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    mlp_dim=512,
    max_seq_len=LENGTH,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    use_bias=False,
)
VARIANTS = {  # name -> (attention, compute dtype)
    "cudnn": ("cudnn", "bfloat16"),
    "xla_bf16": ("xla", "bfloat16"),
    "ref": ("xla", "float32"),
}


@functools.cache
def _small_model(variant: str) -> tuple[nnx.GraphDef, nnx.State]:
    """The same parameters (float32, seed 0) under each variant's graph definition."""
    attention, dtype = VARIANTS[variant]
    cfg = dataclasses.replace(SMALL, attention=attention, dtype=dtype, param_dtype="float32")
    return nnx.split(Decoder(cfg, rngs=nnx.Rngs(params=0)))


@functools.cache
def _loss_and_grads(variant: str):
    graphdef, _ = _small_model(variant)

    def loss_fn(params, tokens, targets, segment_ids, positions):
        logits = nnx.merge(graphdef, params)(
            tokens, segment_ids=segment_ids, positions=positions
        ).logits
        weights = (segment_ids != 0).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
        return jnp.sum(nll * weights) / jnp.sum(weights), logits

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def _check_model(kind: str) -> None:
    device = _cuda_device()
    segment_ids, positions = _segments(kind)
    rng = np.random.default_rng(0)
    tokens, targets = rng.integers(0, SMALL.vocab_size, (2, *segment_ids.shape), dtype=np.int32)
    params = _small_model("ref")[1]
    args = jax.device_put((params, tokens, targets, segment_ids, positions), device)
    results = {}
    for variant in VARIANTS:
        with jax.default_matmul_precision("highest" if variant == "ref" else "default"):
            (loss, logits), grads = _loss_and_grads(variant)(*args)
        results[variant] = (logits, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)]))
    real = segment_ids != 0
    for i, name in enumerate(("logits", "grads")):
        rows = real if name == "logits" else None
        cudnn, xla, ref = (results[v][i] for v in ("cudnn", "xla_bf16", "ref"))
        _assert_close_as_bf16(f"{kind} {name}", cudnn, xla, ref, rows)
        assert np.isfinite(np.asarray(results["cudnn"][i])).all()  # padding rows included


@gpu
def test_cudnn_decoder_matches_xla_causal():
    _check_model("causal")


@gpu
def test_cudnn_decoder_matches_xla_padded():
    _check_model("padded")


@gpu
def test_cudnn_decoder_matches_xla_packed():
    _check_model("packed")


@functools.cache
def _decode(variant: str, steps: int, max_len: int):
    """Jitted: prefill a left-padded prompt into a KV cache, then `steps` one-token steps
    (teacher-forced); returns the logits of the prompt's last token and of each step."""
    graphdef, _ = _small_model(variant)

    def run(params, prompt, segment_ids, next_tokens):
        model = nnx.merge(graphdef, params)
        out = model(
            prompt, segment_ids=segment_ids, cache=model.init_cache(prompt.shape[0], max_len)
        )
        logits, cache = [out.logits[:, -1]], out.cache
        ones = jnp.ones((prompt.shape[0], 1), jnp.int32)
        for t in range(steps):
            out = model(next_tokens[:, t : t + 1], segment_ids=ones, cache=cache)
            logits.append(out.logits[:, 0])
            cache = out.cache
        return jnp.stack(logits, axis=1)  # [B, steps + 1, V]

    return jax.jit(run)


@gpu
def test_cudnn_kv_cache_decoding_matches_xla():
    """Prefill over [B, 48] (left padding as generate_ids makes it) and 4 one-token steps:
    the cuDNN kernel with one query row against a partly filled cache."""
    device = _cuda_device()
    pads = np.array([0, 5, 17, 30])
    segment_ids = (np.arange(48)[None, :] >= pads[:, None]).astype(np.int32)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, SMALL.vocab_size, segment_ids.shape, dtype=np.int32)
    next_tokens = rng.integers(0, SMALL.vocab_size, (len(pads), 4), dtype=np.int32)
    args = jax.device_put((_small_model("ref")[1], prompt, segment_ids, next_tokens), device)
    logits = {}
    for variant in VARIANTS:
        with jax.default_matmul_precision("highest" if variant == "ref" else "default"):
            logits[variant] = _decode(variant, 4, 64)(*args)
    _assert_close_as_bf16("decode logits", logits["cudnn"], logits["xla_bf16"], logits["ref"])


def _main() -> int:
    """Runs the GPU tests without pytest: PASS / SKIP / FAIL per test; exit 1 on a failure."""
    failed = 0
    for name, test in list(globals().items()):
        if not (name.startswith("test_") and getattr(test, "needs_gpu", False)):
            continue
        try:
            test()
            print(f"PASS {name}", flush=True)
        except _Skipped as e:
            print(f"SKIP {name}: {e}", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
