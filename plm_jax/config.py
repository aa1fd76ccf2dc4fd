"""Typed run configuration: frozen dataclasses, YAML deltas, dotted overrides, validation.

The dataclasses below are the single source of defaults; the defaults *are* the quick start
(a tiny GPT on the built-in corpus), so `plm-jax pretrain` with no arguments needs no file.
A YAML file holds only differences, and CLI arguments `section.key=value` override both.
Resolution order, later wins: dataclass defaults < model preset < YAML file < CLI overrides.

`validate()` checks the cross-field constraints that need no devices; `validate_for_devices()`
the ones that depend on the device count (mesh sizes, batch divisibility). Neither touches jax.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from plm_jax.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DistributedConfig",
    "MeshConfig",
    "ModelConfig",
    "RunConfig",
    "TaskConfig",
    "TokenizerConfig",
    "TrainConfig",
    "MODEL_PRESETS",
    "check_resume",
    "config_to_dict",
    "load_config",
    "save_config",
    "validate",
    "validate_for_devices",
]


@dataclass(frozen=True)
class RunConfig:
    name: str = "quickstart"
    dir: str = ""  # "" means runs/<name>
    seed: int = 0
    # Where metrics go besides <run.dir>/metrics.jsonl (always written): TensorBoard events in
    # <run.dir>/tensorboard/, and W&B (pip install wandb; WANDB_MODE=offline writes
    # <run.dir>/wandb/ for a later `wandb sync`). See plm_jax/tracking.py.
    trackers: list[Literal["tensorboard", "wandb"]] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "plm_jax"


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "tiny"
    family: Literal["decoder", "encoder", "encoder_decoder"] = "decoder"
    vocab_size: int = 0  # 0: take the tokenizer's vocabulary size
    num_layers: int = 4  # encoder_decoder: the encoder's layers
    num_decoder_layers: int = 0  # encoder_decoder only; 0: same as num_layers
    embed_dim: int = 128
    num_heads: int = 4
    num_kv_heads: int = 0  # 0: same as num_heads (multi-head); 1: multi-query; else grouped
    head_dim: int = 0  # 0: embed_dim // num_heads
    mlp_dim: int = 0  # 0: 4 * embed_dim
    max_seq_len: int = 128
    # relative: T5's bucketed relative position bias (encoder_decoder only)
    position: Literal["learned", "rope", "relative"] = "learned"
    relative_buckets: int = 32  # position=relative: buckets per direction pair (T5: 32)
    relative_max_distance: int = 128  # distances at or beyond this share the last bucket
    rope_theta: float = 10000.0
    # Llama 3.1+ frequency scaling of RoPE: "" for none, "llama3" with the four settings below.
    rope_scaling: Literal["", "llama3"] = ""
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    norm_placement: Literal["pre", "post"] = "pre"  # post: BERT's x = Norm(x + Sublayer(x))
    # gelu: tanh approximation (GPT-2); relu: T5 v1.0; geglu: gated tanh-GELU (T5 v1.1)
    mlp: Literal["gelu", "gelu_exact", "swiglu", "relu", "geglu"] = "gelu"
    use_bias: bool = True
    tie_embeddings: bool = True
    # Encoder only: token-type (segment A/B) embeddings, the [CLS] pooler and the MLM head.
    type_vocab_size: int = 2
    use_pooler: bool = True
    use_mlm_head: bool = True
    dropout: float = 0.0
    # auto: splash on TPU, cudnn on a GPU that can run it, xla otherwise (models/attention.py)
    attention: Literal["auto", "xla", "cudnn", "splash", "splash_interpret"] = "xla"
    use_scan_layers: bool = False
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    # Compute dtype; parameters (the optimizer's master copy) are stored in param_dtype.
    # auto: bfloat16 on GPU and TPU, float32 on CPU (resolved where the model is built).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    param_dtype: Literal["float32", "bfloat16"] = "float32"


# T5 (Raffel et al. 2020): pre-norm RMSNorm without biases, relative position buckets, an
# input embedding shared by encoder and decoder; v1.0 (t5-small/base) ReLU and a tied head.
_T5: dict[str, Any] = dict(
    family="encoder_decoder",
    vocab_size=32128,
    max_seq_len=512,
    position="relative",
    relative_buckets=32,
    relative_max_distance=128,
    norm="rmsnorm",
    norm_eps=1e-6,
    mlp="relu",
    use_bias=False,
    tie_embeddings=True,
)

_BERT: dict[str, Any] = dict(
    family="encoder",
    vocab_size=30522,
    max_seq_len=512,
    position="learned",
    norm="layernorm",
    norm_eps=1e-12,
    norm_placement="post",
    mlp="gelu_exact",
    use_bias=True,
    tie_embeddings=True,
    type_vocab_size=2,
)

_GPT2: dict[str, Any] = dict(
    vocab_size=50257,
    max_seq_len=1024,
    position="learned",
    norm="layernorm",
    mlp="gelu",
    use_bias=True,
    tie_embeddings=True,
)

_LLAMA3: dict[str, Any] = dict(
    vocab_size=128256,
    num_kv_heads=8,
    max_seq_len=8192,
    position="rope",
    rope_theta=500000.0,
    norm="rmsnorm",
    norm_eps=1e-5,
    mlp="swiglu",
    use_bias=False,
)
_LLAMA32: dict[str, Any] = dict(
    _LLAMA3,
    tie_embeddings=True,
    rope_scaling="llama3",
    rope_scaling_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_len=8192,
)

# Published shapes. A preset fills the model section before the YAML file and the overrides,
# so `model.preset=gpt2-124m model.num_layers=6` is a 6-layer GPT-2.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "gpt2-124m": dict(_GPT2, num_layers=12, embed_dim=768, num_heads=12),
    "gpt2-350m": dict(_GPT2, num_layers=24, embed_dim=1024, num_heads=16),
    # Llama 3.2 1B's shapes at 2048 positions, without its RoPE scaling.
    "llama-1b": dict(
        _LLAMA3,
        num_layers=16,
        embed_dim=2048,
        num_heads=32,
        head_dim=64,
        mlp_dim=8192,
        max_seq_len=2048,
        tie_embeddings=True,
    ),
    # Llama 3 and 3.2 (Meta 2024, the checkpoints' config.json): GQA with 8 kv heads, RoPE
    # theta 500k, vocabulary 128256. 3.2 ties the head and scales RoPE ("llama3", factor 32);
    # 3.0 does not. max_seq_len is the 8192-token pretraining length, not 3.2's 131072-token
    # extended context (RoPE has no position table: model.max_seq_len=131072 is the same model).
    "llama-3-8b": dict(
        _LLAMA3, num_layers=32, embed_dim=4096, num_heads=32, mlp_dim=14336, tie_embeddings=False
    ),
    "llama-3-70b": dict(
        _LLAMA3, num_layers=80, embed_dim=8192, num_heads=64, mlp_dim=28672, tie_embeddings=False
    ),
    "llama-3.2-1b": dict(
        _LLAMA32, num_layers=16, embed_dim=2048, num_heads=32, head_dim=64, mlp_dim=8192
    ),
    "llama-3.2-3b": dict(
        _LLAMA32, num_layers=28, embed_dim=3072, num_heads=24, head_dim=128, mlp_dim=8192
    ),
    # GPT-2 (Radford et al. 2019) medium (= gpt2-350m), large and xl.
    "gpt2-medium": dict(_GPT2, num_layers=24, embed_dim=1024, num_heads=16),
    "gpt2-large": dict(_GPT2, num_layers=36, embed_dim=1280, num_heads=20),
    "gpt2-xl": dict(_GPT2, num_layers=48, embed_dim=1600, num_heads=25),
    # BERT (Devlin et al. 2019): post-norm, exact GELU, token types, pooler, tied MLM head.
    "bert-base": dict(_BERT, num_layers=12, embed_dim=768, num_heads=12, mlp_dim=3072),
    "bert-large": dict(_BERT, num_layers=24, embed_dim=1024, num_heads=16, mlp_dim=4096),
    "bert-tiny": dict(_BERT, num_layers=2, embed_dim=128, num_heads=2, mlp_dim=512),
    "t5-small": dict(
        _T5,
        num_layers=6,
        num_decoder_layers=6,
        embed_dim=512,
        num_heads=8,
        head_dim=64,
        mlp_dim=2048,
    ),
    "t5-base": dict(
        _T5,
        num_layers=12,
        num_decoder_layers=12,
        embed_dim=768,
        num_heads=12,
        head_dim=64,
        mlp_dim=3072,
    ),
    # T5 v1.0 large (HF t5-large: ReLU, tied head), as t5-small and t5-base.
    "t5-large": dict(
        _T5,
        num_layers=24,
        num_decoder_layers=24,
        embed_dim=1024,
        num_heads=16,
        head_dim=64,
        mlp_dim=4096,
    ),
    # A test size in the v1.1 style (gated GELU, untied head); vocabulary from the tokenizer.
    "t5-tiny": dict(
        {k: v for k, v in _T5.items() if k != "vocab_size"},
        max_seq_len=128,
        num_layers=2,
        num_decoder_layers=2,
        embed_dim=64,
        num_heads=4,
        head_dim=16,
        mlp_dim=128,
        mlp="geglu",
        tie_embeddings=False,
    ),
}


@dataclass(frozen=True)
class TokenizerConfig:
    path: str = ""  # "" trains a SentencePiece model on data.source into <run.dir>/tokenizer
    vocab_size: int = 4096
    model_type: Literal["bpe", "unigram"] = "bpe"
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    pad_piece: str = "<pad>"
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    mask_piece: str = "<mask>"  # "" for no mask token
    user_defined_symbols: list[str] = field(default_factory=list)
    max_train_bytes: int = 200_000_000  # text sampled for training; the rest is not read
    # Span corruption's <extra_id_0>..<extra_id_{n-1}>, added as user-defined pieces when a
    # tokenizer is trained for model.family=encoder_decoder (T5: 100).
    num_sentinels: int = 100


@dataclass(frozen=True)
class DataConfig:
    source: str | list[str] = "builtin:python-stdlib"
    format: Literal["auto", "text", "jsonl"] = "auto"  # auto: by file extension
    text_field: str = "text"
    doc_split: Literal["blank_line", "file", "line"] = "blank_line"
    encoding_errors: Literal["strict", "replace"] = "strict"
    eval_fraction: float = 0.02  # documents held out for evaluation, chosen by content hash
    add_bos: bool = True
    # Masked-LM (model.family=encoder): the share of tokens predicted, of which 80% become the
    # mask token, 10% a random token and 10% stay; whole words (all their pieces) at once.
    mask_prob: float = 0.15
    whole_word_mask: bool = False
    # Span corruption (model.family=encoder_decoder): the share of each document's tokens
    # replaced, in spans of this mean length, each span by one sentinel (T5: 0.15 and 3).
    noise_density: float = 0.15
    mean_span_length: float = 3.0
    cache_dir: str = ""  # "" means $PLM_JAX_CACHE or ~/.cache/plm_jax
    tokenize_threads: int = 0  # 0: all cores
    shard_tokens: int = 1 << 26  # tokens per on-disk shard
    loader_threads: int = 2
    prefetch: int = 4


MAX_SPIKE_WINDOW = 1024  # the loss history kept in the train state (train.spike_window <= it)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 16  # global, in sequences
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    # Downstream tasks scored at every evaluation, logged as eval/<task>/acc: local
    # multiple-choice JSONL files or lm-eval multiple_choice task names (plm_jax/evals).
    evals: list[str] = field(default_factory=list)
    evals_limit: int = 200  # examples per task: the first ones, the same at every evaluation
    evals_include_path: str = ""  # a directory of local lm-eval YAML tasks for train.evals
    # A step whose loss or gradient norm is NaN/Inf: "abort" stops the run before anything
    # non-finite is saved (naming the step and batch); "skip" leaves params and optimizer
    # state unchanged and goes on with the next batch.
    nonfinite: Literal["abort", "skip"] = "abort"
    max_skipped: int = 10  # consecutive skipped steps (non-finite or spikes) before aborting
    # Loss-spike skipping: a step whose loss exceeds mean + spike_zscore * std of the previous
    # `spike_window` losses (once the window is full) is skipped; 0 disables. The window lives
    # in the train state, so it survives resume.
    spike_window: int = 0
    spike_zscore: float = 6.0
    # Decoder pretraining: > 0 computes the output head and the loss this many sequence
    # positions at a time (recomputed chunk by chunk backward), so the [batch, seq, vocab]
    # float32 logits and their gradient never exist whole; 0 computes them at once.
    loss_chunk: int = 0
    # AdamW's first moment (optax mu_dtype): "" keeps the parameters' dtype; bfloat16 halves
    # its memory. The second moment stays in the parameters' dtype.
    mu_dtype: Literal["", "float32", "bfloat16"] = ""


# Logical axis -> mesh axes. Weights use embed/mlp/heads/...; activations use act_*; FSDP shards
# weights on `embed` while activations stay sharded on the batch.
DEFAULT_AXIS_RULES: dict[str, Any] = {
    "act_batch": ["data", "fsdp"],
    "act_seq": None,
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "vocab": "tensor",
    "layers": None,
}


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices left over by the other axes
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_AXIS_RULES))


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: int = 200
    keep: int = 3  # the newest `keep` checkpoints stay
    keep_best: bool = False  # also keep the one with the lowest eval/loss (saved at eval steps)
    use_async: bool = True
    verify: bool = True  # check every file's checksum before restoring (falls back if corrupt)


@dataclass(frozen=True)
class TaskConfig:
    """Fine-tuning (`plm-jax finetune`): the task, its files and its evaluation."""

    name: Literal["", "classification", "regression", "qa", "translation"] = ""
    train_file: str = ""
    eval_file: str = ""  # "" holds out `holdout_fraction` of train_file instead
    holdout_fraction: float = 0.1
    text_field: str = "text"
    pair_field: str = "text_pair"
    label_field: str = "label"
    pooling: Literal["auto", "pooler", "cls", "mean", "last"] = "auto"
    epochs: int = 0  # > 0: train this many epochs (train.steps is then derived)
    metric: str = ""  # model selection; "": accuracy, pearson or f1 by task
    patience: int = 0  # evaluations without improvement before stopping; 0 = never stop early
    layer_lr_decay: float = 1.0  # < 1: layer i of L gets lr * decay^(L - i), embeddings ^(L+1)
    max_query_len: int = 64  # QA: question tokens kept
    doc_stride: int = 128  # QA: context tokens shared by consecutive windows
    n_best: int = 20
    max_answer_len: int = 30  # QA: answer tokens at most
    null_threshold: float = 0.0  # QA v2: predict no answer when null score - best > this
    version_2: bool = False  # QA: SQuAD v2 (unanswerable questions)
    # Translation: JSONL pairs (train_file/eval_file), or two aligned one-sentence-a-line files.
    source_field: str = "source"
    target_field: str = "target"
    source_file: str = ""  # with target_file, instead of train_file
    target_file: str = ""
    max_target_len: int = 0  # target tokens with eos; 0: model.max_seq_len
    overlong: Literal["truncate", "error"] = "truncate"  # pairs longer than the limits
    label_smoothing: float = 0.0
    beam_size: int = 4  # 1: greedy
    length_penalty: float = 1.0
    max_decode_len: int = 0  # 0: max_target_len


ClusterDetection = Literal["none", "auto", "slurm", "ompi", "mpi4py", "gcetpu", "gketpu"]


@dataclass(frozen=True)
class DistributedConfig:
    """Multi-process runs (several hosts, or several processes on one host); see docs/multihost.md.

    Empty values come from the environment `plm-jax launch` sets ($PLM_JAX_COORDINATOR,
    $PLM_JAX_NUM_PROCESSES, $PLM_JAX_PROCESS_ID), or from JAX's cluster detection when
    `cluster_detection` asks for it; with none of these the run is one process.
    """

    coordinator_address: str = ""  # host:port where process 0 serves the coordination service
    num_processes: int = 0  # 0: from the environment or cluster detection (1 if neither)
    process_id: int = -1  # -1: from the environment or cluster detection
    # "none": only the values above; "auto": whatever JAX detects (single process if nothing);
    # a JAX method name (jax.distributed.initialize's cluster_detection_method): that
    # environment must be present.
    cluster_detection: ClusterDetection = "none"
    initialization_timeout: int = 300  # seconds for every process to connect
    heartbeat_timeout: int = 100  # seconds of silence before a process counts as dead
    shutdown_timeout: int = 300  # seconds process 0 waits for the others at exit
    prepare_timeout: int = 7200  # seconds the others wait while process 0 prepares the data


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    init_from: str = ""
    # The dotted keys the user wrote (YAML file and overrides; a preset counts as its fields),
    # filled by `load_config`. Not a setting: never saved, never parsed, ignored by ==. It lets
    # `init_from` honour what the user gave and take the rest from the source.
    given: frozenset[str] = field(
        default=frozenset(), compare=False, repr=False, metadata={"internal": True}
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or f"runs/{self.run.name}")


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> nested dict -> typed dataclasses.


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Resolves a config from defaults, an optional YAML delta and `key=value` overrides.

    Args:
      path: YAML file holding differences from the defaults, or None for the quick start.
      overrides: dotted `section.key=value` strings; values are parsed as YAML scalars/lists.

    Returns:
      The validated `Config`.

    Raises:
      ConfigError: unreadable file, unknown key, wrong type, or a failed cross-field check.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
        raw.setdefault("run", {})
        if isinstance(raw["run"], dict):
            raw["run"].setdefault("name", Path(path).stem)
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
    cfg = dataclasses.replace(config_from_dict(raw), given=given_keys(raw))
    validate(cfg)
    return cfg


def given_keys(raw: dict[str, Any]) -> frozenset[str]:
    """The dotted leaf keys of a nested dict of differences; `model.preset` adds its fields."""
    keys: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "rules":
                walk(value, f"{prefix}{key}.")
            else:
                keys.add(f"{prefix}{key}")

    walk(raw, "")
    model = raw.get("model", {})
    if isinstance(model, dict) and model.get("preset") in MODEL_PRESETS:
        keys |= {f"model.{name}" for name in MODEL_PRESETS[model["preset"]]}
    return frozenset(keys)


def _is_setting(f: dataclasses.Field) -> bool:
    return not f.metadata.get("internal", False)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Builds a `Config` from a nested dict of differences (no validation beyond types)."""
    raw = _copy_nested(raw)
    model_raw = raw.get("model", {})
    if not isinstance(model_raw, dict):
        raise ConfigError(f"'model' must be a mapping of model settings, got {model_raw!r}")
    preset = model_raw.get("preset", ModelConfig.preset)
    if not isinstance(preset, str) or preset not in MODEL_PRESETS:
        raise ConfigError(
            f"model.preset={preset!r} is not a known preset; choose one of "
            f"{sorted(MODEL_PRESETS)}{_suggest(str(preset), list(MODEL_PRESETS))}"
        )
    raw["model"] = {**MODEL_PRESETS[preset], **model_raw}
    return _build(Config, raw, prefix="")


def config_to_dict(cfg: Any) -> Any:
    """The resolved config as plain YAML-safe data (nested dicts, lists, scalars)."""
    if dataclasses.is_dataclass(cfg):
        fields = filter(_is_setting, dataclasses.fields(cfg))
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in fields}
    if isinstance(cfg, dict):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [config_to_dict(v) for v in cfg]
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Writes the fully resolved config as YAML (readable back by `load_config`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    tmp.replace(path)


# Settings that may change between segments of one run (resuming from a checkpoint): how long
# it trains, how often it logs, evaluates and saves, where it runs and reads its cache, and
# runtime choices that keep the math. Every other difference is refused by `check_resume`.
RESUMABLE_KEYS = (
    "run.name",
    "run.dir",
    "init_from",
    "tokenizer.path",
    "data.cache_dir",
    "data.tokenize_threads",
    "data.loader_threads",
    "data.prefetch",
    "train.steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.evals",
    "train.evals_limit",
    "train.evals_include_path",
    "run.trackers",
    "run.wandb_project",
    "train.nonfinite",
    "train.max_skipped",
    "train.spike_window",
    "train.spike_zscore",
    "train.loss_chunk",
    "model.attention",
    "model.remat",
    "task.epochs",
    "task.patience",
    "task.n_best",
    "task.null_threshold",
    "task.beam_size",
    "task.length_penalty",
    "task.max_decode_len",
)
RESUMABLE_SECTIONS = ("checkpoint.", "mesh.", "distributed.")


def check_resume(saved: dict[str, Any], cfg: Config, where: str | Path, step: int) -> list[str]:
    """The keys that differ between a checkpoint's config and this run's, if all may differ.

    A step-0 checkpoint (`plm-jax convert` writes one) has trained on nothing, so only what
    fixes the weights' meaning (`model.*`, `tokenizer.*`) must match; data and training
    settings are the new run's to choose.

    Args:
      saved: the config stored with the checkpoint (`config_to_dict` of the run that saved it).
      cfg: this run's config, resolved the same way.
      where: the checkpoint, for the message.
      step: the checkpoint's step.

    Returns:
      The differing keys that may change between segments (`RESUMABLE_KEYS`), for the log.

    Raises:
      ConfigError: a key that may not change differs; the message lists each with both values.
    """
    before = _flatten(config_to_dict(config_from_dict(saved)))
    now = _flatten(config_to_dict(cfg))
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    allowed = [
        k
        for k in changed
        if k in RESUMABLE_KEYS
        or k.startswith(RESUMABLE_SECTIONS)
        or (step == 0 and not k.startswith(("model.", "tokenizer.")))
    ]
    refused = [k for k in changed if k not in allowed]
    if refused:
        shown = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in refused[:6])
        more = f"; ... {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"resuming from {where}: this run's config differs from the checkpoint's in "
            f"{len(refused)} setting(s) that cannot change within a run ({shown}{more}); "
            "give the values it was trained with, or start a new run with another run.dir"
        )
    return allowed


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "rules":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every valid dotted key, e.g. `train.steps`; used for typo suggestions and docs."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in filter(_is_setting, dataclasses.fields(cls)):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], key + ".")
        else:
            keys.append(key)
    return keys


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found; pass an existing YAML file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, ValueError) as e:  # ValueError: not UTF-8, or a 4300+ digit int
        first = " ".join(str(e).split())
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {first}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of sections "
            f"(run, model, data, ...), got {type(data).__name__}"
        )
    return data


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(c.isspace() for c in key):
        raise ConfigError(
            f"override {item!r} is not of the form section.key=value (e.g. train.steps=100)"
        )
    try:
        value = yaml.safe_load(text) if text else ""
    except (yaml.YAMLError, ValueError):  # ValueError: an integer of 4300+ digits
        value = text  # not YAML: keep the raw string, the type check decides
    return key, value


def _set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _copy_nested(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _copy_nested(v) for k, v in raw.items()}
    return raw


def _suggest(key: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # slow: it evaluates every annotation string


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}; "
            f"write it as a YAML section or use {prefix}KEY=VALUE"
        )
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if _is_setting(f)}
    for key in raw:
        if key not in names:
            full = prefix + _first_leaf(key, raw[key])
            hint = _suggest(full, all_keys())
            if hint:
                raise ConfigError(f"unknown config key {full!r}{hint}")
            where = prefix.rstrip(".") or "the top level"
            raise ConfigError(
                f"unknown config key {full!r}; valid keys under {where} are {sorted(names)}"
            )
    kwargs = {}
    for f in filter(_is_setting, dataclasses.fields(cls)):
        if f.name not in raw:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            kwargs[f.name] = _build(kind, raw[f.name], prefix + f.name + ".")
        elif isinstance(raw[f.name], dict) and typing.get_origin(kind) is not dict:
            leaf = prefix + _first_leaf(f.name, raw[f.name])
            raise ConfigError(
                f"unknown config key {leaf!r}: {prefix + f.name!r} is a value, not a section"
            )
        elif typing.get_origin(kind) is dict and f.default_factory is not dataclasses.MISSING:
            # A table (mesh.rules) keeps its defaults: `mesh.rules.embed=null` changes one entry.
            value = _coerce(prefix + f.name, raw[f.name], kind)
            kwargs[f.name] = {**f.default_factory(), **value}
        else:
            kwargs[f.name] = _coerce(prefix + f.name, raw[f.name], kind)
    return cls(**kwargs)


def _first_leaf(key: Any, value: Any) -> str:
    """`not.a.key` for {'not': {'a': {'key': 1}}}, so errors name what the user wrote."""
    while isinstance(value, dict) and len(value) == 1:
        ((child, value),) = value.items()
        key = f"{key}.{child}"
    return str(key)


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Checks `value` against the annotation `kind`, converting only lossless spellings."""
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(
                f"{key}={value!r} is not allowed; choose one of {list(choices)}"
                f"{_suggest(str(value), [str(c) for c in choices])}"
            )
        return value
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(kind):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r} has the wrong type; expected {_type_name(kind)}")
    if origin is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, str) and item is str and kind is not str:
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[a,b]")
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[a,b]")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r} must be a mapping")
        return {str(k): v for k, v in value.items()}
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            if -(2**63) <= value < 2**63:
                return value
            raise ConfigError(f"{key}={value!r} is out of range; integers must fit in 64 bits")
        raise ConfigError(f"{key}={value!r} must be an integer")
    if kind is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        if isinstance(number, bool) or not isinstance(number, int | float):
            raise ConfigError(f"{key}={value!r} must be a number")
        if not -1e308 < number < 1e308:  # also NaN, and ints float() cannot hold
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return float(number)
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if type(value) is datetime.date:  # YAML reads run.name=2024-05-01 as a date
            return value.isoformat()
        raise ConfigError(f"{key}={value!r} must be a string")
    raise TypeError(f"config field {key} has an unsupported annotation {kind!r}")


def _type_name(kind: Any) -> str:
    return " or ".join(getattr(a, "__name__", str(a)) for a in typing.get_args(kind)) or str(kind)


# ---------------------------------------------------------------------------------------------
# Validation.

# The evaluation metrics each fine-tuning task reports (plm_jax.tasks), so that task.metric is
# checked before training rather than at the first evaluation. Binary f1 needs two classes and
# the HasAns/NoAns scores SQuAD v2 data.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1", "mcc", "f1", "loss"),
    "regression": ("pearson", "spearman", "mse", "loss"),
    "qa": ("f1", "exact_match", "HasAns_f1", "HasAns_exact_match", "NoAns_f1", "NoAns_exact_match"),
}


def validate(cfg: Config) -> None:
    """Checks every cross-field constraint that needs no devices.

    Raises:
      ConfigError: naming the keys, their values and what to change.
    """
    m, t, d, tok = cfg.model, cfg.train, cfg.data, cfg.tokenizer
    positive = {
        "model.num_layers": m.num_layers,
        "model.embed_dim": m.embed_dim,
        "model.num_heads": m.num_heads,
        "model.max_seq_len": m.max_seq_len,
        "train.steps": t.steps,
        "train.batch_size": t.batch_size,
        "train.grad_accum": t.grad_accum,
        "train.log_every": t.log_every,
        "train.eval_every": t.eval_every,
        "train.evals_limit": t.evals_limit,
        "train.max_skipped": t.max_skipped,
        "checkpoint.save_every": cfg.checkpoint.save_every,
        "checkpoint.keep": cfg.checkpoint.keep,
        "data.shard_tokens": d.shard_tokens,
        "data.loader_threads": d.loader_threads,
        "data.prefetch": d.prefetch,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    non_negative = {
        "model.vocab_size": m.vocab_size,
        "model.num_kv_heads": m.num_kv_heads,
        "model.num_decoder_layers": m.num_decoder_layers,
        "model.head_dim": m.head_dim,
        "model.mlp_dim": m.mlp_dim,
        "train.warmup_steps": t.warmup_steps,
        "train.eval_batches": t.eval_batches,
        "data.tokenize_threads": d.tokenize_threads,
        "run.seed": cfg.run.seed,
        "train.weight_decay": t.weight_decay,
        "train.grad_clip": t.grad_clip,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{key}={value} must be >= 0")
    int32 = {
        "train.steps": t.steps,
        "model.max_seq_len": m.max_seq_len,
        "model.vocab_size": m.vocab_size,
        "tokenizer.vocab_size": tok.vocab_size,
    }
    for key, value in int32.items():
        if value >= 2**31:
            raise ConfigError(
                f"{key}={value} must be below 2**31: jax counts steps, positions and token ids "
                "in int32"
            )
    if cfg.run.seed >= 2**32:
        raise ConfigError(f"run.seed={cfg.run.seed} must be below 2**32 (jax and grain seeds)")
    for key, value in {"train.beta1": t.beta1, "train.beta2": t.beta2}.items():
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}={value} must be in [0, 1); AdamW uses 0.9 and 0.95-0.999")
    for key, value in {"model.norm_eps": m.norm_eps, "model.rope_theta": m.rope_theta}.items():
        if not value > 0:
            raise ConfigError(f"{key}={value} must be positive")
    if not t.lr > 0:
        raise ConfigError(f"train.lr={t.lr} must be positive")
    if not 0 <= t.spike_window <= MAX_SPIKE_WINDOW:
        raise ConfigError(
            f"train.spike_window={t.spike_window} must be in [0, {MAX_SPIKE_WINDOW}] (0 disables)"
        )
    if not t.spike_zscore > 0:
        raise ConfigError(f"train.spike_zscore={t.spike_zscore} must be positive")
    _validate_loss_chunk(cfg)
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if t.warmup_steps >= t.steps:
        raise ConfigError(
            f"train.warmup_steps={t.warmup_steps} must be smaller than train.steps={t.steps}; "
            "lower the warmup or train longer"
        )
    if t.batch_size % t.grad_accum:
        raise ConfigError(
            f"train.batch_size={t.batch_size} is not divisible by train.grad_accum={t.grad_accum}; "
            "each micro-batch holds batch_size / grad_accum sequences"
        )
    kv_heads = m.num_kv_heads or m.num_heads
    if m.num_heads % kv_heads:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by model.num_kv_heads={kv_heads}; "
            "each kv head serves a whole group of query heads"
        )
    if not m.head_dim and m.embed_dim % m.num_heads:
        raise ConfigError(
            f"model.embed_dim={m.embed_dim} is not divisible by model.num_heads={m.num_heads}; "
            "set model.head_dim explicitly or pick a dividing head count"
        )
    if m.position == "rope" and (m.head_dim or m.embed_dim // m.num_heads) % 2:
        raise ConfigError("RoPE rotates pairs of channels: the head dimension must be even")
    if m.rope_scaling and not (
        m.rope_scaling_factor >= 1.0
        and m.rope_high_freq_factor > m.rope_low_freq_factor > 0
        and m.rope_original_max_len > 0
    ):
        raise ConfigError(
            "model.rope_scaling=llama3 needs rope_scaling_factor >= 1, "
            "rope_high_freq_factor > rope_low_freq_factor > 0 and rope_original_max_len > 0"
        )
    if m.family == "encoder" and m.type_vocab_size < 0:
        raise ConfigError(f"model.type_vocab_size={m.type_vocab_size} must be >= 0")
    if m.rope_scaling and m.position != "rope":
        raise ConfigError("model.rope_scaling needs model.position=rope")
    _validate_model_variants(m)
    task = cfg.task
    if not 0.0 <= task.holdout_fraction < 1.0:
        raise ConfigError(f"task.holdout_fraction={task.holdout_fraction} must be in [0, 1)")
    if task.epochs < 0 or task.patience < 0:
        raise ConfigError("task.epochs and task.patience must be >= 0")
    if not 0.0 < task.layer_lr_decay <= 1.0:
        raise ConfigError(f"task.layer_lr_decay={task.layer_lr_decay} must be in (0, 1]")
    if min(task.max_query_len, task.doc_stride, task.n_best, task.max_answer_len) <= 0:
        raise ConfigError(
            "task.max_query_len, task.doc_stride, task.n_best and task.max_answer_len must be "
            "positive"
        )
    _validate_translation(task)
    if not 0.0 < d.mask_prob < 1.0:
        raise ConfigError(f"data.mask_prob={d.mask_prob} must be in (0, 1); BERT uses 0.15")
    _validate_span_corruption(cfg)
    if not 0.0 <= d.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={d.eval_fraction} must be in [0, 1)")
    if not d.source:
        raise ConfigError(
            "data.source is empty; give a path, a glob, a list, or builtin:python-stdlib"
        )
    if tok.vocab_size < 16 and not tok.path:
        raise ConfigError(f"tokenizer.vocab_size={tok.vocab_size} is too small; use at least 16")
    if m.vocab_size and not tok.path and m.vocab_size < tok.vocab_size:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than tokenizer.vocab_size="
            f"{tok.vocab_size}; token ids would fall outside the embedding. Set "
            "model.vocab_size=0 to use the tokenizer's size"
        )
    if not 0.0 < tok.character_coverage <= 1.0:
        raise ConfigError(
            f"tokenizer.character_coverage={tok.character_coverage} must be in (0, 1]"
        )
    specials = [tok.pad_piece, tok.unk_piece, tok.bos_piece, tok.eos_piece]
    if any(not s for s in specials):
        raise ConfigError("tokenizer pad/unk/bos/eos pieces must be non-empty strings")
    named = [*specials, *([tok.mask_piece] if tok.mask_piece else []), *tok.user_defined_symbols]
    if len(set(named)) != len(named) or not all(named):
        raise ConfigError(
            f"tokenizer special pieces must be distinct, got {named}; "
            "user_defined_symbols too must be non-empty and differ from them"
        )
    if tok.max_train_bytes <= 0:
        raise ConfigError(f"tokenizer.max_train_bytes={tok.max_train_bytes} must be positive")
    metrics = TASK_METRICS.get(task.name, ())
    if task.metric and metrics and task.metric not in metrics:
        raise ConfigError(
            f"task.metric={task.metric!r} is not reported for task.name={task.name}; choose "
            f"one of {list(metrics)}{_suggest(task.metric, list(metrics))}, or '' for the default"
        )
    _validate_rules(cfg.mesh)
    validate_distributed(cfg.distributed)
    _validate_evals(cfg)


def _validate_evals(cfg: Config) -> None:
    """train.evals (plm_jax/evals/downstream.py) and run.trackers."""
    if cfg.train.evals and cfg.model.family != "decoder":
        raise ConfigError(
            f"train.evals scores multiple-choice tasks with a causal LM; model.family="
            f"{cfg.model.family!r} has none. Remove train.evals"
        )
    if any(not e.strip() for e in cfg.train.evals):
        raise ConfigError(
            f"train.evals={cfg.train.evals} holds an empty entry; give JSONL files or task names"
        )
    if len(set(cfg.run.trackers)) != len(cfg.run.trackers):
        raise ConfigError(f"run.trackers={cfg.run.trackers} names a tracker twice")


def _validate_loss_chunk(cfg: Config) -> None:
    chunk = cfg.train.loss_chunk
    if chunk < 0:
        raise ConfigError(
            f"train.loss_chunk={chunk} must be >= 0: 0 computes the loss from the whole "
            "logits, N > 0 from N sequence positions at a time (e.g. 512)"
        )
    if chunk and (cfg.model.family != "decoder" or cfg.task.name):
        what = f"task.name={cfg.task.name}" if cfg.task.name else f"model.family={cfg.model.family}"
        raise ConfigError(
            f"train.loss_chunk={chunk} chunks the next-token loss of decoder pretraining; "
            f"{what} computes its loss from the whole logits. Set train.loss_chunk=0"
        )


def _validate_span_corruption(cfg: Config) -> None:
    d, tok = cfg.data, cfg.tokenizer
    if not 0.0 < d.noise_density < 1.0:
        raise ConfigError(
            f"data.noise_density={d.noise_density} must be in (0, 1): the share of each "
            "document's tokens that span corruption replaces; T5 uses 0.15"
        )
    if not 1.0 <= d.mean_span_length < float("inf"):
        raise ConfigError(
            f"data.mean_span_length={d.mean_span_length} must be a number >= 1 (tokens per "
            "noise span); T5 uses 3"
        )
    if tok.num_sentinels < 0:
        raise ConfigError(f"tokenizer.num_sentinels={tok.num_sentinels} must be >= 0")
    trains_sentinels = cfg.model.family == "encoder_decoder" and not tok.path
    if trains_sentinels and tok.num_sentinels == 0 and not cfg.task.name:
        raise ConfigError(
            "tokenizer.num_sentinels=0: span-corruption pretraining of an encoder_decoder "
            "model replaces each noise span by a sentinel piece; set tokenizer.num_sentinels "
            "(T5: 100) or give a tokenizer with <extra_id_N> pieces in tokenizer.path"
        )
    if trains_sentinels and tok.num_sentinels + 5 + len(tok.user_defined_symbols) >= tok.vocab_size:
        raise ConfigError(
            f"tokenizer.num_sentinels={tok.num_sentinels} leaves no room in "
            f"tokenizer.vocab_size={tok.vocab_size} after the special and user-defined pieces; "
            "lower num_sentinels or raise vocab_size"
        )


def _validate_translation(task: TaskConfig) -> None:
    if not task.source_field or not task.target_field:
        raise ConfigError(
            "task.source_field and task.target_field must name the JSON fields holding the texts"
        )
    if bool(task.source_file) != bool(task.target_file):
        raise ConfigError(
            f"task.source_file={task.source_file!r} and task.target_file={task.target_file!r}: "
            "set both (two aligned text files, one sentence a line) or neither"
        )
    if task.source_file and task.train_file:
        raise ConfigError(
            "task.train_file and task.source_file/target_file both give training pairs; set "
            "task.train_file='' to read the text files, or clear source_file and target_file"
        )
    for key in ("max_target_len", "max_decode_len"):
        if getattr(task, key) < 0 or getattr(task, key) == 1:
            raise ConfigError(
                f"task.{key}={getattr(task, key)} must be 0 (the default length) or at least 2 "
                "(a token and eos)"
            )
    if not 0.0 <= task.label_smoothing < 1.0:
        raise ConfigError(
            f"task.label_smoothing={task.label_smoothing} must be in [0, 1); 0.1 is common"
        )
    if task.beam_size < 1:
        raise ConfigError(f"task.beam_size={task.beam_size} must be >= 1 (1: greedy search)")
    if not abs(task.length_penalty) < float("inf"):  # also NaN
        raise ConfigError(f"task.length_penalty={task.length_penalty} must be a finite number")


def _validate_model_variants(m: ModelConfig) -> None:
    """The position, MLP and norm variants each model family computes."""
    if m.position == "relative" and m.family != "encoder_decoder":
        raise ConfigError(
            f"model.position=relative (T5's relative position buckets) needs "
            f"model.family=encoder_decoder, not {m.family!r}; use learned or rope"
        )
    if m.family == "encoder_decoder" and m.position == "learned":
        raise ConfigError(
            "model.family=encoder_decoder supports model.position=relative (T5) or rope, not "
            "learned; set model.position or pick a t5-* preset"
        )
    if m.family == "encoder_decoder" and m.norm_placement != "pre":
        raise ConfigError(
            "model.family=encoder_decoder is pre-norm (T5); set model.norm_placement=pre"
        )
    if m.attention.startswith("splash") and m.position == "relative":
        raise ConfigError(
            f"model.attention={m.attention} takes no additive logit bias, and "
            "model.position=relative (T5) adds one in every self-attention layer; use "
            "model.attention=auto (XLA for the biased layers) or xla"
        )
    if m.position == "relative" and m.relative_buckets < 4:
        raise ConfigError(
            f"model.relative_buckets={m.relative_buckets} must be at least 4: the encoder "
            "splits them by direction, then into exact and log-spaced distances (T5: 32)"
        )
    if m.position == "relative" and m.relative_max_distance <= m.relative_buckets // 2:
        raise ConfigError(
            f"model.relative_max_distance={m.relative_max_distance} must exceed "
            f"model.relative_buckets // 2 = {m.relative_buckets // 2}, the distances that get "
            "a bucket each (T5: 128 with 32 buckets)"
        )
    if m.family == "encoder" and m.use_mlm_head and m.mlp in ("relu", "geglu"):
        raise ConfigError(
            f"model.mlp={m.mlp} has no masked-LM head activation in the encoder; use gelu, "
            "gelu_exact or swiglu, or set model.use_mlm_head=false"
        )


_MESH_AXES = ("data", "fsdp", "tensor")


def _validate_rules(mesh: MeshConfig) -> None:
    for name, target in mesh.rules.items():
        if name not in DEFAULT_AXIS_RULES:
            raise ConfigError(
                f"mesh.rules.{name} is not a logical axis"
                f"{_suggest(name, list(DEFAULT_AXIS_RULES)) or f'; use {list(DEFAULT_AXIS_RULES)}'}"
            )
        axes = list(target) if isinstance(target, list | tuple) else [target]
        known = [axis for axis in axes if axis in _MESH_AXES]
        if target is not None and (len(known) != len(axes) or len(set(known)) != len(known)):
            raise ConfigError(
                f"mesh.rules.{name}={target!r} names an unknown mesh axis or repeats one; use "
                f"null, one of {list(_MESH_AXES)} or a list of distinct ones"
            )
    for size_key in _MESH_AXES:
        size = getattr(mesh, size_key)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{size_key}={size} must be positive or -1 (the rest)")
    if sum(getattr(mesh, a) == -1 for a in _MESH_AXES) > 1:
        raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


def validate_distributed(dist: DistributedConfig, source: str = "") -> None:
    """Checks the `distributed` section; `source` names where unset values came from.

    Raises:
      ConfigError: naming the key, its value and what to change.
    """
    for key in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
        if getattr(dist, key) <= 0:
            raise ConfigError(f"distributed.{key}={getattr(dist, key)} must be positive (seconds)")
    if dist.prepare_timeout <= 0:
        raise ConfigError(f"distributed.prepare_timeout={dist.prepare_timeout} must be positive")
    if dist.num_processes < 0:
        raise ConfigError(
            f"distributed.num_processes={dist.num_processes}{source} must be >= 0 (0: unset)"
        )
    if dist.process_id < -1 or (dist.num_processes and dist.process_id >= dist.num_processes):
        raise ConfigError(
            f"distributed.process_id={dist.process_id}{source} must be in "
            f"[0, distributed.num_processes={dist.num_processes or '?'}), or -1 (unset)"
        )
    if dist.coordinator_address:
        host, sep, port = dist.coordinator_address.rpartition(":")
        if not (sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(
                f"distributed.coordinator_address={dist.coordinator_address!r}{source} is not "
                "HOST:PORT; give process 0's host name or IP and a free port, e.g. 10.0.0.1:1234"
            )


def resolve_mesh_shape(mesh: MeshConfig, num_devices: int) -> dict[str, int]:
    """Mesh axis sizes with -1 filled in, checked against the device count.

    Raises:
      ConfigError: when the sizes do not multiply to `num_devices`.
    """
    sizes = {a: getattr(mesh, a) for a in _MESH_AXES}
    fixed = 1
    for size in sizes.values():
        if size != -1:
            fixed *= size
    free = [a for a, s in sizes.items() if s == -1]
    if free:
        if num_devices % fixed:
            raise ConfigError(
                f"mesh sizes {sizes} cannot fill {num_devices} devices: {num_devices} is not "
                f"divisible by {fixed}; change mesh.fsdp/mesh.tensor"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"mesh sizes {sizes} multiply to {fixed}, but there are {num_devices} devices; "
            "make them multiply to the device count or set one axis to -1"
        )
    return sizes


def validate_for_devices(cfg: Config, num_devices: int) -> dict[str, int]:
    """Checks the constraints that depend on the device count, and those between the task and
    the model (which `init_from` may have replaced since `validate`); returns the mesh shape."""
    sizes = resolve_mesh_shape(cfg.mesh, num_devices)
    m, t, task = cfg.model, cfg.train, cfg.task
    _validate_loss_chunk(cfg)  # init_from may have made the model an encoder since validate
    pools = task.name in ("classification", "regression") and task.pooling == "pooler"
    if pools and not (m.family == "encoder" and m.use_pooler):
        raise ConfigError(
            f"task.pooling=pooler needs an encoder with a pooler (model.family={m.family}, "
            f"model.use_pooler={m.use_pooler}); use task.pooling=auto, cls, mean or last"
        )
    if m.family == "encoder" and not m.use_mlm_head and not task.name:
        raise ConfigError(
            "model.use_mlm_head=false: an encoder without its masked-LM head (e.g. a converted "
            "BertModel) cannot be pretrained; set model.use_mlm_head=true, or task.name to "
            "fine-tune it"
        )
    if task.name in ("classification", "regression", "qa") and m.family == "encoder_decoder":
        raise ConfigError(
            f"task.name={task.name} needs an encoder or decoder backbone, not "
            "model.family=encoder_decoder; fine-tune encoder-decoders with task.name=translation"
        )
    if task.name == "translation" and m.family == "encoder":
        raise ConfigError(
            "task.name=translation needs a model that generates text (model.family="
            "encoder_decoder or decoder), not an encoder"
        )
    if task.name == "translation" and task.layer_lr_decay < 1.0:
        raise ConfigError(
            f"task.layer_lr_decay={task.layer_lr_decay} is for classification, regression and "
            "qa backbones; set task.layer_lr_decay=1 for translation"
        )
    if task.name == "qa" and m.max_seq_len <= task.max_query_len + task.doc_stride:
        raise ConfigError(
            f"model.max_seq_len={m.max_seq_len} leaves no context beside "
            f"task.max_query_len={task.max_query_len} question tokens and "
            f"task.doc_stride={task.doc_stride} shared ones; raise max_seq_len or lower those"
        )
    for key in ("max_target_len", "max_decode_len"):
        if task.name == "translation" and getattr(task, key) > m.max_seq_len:
            raise ConfigError(
                f"task.{key}={getattr(task, key)} is longer than model.max_seq_len="
                f"{m.max_seq_len}: decoder positions (and a decoder-only model's prompt plus "
                f"completion) stay within max_seq_len; lower task.{key} or raise max_seq_len"
            )
    batch_shards = sizes["data"] * sizes["fsdp"]
    micro = t.batch_size // t.grad_accum
    if micro % batch_shards:
        raise ConfigError(
            f"micro-batch train.batch_size/train.grad_accum={micro} is not divisible by "
            f"mesh.data*mesh.fsdp={batch_shards}; batches are split evenly over those devices"
        )
    kv_heads = m.num_kv_heads or m.num_heads
    if m.num_heads % sizes["tensor"]:
        raise ConfigError(
            f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={sizes['tensor']}; "
            "attention heads are split evenly across tensor-parallel devices. "
            "Pick a mesh.tensor that divides num_heads, or set mesh.tensor=1."
        )
    if kv_heads % sizes["tensor"] and sizes["tensor"] % kv_heads:
        raise ConfigError(
            f"model.num_kv_heads={kv_heads} and mesh.tensor={sizes['tensor']}: one must divide "
            "the other so kv heads can be split or replicated over tensor devices"
        )
    return sizes
