"""`plm-jax plan`: compile the run's train step for some devices and report what it needs.

    plan(cfg, topology=None, fit=None) -> dict   one compiled step (or a search over batch
                                                 sizes / remat policies), reported per device

The step is `train.loop.train_step_jit`, the function `pretrain` runs, with its shardings,
donation and gradient accumulation, lowered from shapes only: no state is allocated, no data
read, no tokenizer trained. With `topology` the devices are compile-only TPU devices (libtpu,
no TPU attached), so a pod's program compiles on a laptop.

What a plan is not: a measurement. Memory is the compiler's estimate for one execution of the
step; throughput is XLA's roofline bound (compute and memory traffic at peak), which a real
step does not reach.
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import numpy as np

from plm_jax.config import Config, ModelConfig, validate_for_devices
from plm_jax.data.pipeline import batch_shapes
from plm_jax.errors import ConfigError
from plm_jax.metrics import device_peak_flops, train_flops_per_token
from plm_jax.models import count_params
from plm_jax.models.attention import choose_attention
from plm_jax.models.sizes import resolve_compute_dtype, resolve_model_config
from plm_jax.plan.hlo import collectives
from plm_jax.plan.topology import chip_memory, hbm_bandwidth, topology_devices
from plm_jax.sharding import batch_sharding, make_mesh, use_mesh
from plm_jax.tokenizer import Tokenizer
from plm_jax.train.init_from import resolve_init_from
from plm_jax.train.loop import eval_step_jit, resolve_vocab, train_step_jit
from plm_jax.train.memory import HEADROOM, memory_limit
from plm_jax.train.optimizer import make_optimizer
from plm_jax.train.state import sharded_abstract_state, state_shardings

GIB = 2**30
# Remat policies, least recomputation first: `--fit remat` takes the first that fits.
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")
MAX_FIT_COMPILES = 10


@dataclasses.dataclass(frozen=True)
class _Vocab:  # what `resolve_vocab` reads of a tokenizer
    vocab_size: int
    path: str


def plan_model(cfg: Config, platform: str | None = None) -> tuple[Config, ModelConfig]:
    """The run's config (init_from resolved) and its model with the vocabulary filled in, as
    `pretrain` would build them, without training a tokenizer: one that exists (configured
    or already trained for this run) gives its size; otherwise `tokenizer.vocab_size` is the
    size the trained one will have. `model.dtype=auto` resolves for `platform` (the planned
    devices'; default: the attached ones)."""
    cfg = resolve_init_from(cfg)
    path = cfg.tokenizer.path or ""
    run_tokenizer = cfg.run_dir / "tokenizer"
    if not path and any(
        (run_tokenizer / f).is_file() for f in ("tokenizer.model", "tokenizer.json")
    ):
        path = str(run_tokenizer)
    size = Tokenizer.load(path).vocab_size if path else cfg.tokenizer.vocab_size
    model = resolve_vocab(cfg.model, _Vocab(size, path))
    model = dataclasses.replace(model, dtype=resolve_compute_dtype(model.dtype, platform))
    return cfg, resolve_model_config(model)


def _tree_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _compile(cfg: Config, model: ModelConfig, devices: list) -> dict[str, Any]:
    """Lowers and compiles the train step of (`cfg`, `model`) on `devices`."""
    validate_for_devices(cfg, len(devices))
    mesh = make_mesh(cfg.mesh, devices)
    tx = make_optimizer(cfg.train)
    with use_mesh(mesh, cfg.mesh.rules):
        shardings = state_shardings(model, tx, mesh, cfg.mesh.rules)
        state = sharded_abstract_state(model, tx, shardings)
        batch = {
            key: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(mesh, len(shape)))
            for key, (shape, dtype) in batch_shapes(cfg, model).items()
        }
        step = train_step_jit(cfg, model, mesh, shardings, cfg.train.grad_accum)
        start = time.perf_counter()
        refused = None
        try:
            compiled = step.lower(state, batch).compile()
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses what cannot fit
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, refused = None, str(e).splitlines()[0]
        seconds = time.perf_counter() - start
        eval_temp = None
        if compiled is not None:  # the eval step runs beside the whole train state
            evaluate = eval_step_jit(model, mesh, shardings, cfg.train.loss_chunk)
            try:
                analysis = evaluate.lower(state.params, batch).compile().memory_analysis()
                eval_temp = int(getattr(analysis, "temp_size_in_bytes", 0) or 0)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                refused = "the eval step: " + str(e).splitlines()[0]
    arguments = {
        "params": _tree_bytes(state.params),
        "optimizer": _tree_bytes(state.opt_state),
        "batch": _tree_bytes(batch),
        "other_state": _tree_bytes([state.step, state.rng, state.loss_window]),
    }
    if compiled is None:
        memory = {"temp_size_in_bytes": _refused_temporaries(refused or "")}
        memory["argument_size_in_bytes"] = sum(arguments.values())
        cost, hlo = {}, ""
    else:
        analysis = compiled.memory_analysis()
        memory = {name: int(getattr(analysis, name, 0) or 0) for name in MEMORY_FIELDS}
        cost, hlo = _cost(compiled), compiled.as_text()
    return {
        "mesh": mesh,
        "seconds": seconds,
        "memory": memory,
        "cost": cost,
        "hlo": hlo,
        "refused": refused,
        "eval_temp": eval_temp,
        **arguments,
    }


MEMORY_FIELDS = (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "alias_size_in_bytes",
    "temp_size_in_bytes",
    "generated_code_size_in_bytes",
)


def _refused_temporaries(message: str) -> int | None:
    """The temporaries a compiler that refused the program reported ("... HLO temporaries
    (30.05G) exceeds available HBM (15.75G)"), in bytes."""
    m = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    if m is None:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


def _cost(compiled: Any) -> dict[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _report(cfg: Config, model: ModelConfig, devices: list, built: dict[str, Any]) -> dict:
    mesh, memory = built["mesh"], built["memory"]
    n = len(devices)
    size = lambda name: memory.get(name) or 0  # noqa: E731
    outputs = max(size("output_size_in_bytes") - size("alias_size_in_bytes"), 0)
    need = size("argument_size_in_bytes") + outputs + size("temp_size_in_bytes")
    limit = _limit(devices)
    t = cfg.train
    shapes = batch_shapes(cfg, model)
    seq_len = shapes["inputs"][0][1]
    decoder_len = shapes["targets"][0][1] if model.family == "encoder_decoder" else None
    tokens = t.batch_size * seq_len
    flops = train_flops_per_token(model, model.vocab_size, seq_len, decoder_len)
    cost = built["cost"]
    scanned = model.use_scan_layers and model.num_layers > 1
    model_flops = flops["flops_per_token"] * tokens / n
    computed_flops = (flops["flops_per_token_noncausal"] + flops["lm_head_flops_per_token"]) * (
        tokens / n
    )
    peak = device_peak_flops(devices[0]) if devices[0].platform != "cpu" else None
    roofline = _roofline(cost, computed_flops, peak, hbm_bandwidth(devices[0]), scanned)
    if "step_seconds" in roofline:
        roofline["tokens_per_sec_per_device"] = tokens / n / roofline["step_seconds"]
        if peak:
            roofline["mfu"] = model_flops / roofline["step_seconds"] / peak
    report = {
        "model": {
            "family": model.family,
            "parameters": count_params(model),
            "layers": model.num_layers,
            "embed_dim": model.embed_dim,
            "vocab_size": model.vocab_size,
            "dtype": model.dtype,
            "remat": model.remat,
            "use_scan_layers": model.use_scan_layers,
            "attention": model.attention,
            "attention_kernel": choose_attention(
                model.attention, dtype=model.dtype, head_dim=model.head_dim, device=devices[0]
            ),
        },
        "devices": {
            "count": n,
            "kind": devices[0].device_kind,
            "platform": devices[0].platform,
            "mesh": {k: int(v) for k, v in mesh.shape.items()},
        },
        "batch": {
            "global": t.batch_size,
            "per_device": t.batch_size / (mesh.shape["data"] * mesh.shape["fsdp"]),
            "seq_len": seq_len,
            "tokens_per_step": tokens,
            "grad_accum": t.grad_accum,
        },
        "memory_per_device": {
            "parameters": built["params"],
            "optimizer_state": built["optimizer"],
            "other_state": built["other_state"],
            "batch": built["batch"],
            "temporaries": size("temp_size_in_bytes"),
            "outputs_not_aliased": max(
                size("output_size_in_bytes") - size("alias_size_in_bytes"), 0
            ),
            "generated_code": size("generated_code_size_in_bytes"),
            "total": need,
            "limit": limit[0] if limit else None,
            "limit_source": limit[1] if limit else "unknown for this device kind",
            "usable": int(HEADROOM * limit[0]) if limit else None,
        },
        "flops_per_device": {
            "model": model_flops,
            "model_formula": flops["formula"],
            "computed_formula": computed_flops,
            "xla": cost.get("flops"),
            "xla_counts_scanned_layer_once": scanned,
        },
        "collectives_per_step": collectives(built["hlo"], default_trips=model.num_layers),
        "roofline": roofline,
        "compile_seconds": built["seconds"],
    }
    if built["eval_temp"] is not None:
        state_bytes = built["params"] + built["optimizer"] + built["other_state"]
        eval_total = state_bytes + built["batch"] + built["eval_temp"]
        report["eval_step_per_device"] = {"temporaries": built["eval_temp"], "total": eval_total}
        need = max(need, eval_total)
    headroom = None if limit is None else int(HEADROOM * limit[0]) - need
    report["memory_per_device"]["headroom"] = headroom
    report["fits"] = None if headroom is None else headroom >= 0
    if built["refused"]:
        report["compiler_refused"] = built["refused"]
        report["fits"] = False
    return report


def _roofline(
    cost: dict, computed_flops: float, peak: float | None, bandwidth: float | None, scanned: bool
) -> dict[str, Any]:
    """The least time a step can take on one device: its FLOPs at peak or its memory traffic
    at full HBM bandwidth, whichever is longer (collectives and overlap left out).

    The FLOPs are the formula's, masked attention and head included (XLA's count misses all
    but one scanned layer); the traffic is XLA's `bytes accessed`, used only when no layer is
    scanned. The compiler's own `optimal_seconds` is kept when it is positive (compile-only
    TPU devices report a negative one).
    """
    out: dict[str, Any] = {"bound": True}
    if peak is None:
        out["why_not"] = "no peak FLOP/s is known for this device kind"
        return out
    out["compute_seconds"] = computed_flops / peak
    traffic = cost.get("bytes accessed")
    if bandwidth and traffic and not scanned:
        out["memory_seconds"] = traffic / bandwidth
    else:
        out["memory_seconds_why_not"] = (
            "XLA's cost model counts a scanned layer once; set model.use_scan_layers=false"
            if scanned
            else "no HBM bandwidth is known for this device kind"
        )
    out["step_seconds"] = max(out["compute_seconds"], out.get("memory_seconds", 0.0))
    out["limited_by"] = (
        "memory" if out.get("memory_seconds", 0) > out["compute_seconds"] else "compute"
    )
    if (cost.get("optimal_seconds") or 0) > 0:
        out["compiler_optimal_seconds"] = cost["optimal_seconds"]
    return out


def _limit(devices: list) -> tuple[int, str] | None:
    """(bytes one device may use, where the figure comes from): the chip's memory, or on CPU
    the available host memory split between the local CPU devices."""
    if devices[0].platform == "cpu":
        found = memory_limit(devices)
        return None if found is None else (found[0] // found[1], found[2])
    return chip_memory(devices[0])


def devices_for(topology: str | None) -> list:
    """Compile-only TPU devices for `topology`, else the attached devices."""
    return topology_devices(topology) if topology else list(jax.devices())


def plan(cfg: Config, *, topology: str | None = None, fit: str | None = None) -> dict:
    """Compiles `cfg`'s train step for `topology` (or the attached devices) and reports it.

    Args:
      cfg: a pretraining config.
      topology: a TPU slice (`v5p-32`, `v5e:2x4`) for compile-only devices, or None.
      fit: None; "batch": the largest per-device batch that fits; "remat": the cheapest
        `model.remat` that fits.

    Returns:
      The report of the plan (see `_report`), with "tried" (each setting compiled and whether
      it fit) when `fit` searches.

    Raises:
      ConfigError: a fine-tuning config, an unknown `fit`, or a topology that is not a slice.
    """
    if cfg.task.name:
        raise ConfigError(
            f"plm-jax plan compiles pretraining steps; task.name={cfg.task.name!r} is a "
            "fine-tuning config, whose step `plm-jax finetune` checks against memory before its "
            "first step"
        )
    if fit not in (None, "batch", "remat"):
        raise ConfigError(f"--fit {fit!r}: choose batch or remat")
    devices = devices_for(topology)
    cfg, model = plan_model(cfg, devices[0].platform)

    def at(c: Config, m: ModelConfig) -> dict:
        return _report(c, m, devices, _compile(c, m, devices))

    if fit is None:
        return at(cfg, model)
    if fit == "remat":
        return _fit_remat(cfg, model, at)
    return _fit_batch(cfg, model, at, devices)


def _with(cfg: Config, model: ModelConfig, **changes: Any) -> tuple[Config, ModelConfig]:
    train = {k: v for k, v in changes.items() if k in ("batch_size",)}
    mod = {k: v for k, v in changes.items() if k not in train}
    cfg = dataclasses.replace(
        cfg,
        train=dataclasses.replace(cfg.train, **train),
        model=dataclasses.replace(cfg.model, **mod),
    )
    return cfg, dataclasses.replace(model, **mod)


def _fit_remat(cfg: Config, model: ModelConfig, at) -> dict:
    tried = []
    for policy in REMAT_ORDER:
        report = at(*_with(cfg, model, remat=policy))
        tried.append({"model.remat": policy, "total": report["memory_per_device"]["total"]})
        tried[-1]["fits"] = report["fits"]
        if report["fits"] is not False:
            report["tried"] = tried
            return report
    report["tried"] = tried
    return report


def _fit_batch(cfg: Config, model: ModelConfig, at, devices: list) -> dict:
    """Doubles the per-device batch until it does not fit, then bisects (compiles are
    counted: at most `MAX_FIT_COMPILES`)."""
    probe = make_mesh(cfg.mesh, devices)
    shards = probe.shape["data"] * probe.shape["fsdp"]
    accum = cfg.train.grad_accum
    tried, best, best_report, last = [], 0, None, None

    def attempt(per_device: int) -> bool:
        nonlocal best, best_report, last
        report = at(*_with(cfg, model, batch_size=per_device * shards))
        last = report
        fits = report["fits"] is not False
        tried.append(
            {
                "per_device_batch": per_device,
                "total": report["memory_per_device"]["total"],
                "fits": fits,
            }
        )
        if fits and per_device > best:
            best, best_report = per_device, report
        return fits

    low, high = 0, None
    per_device = accum  # a micro-batch needs at least one row per shard
    while len(tried) < MAX_FIT_COMPILES:
        if attempt(per_device):
            low, per_device = per_device, per_device * 2
        else:
            high = per_device
            break
    while high is not None and high - low > accum and len(tried) < MAX_FIT_COMPILES:
        mid = (low + high) // 2 // accum * accum
        if mid <= low:
            break
        if attempt(mid):
            low = mid
        else:
            high = mid
    report = best_report if best_report is not None else last
    report["tried"] = tried
    return report
