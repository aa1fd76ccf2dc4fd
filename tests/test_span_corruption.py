"""T5 span corruption: hand-written layouts, a port of T5's functions, statistics, lengths that
fit every packing, grain determinism and resume, sentinel pieces, pipeline and config."""

import numpy as np
import pytest

from plm_jax.config import load_config
from plm_jax.data.loader import BatchLoader
from plm_jax.data.packing import PackedWindows
from plm_jax.data.pipeline import (
    build_pipeline,
    load_or_train_tokenizer,
    make_span_corruption,
    train_tokenizer_from_config,
)
from plm_jax.data.span_corruption import (
    MIN_DOC_LEN,
    SpanCorruption,
    span_corruption_lengths,
    span_counts,
)
from plm_jax.errors import ConfigError
from tests.test_packing import make_store

PAD, BOS, EOS = 0, 2, 3
SENTINELS = list(range(1000, 1100))  # above every word id, so a test can tell them apart
WORDS = (4, 1000)  # word ids are drawn from [4, 1000)

ENCODER_FIELDS = ("inputs", "segment_ids", "positions")
DECODER_FIELDS = ("decoder_inputs", "decoder_segment_ids", "decoder_positions", "targets")


def corrupter(encoder_len=64, noise_density=0.15, mean_span_length=3.0, sentinels=SENTINELS):
    return SpanCorruption(
        sentinel_ids=sentinels,
        eos_id=EOS,
        pad_id=PAD,
        encoder_len=encoder_len,
        noise_density=noise_density,
        mean_span_length=mean_span_length,
    )


def make_window(rng, length, doc_lens, offset=0):
    """A raw window as `PackedWindows(causal=False)` cuts it from documents [bos] words eos.

    `doc_lens` are the documents' lengths with bos and eos (>= 2); the window starts `offset`
    tokens into the stream and is padded past its end.
    """
    docs = [[BOS, *rng.integers(*WORDS, n - 2), EOS] for n in doc_lens]
    stream = np.concatenate(docs)[offset : offset + length]
    doc_id = np.repeat(np.arange(len(docs)), doc_lens)[offset : offset + length]
    inputs = np.full(length, PAD, np.int32)
    segments = np.zeros(length, np.int32)
    inputs[: stream.size] = stream
    segments[: stream.size] = doc_id - doc_id[0] + 1
    return {"inputs": inputs, "segment_ids": segments}


def random_window(rng, length, min_doc=2, max_doc=None):
    """A window at a random offset into documents of random lengths, sometimes padded."""
    max_doc = max_doc or 2 * length
    lens = rng.integers(min_doc, max_doc + 1, 4 * length // min_doc + 4)
    offset = int(rng.integers(0, lens[0]))
    lens = lens[: np.searchsorted(np.cumsum(lens), offset + length) + 1]  # enough to fill it
    window = make_window(rng, length, lens, offset)
    if rng.random() < 0.2:  # the last window of a split: padded
        cut = int(rng.integers(1, length))
        window["inputs"][cut:], window["segment_ids"][cut:] = PAD, 0
    return window


def pieces(window):
    """(content, has_eos) of each document piece in a raw window, left to right."""
    tokens, segments = window["inputs"], window["segment_ids"]
    out = []
    for k in np.unique(segments[segments != 0]):
        piece = tokens[segments == k]
        has_eos = bool(piece[-1] == EOS)
        out.append((piece[:-1] if has_eos else piece, has_eos))
    return out


def examples(out):
    """(encoder ids, decoder target ids) of each output example, by segment id 1, 2, ..."""
    count = out["segment_ids"].max()
    assert out["decoder_segment_ids"].max() == count
    return [
        (out["inputs"][out["segment_ids"] == k], out["targets"][out["decoder_segment_ids"] == k])
        for k in range(1, count + 1)
    ]


def uncorrupt(encoder, decoder, sentinels=SENTINELS):
    """The content and noise mask an example was made from, checking its T5 layout.

    The encoder is kept tokens with sentinel k where noise span k was, then eos; the target is
    sentinel k followed by span k, for k = 0, 1, ..., then eos.
    """
    sentinel_index = {s: k for k, s in enumerate(sentinels)}
    assert encoder[-1] == EOS and decoder[-1] == EOS
    spans = []
    for t in decoder[:-1].tolist():
        if t in sentinel_index:
            assert sentinel_index[t] == len(spans)  # in order, from <extra_id_0>
            spans.append([])
        else:
            spans[-1].append(t)  # the target starts with a sentinel
    assert spans and all(spans)  # every span holds a token
    content, noise, used = [], [], 0
    for t in encoder[:-1].tolist():
        if t in sentinel_index:
            assert sentinel_index[t] == used
            content += spans[used]
            noise += [True] * len(spans[used])
            used += 1
        else:
            content.append(t)
            noise.append(False)
    assert used == len(spans)
    return np.array(content), np.array(noise)


def t5_noise_span_to_unique_sentinel(tokens, noise_mask, sentinels):
    """`t5.data.preprocessors.noise_span_to_unique_sentinel`, in numpy (sentinel k = ours)."""
    prev_token_is_noise = np.pad(noise_mask[:-1], [[1, 0]])
    first_noise_tokens = noise_mask & ~prev_token_is_noise
    subsequent_noise_tokens = noise_mask & prev_token_is_noise
    sentinel = np.asarray(sentinels)[np.maximum(np.cumsum(first_noise_tokens) - 1, 0)]
    tokens = np.where(first_noise_tokens, sentinel, tokens)
    return tokens[~subsequent_noise_tokens]


def check_row_layout(out, encoder_len, decoder_len):
    """Shapes, dtypes, padding, positions and the decoder-input shift of one output."""
    assert set(out) == {*ENCODER_FIELDS, *DECODER_FIELDS, "weights"}
    for key in ENCODER_FIELDS:
        assert out[key].shape == (encoder_len,) and out[key].dtype == np.int32, key
    for key in DECODER_FIELDS:
        assert out[key].shape == (decoder_len,) and out[key].dtype == np.int32, key
    assert out["weights"].dtype == np.float32
    for prefix in ("", "decoder_"):
        seg, pos = out[f"{prefix}segment_ids"], out[f"{prefix}positions"]
        tokens = out["inputs" if not prefix else "targets"]
        used = int((seg != 0).sum())
        assert (seg[used:] == 0).all() and (tokens[used:] == PAD).all() and (pos[used:] == 0).all()
        assert (np.diff(seg[:used]) >= 0).all() and (np.diff(seg[:used]) <= 1).all()
        starts = np.r_[True, seg[1:used] != seg[: used - 1]] if used else np.zeros(0, bool)
        expected = np.arange(used) - np.maximum.accumulate(np.where(starts, np.arange(used), 0))
        np.testing.assert_array_equal(pos[:used], expected)
    seg, pos = out["decoder_segment_ids"], out["decoder_positions"]
    shifted = np.r_[PAD, out["targets"][:-1]]
    np.testing.assert_array_equal(out["decoder_inputs"], np.where(pos == 0, PAD, shifted))
    np.testing.assert_array_equal(out["weights"], (seg != 0).astype(np.float32))


# --- hand-written layouts -------------------------------------------------------------------


def test_hand_written_layout_when_the_mask_is_forced():
    # density 0.5 with span length 1 leaves one mask for an even content length: kept, noise,
    # kept, noise, ... (n = c/2 spans of one token each, starting with a kept token).
    t = corrupter(encoder_len=16, noise_density=0.5, mean_span_length=1.0)
    assert (t.raw_len, t.decoder_len) == (15, 16)
    s0, s1, s2 = SENTINELS[:3]
    window = {
        # doc 1: bos 10..14 eos; doc 2: bos 20 21 eos (c = 3: 2 noise tokens, 1 span); doc 3:
        # cut by the window's end, no eos; then padding.
        "inputs": np.array([2, 10, 11, 12, 13, 14, 3, 2, 20, 21, 3, 2, 30, 0, 0]),
        "segment_ids": np.array([1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0]),
    }
    out = t(window, np.random.default_rng(0))
    np.testing.assert_array_equal(
        out["inputs"], [2, s0, 11, s1, 13, s2, 3, 2, s0, 3, 2, s0, 3, 0, 0, 0]
    )
    np.testing.assert_array_equal(out["segment_ids"], [1] * 7 + [2] * 3 + [3] * 3 + [0] * 3)
    np.testing.assert_array_equal(out["positions"], [*range(7), 0, 1, 2, 0, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(
        out["targets"], [s0, 10, s1, 12, s2, 14, 3, s0, 20, 21, 3, s0, 30, 3, 0, 0]
    )
    np.testing.assert_array_equal(
        out["decoder_inputs"], [0, s0, 10, s1, 12, s2, 14, 0, s0, 20, 21, 0, s0, 30, 0, 0]
    )
    np.testing.assert_array_equal(out["decoder_segment_ids"], [1] * 7 + [2] * 4 + [3] * 3 + [0, 0])
    np.testing.assert_array_equal(out["decoder_positions"], [*range(7), *range(4), 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(out["weights"], [1] * 14 + [0, 0])
    check_row_layout(out, 16, 16)


def test_hand_written_layout_with_a_fixed_generator():
    # One document, bos + 20 words + eos: n = round(21 * 0.3) = 6 noise tokens in
    # round(6 / 2) = 3 spans. The draws of default_rng(7) are pinned: a change to how the
    # transform uses its generator changes every run's data and must be deliberate.
    t = corrupter(encoder_len=32, noise_density=0.3, mean_span_length=2.0)
    words = list(range(10, 30))
    window = make_window(np.random.default_rng(0), t.raw_len, [22])
    window["inputs"][1:21] = words
    out = t(window, np.random.default_rng(7))
    s0, s1, s2 = SENTINELS[:3]
    encoder, decoder = examples(out)[0]
    # kept: 2 10 11 | 15 16 17 | 20..28; noise: 12 13 14 | 18 19 | 29 (6 tokens, 3 spans)
    np.testing.assert_array_equal(
        encoder, [2, 10, 11, s0, 15, 16, 17, s1, 20, 21, 22, 23, 24, 25, 26, 27, 28, s2, 3]
    )
    np.testing.assert_array_equal(decoder, [s0, 12, 13, 14, s1, 18, 19, s2, 29, 3])


def test_every_token_appears_once_and_layouts_match_t5():
    rng = np.random.default_rng(0)
    t = corrupter(encoder_len=128)
    for i in range(300):
        window = random_window(rng, t.raw_len, min_doc=MIN_DOC_LEN + 2)
        out = t(window, np.random.default_rng(i))
        check_row_layout(out, 128, t.decoder_len)
        source = [p for p in pieces(window) if p[0].size >= 2]
        produced = examples(out)
        assert len(produced) == len(source)  # documents of MIN_DOC_LEN tokens always fit
        for (content, _), (encoder, decoder) in zip(source, produced, strict=True):
            recovered, noise = uncorrupt(encoder, decoder)
            np.testing.assert_array_equal(recovered, content)  # each token once, in order
            # the layout is T5's for this mask: kept tokens first, a noise span last
            assert not noise[0] and noise[-1]
            n, s = span_counts(content.size, 0.15, 3.0)
            assert noise.sum() == n and (np.diff(noise.astype(int)) == 1).sum() == s
            np.testing.assert_array_equal(
                encoder, [*t5_noise_span_to_unique_sentinel(content, noise, SENTINELS), EOS]
            )
            np.testing.assert_array_equal(
                decoder, [*t5_noise_span_to_unique_sentinel(content, ~noise, SENTINELS), EOS]
            )


def test_input_window_is_not_modified():
    window = random_window(np.random.default_rng(1), 64)
    before = {k: v.copy() for k, v in window.items()}
    corrupter()(window, np.random.default_rng(0))
    for k in window:
        np.testing.assert_array_equal(window[k], before[k])


def test_few_sentinels_clamp_the_span_count():
    # c = 100 content tokens, n = 50, round(50 / 1) = 50 spans wanted, 3 sentinels available.
    t = corrupter(encoder_len=128, noise_density=0.5, mean_span_length=1.0, sentinels=SENTINELS[:3])
    for seed in range(20):
        window = make_window(np.random.default_rng(seed), t.raw_len, [101], offset=0)
        encoder, decoder = examples(t(window, np.random.default_rng(seed)))[0]
        content, noise = uncorrupt(encoder, decoder, sentinels=SENTINELS[:3])
        np.testing.assert_array_equal(content, window["inputs"][:100])
        assert noise.sum() == 50 and (np.diff(noise.astype(int)) == 1).sum() == 3


# --- statistics -----------------------------------------------------------------------------


def test_noise_density_and_span_counts_follow_the_rule():
    # Per document the counts are fixed: n = round(c * d), s = round(n / mu); the rounding is
    # the only difference from the density, at most 1/2 token per document.
    rng = np.random.default_rng(0)
    t = corrupter(encoder_len=128, noise_density=0.15, mean_span_length=3.0)
    noise_total = content_total = docs = 0
    for i in range(2000):
        window = random_window(rng, t.raw_len, min_doc=4, max_doc=300)
        for encoder, decoder in examples(t(window, np.random.default_rng(i))):
            content, noise = uncorrupt(encoder, decoder)
            c, n = content.size, int(noise.sum())
            s = int((np.diff(noise.astype(int)) == 1).sum())
            assert n == min(max(round(c * 0.15), 1), c - 1)
            assert s == min(max(round(n / 3.0), 1), n, c - n)
            noise_total, content_total, docs = noise_total + n, content_total + c, docs + 1
    assert docs > 2000
    assert abs(noise_total - 0.15 * content_total) <= 0.5 * docs
    assert abs(noise_total / content_total - 0.15) < 0.01


def test_span_lengths_are_uniform_random_segmentations():
    # c = 10, n = 4 noise tokens in 2 spans, 6 kept in 2 spans: the first noise span has 1, 2
    # or 3 tokens and the first kept span 1..5, each equally likely (one uniform cut point).
    t = corrupter(encoder_len=32, noise_density=0.4, mean_span_length=2.0)
    draws = 2000
    first_noise, first_kept = np.zeros(4, int), np.zeros(6, int)
    for i in range(draws):
        window = make_window(np.random.default_rng(i), t.raw_len, [11, 2])
        encoder, decoder = examples(t(window, np.random.default_rng(i)))[0]
        _, noise = uncorrupt(encoder, decoder)
        first_kept[np.argmax(noise)] += 1
        first_noise[np.argmin(noise[np.argmax(noise) :])] += 1
    for counts, options in ((first_noise[1:], 3), (first_kept[1:], 5)):
        p = 1 / options
        sigma = np.sqrt(draws * p * (1 - p))
        assert counts.sum() == draws
        assert np.all(np.abs(counts - draws * p) < 5 * sigma), counts


# --- lengths --------------------------------------------------------------------------------


def test_lengths_match_t5_for_one_document_and_the_documented_table():
    # T5's random_spans_helper(512, 0.15, 3.0): 568 raw tokens -> 512 inputs, 114 targets.
    n, s = span_counts(568, 0.15, 3.0)
    assert (568 - n + s + 1, n + s + 1) == (512, 114)
    n, s = span_counts(569, 0.15, 3.0)
    assert 569 - n + s + 1 == 513
    assert span_corruption_lengths(512, 0.15, 3.0) == (554, 143)
    assert span_corruption_lengths(128, 0.15, 3.0) == (136, 38)


@pytest.mark.parametrize("encoder_len", [16, 40, 128])
@pytest.mark.parametrize("noise_density, mean_span_length", [(0.15, 3.0), (0.5, 1.0), (0.3, 8.0)])
def test_windows_of_long_enough_documents_always_fit_whole(
    encoder_len, noise_density, mean_span_length
):
    t = corrupter(encoder_len, noise_density, mean_span_length)
    rng = np.random.default_rng(encoder_len)
    for i in range(150):
        # whole documents have >= MIN_DOC_LEN content tokens; the edge pieces any length
        window = random_window(rng, t.raw_len, min_doc=MIN_DOC_LEN + 1, max_doc=MIN_DOC_LEN + 40)
        out = t(window, np.random.default_rng(i))
        check_row_layout(out, encoder_len, t.decoder_len)
        assert len(examples(out)) == sum(p[0].size >= 2 for p in pieces(window))


def test_crowded_windows_leave_documents_out_but_always_fit():
    # 3-token documents [bos] w eos: each takes 3 encoder ([bos] <X0> eos) and 3 decoder
    # tokens (<X0> w eos), so the decoder fills first and later documents are left out.
    t = corrupter(encoder_len=128)
    window = make_window(np.random.default_rng(0), t.raw_len, [3] * 100)
    out = t(window, np.random.default_rng(0))
    check_row_layout(out, 128, t.decoder_len)
    produced = examples(out)
    assert len(produced) == t.decoder_len // 3
    for (content, _), (encoder, decoder) in zip(pieces(window), produced, strict=False):
        np.testing.assert_array_equal(uncorrupt(encoder, decoder)[0], content)
    # mixed layouts: output is always valid, and each document kept is reconstructed
    rng = np.random.default_rng(1)
    for i in range(300):
        window = random_window(rng, t.raw_len, min_doc=2, max_doc=int(rng.integers(3, 60)))
        out = t(window, np.random.default_rng(i))
        check_row_layout(out, 128, t.decoder_len)
        contents = [c.tolist() for c, _ in pieces(window)]
        start = 0
        for encoder, decoder in examples(out):  # kept documents, in window order
            content = uncorrupt(encoder, decoder)[0].tolist()
            start = contents.index(content, start) + 1


def test_documents_under_two_tokens_and_empty_windows():
    t = corrupter(encoder_len=16)
    window = {
        "inputs": np.array([5, 3, 2, 3, 2, 9, 3, 0] + [0] * (t.raw_len - 8)),
        "segment_ids": np.array([1, 1, 2, 2, 3, 3, 3, 0] + [0] * (t.raw_len - 8)),
    }
    out = t(window, np.random.default_rng(0))  # only [bos] 9 eos has two content tokens
    assert examples(out)[0][0].tolist() == [2, SENTINELS[0], 3] and len(examples(out)) == 1
    empty = {"inputs": np.zeros(t.raw_len, np.int32), "segment_ids": np.zeros(t.raw_len, np.int32)}
    out = t(empty, np.random.default_rng(0))
    check_row_layout(out, 16, t.decoder_len)
    assert not out["weights"].any() and not out["segment_ids"].any()


# --- grain: determinism and resume -----------------------------------------------------------


@pytest.fixture(scope="module")
def loader_windows(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [[BOS, *rng.integers(*WORDS, rng.integers(1, 60)), EOS] for _ in range(200)]
    store = make_store(tmp_path_factory.mktemp("sc") / "s", docs)
    return PackedWindows(store, corrupter(encoder_len=32).raw_len, PAD, causal=False)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def make_loader(windows, transform_seed=5):
    return BatchLoader(
        windows,
        global_batch=4,
        seed=1,
        transform=corrupter(encoder_len=32),
        transform_seed=transform_seed,
    )


def test_loader_is_deterministic_per_seed_and_index(loader_windows):
    epoch = len(loader_windows) // 4
    a = take(make_loader(loader_windows), epoch + 3)
    assert_same(a, take(make_loader(loader_windows), epoch + 3))
    other = take(make_loader(loader_windows, transform_seed=6), epoch + 3)
    assert any((x["inputs"] != y["inputs"]).any() for x, y in zip(a, other, strict=True))
    assert a[0]["inputs"].shape == (4, 32)
    assert a[0]["targets"].shape == (4, corrupter(encoder_len=32).decoder_len)


@pytest.mark.parametrize("k", [0, 3, 11])
def test_loader_resumes_exactly(loader_windows, k):
    reference = take(make_loader(loader_windows), k + 6)
    first = make_loader(loader_windows)
    take(first, k)
    state = first.get_state()
    resumed = make_loader(loader_windows)
    resumed.set_state(state)
    assert_same(take(resumed, 6), reference[k:])


# --- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_density": 0.0}, r"noise_density=0.0 must be in \(0, 1\)"),
        ({"noise_density": 1.0}, r"noise_density=1.0 must be in \(0, 1\)"),
        ({"noise_density": float("nan")}, "noise_density=nan"),
        ({"mean_span_length": 0.5}, "mean_span_length=0.5 must be >= 1"),
        ({"mean_span_length": float("inf")}, "mean_span_length=inf"),
        ({"sentinel_ids": []}, "needs sentinel ids"),
        ({"sentinel_ids": [5, 5]}, "must be distinct"),
        ({"sentinel_ids": [5, EOS]}, "differ from eos_id=3"),
        ({"sentinel_ids": [PAD]}, "differ from eos_id=3 and pad_id=0"),
        ({"encoder_len": 2}, "encoder_len=2 must be at least 3"),
        ({"min_doc_len": 1}, "min_doc_len=1 must be at least 2"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    args = dict(sentinel_ids=SENTINELS, eos_id=EOS, pad_id=PAD, encoder_len=64) | kwargs
    with pytest.raises(ValueError, match=match):
        SpanCorruption(**args)


# --- tokenizers, pipeline, config -----------------------------------------------------------


def seq2seq_config(tmp_path, corpus, *extra):
    return load_config(
        None,
        [
            f"data.source={corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
            "model.preset=t5-tiny",
            "model.max_seq_len=32",
            "train.batch_size=4",
            "data.eval_fraction=0.1",
            "tokenizer.vocab_size=400",
            "tokenizer.num_sentinels=16",
            "tokenizer.max_train_bytes=40000",  # a quick tokenizer
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def seq2seq_run(tmp_path_factory, small_corpus):
    tmp = tmp_path_factory.mktemp("seq2seq")
    cfg = seq2seq_config(tmp, small_corpus)
    return cfg, load_or_train_tokenizer(cfg, show_progress=False)


def test_trained_tokenizer_has_sentinels_in_order(seq2seq_run):
    _, tok = seq2seq_run
    ids = tok.sentinel_ids
    assert len(ids) == 16 and len(set(ids)) == 16
    assert [tok.id_to_piece(i) for i in ids] == [f"<extra_id_{i}>" for i in range(16)]
    assert not set(ids) & {tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id}
    assert tok.encode("a<extra_id_3>") == [*tok.encode("a"), ids[3]]  # user-defined pieces


def test_tokenizer_without_sentinels_raises(small_tokenizer, small_corpus, tmp_path):
    with pytest.raises(ConfigError, match=r"no sentinel pieces \(<extra_id_0>"):
        _ = small_tokenizer.sentinel_ids
    # a decoder's tokenizer gets none
    cfg = load_config(None, [f"data.source={small_corpus}", "tokenizer.vocab_size=400"])
    tok = train_tokenizer_from_config(cfg.data, cfg, tmp_path / "tok", show_progress=False)
    with pytest.raises(ConfigError, match="no sentinel pieces"):
        _ = tok.sentinel_ids
    with pytest.raises(ConfigError, match="no sentinel pieces"):
        make_span_corruption(seq2seq_config(tmp_path, small_corpus), small_tokenizer)


def test_hugging_face_tokenizer_sentinels(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from plm_jax.hf_tokenizer import HfTokenizer

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "b": 4}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    # as in t5-small: <extra_id_0> is the last id, the numbering runs backwards
    backend.add_special_tokens([f"<extra_id_{i}>" for i in reversed(range(3))])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = HfTokenizer.load(tmp_path)
    assert tok.sentinel_ids == (7, 6, 5)
    (tmp_path / "plain").mkdir()
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")).save(
        str(tmp_path / "plain" / "tokenizer.json")
    )
    with pytest.raises(ConfigError, match="no sentinel pieces"):
        _ = HfTokenizer.load(tmp_path / "plain").sentinel_ids


def test_pipeline_builds_encoder_decoder_batches(seq2seq_run):
    cfg, tok = seq2seq_run
    pipe = build_pipeline(cfg, tok, show_progress=False)
    corruption = pipe.masker
    assert isinstance(corruption, SpanCorruption)
    assert (
        pipe.train_windows.seq_len == corruption.raw_len == span_corruption_lengths(32, 0.15, 3)[0]
    )
    assert not pipe.train_windows.causal
    assert list(corruption.sentinel_ids) == list(tok.sentinel_ids)
    batch = next(pipe.train)
    assert batch["inputs"].shape == (4, 32)
    assert batch["targets"].shape == (4, corruption.decoder_len)
    assert (tok.pad_id, tok.eos_id) == (PAD, EOS)  # plm_jax's: pad 0, unk 1, bos 2, eos 3
    train = pipe.prepared.train
    stream = train.read(0, train.num_tokens)
    for row in range(4):
        out = {k: v[row] for k, v in batch.items()}
        check_row_layout(out, 32, corruption.decoder_len)
        for encoder, decoder in examples(out):
            content, _ = uncorrupt(encoder, decoder, list(tok.sentinel_ids))
            # each document piece is a run of the corpus's token stream
            assert content.astype(stream.dtype).tobytes() in stream.tobytes()
    evals = list(pipe.eval_batches())
    assert len(evals) == len(pipe.eval_windows) // 4
    assert_same(evals, list(pipe.eval_batches()))  # fixed corruption for evaluation
    assert evals[0]["targets"].shape == (4, corruption.decoder_len)
    assert sum(b["weights"].sum() for b in evals) > 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.noise_density=0"], r"data.noise_density=0.0 must be in \(0, 1\)"),
        (["data.noise_density=1"], r"data.noise_density=1.0 must be in \(0, 1\)"),
        (["data.mean_span_length=0.5"], "data.mean_span_length=0.5 must be a number >= 1"),
        (["data.mean_span_length=.nan"], "data.mean_span_length=nan"),
        (["tokenizer.num_sentinels=-1"], "tokenizer.num_sentinels=-1 must be >= 0"),
        (
            ["model.preset=t5-tiny", "tokenizer.num_sentinels=0"],
            "tokenizer.num_sentinels=0: span-corruption pretraining",
        ),
        (
            ["model.preset=t5-tiny", "tokenizer.num_sentinels=100", "tokenizer.vocab_size=100"],
            "tokenizer.num_sentinels=100 leaves no room in tokenizer.vocab_size=100",
        ),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_config_accepts_sentinel_free_setups():
    # a decoder needs no sentinels; nor does an encoder-decoder with its own tokenizer
    assert load_config(None, ["tokenizer.num_sentinels=0"]).tokenizer.num_sentinels == 0
    cfg = load_config(
        None, ["model.preset=t5-tiny", "tokenizer.num_sentinels=0", "tokenizer.path=x"]
    )
    assert cfg.data.noise_density == 0.15 and cfg.data.mean_span_length == 3.0


def test_short_encoder_is_a_config_error(seq2seq_run, tmp_path, small_corpus):
    _, tok = seq2seq_run
    cfg = seq2seq_config(tmp_path, small_corpus, "model.max_seq_len=2")
    with pytest.raises(ConfigError, match="encoder_len=2 must be at least 3"):
        make_span_corruption(cfg, tok)
