"""Dynamic MLM masking: hand-written cases, statistics over many windows, grain determinism."""

import types

import grain
import numpy as np
import pytest

from plm_jax.data.masking import MlmMasker
from plm_jax.errors import ConfigError

V = 1000
PAD, BOS, EOS, MASK, SEP = 0, 1, 2, 3, 999  # SEP: a special id away from the others
SPECIAL = (PAD, BOS, EOS, MASK, SEP)
NUM_WINDOWS, T = 2000, 128


def make_examples(num: int, length: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Packed-style windows: several documents, sprinkled special ids, padded tails."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, SEP, (num, length)).astype(np.int32)
    sprinkle = rng.random((num, length)) < 0.06
    tokens[sprinkle] = rng.choice(np.array([BOS, EOS, MASK, SEP], np.int32), sprinkle.sum())
    segments = 1 + np.cumsum(rng.random((num, length)) < 0.03, axis=1, dtype=np.int32)
    pad_start = np.where(rng.random(num) < 0.5, rng.integers(length // 2, length, num), length)
    padding = np.arange(length) >= pad_start[:, None]
    # Padding is usually the pad id, but segment 0 alone must keep a position out of the loss.
    tokens[padding & (rng.random((num, length)) < 0.7)] = PAD
    segments[padding] = 0
    return [
        {
            "inputs": tokens[i].copy(),
            "targets": np.roll(tokens[i], -1),  # next-token fields from packing, to be replaced
            "segment_ids": segments[i].copy(),
            "positions": np.arange(length, dtype=np.int32),
            "weights": np.ones(length, np.float32),
        }
        for i in range(num)
    ]


def mask_all(masker, examples, seed=0):
    """Masks every example with its own generator; returns stacked [N, T] arrays."""
    outs = [masker(ex, np.random.default_rng([seed, i])) for i, ex in enumerate(examples)]
    return {k: np.stack([o[k] for o in outs]) for k in outs[0]}


def five_sigma(p: float, n: int) -> float:
    return 5 * np.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def examples():
    return make_examples(NUM_WINDOWS, T)


@pytest.fixture(scope="module")
def originals(examples):
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


@pytest.fixture(scope="module")
def word_starts():
    starts = np.random.default_rng(1).random(V) < 0.5
    starts[[BOS, EOS, SEP]] = False  # specials must still stand alone as words
    return starts


# --- hand-written cases ---------------------------------------------------------------------


def test_selects_exactly_the_eligible_tokens_at_mask_prob_one():
    masker = MlmMasker(mask_id=MASK, vocab_size=20, special_ids=[PAD, BOS, EOS], mask_prob=1.0)
    example = {
        "inputs": np.array([1, 10, 11, 3, 12, 2, 0, 13], np.int32),  # 13: padding, not PAD
        "segment_ids": np.array([1, 1, 1, 1, 2, 2, 0, 0], np.int32),
    }
    out = masker(example, np.random.default_rng(0))
    np.testing.assert_array_equal(out["weights"], [0, 1, 1, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(out["targets"], example["inputs"])
    assert out["weights"].dtype == np.float32


def test_whole_word_groups_match_hand_written_words():
    # Word starts: 10, 12, 14; continuations: 11, 13, 15. EOS (2) is not a word start.
    starts = np.zeros(20, bool)
    starts[[10, 12, 14]] = True
    masker = MlmMasker(
        mask_id=MASK,
        vocab_size=20,
        special_ids=[PAD, BOS, EOS],
        mask_prob=0.5,
        whole_word=True,
        word_starts=starts,
    )
    example = {
        "inputs": np.array([1, 10, 11, 11, 12, 2, 13, 14, 15, 15, 13, 0, 0], np.int32),
        "segment_ids": np.array([1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 0, 0], np.int32),
    }
    # 13 after EOS starts a word (after a special); 15 at index 9 starts one (new segment).
    group = np.array([-1, 0, 0, 0, 1, -1, 2, 3, 3, 4, 4, -1, -1])
    picks = np.stack([masker(example, np.random.default_rng(s))["weights"] for s in range(300)])
    assert not picks[:, group == -1].any()
    word_picks = []
    for g in range(5):
        cols = picks[:, group == g]
        assert (cols == cols[:, :1]).all(), f"word {g} was split"
        word_picks.append(cols[:, 0])
    word_picks = np.stack(word_picks, axis=1)
    assert word_picks.mean(0).min() > 0 and word_picks.mean(0).max() < 1
    for a in range(5):
        for b in range(a + 1, 5):
            assert (word_picks[:, a] != word_picks[:, b]).any(), f"words {a}, {b} merged"


# --- invariants and statistics over many windows --------------------------------------------


@pytest.mark.parametrize("mask_prob", [0.15, 0.4])
def test_token_selection_rate_and_80_10_10_split(examples, originals, mask_prob):
    masker = MlmMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIAL, mask_prob=mask_prob)
    out = mask_all(masker, examples)
    tokens, segments = originals["inputs"], originals["segment_ids"]
    eligible = (segments != 0) & ~np.isin(tokens, SPECIAL)
    selected = out["weights"] == 1.0
    assert set(np.unique(out["weights"])) <= {0.0, 1.0}
    n = eligible.sum()
    assert abs(selected[eligible].mean() - mask_prob) < five_sigma(mask_prob, n)

    m = selected.sum()
    new, old = out["inputs"][selected], tokens[selected]
    # A random draw equal to the original token reads as "unchanged": 1 in 995 replacements.
    num_replacements = V - len(SPECIAL)
    expected = {
        "mask": 0.8,
        "random": 0.1 * (1 - 1 / num_replacements),
        "kept": 0.1 * (1 + 1 / num_replacements),
    }
    observed = {
        "mask": (new == MASK).mean(),
        "random": ((new != MASK) & (new != old)).mean(),
        "kept": (new == old).mean(),
    }
    for kind, p in expected.items():
        assert abs(observed[kind] - p) < five_sigma(p, m), (kind, observed[kind], p)


def test_specials_padding_and_unselected_positions_never_change(examples, originals):
    masker = MlmMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIAL, mask_prob=0.3)
    out = mask_all(masker, examples)
    tokens, segments = originals["inputs"], originals["segment_ids"]
    selected = out["weights"] == 1.0
    protected = (segments == 0) | np.isin(tokens, SPECIAL)
    assert protected.sum() > 10_000
    assert not selected[protected].any()
    np.testing.assert_array_equal(out["inputs"][~selected], tokens[~selected])
    np.testing.assert_array_equal(out["targets"], tokens)
    for key in ("segment_ids", "positions"):
        np.testing.assert_array_equal(out[key], originals[key])
    # Replacements are the mask id or non-special ids inside the vocabulary.
    changed = out["inputs"][selected & (out["inputs"] != tokens)]
    random = changed[changed != MASK]
    assert random.size > 1000
    assert random.min() >= 0 and random.max() < V
    assert not np.isin(random, SPECIAL).any()
    assert np.unique(random).size > 0.9 * (V - len(SPECIAL))  # spread over the vocabulary


def test_input_example_is_not_modified(examples):
    masker = MlmMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIAL, mask_prob=0.5)
    example = examples[0]
    before = {k: v.copy() for k, v in example.items()}
    out = masker(example, np.random.default_rng(0))
    assert (out["inputs"] != example["inputs"]).any()
    for k, v in before.items():
        np.testing.assert_array_equal(example[k], v)
    assert not np.shares_memory(out["targets"], example["inputs"])
    assert not np.shares_memory(out["inputs"], example["inputs"])


def reference_words(tokens, segments, word_starts):
    """Word number of each token, by the plain reading of the rule, one token at a time."""
    special = np.isin(tokens, SPECIAL)
    words, w = np.empty(len(tokens), int), -1
    for i, tok in enumerate(tokens):
        if (
            i == 0
            or word_starts[tok]
            or special[i]
            or special[i - 1]
            or segments[i] != segments[i - 1]
        ):
            w += 1
        words[i] = w
    return words


def test_whole_word_masks_whole_words_at_mask_prob(examples, originals, word_starts):
    mask_prob = 0.15
    masker = MlmMasker(
        mask_id=MASK,
        vocab_size=V,
        special_ids=SPECIAL,
        mask_prob=mask_prob,
        whole_word=True,
        word_starts=word_starts,
    )
    out = mask_all(masker, examples)
    picked_words = eligible_words = 0
    multi_token_picked = 0
    for i in range(NUM_WINDOWS):
        tokens, segments = originals["inputs"][i], originals["segment_ids"][i]
        words = reference_words(tokens, segments, word_starts)
        num = words[-1] + 1
        weights = out["weights"][i]
        eligible_token = (segments != 0) & ~np.isin(tokens, SPECIAL)
        picked = np.bincount(words, weights, num)
        size = np.bincount(words, minlength=num)
        eligible = np.bincount(words, eligible_token, num) == size
        assert ((picked == 0) | (picked == size)).all(), f"window {i}: a word was split"
        assert not picked[~eligible].any()
        picked_words += (picked[eligible] > 0).sum()
        eligible_words += eligible.sum()
        multi_token_picked += ((picked > 0) & (size > 1)).sum()
        # Every selected token still gets its own 80/10/10 choice and unselected ones stay.
        np.testing.assert_array_equal(out["inputs"][i][weights == 0], tokens[weights == 0])
    assert multi_token_picked > 1000
    share = picked_words / eligible_words
    assert abs(share - mask_prob) < five_sigma(mask_prob, eligible_words)
    selected = out["weights"] == 1.0
    mask_share = (out["inputs"][selected] == MASK).mean()
    assert abs(mask_share - 0.8) < five_sigma(0.8, selected.sum())


# --- reproducibility through grain ----------------------------------------------------------


def masked_dataset(examples, seed):
    masker = MlmMasker(mask_id=MASK, vocab_size=V, special_ids=SPECIAL)
    return grain.MapDataset.source(examples).repeat(2).random_map(masker, seed=seed)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_same_seed_same_masks_and_epochs_differ(examples):
    source = examples[:16]
    first, second = masked_dataset(source, 7), masked_dataset(source, 7)
    other_seed = masked_dataset(source, 8)
    for i in range(32):
        assert_same(first[i], second[i])
    assert any((first[i]["weights"] != other_seed[i]["weights"]).any() for i in range(32))
    for i in range(16):  # element i of epoch 1 and its copy in epoch 2
        np.testing.assert_array_equal(first[i]["targets"], first[i + 16]["targets"])
        assert (first[i]["weights"] != first[i + 16]["weights"]).any()


def test_resume_from_iterator_state_continues_exactly(examples):
    ds = masked_dataset(examples[:16], 7)
    full = list(ds.to_iter_dataset())
    assert len(full) == 32
    k = 11
    it = iter(ds.to_iter_dataset())
    head = [next(it) for _ in range(k)]
    state = it.get_state()
    resumed = iter(masked_dataset(examples[:16], 7).to_iter_dataset())
    resumed.set_state(state)
    tail = list(resumed)
    assert len(head) + len(tail) == len(full)
    for a, b in zip(head + tail, full, strict=True):
        assert_same(a, b)


# --- construction and errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_prob": 0.0}, "mask_prob=0.0 must be in"),
        ({"mask_prob": 1.5}, "mask_prob=1.5 must be in"),
        ({"mask_id": 20}, "mask_id=20 is outside"),
        ({"vocab_size": 1, "mask_id": 0}, "vocab_size=1"),
        ({"special_ids": [0, 25]}, r"special ids \[25\] are outside"),
        ({"special_ids": range(20)}, "all 20 ids are special"),
        ({"whole_word": True}, "whole_word=True needs word_starts"),
        ({"whole_word": True, "word_starts": np.ones(19, bool)}, r"shape \(20,\)"),
        ({"whole_word": True, "word_starts": np.ones(20, int)}, "bool array"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = {"mask_id": MASK, "vocab_size": 20, "special_ids": [PAD, BOS, EOS]} | kwargs
    with pytest.raises(ValueError, match=match):
        MlmMasker(**args)


def test_from_tokenizer_reads_the_tokenizer():
    starts = np.zeros(20, bool)
    starts[10:] = True
    tokenizer = types.SimpleNamespace(
        mask_id=4, vocab_size=20, special_ids=frozenset({0, 1, 2}), word_starts=lambda: starts
    )
    masker = MlmMasker.from_tokenizer(tokenizer, mask_prob=0.2, whole_word=True)
    assert (masker.mask_id, masker.vocab_size, masker.mask_prob) == (4, 20, 0.2)
    np.testing.assert_array_equal(np.flatnonzero(masker.is_special), [0, 1, 2, 4])
    np.testing.assert_array_equal(masker.word_starts, starts)
    del tokenizer.word_starts  # not needed without whole_word
    assert MlmMasker.from_tokenizer(tokenizer, mask_prob=0.2, whole_word=False).word_starts is None


def test_from_tokenizer_without_mask_token_raises():
    tokenizer = types.SimpleNamespace(mask_id=None, vocab_size=20, special_ids=frozenset({0}))
    with pytest.raises(ConfigError, match="no mask token.*mask_piece"):
        MlmMasker.from_tokenizer(tokenizer, mask_prob=0.15, whole_word=False)
