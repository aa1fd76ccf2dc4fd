"""Using a trained model from Python: `plm_jax.load(path)` and its methods.

    model = plm_jax.load("runs/quickstart")      # a run directory: its newest checkpoint
    model = plm_jax.load("runs/quickstart/checkpoints/200")   # or one checkpoint
    model.score(["Return the absolute value."])  # log P(text), per-token log-probs
    model.generate(["def "], max_new_tokens=32)   # KV-cache decoding
    model.evaluate()                              # loss/perplexity on the held-out split
    model.embed(["Hello, my dog is cute"])        # hidden states + pooled vector (any model)
    model.fill_mask(["Return the <mask> value."]) # masked-LM predictions (encoders)
    model.transform(["Return the <extra_id_0>."]) # beam-search outputs (encoder-decoders)
    model.explain("Return the", output="out/")    # attention, logit lens, attributions, ablations

The checkpoint's own saved config rebuilds the model, so no YAML is needed; a Hugging Face
directory is imported first (`plm-jax convert --from hf`). What it leaves out: fine-tuned task
heads (issue #5).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from pathlib import Path
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from plm_jax.checkpoint import Checkpointer, locate_checkpoint
from plm_jax.config import Config, MeshConfig, config_from_dict
from plm_jax.data.loader import eval_loader
from plm_jax.data.packing import PackedWindows
from plm_jax.data.pipeline import make_masker, make_span_corruption
from plm_jax.data.prepare import prepare_data
from plm_jax.errors import ConfigError, DataError
from plm_jax.infer import (
    Embedding,
    Generation,
    MaskPrediction,
    TextScore,
    embed_texts,
    fill_mask,
    generate,
    score_texts,
)
from plm_jax.models import Decoder, Encoder, EncoderDecoder
from plm_jax.sharding import batch_sharding, make_mesh, shard_batch
from plm_jax.tokenizer import Tokenizer
from plm_jax.train.loop import resolve_vocab
from plm_jax.train.optimizer import make_optimizer
from plm_jax.train.state import model_graphdef, sharded_abstract_state, state_shardings
from plm_jax.train.step import eval_step


@dataclasses.dataclass
class LoadedModel:
    """A trained decoder, encoder or encoder-decoder with its tokenizer and config, ready for
    inference."""

    model: Decoder | Encoder | EncoderDecoder
    tokenizer: Tokenizer
    config: Config
    step: int
    path: Path

    def score(self, texts: list[str] | str, **kwargs: Any) -> list[TextScore]:
        """Log-probabilities of each text (see `plm_jax.infer.score_texts`); decoders only."""
        self._need_decoder("score")
        texts = [texts] if isinstance(texts, str) else list(texts)
        return score_texts(self.model, self.tokenizer, texts, **kwargs)

    def generate(self, prompts: list[str] | str, **kwargs: Any) -> list[Generation]:
        """Continuations of each prompt (see `plm_jax.infer.generate`); decoders only."""
        self._need_decoder("generate")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return generate(self.model, self.tokenizer, prompts, **kwargs)

    def embed(self, texts: list[str] | str, **kwargs: Any) -> list[Embedding]:
        """Last hidden states and pooled vectors (see `plm_jax.infer.embed_texts`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return embed_texts(self.model, self.tokenizer, texts, **kwargs)

    def fill_mask(self, texts: list[str] | str, **kwargs: Any) -> list[list[MaskPrediction]]:
        """Predictions at each mask token (see `plm_jax.infer.fill_mask`); MLM encoders only."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return fill_mask(self.model, self.tokenizer, texts, **kwargs)

    def transform(self, texts: list[str] | str, **kwargs: Any) -> list[str]:
        """The encoder-decoder's output text for each input (beam search; see
        `plm_jax.infer.decode_texts`): span fills after pretraining, translations after
        fine-tuning on a translation task."""
        if not isinstance(self.model, EncoderDecoder):
            raise ConfigError(
                f"transform needs an encoder-decoder; {self.path} holds a "
                f"model.family={self.config.model.family!r} model. Use generate or fill_mask"
            )
        from plm_jax.infer.seq2seq import decode_texts

        texts = [texts] if isinstance(texts, str) else list(texts)
        kwargs.setdefault("max_source_len", self.config.model.max_seq_len)
        return decode_texts(self.model, self.tokenizer, texts, **kwargs)

    def explain(self, text: str, *, output: str | Path | None = None, **kwargs: Any):
        """Attention maps, logit lens, attributions and ablations of `text` (see
        `plm_jax.explain.explain_model`); with `output`, also writes report.html there."""
        from plm_jax.explain import explain_model
        from plm_jax.explain.report import write_report

        result = explain_model(self.model, self.tokenizer, text, source=str(self.path), **kwargs)
        if output is not None:
            write_report(result, output)
        return result

    def _need_decoder(self, what: str) -> None:
        if not isinstance(self.model, Decoder):
            raise ConfigError(
                f"{what} needs a decoder (causal LM); {self.path} holds a "
                f"model.family={self.config.model.family!r} model. Use embed or fill_mask"
            )

    def evaluate(self, data: str | None = None, *, batch_size: int | None = None) -> dict:
        """Loss and perplexity on `data` (a file, directory or glob) or the run's held-out split.

        Raises:
          DataError: no held-out split and no `data`, or unreadable data.
        """
        return evaluate_model(self, data, batch_size=batch_size)


def load(path: str | Path) -> LoadedModel:
    """Loads a decoder checkpoint with its tokenizer and saved config.

    Raises:
      DataError: a missing path, a run without checkpoints, or a missing tokenizer.
    """
    run_dir, step = locate_checkpoint(path)
    checkpointer = Checkpointer(run_dir, Config().checkpoint, read_only=True)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.all_steps():
            raise DataError(f"no committed checkpoint {step if step else ''} in {run_dir}")
        cfg = config_from_dict(checkpointer.restore_config(step))
        cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))
        tokenizer = _load_tokenizer(cfg, run_dir)
        model_cfg = resolve_vocab(cfg.model, tokenizer)
        tx = make_optimizer(cfg.train)
        # Every process restores its own copy (in a multi-process run too).
        mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), devices=jax.local_devices()[:1])
        shardings = state_shardings(model_cfg, tx, mesh, cfg.mesh.rules)
        abstract = sharded_abstract_state(model_cfg, tx, shardings)
        state, _, _ = checkpointer.restore(step, abstract)
    finally:
        checkpointer.close()
    graphdef, _ = model_graphdef(model_cfg)
    model = nnx.merge(graphdef, state.params)
    return LoadedModel(model, tokenizer, cfg, step, run_dir / "checkpoints" / str(step))


def _load_tokenizer(cfg: Config, run_dir: Path) -> Tokenizer:
    if cfg.tokenizer.path:
        return Tokenizer.load(cfg.tokenizer.path)
    if not (run_dir / "tokenizer").is_dir():
        raise DataError(f"{run_dir} has no tokenizer/ directory; it is not a complete run")
    return Tokenizer.load(run_dir / "tokenizer")


def evaluate_model(lm: LoadedModel, data: str | None, *, batch_size: int | None) -> dict:
    """Token-weighted loss over every window of `data` or of the run's held-out split."""
    cfg = lm.config
    batch = batch_size or cfg.train.batch_size
    data_cfg = (
        cfg.data if data is None else dataclasses.replace(cfg.data, source=data, eval_fraction=0.0)
    )
    prepared = prepare_data(data_cfg, lm.tokenizer, show_progress=False)
    store = prepared.train if data is not None else prepared.eval
    if store is None:
        raise DataError(f"run {cfg.run_dir} has no held-out split; pass --data FILE")
    mesh = make_mesh(MeshConfig(), devices=jax.devices())
    batch = -(-batch // mesh.size) * mesh.size  # every device gets whole rows
    # Encoders are evaluated on fixed MLM masks, encoder-decoders on fixed span corruptions
    # (of longer raw windows, as in training).
    corruption = make_span_corruption(cfg, lm.tokenizer)
    masker = corruption or make_masker(cfg, lm.tokenizer)
    windows = PackedWindows(
        store,
        corruption.raw_len if corruption else cfg.model.max_seq_len,
        lm.tokenizer.pad_id,
        pad_to_multiple=batch,
        causal=masker is None,
    )
    graphdef, params = nnx.split(lm.model, nnx.Param)
    # Replicated over all devices (of every process): from the host copy each process holds.
    params = jax.device_put(jax.device_get(params), NamedSharding(mesh, PartitionSpec()))
    step = jax.jit(partial(eval_step, graphdef=graphdef), in_shardings=(None, batch_sharding(mesh)))
    loss_sum = tokens = 0.0
    loader = eval_loader(
        windows,
        global_batch=batch,
        process_index=jax.process_index(),  # each process reads its rows of every batch
        process_count=jax.process_count(),
        transform=masker,
    )
    for local in loader:
        out = jax.device_get(step(params, shard_batch(local, mesh, batch)))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / max(tokens, 1.0)
    return {
        "eval/loss": loss,
        "eval/perplexity": math.exp(min(loss, 50.0)),
        "eval/tokens": tokens,
        "step": lm.step,
    }
