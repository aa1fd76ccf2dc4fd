"""Tests for plm_jax.infer: scoring against a plain forward pass, generation with the KV cache
against recomputing the whole sequence every step, the sampling filters, seeds, eos handling,
and every user error.

Models are tiny (V=512 from the session tokenizer, D=32, 2 layers, max_seq_len=64) with numpy
random weights, the blocks' large enough that greedy output varies. Tests share batch shapes
(three prompts, 12 new tokens), so the generation program compiles once per model and
greedy-or-not; the reference forward pass is jitted at one width per model.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plm_jax.config import ModelConfig
from plm_jax.errors import ConfigError, DataError
from plm_jax.infer import Generation, TextScore, generate, generate_ids, score_texts
from plm_jax.models import Decoder

BASE = dict(num_layers=2, embed_dim=32, num_heads=4, max_seq_len=64)
LLAMA = dict(position="rope", num_kv_heads=2, norm="rmsnorm", mlp="swiglu")
NEW = 12  # new tokens per prompt in every generation test
TEXT = "Return the number of items in a container, or raise an error if it is empty."
LONG_TEXT = " ".join([TEXT, "Open the file and read its lines into a list of strings."] * 3)


def build(vocab_size: int, seed: int = 0, **changes) -> Decoder:
    """A tiny decoder with random weights drawn by numpy: eager init would compile every
    initialiser apart (~8 s on 2 cores), and the model's own init is not under test here."""
    cfg = ModelConfig(vocab_size=vocab_size, **BASE, **changes)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if x.ndim == 1:  # norm scales near 1, biases near 0
            value = ("scale" in name) + 0.1 * rng.standard_normal(x.shape)
        else:
            # Block weights 8x the usual 0.02: with weak blocks, the tied embedding's
            # self-similarity makes greedy decoding repeat the last token.
            value = (0.16 if "blocks" in name else 0.02) * rng.standard_normal(x.shape)
        return jnp.asarray(value, x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@pytest.fixture(scope="module")
def gpt(small_tokenizer):
    return build(small_tokenizer.vocab_size)


@pytest.fixture(scope="module")
def llama(small_tokenizer):
    return build(small_tokenizer.vocab_size, **LLAMA)


@pytest.fixture(scope="module", params=["gpt", "llama"])
def model(request, gpt, llama):
    return {"gpt": gpt, "llama": llama}[request.param]


@pytest.fixture(scope="module")
def prompts(small_tokenizer):
    """Three id prompts of 1, 5 and 11 tokens, bos first."""
    ids = small_tokenizer.encode(TEXT)
    assert len(ids) >= 10
    return [[small_tokenizer.bos_id, *ids[: n - 1]] for n in (1, 5, 11)]


@functools.partial(jax.jit, static_argnames="graphdef")
def _logits(state, tokens, *, graphdef):
    return nnx.merge(graphdef, state)(tokens).logits


def full_log_probs(model: Decoder, ids: list[int]) -> np.ndarray:
    """Plain forward pass, no cache, no padding seen: log-softmax [len(ids), V] of one sequence
    (right-filled to max_seq_len so each model compiles once; causality hides the fill)."""
    tokens = np.zeros((1, model.cfg.max_seq_len), np.int32)
    tokens[0, : len(ids)] = ids
    graphdef, state = nnx.split(model)
    logits = _logits(state, jnp.asarray(tokens), graphdef=graphdef)[0, : len(ids)]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def greedy_by_recompute(model: Decoder, prompt: list[int], steps: int) -> list[int]:
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(full_log_probs(model, seq)[-1].argmax()))
    return seq[len(prompt) :]


# ------------------------------------------------------------------------------------------
# Generation.


def test_greedy_with_cache_equals_full_recompute(model, prompts):
    got = generate_ids(model, prompts, max_new_tokens=NEW)
    assert got == [greedy_by_recompute(model, p, NEW) for p in prompts]
    assert len({t for row in got for t in row}) > 6  # the output is not one repeated token


def test_top_k_1_and_tiny_top_p_equal_greedy(gpt, prompts):
    greedy = generate_ids(gpt, prompts, max_new_tokens=NEW)
    for seed, filters in enumerate([dict(top_k=1), dict(top_p=1e-6)]):
        sampled = generate_ids(
            gpt, prompts, max_new_tokens=NEW, temperature=1.0, seed=seed, **filters
        )
        assert sampled == greedy, filters


def test_same_seed_same_samples_other_seed_other_samples(gpt, prompts):
    def sample(seed):
        return generate_ids(gpt, prompts, max_new_tokens=NEW, temperature=1.0, seed=seed)

    first = sample(0)
    assert sample(0) == first
    assert sample(1) != first
    assert first != generate_ids(gpt, prompts, max_new_tokens=NEW)  # not greedy in disguise


@pytest.mark.parametrize("filters", [dict(top_k=3), dict(top_p=0.5), dict(top_k=4, top_p=0.6)])
def test_samples_stay_inside_top_k_and_nucleus(gpt, prompts, filters):
    """Every sampled token is within the filters of its own prefix's full-forward distribution;
    top-p is applied to the top-k renormalised distribution."""
    got = generate_ids(gpt, prompts, max_new_tokens=NEW, temperature=1.0, seed=7, **filters)
    top_k, top_p = filters.get("top_k", 0), filters.get("top_p", 1.0)
    for prompt, new in zip(prompts, got, strict=True):
        assert len(new) == NEW
        for t, token in enumerate(new):
            log_probs = full_log_probs(gpt, prompt + new[:t])[-1]
            order = np.argsort(-log_probs, kind="stable")
            rank = int(np.nonzero(order == token)[0][0])
            kept = order[: top_k or len(order)]
            probs = np.exp(log_probs[kept] - np.logaddexp.reduce(log_probs[kept]))
            assert rank < len(kept)
            assert probs[:rank].sum() < top_p + 1e-6, (filters, t, rank)
    assert len({t for row in got for t in row}) > 6


def test_rows_stop_after_their_eos(gpt, prompts):
    greedy = generate_ids(gpt, prompts, max_new_tokens=NEW)
    # A stand-in eos: a token that row 0 produces mid-way for the first time.
    step = next(t for t in range(2, NEW) if greedy[0][t] not in greedy[0][:t])
    eos = greedy[0][step]
    expected = [row[: row.index(eos) + 1] if eos in row else row for row in greedy]
    assert len(expected[0]) == step + 1
    assert generate_ids(gpt, prompts, max_new_tokens=NEW, eos_id=eos) == expected
    # Every row stops at the same step: the loop ends early, and the results are unchanged.
    same = [prompts[2]] * 3
    row = greedy[2]
    early = generate_ids(gpt, same, max_new_tokens=NEW, eos_id=row[2])
    assert early == [row[: row.index(row[2]) + 1]] * 3


def test_generate_decodes_the_new_ids(gpt, small_tokenizer):
    texts = ["", "Return the", "def main():\n"]
    got = generate(gpt, small_tokenizer, texts, max_new_tokens=NEW, stop_at_eos=False)
    ids = [[small_tokenizer.bos_id, *small_tokenizer.encode(t)] for t in texts]
    assert [g.token_ids for g in got] == generate_ids(gpt, ids, max_new_tokens=NEW)
    for text, g in zip(texts, got, strict=True):
        assert isinstance(g, Generation)
        assert g.prompt == text
        assert g.text == small_tokenizer.decode(g.token_ids)
        assert g.finish_reason == "length"
    assert generate(gpt, small_tokenizer, []) == []


def test_generate_stops_at_eos(gpt, small_tokenizer):
    """A model whose final norm outputs a constant vector aligned with eos's embedding."""
    eos = small_tokenizer.eos_id
    forced = nnx.clone(gpt)
    table = forced.embed.embedding[...]
    forced.final_norm.scale[...] = jnp.zeros_like(forced.final_norm.scale[...])
    forced.final_norm.bias[...] = 50.0 * table[eos]
    assert int(jnp.argmax(table @ forced.final_norm.bias[...])) == eos  # precondition
    texts = ["", "Return the", "def main():\n"]
    for g in generate(forced, small_tokenizer, texts, max_new_tokens=NEW):
        assert (g.token_ids, g.text, g.finish_reason) == ([eos], "", "eos")
    for g in generate(forced, small_tokenizer, texts, max_new_tokens=NEW, stop_at_eos=False):
        assert (g.token_ids, g.finish_reason) == ([eos] * NEW, "length")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(texts=[LONG_TEXT]), DataError, r"prompt 0 has \d+ tokens .*max_seq_len=64"),
        (dict(max_new_tokens=63), DataError, r"prompt 1 has \d+ tokens .*max_new_tokens=63"),
        (dict(texts=["", "a"], add_bos=False), DataError, "prompt 0 is empty"),
        (dict(max_new_tokens=0), ConfigError, "max_new_tokens=0"),
        (dict(temperature=-1.0), ConfigError, "temperature=-1.0"),
        (dict(top_k=-2), ConfigError, "top_k=-2"),
        (dict(top_p=0.0), ConfigError, r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_p=1.5), ConfigError, "top_p=1.5"),
    ],
)
def test_generate_rejects_bad_input(gpt, small_tokenizer, kwargs, error, match):
    kwargs = {"texts": ["", "Return"], "max_new_tokens": NEW, **kwargs}
    with pytest.raises(error, match=match):
        generate(gpt, small_tokenizer, kwargs.pop("texts"), **kwargs)


def test_generate_ids_rejects_unknown_ids_and_small_vocab(gpt, small_tokenizer):
    with pytest.raises(DataError, match=r"token id 512, outside the model's vocabulary \[0, 512\)"):
        generate_ids(gpt, [[2, 512]], max_new_tokens=NEW)
    small = build(64)
    with pytest.raises(ConfigError, match="tokenizer has 512 ids but .* model.vocab_size=64"):
        generate(small, small_tokenizer, ["a"])
    with pytest.raises(ConfigError, match="model.vocab_size=64"):
        score_texts(small, small_tokenizer, ["a"])


# ------------------------------------------------------------------------------------------
# Scoring.


def test_score_equals_plain_forward(model, small_tokenizer):
    tok = small_tokenizer
    texts = [TEXT, "import os\nprint(os.getcwd())"]
    for add_eos in (False, True):
        scores = score_texts(model, tok, texts, add_eos=add_eos)
        for text, score in zip(texts, scores, strict=True):
            ids = tok.encode(text) + ([tok.eos_id] if add_eos else [])
            seq = [tok.bos_id, *ids]
            log_probs = full_log_probs(model, seq[:-1])[np.arange(len(ids)), ids]
            assert isinstance(score, TextScore)
            assert (score.text, score.token_ids, score.windows) == (text, ids, 1)
            assert score.num_tokens == len(ids)
            assert score.pieces == [tok.id_to_piece(i) for i in ids]
            np.testing.assert_allclose(score.token_logprobs, log_probs, atol=1e-5)
            assert score.total_logprob == pytest.approx(float(log_probs.sum()), abs=1e-4)
            assert score.perplexity == pytest.approx(math.exp(-score.total_logprob / len(ids)))


def test_score_does_not_depend_on_batching_or_padding(llama, small_tokenizer):
    short = "import os"
    alone = score_texts(llama, small_tokenizer, [short])[0]
    batch = score_texts(llama, small_tokenizer, [TEXT, short, TEXT + " " + TEXT])
    np.testing.assert_allclose(batch[1].token_logprobs, alone.token_logprobs, atol=1e-5)
    assert batch[1].total_logprob == pytest.approx(alone.total_logprob, abs=1e-5)
    assert alone.num_tokens < 16 < batch[0].num_tokens  # `short` alone has a shorter bucket
    assert batch[2].windows == 2


def test_sliding_window_scores_each_token_once(llama, small_tokenizer):
    tok, window, stride = small_tokenizer, 64, 32
    ids = tok.encode(LONG_TEXT)
    num = len(ids)
    assert num > 2 * window  # precondition: at least three windows
    score = score_texts(llama, tok, [LONG_TEXT])[0]
    assert score.num_tokens == len(score.token_logprobs) == num
    assert score.windows == 1 + math.ceil((num - window) / stride)

    # Reference: target j (predicting ids[j] from seq[:j+1]) is scored by the first window
    # that reaches it; window k covers inputs [k * stride, k * stride + window).
    seq = [tok.bos_id, *ids]
    window_log_probs = functools.cache(
        lambda begin: full_log_probs(llama, seq[begin : begin + window])
    )
    expected = np.zeros(num)
    for j in range(num):
        begin = 0 if j < window else stride * math.ceil((j + 1 - window) / stride)
        expected[j] = window_log_probs(begin)[j - begin, ids[j]]
    np.testing.assert_allclose(score.token_logprobs, expected, atol=1e-5)

    # A model with the same (RoPE) weights and a longer context scores it in one window;
    # the first window's tokens see the same context in both.
    wide_cfg = dataclasses.replace(llama.cfg, max_seq_len=256)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Decoder(wide_cfg, rngs=nnx.Rngs(0))))
    wide = nnx.merge(graphdef, nnx.state(llama))
    full = score_texts(wide, tok, [LONG_TEXT])[0]
    assert full.windows == 1
    np.testing.assert_allclose(
        score.token_logprobs[:window], full.token_logprobs[:window], atol=1e-5
    )
    assert full.total_logprob != pytest.approx(score.total_logprob, abs=1e-3)


def test_score_rejects_empty_text_and_bad_batch_size(llama, small_tokenizer):
    with pytest.raises(DataError, match="text 1 is empty.*add_eos=True"):
        score_texts(llama, small_tokenizer, ["a", ""])
    empty = score_texts(llama, small_tokenizer, [""], add_eos=True)[0]
    assert empty.token_ids == [small_tokenizer.eos_id]
    with pytest.raises(ConfigError, match="batch_size=0"):
        score_texts(llama, small_tokenizer, ["a"], batch_size=0)
    assert score_texts(llama, small_tokenizer, []) == []
