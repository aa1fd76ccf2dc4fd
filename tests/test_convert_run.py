"""`plm-jax convert`: a Hugging Face GPT-2 directory in, a usable run directory out, and back."""

import numpy as np
import pytest

import plm_jax
from plm_jax.cli import main

torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
tokenizers = pytest.importorskip("tokenizers", reason="needs tokenizers (the hf extra)")

pytestmark = pytest.mark.hf
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory, small_corpus):
    """A tiny random GPT2LMHeadModel with its own byte-level BPE tokenizer, saved like the hub's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("hf_gpt2")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(small_corpus)], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT
    )
    fast.save_pretrained(path)
    eot = tok.token_to_id(EOT)
    config = transformers.GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return path, model, fast


def reference_logprob(model, fast, text):
    ids = [fast.bos_token_id, *fast(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), -1)
    return float(sum(logp[i, ids[i + 1]] for i in range(len(ids) - 1)))


def test_imported_gpt2_scores_text_as_transformers_does(hf_gpt2, tmp_path, capsys):
    path, model, fast = hf_gpt2
    run = tmp_path / "run"
    assert main(["convert", "--from", "hf", "--input", str(path), "--output", str(run)]) == 0
    lm = plm_jax.load(run)
    assert lm.step == 0 and lm.config.model.num_layers == 2
    for text in ["Return the absolute value of x.", "def f(a, b):\n    return a + b  # ünï"]:
        (score,) = lm.score(text)
        assert score.token_ids == fast(text, add_special_tokens=False)["input_ids"]
        assert score.total_logprob == pytest.approx(reference_logprob(model, fast, text), abs=1e-4)


def test_export_round_trip_loads_in_transformers(hf_gpt2, tmp_path):
    path, model, fast = hf_gpt2
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["convert", "--from", "hf", "--input", str(path), "--output", str(run)]) == 0
    assert main(["convert", "--to", "hf", "--input", str(run), "--output", str(out)]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([fast("Return the value.", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        np.testing.assert_allclose(again(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-6)
    assert (out / "tokenizer.json").is_file()
    assert (
        transformers.AutoTokenizer.from_pretrained(out)("a b")["input_ids"]
        == fast("a b")["input_ids"]
    )


def test_convert_refuses_to_overwrite_and_needs_a_tokenizer(hf_gpt2, tmp_path, capsys):
    path, _, _ = hf_gpt2
    run = tmp_path / "run"
    assert main(["convert", "--from", "hf", "--input", str(path), "--output", str(run)]) == 0
    capsys.readouterr()
    assert main(["convert", "--from", "hf", "--input", str(path), "--output", str(run)]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((path / name).read_bytes())
    assert (
        main(["convert", "--from", "hf", "--input", str(bare), "--output", str(tmp_path / "r2")])
        == 2
    )
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["convert", "--from", "hf", "--to", "hf", "--input", "a", "--output", "b"]) == 2


@pytest.mark.e2e
def test_pretraining_continues_from_a_converted_model(hf_gpt2, tmp_path, small_corpus):
    from plm_jax.config import load_config
    from plm_jax.metrics import read_metrics
    from plm_jax.train.loop import pretrain

    path, model, fast = hf_gpt2
    run = tmp_path / "run"
    assert main(["convert", "--from", "hf", "--input", str(path), "--output", str(run)]) == 0
    tokenizer_json = (run / "tokenizer" / "tokenizer.json").read_bytes()
    cfg = load_config(
        run / "config.yaml",
        [
            f"data.source={small_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "model.max_seq_len=64",
            "train.steps=3",
            "train.warmup_steps=1",
            "train.batch_size=8",
            "train.log_every=1",
            "train.eval_every=3",
            "train.eval_batches=1",
        ],
    )
    pretrain(cfg, show_progress=False)
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == tokenizer_json  # kept
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "train/loss" in r]
    assert steps == [1, 2, 3]
    assert plm_jax.load(run).step == 3
