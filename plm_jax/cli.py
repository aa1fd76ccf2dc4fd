"""The `plm-jax` command line: argument parsing only; the work is done by library functions.

User mistakes (`plm_jax.errors.UserError`) print one line `plm-jax: error: ...` and exit with
code 2; `--debug` shows the traceback instead. Commands whose issue has not landed yet say so
in one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from plm_jax import __version__, host_malloc
from plm_jax.distributed import exit_on_failure
from plm_jax.errors import ConfigError, DataError, UserError
from plm_jax.train.preemption import PREEMPTED_EXIT_CODE, Preempted

log = logging.getLogger("plm_jax")

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    host_malloc.tune()  # before jax starts: CPU steps stop page-faulting their buffers
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="plm-jax: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:  # Orbax (through absl) and jax log their internals at INFO/WARNING
        for name in ("absl", "jax", "orbax"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Orbax logs a failed background save's traceback; plm_jax re-raises it as one line.
        logging.getLogger("absl").setLevel(logging.CRITICAL)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.handler(args) or 0
    except UserError as e:
        if args.debug:
            raise
        print(f"plm-jax: error: {e}", file=sys.stderr)
        return exit_on_failure(EXIT_USER_ERROR)  # a multi-process run's process exits now
    except Preempted as e:
        print(f"plm-jax: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("plm-jax: interrupted", file=sys.stderr)
        return exit_on_failure(130)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plm-jax",
        description="Pretrain, fine-tune and use Transformer language models in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"plm-jax {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "--verbose", action="store_true", help="print the full resolved config at start-up"
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    tok = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer")
    tok_sub = tok.add_subparsers(title="tokenizer commands", metavar="ACTION")
    train = tok_sub.add_parser("train", help="train a SentencePiece model on text files")
    train.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="FILE",
        help="text/JSONL files, directories or globs (gzip allowed), or builtin:python-stdlib",
    )
    train.add_argument("--vocab-size", type=int, required=True, metavar="N")
    train.add_argument("--output", required=True, metavar="DIR")
    train.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    train.add_argument(
        "--no-byte-fallback",
        action="store_true",
        help="map unseen characters to <unk> instead of UTF-8 bytes",
    )
    train.add_argument("--character-coverage", type=float, default=0.9995)
    train.add_argument("--pad", default="<pad>", help="pad piece (id 0)")
    train.add_argument("--unk", default="<unk>", help="unknown piece (id 1)")
    train.add_argument("--bos", default="<s>", help="begin-of-sequence piece (id 2)")
    train.add_argument("--eos", default="</s>", help="end-of-sequence piece (id 3)")
    train.add_argument("--mask", default="<mask>", help="mask piece (id 4); '' for none")
    train.add_argument(
        "--user-symbols",
        nargs="*",
        default=[],
        metavar="PIECE",
        help="extra pieces that are never split",
    )
    train.add_argument("--max-train-bytes", type=int, default=200_000_000)
    train.add_argument("--format", choices=["auto", "text", "jsonl"], default="auto")
    train.add_argument("--text-field", default="text", help="JSONL field holding the text")
    train.add_argument("--doc-split", choices=["blank_line", "file", "line"], default="blank_line")
    train.set_defaults(handler=cmd_tokenizer_train)

    def config_command(name: str, help_text: str, handler: Callable, config_required=False):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "config",
            nargs="?" if not config_required else None,
            metavar="CONFIG.yaml",
            help="YAML file of differences from the defaults",
        )
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted overrides, e.g. train.steps=100 mesh.tensor=2",
        )
        p.add_argument(  # SUPPRESS: `plm-jax --verbose pretrain` keeps the global flag's value
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print the full resolved config at start-up (it is always saved in config.yaml)",
        )
        p.set_defaults(handler=handler)
        return p

    config_command(
        "prepare",
        "train the tokenizer and tokenize the corpus of a config into "
        "the cache (the data stage of pretrain)",
        cmd_prepare,
    )
    config_command(
        "pretrain",
        "pretrain a decoder (next token) or encoder (masked LM); a run with checkpoints resumes",
        cmd_pretrain,
    )
    config_command(
        "finetune",
        "fine-tune a pretrained model on a task (classification, regression, QA); resumes",
        cmd_finetune,
    )

    def checkpoint_command(name: str, help_text: str, handler: Callable, *extra):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "checkpoint",
            metavar="RUN_OR_CHECKPOINT",
            help="a run directory (its newest checkpoint) or runs/NAME/checkpoints/STEP",
        )
        for flag, kwargs in extra:
            p.add_argument(flag, **kwargs)
        p.set_defaults(handler=handler)

    as_json = ("--json", dict(action="store_true", help="print one JSON object per line"))
    checkpoint_command(
        "eval",
        "loss and perplexity of a checkpoint on its held-out split or on --data",
        cmd_eval,
        ("--data", dict(metavar="FILE", help="text/JSONL file, directory or glob to evaluate")),
        ("--batch-size", dict(type=int, default=None)),
        as_json,
    )
    checkpoint_command(
        "score",
        "log-probability of texts under a checkpoint (log P(text), per token)",
        cmd_score,
        ("--text", dict(required=True, action="append", help="repeat for several texts")),
        ("--add-eos", dict(action="store_true", help="also score the end of the text")),
        as_json,
    )
    checkpoint_command(
        "generate",
        "continue prompts with the KV cache (greedy by default)",
        cmd_generate,
        ("--prompt", dict(required=True, action="append", help="repeat for a batch")),
        ("--max-new-tokens", dict(type=int, default=64)),
        ("--temperature", dict(type=float, default=0.0, help="0 = greedy")),
        ("--top-k", dict(type=int, default=0, help="0 = no top-k filter")),
        ("--top-p", dict(type=float, default=1.0, help="nucleus sampling mass")),
        ("--seed", dict(type=int, default=0)),
        as_json,
    )
    checkpoint_command(
        "embed",
        "last hidden states and pooled vectors of texts (JSON lines, .json, .jsonl or .npy)",
        cmd_embed,
        ("--text", dict(action="append", default=[], help="repeat for several texts")),
        (
            "--input",
            dict(metavar="FILE", help="one text per line, or JSONL with text (and text_pair)"),
        ),
        ("--pooling", dict(choices=["mean", "cls", "pooler", "last"], default="mean")),
        ("--normalize", dict(action="store_true", help="unit-length pooled vectors")),
        ("--hidden", dict(action="store_true", help="include per-token hidden states in JSON")),
        (
            "--output",
            dict(metavar="FILE", help=".npy: pooled [N, D]; .json/.jsonl: records; default stdout"),
        ),
        ("--batch-size", dict(type=int, default=32)),
    )
    checkpoint_command(
        "predict",
        "task predictions (labels with probabilities, values, answers) for a JSONL file",
        cmd_predict,
        ("--input", dict(required=True, metavar="FILE.jsonl")),
        ("--output", dict(metavar="FILE.jsonl", help="default: print JSON lines")),
    )
    checkpoint_command(
        "explain",
        "attention maps, logit lens, token attributions and ablations of one text, as an "
        "HTML report (decoders, encoders, classifiers, encoder-decoders)",
        cmd_explain,
        ("--text", dict(required=True, help="the text (MLM encoders: with a mask token)")),
        ("--target", dict(help="the explained token or label; default: the model's top one")),
        (
            "--method",
            dict(default="all", help="attention,logit-lens,attributions,ablations or all"),
        ),
        ("--output", dict(required=True, metavar="DIR", help="report.html, PNGs, JSON, NPZ")),
        ("--prefix", dict(default="", help="encoder-decoders: the decoder's output so far")),
        ("--baseline", dict(default="pad", help="integrated gradients' baseline: pad or zero")),
        ("--steps", dict(type=int, default=64, help="integrated gradients' quadrature nodes")),
        ("--ablation", dict(default="zero", help="zero or mean ablation")),
        ("--mean-heads", dict(action="store_true", help="attention: layer means only")),
    )

    plan = config_command(
        "plan",
        "compile the train step for these devices or a TPU slice (--topology) and report its "
        "memory per device, FLOPs, collectives and roofline bound; exit 2 when it does not fit",
        cmd_plan,
    )
    plan.add_argument(
        "--topology",
        metavar="SLICE",
        help="compile for compile-only TPU devices: v5e-8, v5p-32, v6e-256, v5p:2x2x4 (libtpu)",
    )
    plan.add_argument(
        "--fit",
        choices=["batch", "remat"],
        help="batch: the largest per-device batch that fits; remat: the cheapest model.remat",
    )
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    conv = sub.add_parser("convert", help="move weights to or from Hugging Face format")
    conv.add_argument("--from", dest="src", choices=["hf", "plm_jax"], default="plm_jax")
    conv.add_argument("--to", dest="dst", choices=["hf", "plm_jax"], default="plm_jax")
    conv.add_argument("--input", required=True, metavar="DIR")
    conv.add_argument("--output", required=True, metavar="DIR")
    conv.set_defaults(handler=cmd_convert)

    checkpoint_command(
        "lm-eval",
        "lm-evaluation-harness tasks (HellaSwag, ARC, local YAML tasks, ...) on a decoder",
        cmd_lm_eval,
        ("--tasks", dict(required=True, metavar="T1,T2", help="task names, comma-separated")),
        ("--include-path", dict(metavar="DIR", help="a directory of local YAML tasks")),
        ("--num-fewshot", dict(type=int, metavar="K", help="default: each task's own")),
        ("--limit", dict(type=float, metavar="N", help="examples per task (below 1: a fraction)")),
        ("--batch-size", dict(type=int, default=8)),
        ("--bootstrap-iters", dict(type=int, default=100_000, help="0 skips bootstrap stderrs")),
        ("--log-samples", dict(action="store_true", help="keep every request in the JSON")),
        ("--output", dict(metavar="FILE.json", help="write the harness's results JSON here")),
    )

    plot = sub.add_parser(
        "plot",
        help="draw the training curves of one or several runs into an image",
        description="Draw metrics.jsonl curves of one or several runs, one panel per metric.",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    plot.add_argument(
        "--metrics",
        metavar="M1,M2",
        help="default: train/loss,eval/loss,perf/tokens_per_sec (those logged)",
    )
    plot.add_argument("--x", dest="x_axis", choices=["step", "tokens"], default="step")
    plot.add_argument("--labels", metavar="L1,L2", help="legend labels, one per run")
    plot.add_argument("--output", required=True, metavar="FILE.png", help=".png, .svg or .pdf")
    plot.set_defaults(handler=cmd_plot)

    ckpt = sub.add_parser("checkpoint", help="inspect a run's checkpoints")
    ckpt_sub = ckpt.add_subparsers(title="checkpoint commands", metavar="ACTION")
    verify = ckpt_sub.add_parser(
        "verify",
        help="report each checkpoint's state (ok, corrupt, unverified, uncommitted)",
        description="Check every file of every checkpoint against its checksum manifest. "
        "Exit 0 when the newest checkpoint is ok and none is corrupt, 2 otherwise.",
    )
    verify.add_argument("run", metavar="RUN_DIR")
    verify.set_defaults(handler=cmd_checkpoint_verify)

    launch = sub.add_parser(
        "launch",
        help="run pretrain/finetune/eval as N local processes of one multi-process JAX run",
        description="Run `plm-jax COMMAND ...` as N local processes joined into one JAX cluster "
        "(for tests and single-host clusters; see docs/multihost.md for Slurm and TPU VMs).",
    )
    launch.add_argument("--num-processes", "-n", type=int, required=True, metavar="N")
    launch.add_argument(
        "--devices-per-process",
        type=int,
        metavar="K",
        help="CPU: K fake devices per process; GPU host: process i sees devices i*K..i*K+K-1",
    )
    launch.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    launch.add_argument(
        "--grace-period",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="after one process fails, kill the others this much later",
    )
    launch.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the plm-jax command to run, e.g. -- pretrain CONFIG.yaml train.steps=100",
    )
    launch.set_defaults(handler=cmd_launch)
    return parser


def _load(args: argparse.Namespace):
    from plm_jax.config import load_config

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):
        path, overrides = None, [path, *overrides]  # no file given, only overrides
    return load_config(path, overrides)


def cmd_launch(args: argparse.Namespace) -> int:
    from plm_jax.launch import launch

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return launch(
        command,
        num_processes=args.num_processes,
        devices_per_process=args.devices_per_process,
        port=args.port,
        grace_period=args.grace_period,
        debug=args.debug,
    )


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from plm_jax.config import Config, DataConfig, TokenizerConfig, validate
    from plm_jax.data.pipeline import train_tokenizer_from_config

    cfg = Config(
        tokenizer=TokenizerConfig(
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            byte_fallback=not args.no_byte_fallback,
            character_coverage=args.character_coverage,
            pad_piece=args.pad,
            unk_piece=args.unk,
            bos_piece=args.bos,
            eos_piece=args.eos,
            mask_piece=args.mask,
            user_defined_symbols=list(args.user_symbols),
            max_train_bytes=args.max_train_bytes,
        ),
        data=DataConfig(
            source=list(args.input),
            format=args.format,
            text_field=args.text_field,
            doc_split=args.doc_split,
        ),
    )
    validate(cfg)
    start = time.perf_counter()
    tokenizer = train_tokenizer_from_config(cfg.data, cfg, args.output)
    print(
        f"wrote {tokenizer.path} ({tokenizer.vocab_size} pieces) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


def _show_config(args: argparse.Namespace, cfg) -> None:
    """The full resolved config with --verbose; otherwise setup logs a short summary."""
    from plm_jax.config import config_to_dict

    if getattr(args, "verbose", False):
        log.info("resolved config:\n%s", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def cmd_pretrain(args: argparse.Namespace) -> int:
    from plm_jax.distributed import initialize
    from plm_jax.train.loop import pretrain
    from plm_jax.xla_flags import apply_gpu_flags

    cfg = _load(args)
    apply_gpu_flags()  # on an NVIDIA GPU only, before jax starts its backend
    initialize(cfg.distributed)  # before any device is touched
    _show_config(args, cfg)
    final = pretrain(cfg)
    if final.get("complete"):
        print(
            f"run {cfg.run_dir} is already complete at step {final['step']}; raise "
            "train.steps to train it further"
        )
    shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("train/", "eval/"))}
    if shown:
        print(f"run {cfg.run_dir}: step {final['step']}: {shown}")
    _print_sample(cfg)
    return 0


SAMPLE_PROMPT = "Return the"
FILL_MASK_SAMPLE = "Return the {mask} value of the argument."
SPAN_SAMPLE = "Return the {sentinel} of the argument."


def _print_sample(cfg) -> None:
    """A sampled continuation from the final checkpoint, so a run ends with something to read."""
    import jax

    import plm_jax

    if jax.process_count() > 1:  # process 0 alone in plm_jax.load would wait in Orbax barriers
        return
    lm = plm_jax.load(cfg.run_dir)
    if cfg.model.family == "encoder_decoder":
        sentinel = lm.tokenizer.id_to_piece(lm.tokenizer.sentinel_ids[0])
        text = SPAN_SAMPLE.format(sentinel=sentinel)
        (fill,) = lm.transform(text, beam_size=1, max_len=16)
        print(f"span-filling sample (greedy): {text} -> {fill!r}")
        return
    if cfg.model.family == "encoder":
        if lm.tokenizer.mask_id is None or not cfg.model.use_mlm_head:
            return
        mask = lm.tokenizer.id_to_piece(lm.tokenizer.mask_id)
        text = FILL_MASK_SAMPLE.format(mask=mask)
        (prediction,) = lm.fill_mask(text, top_k=5)[0]
        picks = ", ".join(f"{piece!r} {p:.2f}" for piece, _, p in prediction.candidates)
        print(f"fill-mask sample: {text} -> {picks}")
        return
    max_new = min(48, cfg.model.max_seq_len - len(lm.tokenizer.encode(SAMPLE_PROMPT)) - 1)
    if max_new < 1:
        return
    (sample,) = lm.generate(
        SAMPLE_PROMPT, max_new_tokens=max_new, temperature=0.8, top_k=40, seed=cfg.run.seed
    )
    print(f"sample (temperature 0.8, top-k 40): {sample.prompt}{sample.text}")


def cmd_finetune(args: argparse.Namespace) -> int:
    from plm_jax.distributed import initialize
    from plm_jax.tasks.finetune import finetune
    from plm_jax.xla_flags import apply_gpu_flags

    cfg = _load(args)
    apply_gpu_flags()  # on an NVIDIA GPU only, before jax starts its backend
    initialize(cfg.distributed)  # before any device is touched
    _show_config(args, cfg)
    final = finetune(cfg)
    if final.get("complete"):
        print(f"run {cfg.run_dir} is already complete at step {final['step']}")
    shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("train/", "eval/"))}
    if shown:
        print(f"run {cfg.run_dir}: step {final['step']}: {shown}")
    if "best" in final:
        print(f"best eval metric: {final['best']:.4f} (checkpoint in {cfg.run_dir}/best.json)")
    if "padding_fraction" in final:
        print(
            f"padding {100 * final['padding_fraction']:.1f}% of tokens, "
            f"{final['compiled_shapes']} batch shapes"
        )
    return 0


def _read_records(path: Path) -> list[dict]:
    from plm_jax.errors import DataError

    if not path.is_file():
        raise DataError(f"--input {str(path)!r} does not exist; give a JSONL file")
    records = []
    with path.open(encoding="utf-8", errors="strict") as f:
        try:
            lines = list(f)
        except UnicodeDecodeError as e:
            raise DataError(f"--input {str(path)!r} is not UTF-8 text ({e.reason})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise DataError(f"{path}:{n} is not valid JSON; one object per line") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n} is not a JSON object")
        records.append(record)
    if not records:
        raise DataError(f"--input {str(path)!r} holds no records")
    return records


def cmd_predict(args: argparse.Namespace) -> int:
    from plm_jax.tasks.predict import load_task_run, predict_records

    records = _read_records(Path(args.input))
    results = predict_records(load_task_run(args.checkpoint), records)
    lines = "".join(json.dumps(r) + "\n" for r in results)
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(lines)
        print(f"wrote {out}: {len(results)} predictions")
    else:
        sys.stdout.write(lines)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from plm_jax.explain import explain_path
    from plm_jax.explain.report import REPORT_FILE

    explanation = explain_path(
        args.checkpoint,
        args.text,
        output=args.output,
        per_head=not args.mean_heads,
        target=args.target,
        prefix=args.prefix,
        methods=args.method,
        baseline=args.baseline,
        steps=args.steps,
        ablation=args.ablation,
    )
    if explanation.truncation:
        print(f"plm-jax: {explanation.truncation}", file=sys.stderr)
    if explanation.target_name:
        print(f"explained {explanation.target_name!r} ({explanation.kind})")
    if explanation.attributions is not None:
        a = explanation.attributions
        print(f"integrated gradients: completeness error {100 * a.relative_error:.3f}%")
    print(f"wrote {Path(args.output) / REPORT_FILE}")
    return 0


def _is_task_run(path: str) -> bool:
    from plm_jax.checkpoint import locate_checkpoint
    from plm_jax.tasks.finetune import BEST_FILE, LABELS_FILE

    run_dir, _ = locate_checkpoint(path)
    config = run_dir / "config.yaml"
    if (run_dir / BEST_FILE).is_file() or (run_dir / LABELS_FILE).is_file():
        return True
    try:
        return bool((yaml.safe_load(config.read_text()) or {}).get("task", {}).get("name"))
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def cmd_eval(args: argparse.Namespace) -> int:
    import plm_jax
    from plm_jax.config import DistributedConfig
    from plm_jax.distributed import initialize

    initialize(DistributedConfig())  # joins a cluster only when plm-jax launch set $PLM_JAX_*
    if _is_task_run(args.checkpoint):
        from plm_jax.tasks.predict import evaluate_task, load_task_run

        run = load_task_run(args.checkpoint)
        if args.batch_size is not None:  # honoured: the task's batches are train.batch_size
            train = dataclasses.replace(run.config.train, batch_size=args.batch_size)
            run = dataclasses.replace(run, config=dataclasses.replace(run.config, train=train))
        result = evaluate_task(run, args.data)
        if args.json:
            print(json.dumps({**result, "step": run.step}))
        else:
            shown = ", ".join(
                f"{k[5:]} {v:.4f}" for k, v in result.items() if k.startswith("eval/")
            )
            print(f"step {run.step}: {shown} over {result['examples']} examples")
            for key in ("bleu_signature", "chrf_signature"):
                if key in result:  # translation: sacrebleu's settings behind the numbers
                    print(f"{key.split('_')[0].upper()} signature: {result[key]}")
        return 0
    result = plm_jax.load(args.checkpoint).evaluate(args.data, batch_size=args.batch_size)
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"step {result['step']}: loss {result['eval/loss']:.4f}, perplexity "
            f"{result['eval/perplexity']:.3f} over {int(result['eval/tokens'])} tokens"
        )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import plm_jax

    for s in plm_jax.load(args.checkpoint).score(args.text, add_eos=args.add_eos):
        if args.json:
            print(json.dumps(dataclasses.asdict(s)))
            continue
        print(
            f"log P = {s.total_logprob:.4f} nats over {s.num_tokens} tokens, "
            f"perplexity {s.perplexity:.3f}" + (f" ({s.windows} windows)" if s.windows > 1 else "")
        )
        for piece, lp in zip(s.pieces, s.token_logprobs, strict=True):
            print(f"  {lp:9.4f}  {piece!r}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import plm_jax

    lm = plm_jax.load(args.checkpoint)
    outs = lm.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    for g in outs:
        if args.json:
            print(json.dumps(dataclasses.asdict(g)))
        else:
            print(f"{g.prompt}{g.text}")
            print(f"[{len(g.token_ids)} tokens, {g.finish_reason}]")
    return 0


def _embed_inputs(args: argparse.Namespace) -> tuple[list[str], list[str | None]]:
    """(texts, pairs) from --text and --input."""
    from plm_jax.errors import DataError

    texts, pairs = list(args.text), [None] * len(args.text)
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise DataError(f"--input {str(path)!r} does not exist; give a text or JSONL file")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"--input {str(path)!r} is not UTF-8 text ({e.reason})") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if path.suffix != ".jsonl":
                texts.append(line)
                pairs.append(None)
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise DataError(f"{path}:{n} is not valid JSON; one object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{n} needs a string "text" field')
            texts.append(record["text"])
            pairs.append(record.get("text_pair"))
    if not texts:
        raise ConfigError("nothing to embed: give --text TEXT (repeatable) or --input FILE")
    return texts, pairs


def cmd_embed(args: argparse.Namespace) -> int:
    import numpy as np

    import plm_jax

    texts, pairs = _embed_inputs(args)
    out = Path(args.output) if args.output else None
    if out is not None and out.suffix not in (".npy", ".json", ".jsonl"):
        raise ConfigError(f"--output {str(out)!r}: use a .npy, .json or .jsonl file name")
    embeddings = plm_jax.load(args.checkpoint).embed(
        texts,
        text_pairs=pairs,
        pooling=args.pooling,
        normalize=args.normalize,
        batch_size=args.batch_size,
    )
    if out is not None and out.suffix == ".npy":
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, np.stack([e.pooled for e in embeddings]))
        print(f"wrote {out}: pooled vectors [{len(embeddings)}, {embeddings[0].pooled.size}]")
        return 0
    records = []
    for e in embeddings:
        record = {
            "text": e.text,
            "num_tokens": len(e.token_ids),
            "truncated": e.truncated,
            "pooled": e.pooled.tolist(),
        }
        if args.hidden:
            record["token_ids"] = e.token_ids
            record["hidden"] = e.hidden.tolist()
        records.append(record)
    if out is None:
        for record in records:
            print(json.dumps(record))
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(json.dumps(records))
    else:
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {out}: {len(records)} embeddings")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from plm_jax.convert.run import export_hf, import_hf

    if (args.src, args.dst) == ("hf", "plm_jax"):
        path = import_hf(args.input, args.output)
        print(f"wrote {path} (use it with plm-jax score/generate/eval {args.output})")
    elif (args.src, args.dst) == ("plm_jax", "hf"):
        path = export_hf(args.input, args.output)
        print(f"wrote {path} (config.json + model.safetensors)")
    else:
        raise ConfigError(
            f"convert --from {args.src} --to {args.dst} is not a conversion; use --from hf "
            "(import a Hugging Face directory) or --to hf (export a plm_jax checkpoint)"
        )
    return 0


def cmd_checkpoint_verify(args: argparse.Namespace) -> int:
    from plm_jax import integrity
    from plm_jax.checkpoint import CORRUPT

    directory = Path(args.run) / "checkpoints"
    if not directory.is_dir():
        raise DataError(f"{args.run!r} has no checkpoints/ directory; give a run directory")
    found = integrity.scan(directory)
    for status in found:
        print(f"step {status.step:>8}  {status.state:<11}  {status.detail}")
    moved = sorted(p.name for p in (directory / CORRUPT).glob("*"))
    if moved:
        print(f"{len(moved)} corrupt checkpoint(s) set aside in {directory / CORRUPT}: {moved}")
    committed = [s for s in found if s.state != "uncommitted"]
    if not committed:
        raise DataError(f"no committed checkpoint in {directory}")
    corrupt = [s.step for s in committed if s.state == "corrupt"]
    if corrupt:
        raise DataError(
            f"checkpoints {corrupt} are corrupt; training falls back to the newest valid one "
            "(and moves corrupt ones to checkpoints/.corrupt), eval/predict need a valid one"
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from plm_jax.plan import format_plan, plan

    cfg = _load(args)
    _show_config(args, cfg)
    report = plan(cfg, topology=args.topology, fit=args.fit)
    print(json.dumps(report) if args.json else format_plan(report))
    if report["fits"] is False:
        log.error(
            "the train step needs %.2f GiB per device, more than the %.2f GiB usable%s",
            report["memory_per_device"]["total"] / 2**30,
            report["memory_per_device"]["usable"] / 2**30,
            "" if args.fit else "; try --fit batch or --fit remat",
        )
        return 2
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from plm_jax.config import save_config
    from plm_jax.data.pipeline import build_pipeline, load_or_train_tokenizer

    cfg = _load(args)
    _show_config(args, cfg)
    save_config(cfg, cfg.run_dir / "config.yaml")
    tokenizer = load_or_train_tokenizer(cfg)
    pipe = build_pipeline(cfg, tokenizer)
    meta = pipe.prepared.meta
    print(f"tokenizer: {tokenizer.path} ({tokenizer.vocab_size} pieces)")
    print(f"prepared:  {pipe.prepared.path}")
    for split, windows in (("train", pipe.train_windows), ("eval", pipe.eval_windows)):
        n_win = 0 if windows is None else windows.num_real
        print(
            f"{split:5s}: {meta[split]['num_docs']} documents, {meta[split]['num_tokens']} "
            f"tokens, {n_win} windows of {cfg.model.max_seq_len + 1}"
        )
    print(f"batches per epoch: {pipe.train.batches_per_epoch} of {cfg.train.batch_size} sequences")
    return 0


def cmd_lm_eval(args: argparse.Namespace) -> int:
    from plm_jax.evals.harness import results_table, run_lm_eval  # ConfigError without lm-eval

    results = run_lm_eval(
        args.checkpoint,
        args.tasks.split(","),
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        batch_size=args.batch_size,
        output=args.output,
        log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters,
    )
    print(results_table(results))
    if args.output:
        print(f"wrote {args.output}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from plm_jax.plot import plot_runs

    result = plot_runs(
        args.runs,
        output=args.output,
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
        x_axis=args.x_axis,
        labels=args.labels.split(",") if args.labels else None,
    )
    metrics = sorted({c.metric for c in result.curves})
    print(f"wrote {result.path}: {len(result.curves)} curves of {', '.join(metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
