#!/usr/bin/env bash
# The GPU path on one H100/H200, unattended, in at most GPU_SH_BUDGET_S seconds (default 480):
# cuDNN-vs-XLA attention tests, training throughput (GPT-2 124M at T=1024, Llama 1B at
# T=2048, bf16 compute, f32 parameters, cuDNN attention), inference throughput (GPT-2 124M),
# then optional variants (XLA attention, no XLA flags, remat, batch, Triton GEMM off) while
# the budget lasts.
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]   # default: $OUT, else benchmarks/results/gpu-<UTC>
#   GPU_SH_DRY_RUN=1 bash benchmarks/gpu.sh DIR   # CPU, tiny model, few steps: the plumbing
#
# RESULTS_DIR gets one <step>.json per benchmark (its JSON line), <step>.log (stderr),
# env.txt (nvidia-smi, jax devices, XLA flag check), status.tsv and summary.md: preset, T,
# batch, tokens/s and MFU against 989 TFLOP/s (H100/H200 SXM dense bf16), with FLOPs per
# token from plm_jax.metrics.train_flops_per_token (6*N_nonemb + 6*L*(N*H)*T, causal
# attention halved). Each step runs under `timeout`, capped by what is left of the budget;
# an optional step starts only when the budget still holds its usual duration.
# Exit code: 0 when every essential step passed, 1 otherwise, 2 when there is no GPU.
# Environment: GPU_SH_DRY_RUN, GPU_SH_DRY_RUN_ALL=1 (dry run also runs the optional steps),
# GPU_SH_BUDGET_S, PYTHON (default python), XLA_FLAGS (kept; its flags win over ours).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DRY=${GPU_SH_DRY_RUN:-0}
BUDGET_S=${GPU_SH_BUDGET_S:-480}
RESERVE_S=15 # kept back for the summary
RESULTS=${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}
mkdir -p "$RESULTS" || exit 1
START=$(date +%s)
STATUS="$RESULTS/status.tsv"
printf 'step\tkind\trc\tseconds\tnote\n' >"$STATUS"
FAILED=0

if [[ "$DRY" == 1 ]]; then
    echo "gpu.sh: DRY RUN on CPU (GPU_SH_DRY_RUN=1): tiny model, few steps; numbers are meaningless"
    export JAX_PLATFORMS=cpu
    # Appended to every benchmark command: argparse keeps the last value of an option.
    DRY_MODEL=(--preset tiny --layers 2 --embed-dim 64 --heads 4 --vocab 512
        --dtype float32 --attention xla --peak-matmul-size 256)
    DRY_TRAIN=("${DRY_MODEL[@]}" --seq-len 32 --batch 8 --steps 2 --warmup 1)
    DRY_INFER=("${DRY_MODEL[@]}" --batch 2 --prompt-len 8 --new-tokens 4 --repeats 2)
    TEST_PLATFORMS=cpu
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        echo "gpu.sh: nvidia-smi is missing or sees no GPU: this needs an NVIDIA GPU host" \
            "(H100/H200) with the driver and jax's CUDA plugin. To test the script's plumbing" \
            "on CPU instead, run: GPU_SH_DRY_RUN=1 bash benchmarks/gpu.sh" >&2
        exit 2
    fi
    DRY_TRAIN=()
    DRY_INFER=()
    TEST_PLATFORMS=cuda,cpu # tests/conftest.py defaults JAX_PLATFORMS to cpu
    # jax preallocates 75% of GPU memory by default; Llama 1B without remat wants more.
    export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
fi
echo "gpu.sh: results in $RESULTS, budget ${BUDGET_S}s"

remaining() { echo $((BUDGET_S - RESERVE_S - ($(date +%s) - START))); }

# step NAME KIND NEED CAP CMD...: runs CMD under `timeout`, its stdout to NAME.json and
# stderr to NAME.log (benchmarks), or both to NAME.log (other steps). KIND: essential (a
# failure makes the exit code 1), info (a failure does not), or optional (as info, but starts
# only with NEED seconds of budget left, its usual duration, and in a dry run only with
# GPU_SH_DRY_RUN_ALL=1). The timeout is min(CAP, what is left of the budget).
step() {
    local name=$1 kind=$2 need=$3 cap=$4
    shift 4
    local left note="" rc t0 limit
    left=$(remaining)
    if [[ "$kind" != optional ]]; then
        need=10
    elif [[ "$DRY" == 1 && "${GPU_SH_DRY_RUN_ALL:-0}" != 1 ]]; then
        note="skipped: dry run (GPU_SH_DRY_RUN_ALL=1 runs it)"
    fi
    if [[ -z "$note" ]] && ((left < need)); then
        note="skipped: ${left}s of budget left, needs ${need}s"
        [[ "$kind" == essential ]] && FAILED=1
    fi
    if [[ -n "$note" ]]; then
        echo "[gpu.sh] $name: $note"
        printf '%s\t%s\t\t0\t%s\n' "$name" "$kind" "$note" >>"$STATUS"
        return 0
    fi
    limit=$((cap < left ? cap : left))
    t0=$(date +%s)
    echo "[gpu.sh] $name: timeout ${limit}s: $*"
    if [[ "$name" == train_* || "$name" == infer_* ]]; then
        timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.json" 2>"$RESULTS/$name.log"
    else
        timeout --kill-after=10 "$limit" "$@" >"$RESULTS/$name.log" 2>&1
    fi
    rc=$?
    ((rc == 124)) && note="timed out after ${limit}s"
    ((rc != 0)) && [[ -z "$note" ]] && note="exit $rc, see $name.log"
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$kind" "$rc" "$(($(date +%s) - t0))" "$note" >>"$STATUS"
    echo "[gpu.sh] $name: exit $rc after $(($(date +%s) - t0))s ${note}"
    if ((rc != 0)); then
        [[ "$kind" == essential ]] && FAILED=1
        return 1
    fi
    return 0
}

train() { # train NAME KIND NEED CAP ARGS...
    local name=$1 kind=$2 need=$3 cap=$4
    shift 4
    step "$name" "$kind" "$need" "$cap" "$PY" -m benchmarks.train_throughput \
        --dtype bfloat16 --attention cudnn --steps 10 --warmup 2 \
        "$@" ${DRY_TRAIN[@]+"${DRY_TRAIN[@]}"}
}

infer() { # infer NAME KIND NEED CAP ARGS...
    local name=$1 kind=$2 need=$3 cap=$4
    shift 4
    step "$name" "$kind" "$need" "$cap" "$PY" -m benchmarks.infer_throughput \
        --dtype bfloat16 "$@" ${DRY_INFER[@]+"${DRY_INFER[@]}"}
}

# --- preflight: the machine, jax's devices, the XLA flags this jaxlib accepts ---------------
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)," \
        "$(git status --porcelain 2>/dev/null | wc -l) files changed since"
    echo "XLA_FLAGS: ${XLA_FLAGS:-}"
    [[ "$DRY" == 1 ]] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
} >"$RESULTS/env.txt" 2>&1
DEVICE_CHECK='import jax; d = jax.devices(); print(jax.__version__, d)
assert d[0].platform == "gpu", f"jax sees no GPU: {d} (is its CUDA plugin installed?)"'
[[ "$DRY" == 1 ]] && DEVICE_CHECK='import jax; print(jax.__version__, jax.devices())'
if ! step preflight_devices essential 0 90 "$PY" -c "$DEVICE_CHECK"; then
    echo "gpu.sh: jax cannot use the GPU (see $RESULTS/preflight_devices.log); stopping" >&2
    cat "$RESULTS/preflight_devices.log" >&2
    FAILED=1
else
    # Informational: the benchmarks validate the flags themselves and drop unknown ones.
    step preflight_xla_flags info 0 60 "$PY" -m plm_jax.xla_flags --check
    cat "$RESULTS/preflight_devices.log" "$RESULTS/preflight_xla_flags.log" \
        >>"$RESULTS/env.txt" 2>/dev/null

    # --- essential: correctness, then the two training targets, then inference -------------
    if "$PY" -c "import pytest" 2>/dev/null; then
        step gpu_tests essential 0 150 env JAX_PLATFORMS=$TEST_PLATFORMS "$PY" -m pytest \
            tests/test_gpu_path.py -m gpu -q -rs -p no:cacheprovider
    else # the GPU image may lack pytest: the test module runs its GPU tests itself
        step gpu_tests essential 0 150 "$PY" -m tests.test_gpu_path
    fi
    train train_gpt2-124m_T1024_b16 essential 0 150 --preset gpt2-124m --seq-len 1024 --batch 16
    train train_llama-1b_T2048_b8 essential 0 210 --preset llama-1b --seq-len 2048 --batch 8
    if ! infer infer_gpt2-124m_cudnn essential 0 120 --preset gpt2-124m --attention cudnn \
        --batch 8 --prompt-len 512 --new-tokens 128; then
        infer infer_gpt2-124m_xla optional 60 120 --preset gpt2-124m --attention xla \
            --batch 8 --prompt-len 512 --new-tokens 128
    fi

    # --- optional variants, most informative first -----------------------------------------
    train train_gpt2-124m_T1024_b16_xla-attention optional 75 120 \
        --preset gpt2-124m --seq-len 1024 --batch 16 --attention xla
    train train_gpt2-124m_T1024_b16_no-xla-flags optional 75 120 \
        --preset gpt2-124m --seq-len 1024 --batch 16 --no-xla-gpu-flags
    train train_llama-1b_T2048_b8_remat-dots optional 130 180 \
        --preset llama-1b --seq-len 2048 --batch 8 --remat dots
    train train_gpt2-124m_T1024_b32 optional 75 120 --preset gpt2-124m --seq-len 1024 --batch 32
    train train_llama-1b_T2048_b8_remat-full optional 130 180 \
        --preset llama-1b --seq-len 2048 --batch 8 --remat full
    XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
        train train_gpt2-124m_T1024_b16_triton-gemm-off optional 75 120 \
        --preset gpt2-124m --seq-len 1024 --batch 16
fi

# --- summary ---------------------------------------------------------------------------------
"$PY" - "$RESULTS" <<'EOF'
import json
import pathlib
import sys

PEAK = 989e12  # H100/H200 SXM dense bf16 FLOP/s (DESIGN.md); MFU below is against this
TARGETS = {("gpt2-124m", 1024): 0.45, ("llama-1b", 2048): 0.50}
results = pathlib.Path(sys.argv[1])
rows = [line.split("\t") for line in (results / "status.tsv").read_text().splitlines()[1:]]


def record(name):
    try:
        return json.loads((results / f"{name}.json").read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def gib(n):
    return f"{n / 2**30:.1f}" if n else "-"


out = ["# gpu.sh results", ""]
train = ["| step | status | preset | T | batch | attention | remat | XLA GPU flags | tokens/s | "
         "step ms | MFU @989T | MFU non-causal | target | compile s | peak GiB | recompiled | "
         "donation warnings |", "|" + "---|" * 17]
infer = ["| step | status | preset | batch | prompt | new | prefill tok/s | prefill MFU @989T | "
         "decode tok/s | decode net tok/s |", "|" + "---|" * 10]
last = None
for name, kind, rc, seconds, note in rows:
    if not name.startswith(("train_", "infer_")):
        continue
    r = record(name)
    status = "ok" if rc == "0" else (note or f"exit {rc}")
    if r is None and name.startswith("train_"):
        train.append(f"| {name} | {status} |" + " |" * 15)
    elif r is None and name.startswith("infer_"):
        infer.append(f"| {name} | {status} |" + " |" * 8)
    elif name.startswith("train_"):
        last = r
        peak = PEAK * r["device_count"]
        mfu = r["tokens_per_sec"] * r["flops_per_token"] / peak
        mfu_nc = r["tokens_per_sec"] * r["flops_per_token_noncausal"] / peak
        goal = TARGETS.get((r["preset"], r["seq_len"]))
        target = "-" if goal is None else f"{goal:.0%}: {'met' if mfu >= goal else 'not met'}"
        added = len(r.get("xla_gpu_flags_added") or [])
        flags = f"on, {added} added" if r.get("xla_gpu_flags") else "off"
        train.append(
            f"| {name} | {status} | {r['preset']} | {r['seq_len']} | {r['batch']} | "
            f"{r.get('attention')} | {r['remat']} | {flags} | {r['tokens_per_sec']:,.0f} | "
            f"{1e3 * r['step_time_median_s']:.1f} | {mfu:.1%} | {mfu_nc:.1%} | {target} | "
            f"{r['compile_s']:.1f} | {gib(r.get('peak_memory_bytes'))} | "
            f"{r.get('recompiled_after_first_step')} | {len(r.get('donation_warnings') or [])} |")
    else:
        last = last or r
        infer.append(
            f"| {name} | {status} | {r['preset']} | {r['batch']} | {r['prompt_len']} | "
            f"{r['new_tokens']} | {r['prefill_tokens_per_sec']:,.0f} | "
            f"{r['prefill_tokens_per_sec'] * r['prefill_flops_per_token'] / PEAK:.1%} | "
            f"{r['decode_tokens_per_sec']:,.0f} | {r['decode_tokens_per_sec_net']:,.0f} |")
out += ["## Training", "", *train, "", "## Inference", "", *infer, "", "## Steps", "",
        "| step | kind | exit | seconds | note |", "|---|---|---|---|---|"]
out += [f"| {' | '.join(row)} |" for row in rows]
out += ["", f"MFU = tokens/s * FLOPs per token / ({PEAK:.3g} FLOP/s x devices): H100/H200 SXM "
        "dense bf16 per device. Prefill FLOPs are a third of the training count."]
if last:
    out += [f"FLOPs per token: {last['flops_formula']}; non-causal column: 12*L*(N*H)*T attention.",
            f"Device: {last['device_count']} x {last['device_kind']}; the records' own `mfu` uses "
            f"{last['peak_flops_source']}. Inference runs on one device.",
            f"Versions: {json.dumps(last['versions'])}; XLA_FLAGS: `{last['xla_flags']}`."]
(results / "summary.md").write_text("\n".join(out) + "\n")
print("\n".join(out))
EOF
echo "gpu.sh: done in $(($(date +%s) - START))s; summary in $RESULTS/summary.md"
exit $FAILED
