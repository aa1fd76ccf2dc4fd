"""Continued pretraining of an imported Hugging Face LLaMA: the first step's loss is the loss
transformers computes on the same batch."""

import json

import numpy as np
import pytest

from plm_jax.cli import main
from plm_jax.config import load_config
from plm_jax.data.pipeline import build_pipeline
from plm_jax.tokenizer import Tokenizer
from plm_jax.train import loop
from plm_jax.train.init_from import resolve_init_from

torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers (the hf extra)")

pytestmark = pytest.mark.hf
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory, small_corpus):
    """A tiny random LlamaForCausalLM (grouped-query attention, untied head) with a BPE."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("hf_llama")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(small_corpus)], trainer)
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT
    ).save_pretrained(path)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path, model


def reference_loss(model, batch) -> float:
    """Token-weighted cross-entropy of a packed batch, each document run on its own."""
    total = weight = 0.0
    for inputs, targets, segments, positions, weights in zip(
        batch["inputs"],
        batch["targets"],
        batch["segment_ids"],
        batch["positions"],
        batch["weights"],
        strict=True,
    ):
        for seg in np.unique(segments[segments > 0]):
            keep = segments == seg
            ids = torch.tensor(inputs[keep][None].astype(np.int64))
            pos = torch.tensor(positions[keep][None].astype(np.int64))
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=pos).logits[0].double()
            logp = torch.log_softmax(logits, -1).numpy()
            tgt, w = targets[keep], weights[keep]
            total += float(-(logp[np.arange(len(tgt)), tgt] * w).sum())
            weight += float(w.sum())
    return total / weight


def test_first_step_loss_of_imported_llama_equals_transformers(
    hf_llama, small_corpus, tmp_path, capsys
):
    path, model = hf_llama
    converted = tmp_path / "converted"
    assert main(["convert", "--from", "hf", "--input", str(path), "--output", str(converted)]) == 0
    cfg = load_config(
        None,
        [
            f"init_from={converted}",
            f"data.source={small_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'continued'}",
            "train.batch_size=8",
            "train.steps=2",
            "train.warmup_steps=1",
            "train.log_every=1",
            "train.eval_every=1000",
            "data.eval_fraction=0",
        ],
    )
    resolved = resolve_init_from(cfg)
    assert resolved.model.num_kv_heads == 2 and resolved.model.max_seq_len == 64
    tokenizer = Tokenizer.load(resolved.tokenizer.path)
    first = next(build_pipeline(resolved, tokenizer, show_progress=False).train)
    assert first["weights"].sum() > 200
    loop.pretrain(cfg, show_progress=False)
    records = [json.loads(x) for x in (tmp_path / "continued" / "metrics.jsonl").open()]
    step1 = next(r["train/loss"] for r in records if r.get("step") == 1 and "train/loss" in r)
    assert step1 == pytest.approx(reference_loss(model, first), abs=1e-4)
