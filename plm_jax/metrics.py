"""Training metrics: parameter and FLOP counts, peak FLOP/s, MFU, throughput, and the sinks.

- Sizes: `nonembedding_params`, `param_breakdown` (closed form, from `models.sizes`).
- FLOPs: `train_flops_per_token` (the DESIGN.md formula, named by its `formula` field).
- Peak: `device_peak_flops` (a table of bf16 dense peaks), `measure_cpu_peak_flops`, `peak_flops`.
- `mfu`, `StepTimer` (tokens/s between metric fetches), `MetricsWriter` (JSONL + TensorBoard,
  and the trackers of `plm_jax.tracking`),
  `read_metrics`, `ProgressBar` (tqdm).

What it leaves out: computing metric values inside the step (train/) and deciding when to log
(the loop). The counts cover decoders, encoders (bidirectional attention) and encoder-decoders
(per encoder input token, the decoder's share scaled by its length). tensorboardX is imported
only when a writer asks for it, so the FLOP and MFU helpers import on machines without it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from plm_jax.config import ModelConfig
from plm_jax.models.sizes import count_params, resolve_model_config

__all__ = [
    "MetricsWriter",
    "ProgressBar",
    "StepTimer",
    "device_peak_flops",
    "measure_cpu_peak_flops",
    "mfu",
    "nonembedding_params",
    "param_breakdown",
    "peak_flops",
    "read_metrics",
    "train_flops_per_token",
]

# ---------------------------------------------------------------------------------------------
# Parameter and FLOP counts.


def _resolved(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    # One rule for the 0 = derive-it sizes, shared with the model (models/sizes.py), so the
    # FLOP count can never drift from the parameters the model builds.
    return resolve_model_config(dataclasses.replace(cfg, vocab_size=vocab_size))


def param_breakdown(cfg: ModelConfig, vocab_size: int) -> dict[str, int]:
    """Parameter counts of `Decoder(cfg)`, split into embeddings and the rest.

    Sizes left at 0 are resolved as the model does (`models.sizes.resolve_model_config`):
    num_kv_heads -> num_heads, head_dim -> embed_dim // num_heads, mlp_dim -> 4 * embed_dim for
    GELU or LLaMA's int(8 * embed_dim / 3) rounded up to a multiple of 256 for SwiGLU.

    Returns:
      token_embedding V*D, position_embedding P*D (learned positions; 0 for RoPE), lm_head D*V
      (untied head; 0 when tied), nonembedding (attention, MLPs and norms: everything else), and
      total. "Non-embedding" follows Kaplan et al. 2020: all three embedding tables are excluded.
    """
    c = _resolved(cfg, vocab_size)
    total = count_params(c)
    token = c.vocab_size * c.embed_dim
    position = c.max_seq_len * c.embed_dim if c.position == "learned" else 0
    if c.family == "encoder":  # token types count with the position table
        position += c.type_vocab_size * c.embed_dim
    has_head = c.family != "encoder" or c.use_mlm_head
    head = 0 if c.tie_embeddings or not has_head else c.embed_dim * c.vocab_size
    return {
        "token_embedding": token,
        "position_embedding": position,
        "lm_head": head,
        "nonembedding": total - token - position - head,
        "total": total,
    }


def nonembedding_params(cfg: ModelConfig, vocab_size: int) -> int:
    """Closed-form non-embedding parameter count of the decoder.

    Per layer, with D embed, N/K heads, H head dim, F mlp dim, b = use_bias: attention
    D*N*H + 2*D*K*H + N*H*D + b*(N*H + 2*K*H + D); MLP 2*D*F + b*(F + D) (GELU) or
    3*D*F + b*(2F + D) (SwiGLU); two norms of 2D (LayerNorm with bias) or D. Plus a final norm.
    GPT-2 124M: 85,056,000. Llama 3.2 1B: 973,146,112.
    """
    return param_breakdown(cfg, vocab_size)["nonembedding"]


FLOPS_FORMULA = "6*N_nonemb + 6*L*(N*H)*T (causal attention halved; Kaplan 2020, PaLM app. B)"
FLOPS_FORMULA_ENCODER = "6*N_nonemb + 12*L*(N*H)*T (bidirectional attention; Kaplan 2020)"
FLOPS_FORMULA_ENCODER_DECODER = (
    "6*N_enc + 12*E*(N*H)*S + (T/S)*(6*N_dec + 6*L*(N*H)*T + 12*L*(N*H)*S) per encoder token "
    "(S encoder, T decoder tokens; causal decoder self-attention halved)"
)


def train_flops_per_token(
    cfg: ModelConfig, vocab_size: int, seq_len: int, decoder_len: int | None = None
) -> dict[str, Any]:
    """Model FLOPs per trained token (forward + backward = 3x forward), as in DESIGN.md.

    A matmul with P weights costs 2P FLOPs per token forward, so the weights cost 6*N_nonemb.
    Attention scores Q.K^T and the weighted sum A.V each cost 2*T*N*H per token and layer
    forward, 12*L*N*H*T for training; a causal mask skips half of them, leaving 6*L*N*H*T.
    N*H is the attention width (= D for the published presets); K does not enter, since every
    query head still attends over T keys.

    The output head (6*D*V) is left out of the headline, as DESIGN.md's formula (from
    Kaplan's non-embedding count) prescribes. PaLM and nanoGPT count it, through an N that
    includes the tied embedding: compare with those figures through `flops_per_token_with_head`.
    For GPT-2 124M at T=1024 the head is ~30% of the total, so the choice matters.

    An encoder-decoder counts per encoder input token (what the loop's throughput counts):
    with S = `seq_len` encoder and T = `decoder_len` decoder tokens per row, E encoder and L
    decoder layers, the encoder's weights cost 6*N_enc and its attention 12*E*N*H*S; each
    decoder token costs 6*N_dec, causal self-attention 6*L*N*H*T and cross-attention
    12*L*N*H*S, scaled by T/S decoder tokens per encoder token. The head is T/S * 6*D*V.

    Args: `cfg` (sizes at 0 resolved as the model does), V = `vocab_size`, T = `seq_len`,
      `decoder_len` (encoder-decoders; default `seq_len`).

    Returns:
      flops_per_token (headline, causal), flops_per_token_noncausal (attention 12*L*N*H*T),
      flops_per_token_with_head, lm_head_flops_per_token (6*D*V), attention_flops_per_token,
      params_nonembedding, and formula (names the headline; print it next to every MFU figure).
    """
    c = _resolved(cfg, vocab_size)
    dense = 6 * nonembedding_params(c, vocab_size)
    attention = 6 * c.num_layers * c.num_heads * c.head_dim * seq_len
    head = 6 * c.embed_dim * vocab_size
    if c.family == "encoder_decoder":
        return _encoder_decoder_flops(c, seq_len, decoder_len or seq_len, head)
    if c.family == "encoder":  # bidirectional: every query attends to all T keys
        return {
            "flops_per_token": dense + 2 * attention,
            "flops_per_token_noncausal": dense + 2 * attention,
            "flops_per_token_with_head": dense + 2 * attention + head,
            "lm_head_flops_per_token": head,
            "attention_flops_per_token": 2 * attention,
            "params_nonembedding": dense // 6,
            "formula": FLOPS_FORMULA_ENCODER,
        }
    return {
        "flops_per_token": dense + attention,
        "flops_per_token_noncausal": dense + 2 * attention,
        "flops_per_token_with_head": dense + attention + head,
        "lm_head_flops_per_token": head,
        "attention_flops_per_token": attention,
        "params_nonembedding": dense // 6,
        "formula": FLOPS_FORMULA,
    }


def _encoder_decoder_flops(c: ModelConfig, s_len: int, t_len: int, head: int) -> dict[str, Any]:
    d, n, k, h = c.embed_dim, c.num_heads, c.num_kv_heads, c.head_dim
    b = int(c.use_bias)
    attention = 2 * d * n * h + 2 * d * k * h + b * (n * h + 2 * k * h + d)
    gated = c.mlp in ("swiglu", "geglu")
    mlp = (3 if gated else 2) * d * c.mlp_dim + b * ((2 if gated else 1) * c.mlp_dim + d)
    n_enc = c.num_layers * (attention + mlp)
    n_dec = c.num_decoder_layers * (2 * attention + mlp)
    width, ratio = n * h, t_len / s_len
    enc_attn = 12 * c.num_layers * width * s_len
    dec_attn = 6 * c.num_decoder_layers * width * t_len + 12 * c.num_decoder_layers * width * s_len
    dense = 6 * n_enc + ratio * 6 * n_dec
    total = dense + enc_attn + ratio * dec_attn
    noncausal = total + ratio * 6 * c.num_decoder_layers * width * t_len
    return {
        "flops_per_token": total,
        "flops_per_token_noncausal": noncausal,
        "flops_per_token_with_head": total + ratio * head,
        "lm_head_flops_per_token": ratio * head,
        "attention_flops_per_token": enc_attn + ratio * dec_attn,
        "params_nonembedding": n_enc + n_dec,
        "formula": FLOPS_FORMULA_ENCODER_DECODER,
    }


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s and MFU.

# Dense bf16 peaks per chip (vendor sheets; NVIDIA's "with sparsity" figures halved). Keys are
# lower-cased `device.device_kind` strings as jax reports them. TPUs match exactly: "TPU v5" is
# v5p and "TPU v5 lite" is v5e, so a substring match would confuse them.
_TPU_PEAKS = {"tpu v4": 275e12, "tpu v5 lite": 197e12, "tpu v5e": 197e12}
_TPU_PEAKS |= {"tpu v5": 459e12, "tpu v5p": 459e12, "tpu v6 lite": 918e12, "tpu v6e": 918e12}
# GPUs match by substring, first hit wins: "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe".
_GPU_PEAKS = (("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("a100", 312e12))


def device_peak_flops(device: Any) -> float | None:
    """bf16 dense peak FLOP/s of one accelerator chip, or None when the kind is not tabled."""
    kind = device.device_kind.lower().strip()
    if kind in _TPU_PEAKS:
        return _TPU_PEAKS[kind]
    for pattern, peak in _GPU_PEAKS:
        if pattern in kind:
            return peak
    return None


@functools.cache
def measure_cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """Float32 FLOP/s of a [size, size] @ [size, size] matmul through XLA on the first CPU device.

    Best of `repeats` timed runs after one compiling warm-up. Fake CPU devices
    (--xla_force_host_platform_device_count) share the host's cores and XLA's thread pool, so
    this is the peak of the whole host, not of one fake device. Cached per (size, repeats).
    """
    device = jax.devices("cpu")[0]
    x = jax.device_put(np.random.default_rng(0).standard_normal((size, size), np.float32), device)
    matmul = jax.jit(jnp.dot)
    matmul(x, x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x, x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_flops(devices: Sequence[Any], *, cpu_matmul_size: int = 2048) -> tuple[float, str]:
    """Total peak FLOP/s of `devices` and where the figure comes from.

    Tabled accelerators: the per-chip peak times the chip count ("table: <kind>"). CPU: the
    measured host peak, counted once however many fake devices there are ("measured: ...");
    CPU runs are single-host in practice. Any other accelerator raises rather than guess: a
    float32 matmul is not its bf16 peak. A caller that can train without MFU catches the error.

    Raises:
      ValueError: no devices, or an accelerator kind that is not in the table.
    """
    if not devices:
        raise ValueError("peak_flops needs at least one device")
    kinds = sorted({d.device_kind for d in devices})
    if all(d.platform == "cpu" for d in devices):
        peak = measure_cpu_peak_flops(cpu_matmul_size)
        where = f"on the host, shared by {len(devices)} cpu devices"
        return peak, f"measured: f32 matmul {cpu_matmul_size} {where}"
    peaks = [device_peak_flops(d) for d in devices]
    if any(p is None for p in peaks):
        raise ValueError(
            f"no peak FLOP/s known for device kind(s) {kinds}; add the chip's dense bf16 peak "
            "to plm_jax.metrics._GPU_PEAKS/_TPU_PEAKS, or report throughput without MFU"
        )
    return float(sum(peaks)), "table: " + ", ".join(kinds)


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilization: tokens/s * model FLOPs per token / peak FLOP/s (a fraction)."""
    if not peak > 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_sec * flops_per_token / peak


class StepTimer:
    """Throughput over the wall time between metric fetches.

    Call `lap` right after each fetch: the fetch waits for the device, so the time between laps
    is the device time of the steps in between. Call `reset` after the first (compiling) step so
    compile time is not counted. MFU, when `flops_per_token` and `peak` are given, uses real
    tokens: padding is work the model did not need.
    """

    def __init__(self, *, flops_per_token: float | None = None, peak: float | None = None):
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.reset()

    def reset(self) -> None:
        self._start = time.perf_counter()

    def lap(self, num_steps: int, real_tokens: float, padded_tokens: float) -> dict[str, float]:
        """Rates over the `num_steps` steps since the last lap or reset; restarts the clock.

        `real_tokens` is the number of non-padding input tokens over those steps (for a
        decoder, about the sum of the loss weights; a masked LM predicts only some of them);
        `padded_tokens` is batch * seq_len * num_steps. Returns perf/step_time (seconds per
        step), perf/tokens_per_sec, perf/padded_tokens_per_sec, and perf/mfu when the timer has
        flops_per_token and peak.
        """
        now = time.perf_counter()
        elapsed, self._start = max(now - self._start, 1e-9), now
        out = {
            "perf/step_time": elapsed / max(num_steps, 1),
            "perf/tokens_per_sec": float(real_tokens) / elapsed,
            "perf/padded_tokens_per_sec": float(padded_tokens) / elapsed,
        }
        if self.flops_per_token is not None and self.peak is not None:
            out["perf/mfu"] = mfu(out["perf/tokens_per_sec"], self.flops_per_token, self.peak)
        return out


# ---------------------------------------------------------------------------------------------
# Sinks.


def _json_value(key: str, value: Any) -> int | float | None:
    """A metric as a JSON number: ints stay ints, NaN/Inf become null (strict JSON has none)."""
    if isinstance(value, bool | int | np.bool_ | np.integer):
        return int(value)
    try:
        number = float(value)  # Python, numpy and 0-d jax scalars
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from None
    return number if math.isfinite(number) else None


class MetricsWriter:
    """Appends metrics to `run_dir/metrics.jsonl` and TensorBoard events in `run_dir/tensorboard/`.

    One JSON object per `write`, flushed at once: {"step": 100, "train/loss": 2.3, ...}. NaN and
    Inf are written as null so every line is strict JSON (TensorBoard still gets the raw value).
    A resumed run appends; if a crash cut the last line short, the next write starts a new line.
    With `enabled=False` (processes other than 0 in multi-host runs) nothing is written.
    Without tensorboardX installed it warns once and writes the JSONL only. `trackers` (e.g.
    `plm_jax.tracking.WandbWriter`) get every record too, under the same names.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool = True,
        use_tensorboard: bool = True,
        trackers: Sequence[Any] = (),
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file: TextIO | None = None
        self._tb: Any = None
        self._trackers = list(trackers) if enabled else []
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        if self._file.tell() and _last_byte(self.path) != b"\n":  # a crash cut the line short
            self._file.write("\n")
        if use_tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                warnings.warn(
                    "tensorboardX is not installed; writing metrics.jsonl only "
                    "(pip install tensorboardX, or pass use_tensorboard=False)",
                    stacklevel=2,
                )
            else:
                self._tb = SummaryWriter(logdir=str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs `metrics` (slash-namespaced keys, scalar values) at `step`.

        Raises:
          TypeError: a value that is not a scalar number.
          ValueError: a metric named "step".
        """
        if self._file is None:  # disabled, or closed
            return
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step argument; rename the metric")
        record: dict[str, Any] = {"step": int(step)}
        record.update({k: _json_value(k, v) for k, v in metrics.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, float(value), global_step=int(step))
            self._tb.flush()
        for tracker in self._trackers:
            tracker.write(int(step), metrics)

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        """Logs free text (compile info, the resolved config) to TensorBoard only."""
        if self._tb is not None:
            self._tb.add_text(tag, text, global_step=step)
            self._tb.flush()
        for tracker in self._trackers:
            tracker.write_text(tag, text, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (or a run directory holding one), in order.

    Nulls come back as None. A line that is not JSON (a write cut short by a crash) is skipped
    with a warning naming it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    records = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{number} is not valid JSON; skipped", stacklevel=2)
    return records


def truncate_metrics(run_dir: str | Path, last_step: int) -> int:
    """Drops records after `last_step` from metrics.jsonl; returns how many were dropped.

    A run resumed from the checkpoint of `last_step` recomputes the later steps exactly, so
    their old records would only appear twice. The file is replaced atomically.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            dropped += 1  # a line cut short by the crash
            continue
        if step > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


class ProgressBar:
    """A tqdm bar on stderr: step/total, loss and tokens/s.

    Shown only when `enabled` and the stream is a terminal, so logs of batch jobs stay clean.
    """

    def __init__(
        self, total: int, *, initial: int = 0, enabled: bool = True, stream: TextIO | None = None
    ):
        stream = stream if stream is not None else sys.stderr
        is_tty = hasattr(stream, "isatty") and stream.isatty()
        show = enabled and is_tty
        self._bar = tqdm(total=total, initial=initial, file=stream, disable=not show, unit="step")

    def update(
        self, step: int, *, loss: float | None = None, tokens_per_sec: float | None = None
    ) -> None:
        """Moves the bar to `step` (absolute, not an increment) and shows the latest numbers."""
        postfix = {}
        if loss is not None:
            postfix["loss"] = f"{float(loss):.4f}"
        if tokens_per_sec is not None:
            postfix["tok/s"] = f"{float(tokens_per_sec):,.0f}"
        if postfix:
            self._bar.set_postfix(postfix, refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        self._bar.close()
