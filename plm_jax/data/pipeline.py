"""From a resolved config to a tokenizer and batch iterators: the data stage of every run.

    tokenizer: `tokenizer.path`, or <run dir>/tokenizer if a previous run trained one there,
               else trained on `data.source` and saved there
    corpus:    tokenized once into the cache (`prepare.py`)
    batches:   packed windows (`packing.py`) -> grain loaders (`loader.py`); encoders get
               non-overlapping windows and dynamic masked-LM masking (`masking.py`),
               encoder-decoders longer raw windows and T5 span corruption
               (`span_corruption.py`), whose tokenizer gets the sentinel pieces

What it leaves out: moving batches onto devices (`sharding.shard_batch`) and the train loop.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plm_jax.config import Config, DataConfig, ModelConfig
from plm_jax.data.loader import BatchLoader, eval_loader
from plm_jax.data.masking import MlmMasker
from plm_jax.data.packing import PackedWindows
from plm_jax.data.prepare import PreparedData, prepare_data
from plm_jax.data.sources import SourceStats, check_stats, iter_documents, resolve_files
from plm_jax.data.span_corruption import SpanCorruption, span_corruption_lengths
from plm_jax.distributed import primary_first
from plm_jax.errors import ConfigError, DataError
from plm_jax.tokenizer import Tokenizer, sentinel_pieces, train_tokenizer

log = logging.getLogger(__name__)


def train_tokenizer_from_config(
    data: DataConfig,
    cfg: Config,
    output_dir: Path,
    *,
    show_progress: bool = True,
    documents: Iterable[str] | None = None,
) -> Tokenizer:
    """Trains a SentencePiece model on the documents of `data` with `cfg.tokenizer` settings.

    An encoder_decoder model's tokenizer also gets `tokenizer.num_sentinels` sentinel pieces
    (<extra_id_0>, ...) after the user-defined symbols. `documents`, when given, replaces the
    documents of `data` (a fine-tuning task's texts).
    """
    tok = cfg.tokenizer
    is_seq2seq = cfg.model.family == "encoder_decoder"
    sentinels = sentinel_pieces(tok.num_sentinels) if is_seq2seq else []
    stats = None
    if documents is None:
        resolve_files(data)  # a missing source fails here, before any training output
        stats = SourceStats()
        documents = iter_documents(data, stats)
    try:
        tokenizer = train_tokenizer(
            documents,
            output_dir,
            vocab_size=tok.vocab_size,
            model_type=tok.model_type,
            byte_fallback=tok.byte_fallback,
            character_coverage=tok.character_coverage,
            pad_piece=tok.pad_piece,
            unk_piece=tok.unk_piece,
            bos_piece=tok.bos_piece,
            eos_piece=tok.eos_piece,
            mask_piece=tok.mask_piece,
            user_defined_symbols=[*tok.user_defined_symbols, *sentinels],
            max_train_bytes=tok.max_train_bytes,
            num_threads=data.tokenize_threads,
            show_progress=show_progress,
        )
    except DataError:
        if stats is not None:  # no document at all: say why (e.g. no line has the text field)
            check_stats(stats, data)
        raise
    if stats is not None:
        check_stats(stats, data)
    return tokenizer


def load_or_train_tokenizer(cfg: Config, *, show_progress: bool = True) -> Tokenizer:
    """The run's tokenizer: configured, previously trained for this run, or trained now.

    Raises:
      DataError: a configured `tokenizer.path` that is missing or corrupt.
    """
    if cfg.tokenizer.path:
        return Tokenizer.load(cfg.tokenizer.path)
    # Several processes: process 0 trains it into the (shared) run directory, the others load it.
    with primary_first("training the tokenizer", cfg.distributed.prepare_timeout):
        run_tokenizer = cfg.run_dir / "tokenizer"
        if (run_tokenizer / "tokenizer.model").is_file() or (
            run_tokenizer / "tokenizer.json"
        ).is_file():
            return Tokenizer.load(run_tokenizer)  # SentencePiece, or an imported HF tokenizer
        log.info("training a %d-piece tokenizer on %s", cfg.tokenizer.vocab_size, cfg.data.source)
        return train_tokenizer_from_config(
            cfg.data, cfg, run_tokenizer, show_progress=show_progress
        )


@dataclass
class Pipeline:
    """Everything the training loop reads: windows per split and the train batch iterator."""

    prepared: PreparedData
    train_windows: PackedWindows
    eval_windows: PackedWindows | None
    train: BatchLoader
    masker: MlmMasker | SpanCorruption | None = None  # the per-example transform, if any

    def eval_batches(self, process_index: int = 0, process_count: int = 1) -> BatchLoader | None:
        """A fresh ordered pass over the held-out split (None when there is none)."""
        if self.eval_windows is None:
            return None
        return eval_loader(
            self.eval_windows,
            global_batch=self.train.global_batch,
            process_index=process_index,
            process_count=process_count,
            transform=self.masker,
        )


def make_masker(cfg: Config, tokenizer: Tokenizer) -> MlmMasker | None:
    """The masked-LM transform for an encoder, None for a decoder.

    Raises:
      ConfigError: the tokenizer has no mask token.
    """
    if cfg.model.family != "encoder":
        return None
    return MlmMasker.from_tokenizer(
        tokenizer, mask_prob=cfg.data.mask_prob, whole_word=cfg.data.whole_word_mask
    )


def make_span_corruption(cfg: Config, tokenizer: Tokenizer) -> SpanCorruption | None:
    """T5 span corruption for an encoder-decoder, None for other families.

    Its `raw_len` is the length of the windows to read.

    Raises:
      ConfigError: the tokenizer has no sentinels, or model.max_seq_len is too short.
    """
    if cfg.model.family != "encoder_decoder":
        return None
    try:
        return SpanCorruption.from_tokenizer(
            tokenizer,
            encoder_len=cfg.model.max_seq_len,
            noise_density=cfg.data.noise_density,
            mean_span_length=cfg.data.mean_span_length,
        )
    except ValueError as e:
        raise ConfigError(f"span corruption (model.family=encoder_decoder): {e}") from None


def batch_shapes(cfg: Config, model: ModelConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (global shape, dtype)} of the train batches `build_pipeline` yields for `cfg`.

    `plm-jax plan` compiles the step from these shapes without reading any data; a test
    checks them against the real pipeline's batches for every family.
    """
    rows, length = cfg.train.batch_size, model.max_seq_len
    ints, floats = np.dtype(np.int32), np.dtype(np.float32)
    side = {key: ((rows, length), ints) for key in ("inputs", "segment_ids", "positions")}
    if model.family != "encoder_decoder":
        return {**side, "targets": ((rows, length), ints), "weights": ((rows, length), floats)}
    _, decoder_len = span_corruption_lengths(
        length, cfg.data.noise_density, cfg.data.mean_span_length
    )
    decoder = {
        key: ((rows, decoder_len), ints)
        for key in ("decoder_inputs", "decoder_segment_ids", "decoder_positions", "targets")
    }
    return {**side, **decoder, "weights": ((rows, decoder_len), floats)}


def build_pipeline(
    cfg: Config,
    tokenizer: Tokenizer,
    *,
    process_index: int = 0,
    process_count: int = 1,
    show_progress: bool = True,
) -> Pipeline:
    """Prepares the corpus and builds the loaders for `cfg`.

    Raises:
      DataError: no data, or a train split smaller than one window.
    """
    seq_len = cfg.model.max_seq_len
    corruption = make_span_corruption(cfg, tokenizer)
    masker = corruption or make_masker(cfg, tokenizer)
    causal = masker is None
    # Span corruption shortens a window, so it reads more raw tokens than the encoder holds.
    window_len = corruption.raw_len if corruption else seq_len
    with primary_first("tokenizing the corpus", cfg.distributed.prepare_timeout):
        prepared = prepare_data(cfg.data, tokenizer, show_progress=show_progress)  # 0 first
    train = prepared.train
    if train.num_tokens < window_len + causal:
        raise DataError(
            f"the training split has {train.num_tokens} tokens, fewer than one window of "
            f"{window_len + causal} (model.max_seq_len={seq_len}); add data or lower "
            "model.max_seq_len"
        )
    if train.max_doc_len < seq_len:
        log.info(
            "every document is shorter than model.max_seq_len=%d (longest: %d tokens); "
            "windows pack several documents, kept apart by segment_ids",
            seq_len,
            train.max_doc_len,
        )
    train_windows = PackedWindows(train, window_len, tokenizer.pad_id, causal=causal)
    eval_windows = None
    if prepared.eval is not None:
        eval_windows = PackedWindows(
            prepared.eval,
            window_len,
            tokenizer.pad_id,
            pad_to_multiple=cfg.train.batch_size,
            causal=causal,
        )
    elif cfg.data.eval_fraction > 0:
        log.warning("no document was held out for evaluation; raise data.eval_fraction")
    loader = BatchLoader(
        train_windows,
        global_batch=cfg.train.batch_size,
        seed=cfg.run.seed,
        process_index=process_index,
        process_count=process_count,
        num_threads=cfg.data.loader_threads,
        prefetch=cfg.data.prefetch,
        transform=masker,
        transform_seed=cfg.run.seed,
    )
    return Pipeline(prepared, train_windows, eval_windows, loader, masker)
