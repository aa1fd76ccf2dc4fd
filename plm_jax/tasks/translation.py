"""Translation (sequence-to-sequence) fine-tuning: the task model, its scores and decoding.

    model     `Seq2SeqModel`: a pretrained encoder-decoder (T5 style) or decoder as
              `{"backbone": ...}`, so `init_from` fills the backbone unchanged; its outputs are
              the backbone's LM logits on the decoder side (encoder-decoder) or on the prompt +
              completion row (decoder: the loss reads the completion only)
    scores    `translation_scores`: corpus BLEU and chrF from sacrebleu, the field's standard
              scorer, with the signatures that make a number reproducible
    decoding  `translate`: beam search (encoder-decoder) or greedy completion (decoder) of
              source sentences, in order

What it leaves out: reading and batching the parallel data (`seq2seq_data.py`), the search
itself (`plm_jax.infer.seq2seq`, `plm_jax.infer.generate`) and the training loop
(`finetune.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from plm_jax.config import Config, ModelConfig
from plm_jax.errors import DataError
from plm_jax.models import build_model
from plm_jax.tasks.batching import bucket_lengths
from plm_jax.tasks.classification import split_holdout
from plm_jax.tasks.data import TaskData
from plm_jax.tasks.seq2seq_data import (
    EncodedPairs,
    PromptCompletionBatcher,
    Seq2SeqBatcher,
    encode_parallel,
    read_parallel,
)
from plm_jax.train.step import lm_forward

__all__ = [
    "Seq2SeqModel",
    "evaluate_translation",
    "evaluate_translation_run",
    "load_translation_data",
    "make_translation_batcher",
    "predict_translations",
    "target_limit",
    "translate_ids",
    "translation_scores",
]

log = logging.getLogger(__name__)


class Seq2SeqModel(nnx.Module):
    """An encoder-decoder or decoder LM whose logits are the task's outputs.

    Args:
      cfg: the backbone's model config (`family` encoder_decoder or decoder).
      rngs: parameter (and dropout) randomness.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if cfg.family not in ("encoder_decoder", "decoder"):
            raise ValueError(
                f"task.name=translation needs an encoder_decoder or decoder model, not "
                f"model.family={cfg.family!r}"
            )
        self.backbone = build_model(cfg, rngs=rngs)
        self.cfg = self.backbone.cfg

    def __call__(
        self, batch: dict[str, jax.Array], *, deterministic: bool = True, rngs=None
    ) -> jax.Array:
        """[B, L, V] float32 logits of the decoder side (encoder-decoder batches, with
        `decoder_inputs`) or of the whole prompt + completion row (decoder batches)."""
        return lm_forward(self.backbone, batch, deterministic=deterministic, rngs=rngs).logits


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF (sacrebleu defaults: 13a tokenisation, BLEU-4; chrF n=6, beta=2).

    Returns:
      {"bleu": float, "chrf": float, "bleu_signature": str, "chrf_signature": str}; the
      signatures name sacrebleu's version and every setting, to print next to the numbers.

    Raises:
      DataError: no sentences, or different numbers of hypotheses and references.
    """
    from sacrebleu.metrics import BLEU, CHRF

    if len(hypotheses) != len(references):
        raise DataError(
            f"{len(hypotheses)} translations for {len(references)} references; every source "
            "needs exactly one of each"
        )
    if not references:
        raise DataError("no sentences to score; the evaluation data is empty")
    bleu, chrf = BLEU(), CHRF()
    hyps, refs = list(hypotheses), [list(references)]
    b, c = bleu.corpus_score(hyps, refs), chrf.corpus_score(hyps, refs)
    return {
        "bleu": float(b.score),
        "chrf": float(c.score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def target_limit(cfg: Config) -> int:
    """Target tokens kept per example (eos included): `task.max_target_len` or max_seq_len."""
    return cfg.task.max_target_len or cfg.model.max_seq_len


def load_translation_data(cfg: Config, tokenizer: Any) -> TaskData:
    """Reads, splits and encodes the parallel data of `cfg.task`.

    Training pairs come from `task.train_file` (JSONL) or the aligned `task.source_file` /
    `task.target_file`; evaluation pairs from `task.eval_file` (JSONL) or a seeded
    `task.holdout_fraction` of the training pairs. `train` and `eval` are `EncodedPairs`;
    `raw_eval` holds the evaluation `ParallelExample`s (their targets are the references).

    Raises:
      DataError: unreadable, misaligned or empty data, or (with `task.overlong=error`) an
        example over the length limits.
    """
    t = cfg.task
    fields = dict(source_field=t.source_field, target_field=t.target_field)
    train = read_parallel(
        t.train_file or None,
        source_file=t.source_file or None,
        target_file=t.target_file or None,
        **fields,
    )
    if t.eval_file:
        held_out = read_parallel(t.eval_file, **fields)
    elif t.holdout_fraction > 0:
        train, held_out = split_holdout(train, t.holdout_fraction, cfg.run.seed)
    else:
        raise DataError(
            "no evaluation data: set task.eval_file, or task.holdout_fraction > 0 to hold out "
            "part of the training pairs"
        )
    limits = dict(
        max_source_len=cfg.model.max_seq_len,
        max_target_len=target_limit(cfg),
        overlong=t.overlong,
        max_total_len=cfg.model.max_seq_len if cfg.model.family == "decoder" else 0,
    )
    encoded = []
    for name, examples in (("training", train), ("evaluation", held_out)):
        pairs = encode_parallel(examples, tokenizer, **limits)
        if pairs.truncation_summary():
            log.warning("%s data: %s", name, pairs.truncation_summary())
        encoded.append(pairs)
    return TaskData(encoded[0], encoded[1], None, 0, tokenizer.pad_id, _no_outputs, held_out)


def _no_outputs(outputs: list[Any]) -> dict[str, float]:
    raise TypeError("translation is scored from decoded text (translation_scores)")


def make_translation_batcher(
    cfg: Config,
    pairs: EncodedPairs,
    tokenizer: Any,
    *,
    shuffle: bool,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Seq2SeqBatcher | PromptCompletionBatcher:
    """Packed, length-bucketed batches of `pairs` for the model family of `cfg`.

    Training (`shuffle`) packs several pairs a row; evaluation reads one pair a row, in order.
    A decoder reads `[bos] source target` rows (bos as pretraining's `data.add_bos`).
    """
    kw = dict(
        global_batch=global_batch,
        seed=cfg.run.seed,
        shuffle=shuffle,
        process_index=process_index,
        process_count=process_count,
        pad_id=tokenizer.pad_id,
    )
    max_len = cfg.model.max_seq_len
    if cfg.model.family == "decoder":
        bos = tokenizer.bos_id if cfg.data.add_bos else None
        return PromptCompletionBatcher(pairs, buckets=bucket_lengths(max_len), bos_id=bos, **kw)
    return Seq2SeqBatcher(
        pairs,
        source_buckets=bucket_lengths(max_len),
        target_buckets=bucket_lengths(target_limit(cfg)),
        **kw,
    )


def translate_ids(
    cfg: Config, model: nnx.Module, tokenizer: Any, sources: Sequence[Sequence[int]]
) -> list[list[int]]:
    """The translation of each source (ids ending with eos), without its eos, in order.

    An encoder-decoder decodes with beam search (`task.beam_size`, `task.length_penalty`;
    beam size 1 is greedy); a decoder continues `[bos] source` greedily. At most
    `task.max_decode_len` tokens (0: the target limit) are generated per source.
    """
    from plm_jax.infer.generate import generate_ids
    from plm_jax.infer.seq2seq import Seq2SeqDecoder

    t = cfg.task
    budget = t.max_decode_len or target_limit(cfg)
    batch = max(1, min(cfg.train.batch_size, 64))
    eos = tokenizer.eos_id
    if cfg.model.family == "encoder_decoder":
        decoder = Seq2SeqDecoder(
            batch_size=batch,
            max_len=budget,
            max_source_len=cfg.model.max_seq_len,
            eos_id=eos,
            pad_id=tokenizer.pad_id,
            beam_size=t.beam_size,
            length_penalty=t.length_penalty,
            vocab_size=tokenizer.vocab_size,
        )
        hyps = decoder.decode_ids(model, [list(ids) for ids in sources])
        return [h.token_ids[:-1] if h.is_finished else h.token_ids for h in hyps]
    bos = [tokenizer.bos_id] if cfg.data.add_bos else []
    prompts = [bos + list(ids) for ids in sources]
    results: list[list[int]] = []
    for lo in range(0, len(prompts), batch):
        chunk = prompts[lo : lo + batch]
        room = cfg.model.max_seq_len - max(len(ids) for ids in chunk)
        new = generate_ids(
            model,
            chunk,
            max_new_tokens=max(1, min(budget, room)),
            eos_id=eos,
            vocab_size=tokenizer.vocab_size,
        )
        results.extend(ids[:-1] if ids and ids[-1] == eos else list(ids) for ids in new)
    return results


def _eval_loss_fn(params, batch, *, graphdef):
    model = nnx.merge(graphdef, params)
    from plm_jax.train.step import next_token_loss

    logits = model(batch, deterministic=True)
    return next_token_loss(logits, batch["targets"], batch["weights"]), jnp.sum(batch["weights"])


def evaluate_translation(
    cfg: Config, graphdef: Any, params: Any, data: TaskData, tokenizer: Any, mesh: Any
) -> dict[str, Any]:
    """Teacher-forced loss per target token and the BLEU/chrF of decoded translations.

    Returns:
      {"loss", "bleu", "chrf", "bleu_signature", "chrf_signature", "examples"} over
      `data.eval` (references: the evaluation targets as read, untruncated).
    """
    from plm_jax.sharding import shard_batch, use_mesh

    batcher = make_translation_batcher(
        cfg, data.eval, tokenizer, shuffle=False, global_batch=cfg.train.batch_size
    )
    loss_fn = jax.jit(lambda p, b: _eval_loss_fn(p, b, graphdef=graphdef))
    total, tokens = 0.0, 0.0
    for local in batcher.epoch_iter():
        batch = shard_batch(local, mesh, cfg.train.batch_size)
        with use_mesh(mesh, cfg.mesh.rules):
            loss_sum, count = jax.device_get(loss_fn(params, batch))
        total, tokens = total + float(loss_sum), tokens + float(count)
    model = nnx.merge(graphdef, params)
    hyp_ids = translate_ids(cfg, model.backbone, tokenizer, data.eval.sources)
    hypotheses = [tokenizer.decode(ids) for ids in hyp_ids]
    references = [ex.target for ex in data.raw_eval]
    scores = translation_scores(hypotheses, references)
    return {"loss": total / max(tokens, 1.0), **scores, "examples": float(len(references))}


def _run_model(run: Any) -> nnx.Module:
    """The backbone of a loaded task run, on one device."""
    return nnx.merge(run.graphdef, run.params).backbone


def evaluate_translation_run(run: Any, data_file: str | None = None) -> dict[str, Any]:
    """BLEU, chrF and loss of a fine-tuned run on `data_file` (JSONL pairs) or on the run's
    own evaluation data (its `task.eval_file` or held-out pairs)."""
    import dataclasses

    cfg = run.config
    if data_file is None:
        data = load_translation_data(cfg, run.tokenizer)
    else:
        t = cfg.task
        pairs = read_parallel(data_file, source_field=t.source_field, target_field=t.target_field)
        encoded = encode_parallel(
            pairs,
            run.tokenizer,
            max_source_len=cfg.model.max_seq_len,
            max_target_len=target_limit(cfg),
            overlong="truncate",
            max_total_len=cfg.model.max_seq_len if cfg.model.family == "decoder" else 0,
        )
        if encoded.truncation_summary():
            log.warning("%s: %s", data_file, encoded.truncation_summary())
        data = TaskData(encoded, encoded, None, 0, run.tokenizer.pad_id, _no_outputs, pairs)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=1))
    scores = evaluate_translation(cfg, run.graphdef, run.params, data, run.tokenizer, run.mesh)
    out = {f"eval/{k}": v for k, v in scores.items() if k in ("loss", "bleu", "chrf")}
    return {
        **out,
        "examples": int(scores["examples"]),
        "bleu_signature": scores["bleu_signature"],
        "chrf_signature": scores["chrf_signature"],
    }


def predict_translations(run: Any, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record with `translation` added (the source: `task.source_field`).

    Raises:
      DataError: a record without a non-empty string source.
    """
    cfg = run.config
    field = cfg.task.source_field
    sources = []
    limit = cfg.model.max_seq_len
    for n, record in enumerate(records, 1):
        text = record.get(field)
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"input record {n} has no non-empty string field {field!r}")
        ids = run.tokenizer.encode(text) + [run.tokenizer.eos_id]
        sources.append(ids if len(ids) <= limit else ids[: limit - 1] + ids[-1:])
    hyp_ids = translate_ids(cfg, _run_model(run), run.tokenizer, sources)
    return [
        {**record, "translation": run.tokenizer.decode(ids)}
        for record, ids in zip(records, hyp_ids, strict=True)
    ]
