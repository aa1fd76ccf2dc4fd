"""Fine-tuning task data: readers, labels, truncation, holdout, metrics and bucketed batches."""

import json
import logging
import math

import numpy as np
import pytest

from plm_jax.errors import ConfigError, DataError
from plm_jax.tasks import metrics
from plm_jax.tasks.batching import BucketBatcher, bucket_lengths
from plm_jax.tasks.classification import (
    ClassificationExample,
    LabelSet,
    _longest_first,
    encode_examples,
    read_classification,
    split_holdout,
)

# ---------------------------------------------------------------------------------------------
# Readers.


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_read_jsonl_string_int_labels_and_pairs(tmp_path):
    path = write(
        tmp_path,
        "train.jsonl",
        '{"text": "a b", "label": 1}\n\n'
        '{"text": "c", "text_pair": "d e", "label": "1"}\n'
        '{"text": "f", "text_pair": null, "label": 0, "extra": [1]}\n'
        '{"text": "g", "label": true}\n',
    )
    got = read_classification(path)
    assert got == [
        ClassificationExample("a b", None, "1"),
        ClassificationExample("c", "d e", "1"),  # the JSON number 1 and the string "1": one class
        ClassificationExample("f", None, "0"),
        ClassificationExample("g", None, "true"),
    ]


def test_read_csv_and_tsv_with_custom_fields(tmp_path):
    csv_path = write(
        tmp_path,
        "dev.csv",
        'text,text_pair,label\n"hello, world",second,pos\nbye,"multi\nline",neg\n\n',
    )
    assert read_classification(csv_path) == [
        ClassificationExample("hello, world", "second", "pos"),
        ClassificationExample("bye", "multi\nline", "neg"),
    ]
    tsv_path = write(tmp_path, "stsb.tsv", "sentence1\tsentence2\tscore\nA\tB\t3.5\nC\tD\t-1\n")
    got = read_classification(
        tsv_path,
        text_field="sentence1",
        pair_field="sentence2",
        label_field="score",
        regression=True,
    )
    assert got == [ClassificationExample("A", "B", 3.5), ClassificationExample("C", "D", -1.0)]
    assert all(isinstance(ex.label, float) for ex in got)
    # No pair column: single-text examples.
    single = write(tmp_path, "s.csv", "label,text\n2,x\n10,y\n")
    assert read_classification(single) == [
        ClassificationExample("x", None, "2"),
        ClassificationExample("y", None, "10"),
    ]


def test_read_regression_jsonl_numbers_and_numeric_strings(tmp_path):
    path = write(tmp_path, "r.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": "2.5"}\n')
    assert [ex.label for ex in read_classification(path, regression=True)] == [1.0, 2.5]


BAD_INPUTS = [
    # (file name, contents or None for a missing file, kwargs, message pattern)
    ("missing.jsonl", None, {}, r"missing\.jsonl.*does not exist"),
    ("data.txt", "x\n", {}, r"data\.txt: unknown task data format '\.txt'"),
    ("empty.jsonl", "", {}, r"empty\.jsonl holds no examples"),
    ("blank.jsonl", "\n  \n", {}, r"blank\.jsonl holds no examples"),
    ("empty.csv", "", {}, r"empty\.csv holds no examples"),
    ("header.csv", "text,label\n", {}, r"header\.csv holds no examples"),
    ("bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b"', {}, r"bad\.jsonl:2: not valid JSON"),
    ("list.jsonl", '["a", 1]\n', {}, r"list\.jsonl:1: a JSON list, not an object"),
    ("notext.jsonl", '{"sentence": "a", "label": 1}\n', {}, r"notext\.jsonl:1: no 'text' field"),
    ("nolabel.jsonl", '{"text": "a"}\n', {}, r"nolabel\.jsonl:1: no 'label' label"),
    ("nolabel.csv", "text,label\na,1\nb,\n", {}, r"nolabel\.csv:3: no 'label' label"),
    ("emptytext.jsonl", '{"text": " ", "label": 1}\n', {}, r"emptytext\.jsonl:1: 'text' is empty"),
    ("emptytext.tsv", "text\tlabel\n\t1\n", {}, r"emptytext\.tsv:2: 'text' is empty"),
    ("numtext.jsonl", '{"text": 5, "label": 1}\n', {}, r"numtext\.jsonl:1: 'text' is a int"),
    ("nocol.csv", "sentence,label\na,1\n", {}, r"nocol\.csv:1: the header has no column 'text'"),
    (
        "reg.jsonl",
        '{"text": "a", "label": 1}\n{"text": "b", "label": "high"}\n',
        {"regression": True},
        r"reg\.jsonl:2: label 'high' is not a finite number",
    ),
    ("nan.csv", "text,label\na,nan\n", {"regression": True}, r"nan\.csv:2: label 'nan'"),
    ("dict.jsonl", '{"text": "a", "label": {"x": 1}}\n', {}, r"dict\.jsonl:1: label .* is a dict"),
]


@pytest.mark.parametrize("name,text,kwargs,match", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_data_error_naming_file_and_line(tmp_path, name, text, kwargs, match):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(DataError, match=match) as info:
        read_classification(path, **kwargs)
    assert "\n" not in str(info.value)  # one line


def test_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "a", "label": 1}\n{"text": "caf\xe9", "label": 1}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8"):
        read_classification(path)


# ---------------------------------------------------------------------------------------------
# Labels.


def examples_with(labels):
    return [ClassificationExample("t", None, label) for label in labels]


def test_label_set_orders_integers_numerically_else_as_strings():
    assert LabelSet.from_examples(examples_with(["10", "2", "-1", "0", "2"])).labels == (
        "-1",
        "0",
        "2",
        "10",
    )
    nli = ["neutral", "entailment", "contradiction", "neutral"]
    assert LabelSet.from_examples(examples_with(nli)).labels == (
        "contradiction",
        "entailment",
        "neutral",
    )
    assert LabelSet.from_examples(examples_with(["10", "9", "a"])).labels == ("10", "9", "a")


def test_label_set_round_trip_encode_and_unseen_label():
    labels = LabelSet.from_examples(examples_with(["b", "a", "c"]))
    restored = LabelSet.from_dict(json.loads(json.dumps(labels.to_dict())))
    assert restored == labels and restored.labels == ("a", "b", "c") and len(restored) == 3
    assert [restored.encode(x) for x in "abc"] == [0, 1, 2] and restored.decode(2) == "c"
    numeric = LabelSet.from_examples(examples_with(["0", "1"]))
    assert numeric.encode(1) == numeric.encode("1") == 1
    with pytest.raises(DataError, match=r"label 'd' does not occur in the training data"):
        labels.encode("d")


def test_label_set_errors():
    with pytest.raises(DataError, match=r"needs at least two"):
        LabelSet.from_examples(examples_with(["a", "a"]))
    with pytest.raises(DataError, match=r"has no 'labels' list"):
        LabelSet.from_dict({"classes": ["a", "b"]})
    with pytest.raises(DataError, match=r"distinct strings"):
        LabelSet(["a", "a", "b"])
    with pytest.raises(ConfigError, match=r"regression needs no LabelSet"):
        LabelSet.from_examples(examples_with([1.0, 2.0]))


# ---------------------------------------------------------------------------------------------
# Encoding and truncation.

LONG = "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun. " * 3
SHORT = "Return the value."


def test_encode_without_truncation_matches_encode_pair(small_tokenizer):
    exs = [ClassificationExample(SHORT, None, "b"), ClassificationExample(SHORT, LONG, "a")]
    labels = LabelSet.from_examples(exs)
    out = encode_examples(exs, small_tokenizer, labels, max_seq_len=512)
    for ex, enc in zip(exs, out, strict=True):
        ids, types = small_tokenizer.encode_pair(ex.text, ex.text_pair)
        assert enc == {"ids": ids, "token_types": types, "label": labels.encode(ex.label),
                       "truncated": False}  # fmt: skip
    assert [e["label"] for e in out] == [1, 0]


def test_pair_truncation_is_longest_first_and_keeps_specials(small_tokenizer, caplog):
    tok = small_tokenizer
    bos, eos = tok.bos_id, tok.eos_id
    a, b = tok.encode(LONG), tok.encode(SHORT)
    assert len(a) > len(b) + 10
    max_len = 3 + len(b) + 7
    exs = [ClassificationExample(LONG, SHORT, 0.5), ClassificationExample(SHORT, LONG, 1.5)]
    with caplog.at_level(logging.WARNING):
        out = encode_examples(exs, tok, None, max_seq_len=max_len)
    assert "2 of 2 examples are longer than max_seq_len" in caplog.text
    # The long segment loses tokens from its end; the short one is kept whole.
    assert out[0]["ids"] == [bos, *a[:7], eos, *b, eos]
    assert out[0]["token_types"] == [0] * 9 + [1] * (len(b) + 1)
    assert out[1]["ids"] == [bos, *b, eos, *a[:7], eos]
    assert all(len(e["ids"]) == max_len and e["truncated"] for e in out)
    assert [e["label"] for e in out] == [0.5, 1.5]
    # Both longer than half the budget: an even split, the odd token to the first segment.
    both = encode_examples([ClassificationExample(LONG, LONG, 0.0)], tok, None, max_seq_len=14)
    assert both[0]["ids"] == [bos, *a[:6], eos, *a[:5], eos]


def test_single_text_truncation_keeps_bos_and_eos(small_tokenizer):
    tok = small_tokenizer
    out = encode_examples([ClassificationExample(LONG, None, "x")], tok, LabelSet(["x", "y"]),
                          max_seq_len=10)  # fmt: skip
    assert out[0]["ids"] == [tok.bos_id, *tok.encode(LONG)[:8], tok.eos_id]
    assert out[0]["token_types"] == [0] * 10 and out[0]["truncated"]


def test_longest_first_matches_hugging_face_loop():
    def reference(len_a, len_b, budget):  # transformers' slow-tokenizer "longest_first" loop
        while len_a + len_b > budget:
            if len_a > len_b:
                len_a -= 1
            else:
                len_b -= 1
        return len_a, len_b

    for len_a in range(12):
        for len_b in range(12):
            for budget in range(2, 20):
                assert _longest_first(len_a, len_b, budget) == reference(len_a, len_b, budget)


class RobertaLikeTokenizer:
    """Words -> ids 10.., with a RoBERTa template: <s> A </s> </s> B </s> (ids 0 and 2)."""

    def encode(self, text):
        return [10 + len(w) for w in text.split()]

    def encode_pair(self, text, text_pair=None):
        ids = [0, *self.encode(text), 2]
        if text_pair is not None:
            ids += [2, *self.encode(text_pair), 2]
        return ids, [0] * len(ids)


def test_truncation_finds_segments_in_any_template():
    ex = ClassificationExample("a bb ccc dddd", "x yy", "k")
    out = encode_examples([ex], RobertaLikeTokenizer(), LabelSet(["j", "k"]), max_seq_len=7)
    assert out[0]["ids"] == [0, 11, 12, 2, 2, 11, 2] and out[0]["label"] == 1


def test_encode_errors(small_tokenizer):
    pair = [ClassificationExample(LONG, LONG, "a")]
    with pytest.raises(ConfigError, match=r"max_seq_len=4 leaves no room for text"):
        encode_examples(pair, small_tokenizer, LabelSet(["a", "b"]), max_seq_len=4)
    with pytest.raises(DataError, match=r"label 'c' does not occur"):
        encode_examples([ClassificationExample("x", None, "c")], small_tokenizer,
                        LabelSet(["a", "b"]), max_seq_len=8)  # fmt: skip
    with pytest.raises(ConfigError, match=r"label_set is None"):
        encode_examples(pair, small_tokenizer, None, max_seq_len=8)
    with pytest.raises(ConfigError, match=r"pass label_set=None"):
        encode_examples([ClassificationExample("x", None, 1.0)], small_tokenizer,
                        LabelSet(["a", "b"]), max_seq_len=8)  # fmt: skip


def test_split_holdout_is_seeded_disjoint_and_complete():
    items = list(range(50))
    kept, held = split_holdout(items, 0.1, seed=3)
    assert len(held) == 5 and sorted(kept + held) == items and kept == sorted(kept)
    assert split_holdout(items, 0.1, seed=3) == (kept, held)
    assert split_holdout(items, 0.1, seed=4)[1] != held
    with pytest.raises(ConfigError, match=r"fraction=1.5 must be in \(0, 1\)"):
        split_holdout(items, 1.5, seed=0)
    with pytest.raises(DataError, match=r"cannot hold out 50% of 1 examples"):
        split_holdout([1], 0.5, seed=0)


# ---------------------------------------------------------------------------------------------
# Metrics.


def test_accuracy_and_macro_f1_with_absent_and_unpredicted_classes():
    golds = [0, 0, 1, 1, 2, 2]
    preds = [0, 0, 1, 0, 1, 1]
    assert metrics.accuracy(preds, golds) == pytest.approx(0.5)
    # class 0: P=2/3 R=1 F1=0.8; class 1: P=1/3 R=1/2 F1=0.4; class 2 never predicted: F1=0.
    # Class 3 (num_classes=4) is in neither and is ignored: (0.8 + 0.4 + 0) / 3.
    assert metrics.macro_f1(preds, golds) == pytest.approx(0.4)
    # A class predicted but never gold counts with F1 0: (1 + 2/3 + 0) / 3.
    assert metrics.macro_f1([0, 1, 3], [0, 1, 1]) == pytest.approx(5 / 9)
    out = metrics.classification_metrics(preds, golds, num_classes=4)
    assert out == pytest.approx({"accuracy": 0.5, "macro_f1": 0.4, "mcc": 1 / (2 * math.sqrt(3))})


def test_matthews_corrcoef_hand_computed():
    # Binary: TP=2 TN=2 FP=1 FN=1 -> (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3.
    assert metrics.matthews_corrcoef([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0]) == pytest.approx(1 / 3)
    # Multi-class (confusion [[2,0,0],[1,1,0],[0,2,0]]): t=[2,2,2], p=[3,3,0], c=3, s=6:
    # (3*6 - 12) / sqrt((36 - 18) * (36 - 12)) = 6 / sqrt(432) = 1 / (2 sqrt 3).
    mcc = metrics.matthews_corrcoef([0, 0, 1, 0, 1, 1], [0, 0, 1, 1, 2, 2])
    assert mcc == pytest.approx(1 / (2 * math.sqrt(3)))
    assert metrics.matthews_corrcoef([1, 0, 1], [0, 1, 0]) == pytest.approx(-1.0)
    assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 0]) == 0.0  # constant prediction


def test_binary_metrics_include_positive_class_f1():
    out = metrics.classification_metrics([1, 1, 0, 0, 0, 1], [1, 1, 1, 0, 0, 0], num_classes=2)
    assert out["f1"] == pytest.approx(2 / 3)  # P = R = 2/3
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        metrics.classification_metrics([0, 2], [0, 1], num_classes=2)
    with pytest.raises(ValueError, match=r"3 predictions for 2 gold labels"):
        metrics.accuracy([0, 1, 1], [0, 1])


def test_correlations_hand_computed():
    assert metrics.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 4 / sqrt(5*5)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.pearson([2, 2, 2], [1, 2, 3]) == 0.0  # undefined: constant input
    assert metrics._average_ranks(np.array([10, 20, 20, 20, 5])).tolist() == [2, 4, 4, 4, 1]
    # ranks [1, 2.5, 2.5, 4] vs [1, 2, 3, 4]: 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(math.sqrt(0.9))
    assert metrics.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    out = metrics.regression_metrics([1.0, 2.0, 4.0], [1.0, 3.0, 2.0])
    assert out["mse"] == pytest.approx(5 / 3) and set(out) == {"pearson", "spearman", "mse"}


def test_metrics_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, 200).astype(float)  # many ties
    y = x + rng.normal(0, 2, 200)
    assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert metrics._average_ranks(x).tolist() == stats.rankdata(x).tolist()


def test_metrics_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    golds, preds = rng.integers(0, 4, 300), rng.integers(0, 5, 300)
    assert metrics.macro_f1(preds, golds) == pytest.approx(
        skm.f1_score(golds, preds, average="macro", zero_division=0)
    )
    assert metrics.matthews_corrcoef(preds, golds) == pytest.approx(
        skm.matthews_corrcoef(golds, preds)
    )


# ---------------------------------------------------------------------------------------------
# Bucketed batches.


def make_examples(n, seed=0, max_len=128):
    """Skewed lengths: mostly short, a few near max_len; ids encode (example, position)."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(1 / 20, n) + 2, max_len)
    lengths[:: max(n // 10, 1)] = max_len - rng.integers(0, 10)
    return [
        {
            "ids": [1000 * i + j + 1 for j in range(int(n_tok))],
            "token_types": [0] * (int(n_tok) // 2) + [1] * (int(n_tok) - int(n_tok) // 2),
            "label": i % 3,
            "score": float(i) / 2,
            "truncated": False,
            "text": "not batched",
        }
        for i, n_tok in enumerate(lengths)
    ]


def epoch(batcher):
    return list(batcher.epoch_iter())


def real_indices(batches):
    return [int(i) for b in batches for i in b["example_index"] if i >= 0]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_bucket_lengths():
    assert bucket_lengths(200) == (16, 32, 64, 128, 200)
    assert bucket_lengths(128) == (16, 32, 64, 128)
    assert bucket_lengths(10) == (10,)
    assert bucket_lengths(100, min_len=24) == (24, 48, 96, 100)
    with pytest.raises(ConfigError, match=r"max_seq_len >= 1"):
        bucket_lengths(0)


def test_batches_hold_the_examples_padded_to_the_smallest_fitting_bucket():
    exs = make_examples(203)
    buckets = bucket_lengths(128)
    batcher = BucketBatcher(exs, global_batch=16, buckets=buckets, seed=5, pad_id=7)
    batches = epoch(batcher)
    assert len(batches) == batcher.batches_per_epoch == 13
    for b in batches:
        longest = max(len(exs[i]["ids"]) for i in b["example_index"] if i >= 0)
        seq_len = b["inputs"].shape[1]
        assert seq_len == min(x for x in buckets if x >= longest)
        assert b["inputs"].shape == (16, seq_len) and b["inputs"].dtype == np.int32
        assert set(b) == {"inputs", "token_types", "segment_ids", "positions", "example_index",
                          "weights", "label", "score"}  # fmt: skip
        assert b["label"].dtype == np.int32 and b["score"].dtype == np.float32
        np.testing.assert_array_equal(b["positions"], np.tile(np.arange(seq_len), (16, 1)))
        for r, i in enumerate(b["example_index"]):
            ids = exs[i]["ids"] if i >= 0 else []
            n = len(ids)
            assert b["inputs"][r, :n].tolist() == ids and (b["inputs"][r, n:] == 7).all()
            assert b["segment_ids"][r].tolist() == [1] * n + [0] * (seq_len - n)
            assert b["token_types"][r, :n].tolist() == (exs[i]["token_types"] if i >= 0 else [])
            assert b["weights"][r] == (1.0 if i >= 0 else 0.0)
            assert b["label"][r] == (exs[i]["label"] if i >= 0 else 0)
            assert b["score"][r] == (exs[i]["score"] if i >= 0 else 0.0)
    assert {b["inputs"].shape for b in batches} == batcher.shapes
    assert {s[1] for s in batcher.shapes} <= set(buckets)


def test_bucketing_pads_less_than_max_length():
    exs = make_examples(400)
    batcher = BucketBatcher(exs, global_batch=16, buckets=bucket_lengths(128), seed=0)
    batches = epoch(batcher)
    real = sum(len(e["ids"]) for e in exs)
    measured = 1 - sum(int(b["segment_ids"].sum()) for b in batches) / sum(
        b["inputs"].size for b in batches
    )
    assert batcher.padding_fraction == pytest.approx(measured)
    padded_to_max = 1 - real / (len(batches) * 16 * 128)
    assert padded_to_max > 0.6 and batcher.padding_fraction < padded_to_max / 2
    assert len(batcher.shapes) <= len(bucket_lengths(128))


def test_training_epochs_read_every_example_once_seeded_and_different():
    exs = make_examples(103)
    a = BucketBatcher(exs, global_batch=8, buckets=bucket_lengths(128), seed=1)
    first, second = epoch(a), epoch(a)
    assert sorted(real_indices(first)) == sorted(real_indices(second)) == list(range(103))
    assert sum(int((b["example_index"] < 0).sum()) for b in first) == 13 * 8 - 103
    assert real_indices(first) != real_indices(second)  # each epoch reshuffles
    same = BucketBatcher(exs, global_batch=8, buckets=bucket_lengths(128), seed=1)
    assert_same_batches(epoch(same), first)
    other = BucketBatcher(exs, global_batch=8, buckets=bucket_lengths(128), seed=2)
    assert real_indices(epoch(other)) != real_indices(first)


@pytest.mark.parametrize("k", [0, 3, 12, 13, 20])
def test_set_state_continues_exactly(k):
    exs = make_examples(103)
    make = lambda: BucketBatcher(exs, global_batch=8, buckets=bucket_lengths(128), seed=4)  # noqa: E731 - a local factory
    reference = make()
    for _ in range(k):
        next(reference)
    state = json.loads(json.dumps(reference.get_state()))
    assert state == {"epoch": k // 13, "batch": k % 13}
    expected = [next(reference) for _ in range(20)]  # crosses an epoch boundary
    resumed = make()
    resumed.set_state(state)
    assert_same_batches([next(resumed) for _ in range(20)], expected)


def test_epoch_iter_reads_the_rest_of_the_epoch_and_bad_state_is_rejected():
    batcher = BucketBatcher(make_examples(40), global_batch=8, buckets=(64, 128), seed=0)
    head = [next(batcher) for _ in range(2)]
    rest = epoch(batcher)
    assert len(rest) == 3 and batcher.get_state() == {"epoch": 1, "batch": 0}
    assert sorted(real_indices(head + rest)) == list(range(40))
    with pytest.raises(ConfigError, match=r"does not fit 5 batches per epoch"):
        batcher.set_state({"epoch": 0, "batch": 5})
    with pytest.raises(ConfigError, match=r"does not fit"):
        batcher.set_state({"next_index": 3})


def test_eval_reads_each_example_once_in_order():
    exs = make_examples(23)
    batcher = BucketBatcher(exs, global_batch=8, buckets=bucket_lengths(128), shuffle=False)
    batches = list(batcher)
    assert len(batches) == 3
    order = np.concatenate([b["example_index"] for b in batches]).tolist()
    assert order == [*range(23), -1]
    assert batches[-1]["weights"].tolist() == [1.0] * 7 + [0.0]
    assert_same_batches(list(batcher), batches)  # a second evaluation: the same pass


@pytest.mark.parametrize("shuffle", [False, True])
def test_processes_split_every_global_batch(shuffle):
    exs = make_examples(23)
    kwargs = dict(global_batch=8, buckets=bucket_lengths(128), seed=3, shuffle=shuffle)
    whole = epoch(BucketBatcher(exs, **kwargs))
    parts = [epoch(BucketBatcher(exs, process_index=p, process_count=2, **kwargs)) for p in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == 3
    for b, p0, p1 in zip(whole, *parts, strict=True):
        assert p0["inputs"].shape == p1["inputs"].shape == (4, b["inputs"].shape[1])
        for key in b:
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), b[key])
    union = real_indices(parts[0]) + real_indices(parts[1])
    assert sorted(union) == list(range(23))  # each example exactly once over both processes


def test_batcher_errors():
    exs = make_examples(10)
    with pytest.raises(ConfigError, match=r"batch size 6 must be a positive multiple of the 4"):
        BucketBatcher(exs, global_batch=6, buckets=(128,), process_count=4)
    with pytest.raises(ConfigError, match=r"more than the largest bucket 64"):
        BucketBatcher(exs, global_batch=2, buckets=(32, 64))
    with pytest.raises(ConfigError, match=r"strictly increasing"):
        BucketBatcher(exs, global_batch=2, buckets=(64, 32, 128))
    with pytest.raises(DataError, match=r"no examples to batch"):
        BucketBatcher([], global_batch=2, buckets=(128,))
    del exs[3]["label"]
    with pytest.raises(DataError, match=r"example 3 has no 'label' field"):
        BucketBatcher(exs, global_batch=2, buckets=(128,))
