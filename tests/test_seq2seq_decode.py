"""Tests for plm_jax.infer.seq2seq: greedy and beam search over an encoder-decoder.

Two kinds of model:
  * `TrieModel`, a stand-in with the `EncoderDecoder` decoding interface whose next-token
    distribution is written out per prefix (a trie), so the length penalty and early stopping
    cases are constructed by hand, with hand-computed scores; its cache holds the trie node, so
    a wrong beam reordering (`take_rows`) gives wrong results;
  * the real `EncoderDecoder` (t5-tiny shape, V=300 from a small tokenizer, numpy random
    weights with a large output head so distributions are peaky; searches restricted to the
    first 12 ids so eos is often likely), checked against a plain beam search written here
    (`reference_beam_search`) that recomputes the full forward pass
    `model(src, [start] + prefix)` at every step, with no cache.

Plus: beam size 1 equals greedy, rows do not depend on their batch or padding, a corpus in
one source bucket compiles once, `decode_texts` keeps input order, every user error, and
(marked `hf`) agreement with `T5ForConditionalGeneration.generate` on a converted tiny model.
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

from plm_jax.config import MODEL_PRESETS, ModelConfig
from plm_jax.errors import ConfigError, DataError
from plm_jax.infer.seq2seq import Seq2SeqDecoder, beam_search, greedy_decode
from plm_jax.models import LmOutput

PAD, EOS = 0, 1


# -- a reference beam search: one row, Python lists, Hugging Face's rules --------------------


def reference_beam_search(
    logp_fn, *, beam_size, max_len, length_penalty, early_stopping, eos_id=EOS
):
    """The best (tokens, score) of one source. `logp_fn(prefixes)` gives the [n, V] next-token
    log-probs after each generated prefix (start token excluded). Arithmetic in float32, ties
    broken by (beam, token) order, as `jax.lax.top_k` does."""
    lp = np.float32(length_penalty)
    live = [([], np.float32(0.0))]
    done = []  # (score, tokens), best first
    for step in range(max_len):
        logp = np.asarray(logp_fn([tokens for tokens, _ in live]), np.float32)
        cands = [
            (score + logp[b, v], [*tokens, v])
            for b, (tokens, score) in enumerate(live)
            for v in range(logp.shape[1])
        ]
        cands = sorted(cands, key=lambda c: -c[0])[: 2 * beam_size]  # stable: ties keep order
        length = np.float32(step + 1)
        ends = [t[-1] == eos_id or step == max_len - 1 for _, t in cands]
        for rank, ((score, tokens), end) in enumerate(zip(cands, ends, strict=True)):
            if end and rank < beam_size:
                done.append((score / length**lp, tokens))
        done = sorted(done, key=lambda d: -d[0])[:beam_size]
        live = [(t, s) for (s, t), end in zip(cands, ends, strict=True) if not end][:beam_size]
        if len(done) == beam_size:
            if early_stopping is True:
                break
            horizon = np.float32(max_len) if early_stopping == "never" and lp > 0 else length
            if not live or live[0][1] / horizon**lp <= done[-1][0]:
                break
    return done[0][1], float(done[0][0])


def reference_greedy(logp_fn, *, max_len):
    tokens, total = [], np.float32(0.0)
    for _ in range(max_len):
        logp = np.asarray(logp_fn([tokens])[0], np.float32)
        tokens.append(int(np.argmax(logp)))
        total += logp[tokens[-1]]
        if tokens[-1] == EOS:
            break
    return tokens, float(total)


def cut(tokens, length):
    return [int(t) for t in tokens[:length]]


# -- a stand-in model whose distributions are written per prefix ----------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrieCache:
    node: jax.Array  # [B] int32, the trie node after the tokens fed so far
    index: jax.Array  # [] int32

    def take_rows(self, index):
        return TrieCache(self.node[index], self.index)


def trie_probs(tree, vocab: int, prefix) -> np.ndarray:
    """[V] next-token probabilities after `prefix` (a tuple); the sink's for unknown ones."""
    listed = tree.get(prefix, {EOS: 0.9})
    out = np.full(vocab, (1.0 - sum(listed.values())) / (vocab - len(listed)))
    for v, p in listed.items():
        out[v] = p
    return out


def trie_logp(tree, vocab: int):
    """The reference's `logp_fn` for a trie."""
    return lambda prefixes: np.log([trie_probs(tree, vocab, tuple(p)) for p in prefixes])


class TrieModel(nnx.Module):
    """Next-token probabilities given per generated prefix (the start token excluded); the
    unlisted tokens share the rest of the mass. Prefixes not in the tree go to a sink that
    says eos with probability 0.9. The source is ignored; `traces` counts `encode` calls,
    which happen once per compilation."""

    traces = 0

    def __init__(self, tree: dict[tuple[int, ...], dict[int, float]], vocab: int):
        self.cfg = ModelConfig(family="encoder_decoder", vocab_size=vocab)
        prefixes = list(tree)
        node = {p: i + 1 for i, p in enumerate(prefixes)}  # 0: before the start token
        sink = len(prefixes) + 1
        child = np.full((sink + 1, vocab), sink, np.int32)
        child[0, :] = node[()]
        for p in prefixes:
            for v in range(vocab):
                child[node[p], v] = node.get((*p, v), sink)
        rows = [None, *prefixes, "sink"]  # node 0 is never read
        table = [trie_probs(tree, vocab, p) for p in rows]
        self.child = nnx.Variable(jnp.asarray(child))
        self.table = nnx.Variable(jnp.asarray(np.log(table), jnp.float32))

    def encode(self, tokens, *, segment_ids=None, **_):
        TrieModel.traces += 1
        return jnp.zeros((*tokens.shape, 1), jnp.float32)

    def init_cache(self, encoded, encoder_segment_ids, max_len):
        del encoder_segment_ids, max_len
        return TrieCache(jnp.zeros(encoded.shape[:1], jnp.int32), jnp.zeros((), jnp.int32))

    def decode(self, tokens, encoded, *, encoder_segment_ids, cache, **_):
        node = self.child[...][cache.node, tokens[:, 0]]
        logits = self.table[...][node][:, None]
        return LmOutput(logits=logits, hidden=encoded, cache=TrieCache(node, cache.index + 1))


A, B, C, D, E = 2, 3, 4, 5, 6
# Two beams: "A eos" (p=.25) is found at step 2, "A C eos" (p=.135) at step 3, which fills
# the beams; the live "B C D" (p=.256) ends as "B C D eos" (p=.2304) at step 4.
TREE = {
    (): {A: 0.5, B: 0.4, EOS: 0.05},
    (A,): {EOS: 0.5, C: 0.3},
    (B,): {C: 0.8},
    (A, C): {EOS: 0.9},
    (B, C): {D: 0.8},
    (B, C, D): {EOS: 0.9},
}
SHORT, MID, LONG = [A, EOS], [A, C, EOS], [B, C, D, EOS]
P = {2: 0.25, 3: 0.5 * 0.3 * 0.9, 4: 0.4 * 0.8 * 0.8 * 0.9}


@pytest.fixture(scope="module")
def trie():
    return TrieModel(TREE, vocab=8)


def trie_search(model, **kw):
    src = jnp.full((2, 4), A, jnp.int32)
    kw = dict(beam_size=2, max_len=6, eos_id=EOS, pad_id=PAD) | kw
    out = jax.tree_util.tree_map(np.asarray, beam_search(model, src, jnp.ones_like(src), **kw))
    return cut(out.tokens[0], out.lengths[0]), float(out.scores[0]), out


@pytest.mark.parametrize(
    "length_penalty, early_stopping, best",
    [
        # True: stops at step 3 with SHORT (log .25 = -1.386, / 2 = -0.693) and MID
        # (log .135 = -2.003, / 3 = -0.668) kept; the length penalty picks between them.
        (0.0, True, SHORT),
        (1.0, True, MID),
        # False: the live "B C D" (log .256 = -1.363, / 3 = -0.454) may still beat the worst
        # kept, so LONG (log .2304 = -1.468, / 4 = -0.367) is found; with length_penalty 0
        # its plain sum is lower than SHORT's.
        (0.0, False, SHORT),
        (1.0, False, LONG),
        (1.0, "never", LONG),
        (0.0, "never", SHORT),
    ],
)
def test_trie_length_penalty_and_early_stopping(trie, length_penalty, early_stopping, best):
    tokens, score, out = trie_search(
        trie, length_penalty=length_penalty, early_stopping=early_stopping
    )
    assert tokens == best
    expected = math.log(P[len(best)]) / len(best) ** length_penalty
    assert score == pytest.approx(expected, abs=1e-5)
    ref = reference_beam_search(
        trie_logp(TREE, 8),
        beam_size=2,
        max_len=6,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
    )
    assert (tokens, score) == (ref[0], pytest.approx(ref[1], abs=1e-5))
    # Both rows are the same source; positions after the eos hold padding.
    np.testing.assert_array_equal(out.tokens[0], out.tokens[1])
    assert (out.tokens[0, len(best) :] == PAD).all()


# Two beams, length_penalty 1: after step 2 "A eos" (p=.225, -0.746) and "B eos" (p=.2205,
# -0.756) fill the beams; the live "B C" (p=.2025) scores -1.597 / 2 = -0.799, below the worst
# kept, so HF's heuristic stops (a live beam's score is divided by its current length, 2),
# although "B C eos" (p=.2005, -1.607 / 3 = -0.536) would have won. "never" divides by
# max_len=6 (-0.266) and finds it.
TREE2 = {
    (): {A: 0.5, B: 0.45},
    (A,): {EOS: 0.45},
    (B,): {EOS: 0.49, C: 0.45},
    (B, C): {EOS: 0.99},
}


@pytest.mark.parametrize(
    "early_stopping, best, p",
    [
        (True, SHORT, 0.5 * 0.45),
        (False, SHORT, 0.5 * 0.45),
        ("never", [B, C, EOS], 0.45 * 0.45 * 0.99),
    ],
)
def test_trie_early_stopping_heuristic(early_stopping, best, p):
    model = TrieModel(TREE2, vocab=8)
    tokens, score, _ = trie_search(model, length_penalty=1.0, early_stopping=early_stopping)
    assert tokens == best and score == pytest.approx(math.log(p) / len(best), abs=1e-5)
    ref = reference_beam_search(
        trie_logp(TREE2, 8),
        beam_size=2,
        max_len=6,
        length_penalty=1.0,
        early_stopping=early_stopping,
    )
    assert (tokens, score) == (ref[0], pytest.approx(ref[1], abs=1e-5))


def test_trie_greedy(trie):
    src = jnp.full((2, 4), A, jnp.int32)
    out = greedy_decode(trie, src, jnp.ones_like(src), max_len=6, eos_id=EOS, pad_id=PAD)
    out = jax.tree_util.tree_map(np.asarray, out)
    assert cut(out.tokens[0], out.lengths[0]) == SHORT  # A (.5), then eos (.5) over C (.3)
    assert out.scores[0] == pytest.approx(math.log(0.25), abs=1e-6)
    assert out.tokens[0, 2:].tolist() == [PAD] * 4


def test_trie_max_len_ends_hypotheses(trie):
    """At max_len every candidate counts as finished: with max_len=2, "B C" (p=.32, no eos)
    beats SHORT (p=.25); with max_len=1, "A" (p=.5)."""
    for lp in (0.0, 1.0):
        tokens, score, out = trie_search(trie, max_len=2, length_penalty=lp)
        assert tokens == [B, C] and score == pytest.approx(math.log(0.32) / 2**lp, abs=1e-6)
        assert out.lengths[0] == 2
    tokens, score, _ = trie_search(trie, max_len=1, length_penalty=1.0, early_stopping=False)
    assert tokens == [A] and score == pytest.approx(math.log(0.5), abs=1e-6)


def test_decoder_compiles_once_per_bucket(trie):
    """Sources of 1..16 tokens share one program; a 17-token source needs the 32 bucket."""
    decoder = Seq2SeqDecoder(
        batch_size=3, max_len=6, max_source_len=40, eos_id=EOS, pad_id=PAD, beam_size=2
    )
    assert decoder.shapes == ((3, 16), (3, 32), (3, 40))
    before = TrieModel.traces
    first = decoder.decode_ids(trie, [[A] * 3, [B] * 5])
    assert TrieModel.traces == before + 1
    for n in (1, 7, 16):
        assert decoder.decode_ids(trie, [[A] * n] * 4) == [first[0]] * 4  # 2 batches of 3
    assert TrieModel.traces == before + 1
    decoder.decode_ids(trie, [[A] * 17])
    assert TrieModel.traces == before + 2
    # length_penalty is traced: another value runs the same program.
    decoder.length_penalty = 0.0
    assert decoder.decode_ids(trie, [[A] * 2])[0].token_ids == SHORT
    assert TrieModel.traces == before + 2
    assert first[0].token_ids == MID and first[0].is_finished  # lp 1, early stopping True


def test_user_errors(trie):
    src = jnp.ones((1, 4), jnp.int32)
    kw = dict(beam_size=2, max_len=4, eos_id=EOS, pad_id=PAD)
    for bad, match in [
        (dict(beam_size=0), "beam_size=0 must be at least 1"),
        (dict(beam_size=5), "beam_size=5 is more than half the vocabulary"),
        (dict(max_len=0), "max_len=0 must be at least 1"),
        (dict(length_penalty=float("nan")), "length_penalty=nan must be a finite"),
        (dict(early_stopping="sometimes"), "early_stopping='sometimes' must be True"),
        (dict(eos_id=8), "eos_id=8 is outside the vocabulary"),
        (dict(vocab_size=4, pad_id=5), "pad_id=5 is outside the vocabulary \\[0, 4\\)"),
    ]:
        with pytest.raises(ConfigError, match=match):
            beam_search(trie, src, src, **(kw | bad))
    with pytest.raises(ConfigError, match="batch_size=0 must be at least 1"):
        Seq2SeqDecoder(batch_size=0, max_len=4, max_source_len=8, eos_id=EOS, pad_id=PAD)
    with pytest.raises(ConfigError, match="max_len=-1 must be at least 1"):
        Seq2SeqDecoder(batch_size=1, max_len=-1, max_source_len=8, eos_id=EOS, pad_id=PAD)
    decoder = Seq2SeqDecoder(batch_size=1, max_len=4, max_source_len=8, eos_id=EOS, pad_id=PAD)
    with pytest.raises(DataError, match="source 1 is empty"):
        decoder.decode_ids(trie, [[A], []])
    with pytest.raises(DataError, match="source 0 has 9 tokens, more than max_source_len=8"):
        decoder.decode_ids(trie, [[A] * 9])
    with pytest.raises(DataError, match="source 0 holds token id 8, outside"):
        decoder.decode_ids(trie, [[A, 8]])


# -- the real encoder-decoder against a full-recompute reference ----------------------------

T = 10  # max_len in every real-model search
SEARCH_VOCAB = 12  # real-model searches use ids < 12 only, so eos is often likely
REF_ROWS, SRC_LEN = 4, 16  # the reference forward pass's fixed shapes


def build_t5(vocab: int, seed: int = 0):
    """t5-tiny with numpy random weights (eager init would compile every initialiser apart);
    the output head is drawn large so next-token distributions are peaky."""
    from plm_jax.models.encoder_decoder import EncoderDecoder

    cfg = ModelConfig(**(MODEL_PRESETS["t5-tiny"] | dict(preset="t5-tiny", vocab_size=vocab)))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: EncoderDecoder(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = jax.tree_util.keystr(path)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if x.ndim == 1:  # norm scales near 1
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), x.dtype)
        std = 0.5 if "head" in name or "rel_bias" in name else 1.0 if "embed" in name else 0.1
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


@functools.partial(jax.jit, static_argnames="graphdef")
def _full_logits(state, src, src_segments, dec, *, graphdef):
    model = nnx.merge(graphdef, state)
    out = model(src, dec, segment_ids=src_segments, decoder_segment_ids=jnp.ones_like(dec))
    return out.logits


def full_logp(model, src_ids, vocab=SEARCH_VOCAB):
    """The reference's `logp_fn` for one source: the whole forward pass on `[start] + prefix`,
    no cache, log-softmax over the ids below `vocab`."""
    graphdef, state = nnx.split(model)
    src = np.zeros((REF_ROWS, SRC_LEN), np.int32)
    src[:, : len(src_ids)] = src_ids
    segments = (np.arange(SRC_LEN) < len(src_ids)).astype(np.int32)[None].repeat(REF_ROWS, 0)

    def logp_fn(prefixes):
        dec = np.full((REF_ROWS, T), PAD, np.int32)  # causal: later columns never matter
        for row, p in enumerate(prefixes):
            dec[row, 1 : 1 + len(p)] = p
        logits = np.asarray(_full_logits(state, src, segments, dec, graphdef=graphdef))
        rows = [logits[row, len(p), :vocab] for row, p in enumerate(prefixes)]
        return np.asarray(jax.nn.log_softmax(jnp.asarray(np.stack(rows)), axis=-1))

    return logp_fn


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A 300-piece SentencePiece model (eos id 3) trained on a few sentences, in well under a
    second (the session's `small_tokenizer` reads the stdlib's docstrings first, ~20 s)."""
    from plm_jax.tokenizer import train_tokenizer

    texts = [
        "Return the number of items in a container, or raise an error if it is empty.",
        "Open the file and read its lines into a list of strings, then close it again.",
        "Print the value to standard output.",
        "Raise an error when the key is missing.",
    ]
    out = tmp_path_factory.mktemp("tokenizer")
    return train_tokenizer(texts * 20, out, vocab_size=300, show_progress=False)


@pytest.fixture(scope="module")
def t5(tokenizer):
    # Seed 4: within the 12 searched ids, hypotheses end (eos) at different lengths, the
    # length penalty changes some choices and beam search beats greedy on some rows.
    return build_t5(tokenizer.vocab_size, seed=4)


@pytest.fixture(scope="module")
def sources():
    """Three sources of 5, 11 and 16 ids (eos last), right-padded to 16."""
    rng = np.random.default_rng(1)
    rows = [[*rng.integers(4, SEARCH_VOCAB, n - 1).tolist(), EOS] for n in (5, 11, 16)]
    tokens = np.zeros((3, SRC_LEN), np.int32)
    segments = np.zeros((3, SRC_LEN), np.int32)
    for r, ids in enumerate(rows):
        tokens[r, : len(ids)], segments[r, : len(ids)] = ids, 1
    return rows, tokens, segments


def search(model, tokens, segments, **kw):
    kw = dict(max_len=T, eos_id=EOS, pad_id=PAD, vocab_size=SEARCH_VOCAB) | kw
    fn = greedy_decode if kw.pop("greedy", False) else beam_search
    out = jax.tree_util.tree_map(np.asarray, fn(model, tokens, segments, **kw))
    rows = [cut(out.tokens[r], out.lengths[r]) for r in range(len(out.lengths))]
    return rows, out.scores.tolist(), out


@pytest.mark.parametrize(
    "beam_size, early_stopping, length_penalties",
    [(3, True, (1.0, 0.0)), (2, False, (1.5, -0.5))],
)
def test_beam_search_matches_full_recompute(
    t5, sources, beam_size, early_stopping, length_penalties
):
    rows, tokens, segments = sources
    results = []
    for lp in length_penalties:  # traced: one compilation per parametrisation
        got, scores, out = search(
            t5,
            tokens,
            segments,
            beam_size=beam_size,
            length_penalty=lp,
            early_stopping=early_stopping,
        )
        for r, ids in enumerate(rows):
            want = reference_beam_search(
                full_logp(t5, ids),
                beam_size=beam_size,
                max_len=T,
                length_penalty=lp,
                early_stopping=early_stopping,
            )
            assert got[r] == want[0], (lp, r)
            assert scores[r] == pytest.approx(want[1], abs=1e-5), (lp, r)
            assert (out.tokens[r, len(got[r]) :] == PAD).all()
        results.append(got)
    # Not trivial: hypotheses end before max_len, the length penalty changes a choice, and
    # beam search finds something greedy does not.
    assert any(len(g) < T for g in results[0])
    assert results[0] != results[1]
    greedy = [reference_greedy(full_logp(t5, ids), max_len=T)[0] for ids in rows]
    assert any(got != greedy for got in results)


def test_beam_size_one_equals_greedy(t5, sources):
    rows, tokens, segments = sources
    greedy, greedy_scores, _ = search(t5, tokens, segments, greedy=True)
    beam, beam_scores, _ = search(t5, tokens, segments, beam_size=1, length_penalty=0.7)
    assert beam == greedy
    for r, ids in enumerate(rows):
        want, want_score = reference_greedy(full_logp(t5, ids), max_len=T)
        assert greedy[r] == want
        assert greedy_scores[r] == pytest.approx(want_score, abs=1e-5)
        assert beam_scores[r] == pytest.approx(want_score / len(want) ** 0.7, abs=1e-5)


def test_rows_do_not_depend_on_the_batch(t5, sources):
    """Row 0 (5 ids) alone, unpadded, equals row 0 in the batch padded to 16."""
    rows, tokens, segments = sources
    kw = dict(beam_size=3, length_penalty=1.0)
    batched, batched_scores, _ = search(t5, tokens, segments, **kw)
    alone, alone_scores, _ = search(t5, tokens[:1, :5], segments[:1, :5], **kw)
    assert alone[0] == batched[0]
    assert alone_scores[0] == pytest.approx(batched_scores[0], abs=1e-5)


def test_decode_texts_keeps_order(t5, tokenizer):
    """Five texts in batches of 3 (sorted by length, the last batch padded with a copy), one
    truncated to 16 tokens; each equals the reference search of its own ids."""
    from plm_jax.infer import decode_texts

    tok = tokenizer
    texts = [
        "Return the number of items.",
        "Open the file and read its lines into a list of strings, then close it again.",
        "",
        "Raise an error.",
        "Print it.",
    ]
    got = decode_texts(
        t5,
        tok,
        texts,
        beam_size=3,
        length_penalty=1.0,
        max_len=T,
        batch_size=3,
        max_source_len=SRC_LEN,
        truncate=True,
    )
    for text, out in zip(texts, got, strict=True):
        ids = tok.encode(text)[: SRC_LEN - 1] + [tok.eos_id]
        want, _ = reference_beam_search(
            full_logp(t5, ids, vocab=tok.vocab_size),
            beam_size=3,
            max_len=T,
            length_penalty=1.0,
            early_stopping=True,
            eos_id=tok.eos_id,
        )
        assert out == tok.decode(want[:-1] if want[-1] == tok.eos_id else want)
    assert len(set(got)) > 1
    n = len(tok.encode(texts[1])) + 1
    with pytest.raises(DataError, match=f"source 1 has {n} tokens, more than max_source_len=16"):
        decode_texts(t5, tok, [texts[4], texts[1]], max_len=T, batch_size=3, max_source_len=SRC_LEN)


# -- against transformers' generate ---------------------------------------------------------

HF_VOCAB = 16  # small, so eos (id 1) is often likely


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
    """(torch model, plm_jax model): a tiny random T5 v1.0 (ReLU, tied head scaled by
    D**-0.5) converted with `load_hf_model`; the shared embedding is drawn large (std 1.5), so
    next-token distributions are peaky. Seed 5: some hypotheses end early, the length penalty
    changes one, and beam search differs from greedy."""
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    from plm_jax.convert import load_hf_model

    config = transformers.T5Config(
        vocab_size=HF_VOCAB,
        d_model=32,
        d_kv=16,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
        feed_forward_proj="relu",
        dropout_rate=0.0,
        pad_token_id=PAD,
        eos_token_id=EOS,
        decoder_start_token_id=PAD,
    )
    torch.manual_seed(5)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 1.5 if name == "shared.weight" else 0.3)
    path = tmp_path_factory.mktemp("hf_t5")
    model.save_pretrained(path, safe_serialization=True)
    return model, load_hf_model(path)


@pytest.mark.hf
@pytest.mark.parametrize(
    "beam_size, early_stopping, length_penalties", [(3, True, (1.0, 0.0)), (4, False, (0.0, 1.0))]
)
def test_matches_transformers_generate(hf_t5, beam_size, early_stopping, length_penalties):
    import torch

    torch_model, model = hf_t5
    rng = np.random.default_rng(2)
    lengths = (4, 9, 7)
    src = np.zeros((3, 9), np.int64)
    for r, n in enumerate(lengths):
        src[r, :n] = [*rng.integers(2, HF_VOCAB, n - 1), EOS]
    mask = (np.arange(9)[None] < np.array(lengths)[:, None]).astype(np.int64)
    jax_src, jax_mask = jnp.asarray(src, jnp.int32), jnp.asarray(mask, jnp.int32)
    ended_early = False
    for lp in length_penalties:
        with torch.no_grad():
            want = torch_model.generate(
                input_ids=torch.tensor(src),
                attention_mask=torch.tensor(mask),
                num_beams=beam_size,
                early_stopping=early_stopping,
                length_penalty=lp,
                max_new_tokens=T,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        got, scores, _ = search(
            model,
            jax_src,
            jax_mask,
            beam_size=beam_size,
            length_penalty=lp,
            early_stopping=early_stopping,
            vocab_size=None,
        )
        for r in range(3):
            seq = want.sequences[r, 1:].tolist()  # without the start token
            seq = seq[: seq.index(EOS) + 1] if EOS in seq else seq
            assert got[r] == seq, (lp, r)
            assert scores[r] == pytest.approx(float(want.sequences_scores[r]), abs=1e-4)
            ended_early |= len(seq) < T
    assert ended_early


@pytest.mark.hf
def test_greedy_matches_transformers_generate(hf_t5):
    import torch

    torch_model, model = hf_t5
    src = np.array([[5, 9, 12, 1, 0], [3, 3, 14, 7, 1]])
    mask = (src > 0).astype(np.int64)
    with torch.no_grad():
        want = torch_model.generate(
            input_ids=torch.tensor(src),
            attention_mask=torch.tensor(mask),
            num_beams=1,
            do_sample=False,
            max_new_tokens=T,
        )
    got, _, _ = search(
        model,
        jnp.asarray(src, jnp.int32),
        jnp.asarray(mask, jnp.int32),
        greedy=True,
        vocab_size=None,
    )
    for r in range(2):
        seq = want[r, 1:].tolist()
        assert got[r] == (seq[: seq.index(EOS) + 1] if EOS in seq else seq)
