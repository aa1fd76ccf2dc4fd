"""The `plm-jax` command line: argument parsing only; the work is done by library functions.

User mistakes (`plm_jax.errors.UserError`) print one line `plm-jax: error: ...` and exit with
code 2; `--debug` shows the traceback instead. Commands whose issue has not landed yet say so
in one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence

import yaml

from plm_jax import __version__
from plm_jax.errors import NotYetAvailable, UserError

log = logging.getLogger("plm_jax")

EXIT_USER_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="plm-jax: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:  # Orbax/absl and jax log their internals at INFO
        for name in ("absl", "jax", "orbax"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not hasattr(args, "handler"):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return args.handler(args) or 0
    except UserError as e:
        if args.debug:
            raise
        print(f"plm-jax: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("plm-jax: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="plm-jax",
        description="Pretrain, fine-tune and use Transformer language models in JAX.",
    )
    parser.add_argument("--version", action="version", version=f"plm-jax {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
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
        "pretrain a decoder LM; a run directory that holds checkpoints resumes",
        cmd_pretrain,
    )
    config_command(
        "finetune",
        "fine-tune on a task (classification, QA, translation)",
        not_yet("finetune", 5, "fine-tuning"),
    )

    def checkpoint_command(name: str, help_text: str, issue: int, what: str, *extra):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT")
        for flag, kwargs in extra:
            p.add_argument(flag, **kwargs)
        p.set_defaults(handler=not_yet(name, issue, what))

    checkpoint_command(
        "eval",
        "loss, perplexity and task metrics of a checkpoint",
        3,
        "evaluation",
        ("--data", dict(metavar="FILE")),
    )
    checkpoint_command(
        "score",
        "log-probability of a text under a checkpoint",
        3,
        "scoring",
        ("--text", dict(required=True, action="append")),
    )
    checkpoint_command(
        "generate",
        "sample or greedy-decode continuations",
        3,
        "generation",
        ("--prompt", dict(required=True, action="append")),
        ("--max-new-tokens", dict(type=int, default=64)),
    )
    checkpoint_command(
        "embed",
        "last hidden states and pooled vectors",
        4,
        "embeddings",
        ("--text", dict(required=True, action="append")),
    )
    checkpoint_command(
        "predict",
        "task predictions for a JSONL file",
        5,
        "prediction",
        ("--input", dict(required=True, metavar="FILE.jsonl")),
    )

    conv = sub.add_parser("convert", help="move weights to or from Hugging Face format")
    conv.add_argument("--from", dest="src", choices=["hf", "plm_jax"], default="plm_jax")
    conv.add_argument("--to", dest="dst", choices=["hf", "plm_jax"], default="plm_jax")
    conv.add_argument("--input", required=True, metavar="DIR")
    conv.add_argument("--output", required=True, metavar="DIR")
    conv.set_defaults(handler=not_yet("convert", 4, "Hugging Face conversion"))
    return parser


def not_yet(command: str, issue: int, what: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        if getattr(args, "config", None) is not None or getattr(args, "overrides", None):
            _load(args)  # config mistakes are still reported as such
        raise NotYetAvailable(
            f"'plm-jax {command}' is not available yet: {what} lands with issue #{issue}"
        )

    return handler


def _load(args: argparse.Namespace):
    from plm_jax.config import load_config

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not path.endswith((".yaml", ".yml")):
        path, overrides = None, [path, *overrides]  # no file given, only overrides
    return load_config(path, overrides)


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


def cmd_pretrain(args: argparse.Namespace) -> int:
    from plm_jax.config import config_to_dict
    from plm_jax.train.loop import pretrain

    cfg = _load(args)
    if cfg.model.family != "decoder":
        issue = 4 if cfg.model.family == "encoder" else 6
        raise NotYetAvailable(
            f"model.family={cfg.model.family!r} pretraining lands with issue #{issue}; "
            "use model.family=decoder"
        )
    log.info("resolved config:\n%s", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    final = pretrain(cfg)
    shown = {k: round(v, 4) for k, v in final.items() if k.startswith(("train/", "eval/"))}
    print(f"run {cfg.run_dir}: step {final.get('step', '-')}: {shown}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from plm_jax.config import config_to_dict, save_config
    from plm_jax.data.pipeline import build_pipeline, load_or_train_tokenizer

    cfg = _load(args)
    log.info("resolved config:\n%s", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
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


if __name__ == "__main__":
    sys.exit(main())
