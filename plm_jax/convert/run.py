"""Whole checkpoints between Hugging Face directories and plm_jax run directories.

    import_hf(hf_dir, run_dir)   config.json + safetensors + tokenizer.json (or BERT's
                                 vocab.txt) -> a run directory (config.yaml, tokenizer/,
                                 checkpoints/0) that `plm_jax.load`, `score`, `generate`,
                                 `eval` and `pretrain init` read
    export_hf(run_or_ckpt, dir)  a decoder or encoder checkpoint -> config.json +
                                 model.safetensors (+ the Hugging Face tokenizer files, when
                                 the run has them)

The imported checkpoint holds a fresh optimizer state (AdamW moments at zero) beside the
weights, so a run can continue training from it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
from flax import nnx

from plm_jax.checkpoint import Checkpointer
from plm_jax.config import Config, RunConfig, TokenizerConfig, config_to_dict, save_config
from plm_jax.convert.hf import load_hf_model, save_hf_model
from plm_jax.errors import DataError
from plm_jax.tokenizer import Tokenizer
from plm_jax.train.optimizer import make_optimizer
from plm_jax.train.state import TrainState, empty_loss_window

# Files of a Hugging Face tokenizer directory that travel with the weights (vocab.txt: BERT's
# WordPiece vocabulary, which some BERT directories hold instead of a tokenizer.json).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)


def import_hf(hf_dir: str | Path, run_dir: str | Path) -> Path:
    """Converts a Hugging Face GPT-2/LLaMA/BERT directory into a plm_jax run directory.

    Raises:
      DataError: missing/corrupt files, neither tokenizer.json nor vocab.txt, or an existing
        checkpoint in `run_dir` (never overwritten).
      ConfigError: an architecture or option plm_jax does not model.
    """
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if (run_dir / "checkpoints").exists():
        raise DataError(f"{run_dir} already holds checkpoints; choose a new --output directory")
    if not any((hf_dir / name).is_file() for name in ("tokenizer.json", "vocab.txt")):
        raise DataError(
            f"{hf_dir} has no tokenizer.json (or BERT vocab.txt); save the Hugging Face "
            "tokenizer there (tokenizer.save_pretrained(dir)) so the converted model can read text"
        )
    model = load_hf_model(hf_dir)
    tokenizer_dir = run_dir / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, tokenizer_dir / name)
    tokenizer = Tokenizer.load(tokenizer_dir)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise DataError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
            f"{model.cfg.vocab_size} rows; the two files do not belong together"
        )
    cfg = Config(
        run=RunConfig(name=run_dir.name, dir=str(run_dir)),
        model=dataclasses.replace(model.cfg, preset="tiny"),
        tokenizer=TokenizerConfig(vocab_size=tokenizer.vocab_size),
    )
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(cfg.train)
    state = TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(cfg.run.seed)),
        loss_window=empty_loss_window(),
    )
    save_config(cfg, run_dir / "config.yaml")
    checkpointer = Checkpointer(run_dir, cfg.checkpoint)
    try:
        checkpointer.save(0, state, {"next_index": 0}, config_to_dict(cfg), force=True)
        checkpointer.wait()
    finally:
        checkpointer.close()
    return run_dir / "checkpoints" / "0"


def export_hf(path: str | Path, out_dir: str | Path) -> Path:
    """Writes a plm_jax decoder, encoder or encoder-decoder checkpoint as a Hugging Face
    directory.

    An encoder's config.json gets the tokenizer's padding id as `pad_token_id`; an
    encoder-decoder's also its decoder start (the padding id, as T5) and `eos_token_id`.

    Raises:
      DataError: `out_dir` already holds a config.json (never overwritten).
      ConfigError: a model neither GPT-2, LLaMA, BERT nor T5 can express.
    """
    from plm_jax.api import load

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise DataError(f"{out_dir} already holds a config.json; choose a new --output directory")
    lm = load(path)
    save_hf_model(lm.model, out_dir)
    ids = {}
    if lm.model.cfg.family == "encoder" and lm.tokenizer.pad_id is not None:
        # BERT's word embedding keeps the padding row out of training (padding_idx).
        ids["pad_token_id"] = lm.tokenizer.pad_id
    elif lm.model.cfg.family == "encoder_decoder":
        # T5 starts decoding from the padding id and stops at eos: the run's tokenizer's ids.
        pad, eos = lm.tokenizer.pad_id, lm.tokenizer.eos_id
        ids = {"pad_token_id": pad, "decoder_start_token_id": pad, "eos_token_id": eos}
    if ids:
        config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
        config.update(ids)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    source = lm.tokenizer.path.parent
    copied = [n for n in TOKENIZER_FILES if (source / n).is_file() and _is_hf(source / n)]
    for name in copied:
        shutil.copy2(source / name, out_dir / name)
    if not copied:
        shutil.copy2(lm.tokenizer.path, out_dir / lm.tokenizer.path.name)  # SentencePiece
    return out_dir


def _is_hf(path: Path) -> bool:
    """False for plm_jax's own tokenizer.json (SentencePiece metadata), True otherwise."""
    if path.name != "tokenizer.json":
        return True
    try:
        return "model" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
