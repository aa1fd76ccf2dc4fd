"""Packing into windows: hand-computed layout, document isolation, positions, shards, padding."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plm_jax.data.packing import PackedWindows
from plm_jax.data.prepare import TokenStore, _SplitWriter

BOS, EOS, PAD = 2, 3, 0


def make_store(root, docs, shard_tokens=1 << 20):
    writer = _SplitWriter(root, np.dtype(np.uint16), shard_tokens)
    for d in docs:
        writer.add(np.asarray(d))
    writer.close()
    return TokenStore(root)


DOCS = [[BOS, 10, 11, EOS], [BOS, 12, EOS], [BOS, 13, 14, 15, 16, EOS]]


def test_hand_computed_windows(tmp_path):
    # stream: 2 10 11 3 | 2 12 3 | 2 13 14 15 16 3   (13 tokens, 12 targets)
    w = PackedWindows(make_store(tmp_path / "s", DOCS), seq_len=5, pad_id=PAD)
    assert len(w) == 3  # ceil(12 / 5)
    first, second, last = w[0], w[1], w[2]
    np.testing.assert_array_equal(first["inputs"], [2, 10, 11, 3, 2])
    np.testing.assert_array_equal(first["targets"], [10, 11, 3, 2, 12])
    np.testing.assert_array_equal(first["segment_ids"], [1, 1, 1, 1, 2])
    np.testing.assert_array_equal(first["positions"], [0, 1, 2, 3, 0])
    np.testing.assert_array_equal(first["weights"], [1, 1, 1, 0, 1])  # eos -> next bos masked
    # window 1 starts at stream index 5, inside document 2 (which began at 4)
    np.testing.assert_array_equal(second["inputs"], [12, 3, 2, 13, 14])
    np.testing.assert_array_equal(second["segment_ids"], [1, 1, 2, 2, 2])
    np.testing.assert_array_equal(second["positions"], [0, 1, 0, 1, 2])
    np.testing.assert_array_equal(second["weights"], [1, 0, 1, 1, 1])
    # window 2: stream [10, 13) then padding
    np.testing.assert_array_equal(last["inputs"], [15, 16, 3, PAD, PAD])
    np.testing.assert_array_equal(last["targets"], [16, 3, PAD, PAD, PAD])
    np.testing.assert_array_equal(last["segment_ids"], [1, 1, 1, 0, 0])
    np.testing.assert_array_equal(last["positions"], [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(last["weights"], [1, 1, 0, 0, 0])
    assert first["inputs"].dtype == np.int32 and first["weights"].dtype == np.float32
    with pytest.raises(IndexError):
        w[3]


def test_pad_to_multiple_adds_empty_windows(tmp_path):
    w = PackedWindows(make_store(tmp_path / "s", DOCS), seq_len=5, pad_id=PAD, pad_to_multiple=4)
    assert len(w) == 4 and w.num_real == 3
    assert w[3]["weights"].sum() == 0 and (w[3]["segment_ids"] == 0).all()


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    seq_len=st.integers(1, 17),
    shard_tokens=st.integers(1, 40),
)
def test_packing_invariants(tmp_path_factory, lengths, seq_len, shard_tokens):
    root = tmp_path_factory.mktemp("p") / "split"
    docs, doc_of = [], []
    for i, n in enumerate(lengths):
        body = list(range(100 * (i + 1), 100 * (i + 1) + n))  # ids reveal the document
        docs.append([BOS, *body, EOS])
        doc_of += [i] * (n + 2)
    stream = np.concatenate(docs)
    windows = PackedWindows(make_store(root, docs, shard_tokens), seq_len, PAD)
    seen_targets = []
    for i in range(len(windows)):
        ex = windows[i]
        start = i * seq_len
        real = ex["segment_ids"] > 0
        idx = start + np.arange(seq_len)
        np.testing.assert_array_equal(ex["inputs"][real], stream[idx[real]])
        for seg in np.unique(ex["segment_ids"][real]):
            members = idx[ex["segment_ids"] == seg]
            docs_in_seg = {doc_of[j] for j in members}
            assert len(docs_in_seg) == 1, "a segment id mixes documents"
            # positions count from the piece's first token, one by one
            np.testing.assert_array_equal(
                ex["positions"][ex["segment_ids"] == seg], np.arange(len(members))
            )
        for j in range(seq_len):
            g = start + j
            if g + 1 < len(stream) and doc_of[g] == doc_of[g + 1]:
                assert ex["weights"][j] == 1 and ex["targets"][j] == stream[g + 1]
                seen_targets.append(g + 1)
            else:
                assert ex["weights"][j] == 0
    # every within-document target is trained exactly once
    expected = [g for g in range(1, len(stream)) if doc_of[g] == doc_of[g - 1]]
    assert sorted(seen_targets) == expected
