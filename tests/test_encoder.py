"""The BERT-style encoder and masked-LM pretraining: model, data pipeline, training, resume."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plm_jax.config import MODEL_PRESETS, ModelConfig, load_config
from plm_jax.data.pipeline import build_pipeline
from plm_jax.errors import ConfigError
from plm_jax.metrics import train_flops_per_token
from plm_jax.models import Decoder, Encoder, build_model, count_params, param_count
from plm_jax.train import loop

BERT = ModelConfig(
    **{
        **MODEL_PRESETS["bert-tiny"],
        "vocab_size": 96,
        "num_layers": 2,
        "embed_dim": 32,
        "num_heads": 4,
        "mlp_dim": 64,
        "max_seq_len": 24,
    }
)


@pytest.fixture(scope="module")
def bert():
    return build_model(BERT, rngs=nnx.Rngs(0))


def hidden(model, tokens, **kw):
    return np.asarray(model(jnp.asarray(tokens, jnp.int32)[None], **kw).hidden[0])


def test_attention_is_bidirectional(bert):
    tokens = np.arange(1, 11)
    changed = tokens.copy()
    changed[-1] = 50
    # Unlike a decoder, the first position sees the last one.
    assert np.abs(hidden(bert, tokens)[0] - hidden(bert, changed)[0]).max() > 1e-4


def test_padding_does_not_change_real_tokens(bert):
    tokens = np.arange(1, 9)
    padded = np.concatenate([tokens, np.zeros(6, int)])
    seg = jnp.asarray([[1] * 8 + [0] * 6], jnp.int32)
    np.testing.assert_allclose(
        hidden(bert, padded, segment_ids=seg)[:8], hidden(bert, tokens), atol=1e-5
    )


def test_packed_documents_equal_separate_encodings(bert):
    a, b = np.arange(1, 7), np.arange(20, 29)
    packed = np.concatenate([a, b])
    seg = jnp.asarray([[1] * 6 + [2] * 9], jnp.int32)
    pos = jnp.asarray([list(range(6)) + list(range(9))], jnp.int32)
    out = hidden(bert, packed, segment_ids=seg, positions=pos)
    np.testing.assert_allclose(out[:6], hidden(bert, a), atol=1e-5)
    np.testing.assert_allclose(out[6:], hidden(bert, b), atol=1e-5)


def test_token_types_pooler_and_mlm_head_shapes(bert):
    tokens = jnp.ones((3, 7), jnp.int32)
    out = bert(tokens)
    assert out.logits.shape == (3, 7, 96) and out.logits.dtype == jnp.float32
    assert out.pooled.shape == (3, 32) and np.abs(np.asarray(out.pooled)).max() <= 1.0  # tanh
    typed = bert(tokens, token_types=jnp.ones((3, 7), jnp.int32))
    assert np.abs(np.asarray(typed.hidden - out.hidden)).max() > 1e-4


def test_post_norm_block_literal():
    """One post-norm block equals BERT's `LN(x + Attn(x))`, `LN(h + Mlp(h))` written out."""
    cfg = dataclasses.replace(BERT, num_layers=1)
    model = build_model(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (1, 5, 32))
    block = model.blocks[0]
    seg = jnp.ones((1, 5), jnp.int32)
    from plm_jax.models import attention_mask

    idx = jnp.arange(5)
    mask = attention_mask(seg, seg, idx, idx, causal=False)
    got, _ = block(x, mask=mask)
    attn, _ = block.attn(x, mask=mask)
    h = block.attn_norm(x + attn)
    want = block.mlp_norm(h + block.mlp(h))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
    assert model.final_norm is None and model.embed_norm is not None


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"norm_placement": "pre"},
        {"use_pooler": False},
        {"use_mlm_head": False},
        {"tie_embeddings": False},
        {"type_vocab_size": 0},
        {"position": "rope"},
        {"mlp": "swiglu", "norm": "rmsnorm", "use_bias": False},
    ],
)
def test_param_count_matches_formula(changes):
    cfg = dataclasses.replace(BERT, **changes)
    assert param_count(nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))) == (
        count_params(cfg)
    )


def test_bert_base_published_size():
    # BertModel bert-base-uncased: 109,482,240 parameters; the MLM head adds 622,650.
    base = ModelConfig(**MODEL_PRESETS["bert-base"])
    assert count_params(dataclasses.replace(base, use_mlm_head=False)) == 109_482_240
    assert count_params(base) == 109_482_240 + 622_650


def test_decoder_refuses_an_encoder_config():
    with pytest.raises(ValueError, match="build_model"):
        Decoder(BERT, rngs=nnx.Rngs(0))
    assert isinstance(build_model(BERT, rngs=nnx.Rngs(0)), Encoder)


def test_encoder_flops_count_full_attention():
    enc = train_flops_per_token(BERT, 96, 24)
    dec = train_flops_per_token(dataclasses.replace(BERT, family="decoder"), 96, 24)
    assert enc["attention_flops_per_token"] == 2 * dec["attention_flops_per_token"]
    assert "12*L" in enc["formula"]


# ---------------------------------------------------------------------------------------------
# Masked-LM pretraining.


def mlm_config(tmp_path, corpus, tokenizer, steps, *extra, name="mlm"):
    return load_config(
        None,
        [
            "model.preset=bert-tiny",
            "model.vocab_size=0",
            f"data.source={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / name}",
            f"tokenizer.path={tokenizer.path}",
            "model.max_seq_len=32",
            "model.num_layers=1",
            "model.embed_dim=32",
            "model.mlp_dim=64",
            "train.batch_size=8",
            f"train.steps={steps}",
            "train.warmup_steps=2",
            "train.log_every=1",
            "train.eval_every=1000",
            "train.eval_batches=2",
            "checkpoint.save_every=4",
            "model.dropout=0.1",
            *extra,
        ],
    )


def test_mlm_batches_mask_only_real_non_special_tokens(tmp_path, small_corpus, small_tokenizer):
    cfg = mlm_config(tmp_path, small_corpus, small_tokenizer, 4)
    pipe = build_pipeline(cfg, small_tokenizer, show_progress=False)
    assert not pipe.train_windows.causal
    batches = [next(pipe.train) for _ in range(20)]
    inputs = np.concatenate([b["inputs"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    weights = np.concatenate([b["weights"] for b in batches])
    segments = np.concatenate([b["segment_ids"] for b in batches])
    assert inputs.shape[1] == 32  # exactly max_seq_len: no next-token shift
    selected = weights > 0
    special = np.isin(targets, sorted(small_tokenizer.special_ids))
    assert not (selected & special).any() and not (selected & (segments == 0)).any()
    assert (inputs[~selected] == targets[~selected]).all()
    eligible = (~special) & (segments != 0)
    rate = selected.sum() / eligible.sum()
    assert 0.12 < rate < 0.18, rate
    masked = (inputs == small_tokenizer.mask_id) & selected
    assert 0.7 < masked.sum() / selected.sum() < 0.9
    # Documents are framed by the tokenizer's bos/eos ([CLS]/[SEP] for a BERT vocabulary).
    assert (targets == small_tokenizer.bos_id).any() and (targets == small_tokenizer.eos_id).any()


def test_mlm_masks_are_reproducible_from_the_seed(tmp_path, small_corpus, small_tokenizer):
    cfg = mlm_config(tmp_path, small_corpus, small_tokenizer, 4)
    a = build_pipeline(cfg, small_tokenizer, show_progress=False)
    b = build_pipeline(cfg, small_tokenizer, show_progress=False)
    first = [next(a.train) for _ in range(3)]
    state = a.train.get_state()
    after = next(a.train)
    for x, y in zip(first, [next(b.train) for _ in range(3)], strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
    c = build_pipeline(cfg, small_tokenizer, show_progress=False)
    c.train.set_state(state)
    resumed = next(c.train)
    for key in ("inputs", "targets", "weights"):
        np.testing.assert_array_equal(resumed[key], after[key])
    other = build_pipeline(
        dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=cfg.run.seed + 1)),
        small_tokenizer,
        show_progress=False,
    )
    assert not np.array_equal(next(other.train)["inputs"], first[0]["inputs"])
    # Evaluation masks are fixed: two passes over the held-out split see the same batches.
    e1, e2 = next(iter(a.eval_batches())), next(iter(a.eval_batches()))
    np.testing.assert_array_equal(e1["inputs"], e2["inputs"])
    assert e1["weights"].sum() > 0


def test_whole_word_masking_in_the_pipeline(tmp_path, small_corpus, small_tokenizer):
    cfg = mlm_config(tmp_path, small_corpus, small_tokenizer, 4, "data.whole_word_mask=true")
    pipe = build_pipeline(cfg, small_tokenizer, show_progress=False)
    starts = small_tokenizer.word_starts()
    special = np.zeros(len(starts), bool)
    special[sorted(small_tokenizer.special_ids)] = True
    for _ in range(5):
        batch = next(pipe.train)
        for row_t, row_w, row_s in zip(
            batch["targets"], batch["weights"], batch["segment_ids"], strict=True
        ):
            # A continuation piece is selected exactly when the piece before it is (same word);
            # a special token is a word of its own, so the piece after it starts a new word.
            cont = ~starts[row_t[1:]] & (row_s[1:] == row_s[:-1]) & (row_s[1:] != 0)
            cont &= ~special[row_t[:-1]]
            np.testing.assert_array_equal((row_w[1:] > 0)[cont], (row_w[:-1] > 0)[cont])


def test_tokenizer_without_mask_token_is_a_config_error(tmp_path, small_corpus):
    from plm_jax.tokenizer import train_tokenizer

    tok = train_tokenizer(
        [small_corpus.read_text()[:200_000]], tmp_path / "tok", vocab_size=400, mask_piece=""
    )
    cfg = mlm_config(tmp_path, small_corpus, tok, 4)
    with pytest.raises(ConfigError, match="no mask token"):
        build_pipeline(cfg, tok, show_progress=False)


def losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {d["step"]: d["train/loss"] for d in lines if "train/loss" in d}


@pytest.mark.e2e
def test_mlm_pretraining_learns_and_resumes_exactly(tmp_path, small_corpus, small_tokenizer):
    whole = mlm_config(tmp_path, small_corpus, small_tokenizer, 12, "train.lr=3e-3", name="w")
    loop.pretrain(whole, show_progress=False)
    got = losses(tmp_path / "w")
    assert got[12] < got[1] - 0.3, got  # learns
    split = mlm_config(tmp_path, small_corpus, small_tokenizer, 12, "train.lr=3e-3", name="s")
    loop.pretrain(split, show_progress=False, until=6)
    shutil.rmtree(tmp_path / "s" / "checkpoints" / "6")  # interrupted 2 steps after step 4
    loop.pretrain(split, show_progress=False)
    assert losses(tmp_path / "s") == got  # same masks, same dropout: identical losses


# ---------------------------------------------------------------------------------------------
# Using a trained encoder: embed, fill-mask, eval, and the CLI.


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, small_corpus, small_tokenizer):
    tmp = tmp_path_factory.mktemp("mlm_run")
    cfg = mlm_config(
        tmp,
        small_corpus,
        small_tokenizer,
        4,
        "train.eval_every=4",
        "train.eval_batches=0",
        name="run",
    )
    loop.pretrain(cfg, show_progress=False)
    return tmp / "run"


def test_embed_pooling_batching_and_truncation(mlm_run):
    import plm_jax

    lm = plm_jax.load(mlm_run)
    texts = ["Return the absolute value.", "x", "A much longer sentence " * 3]
    alone = lm.embed(texts[0], pooling="mean")[0]
    batch = lm.embed(texts, pooling="mean", batch_size=2)
    assert batch[0].token_ids == alone.token_ids
    assert alone.token_ids[0] == lm.tokenizer.bos_id and alone.token_ids[-1] == lm.tokenizer.eos_id
    np.testing.assert_allclose(batch[0].pooled, alone.pooled, atol=1e-5)  # other bucket/rows
    np.testing.assert_allclose(alone.pooled, alone.hidden.mean(axis=0), atol=1e-6)
    assert alone.hidden.shape == (len(alone.token_ids), 32)
    cls = lm.embed(texts[0], pooling="cls", normalize=True)[0]
    np.testing.assert_allclose(np.linalg.norm(cls.pooled), 1.0, atol=1e-5)
    np.testing.assert_allclose(cls.pooled, alone.hidden[0] / np.linalg.norm(alone.hidden[0]), 1e-5)
    pooled = lm.embed(texts[0], pooling="pooler")[0].pooled
    assert np.abs(pooled).max() <= 1.0
    long = lm.embed("word " * 200)[0]
    assert long.truncated and len(long.token_ids) == 32
    assert long.token_ids[-1] == lm.tokenizer.eos_id
    with pytest.raises(ConfigError, match="pooling"):
        lm.embed("x", pooling="max")


def test_decoder_embeddings_and_pooler_error(tiny_run):
    import plm_jax

    lm = plm_jax.load(tiny_run)
    (e,) = lm.embed("Return the value.", pooling="last")
    np.testing.assert_allclose(e.pooled, e.hidden[-1])
    with pytest.raises(ConfigError, match="pooler"):
        lm.embed("x", pooling="pooler")
    with pytest.raises(ConfigError, match="masked-LM head"):
        lm.fill_mask("x <mask>")


def test_fill_mask_and_eval_of_an_encoder(mlm_run):
    import plm_jax

    lm = plm_jax.load(mlm_run)
    (preds,) = lm.fill_mask("Return the <mask> value of <mask>.", top_k=3)
    assert len(preds) == 2 and all(len(p.candidates) == 3 for p in preds)
    probs = [c[2] for c in preds[0].candidates]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    from plm_jax.errors import DataError

    with pytest.raises(DataError, match="no mask token"):
        lm.fill_mask("no mask here")
    with pytest.raises(ConfigError, match="needs a decoder"):
        lm.score("x")
    # Evaluation masks are fixed, so `plm_jax.load(...).evaluate()` reproduces the run's eval.
    logged = [json.loads(x) for x in (mlm_run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r["eval/loss"] for r in logged if "eval/loss" in r][-1]
    assert lm.evaluate(batch_size=8)["eval/loss"] == pytest.approx(final_eval, abs=1e-5)


def test_embed_cli(mlm_run, tmp_path, capsys):
    from plm_jax.cli import main

    assert main(["embed", str(mlm_run), "--text", "hello world", "--text", "x"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in lines] == ["hello world", "x"] and len(lines[0]["pooled"]) == 32
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": "a question", "text_pair": "an answer"}\n\n{"text": "b"}\n')
    out = tmp_path / "e.npy"
    assert main(["embed", str(mlm_run), "--input", str(inp), "--output", str(out)]) == 0
    assert np.load(out).shape == (2, 32)
    out_json = tmp_path / "e.json"
    argv = ["embed", str(mlm_run), "--text", "hi", "--hidden", "--output", str(out_json)]
    assert main(argv) == 0
    (record,) = json.loads(out_json.read_text())
    assert len(record["hidden"]) == record["num_tokens"] == len(record["token_ids"])
    capsys.readouterr()
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text("{not json\n")
    for argv, message in [
        (["embed", str(mlm_run)], "nothing to embed"),
        (["embed", str(mlm_run), "--input", str(tmp_path / "missing.txt")], "does not exist"),
        (["embed", str(mlm_run), "--input", str(bad_json)], "not valid JSON"),
        (["embed", str(mlm_run), "--text", "x", "--output", str(tmp_path / "e.csv")], ".npy"),
        (["score", str(mlm_run), "--text", "x"], "needs a decoder"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
