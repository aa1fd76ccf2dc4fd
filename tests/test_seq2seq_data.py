"""Seq2seq fine-tuning data: parallel readers, encoding limits, packed and bucketed batches for
encoder-decoders and decoder-only models, the translation config fields, and the gettext corpus
script."""

import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from plm_jax.config import load_config, validate_for_devices
from plm_jax.errors import ConfigError, DataError
from plm_jax.tasks.batching import bucket_lengths
from plm_jax.tasks.seq2seq_data import (
    EncodedPairs,
    ParallelExample,
    PromptCompletionBatcher,
    Seq2SeqBatcher,
    count_target_tokens,
    encode_parallel,
    read_parallel,
)

PAD, BOS, EOS = 0, 2, 3
LETTERS = "abcdefghijklmnopqrstuvwxyz "


class CharTokenizer:
    """One token a character: 'a' -> 4, ..., 'z' -> 29, ' ' -> 30; pad 0, bos 2, eos 3."""

    pad_id, unk_id, bos_id, eos_id = PAD, 1, BOS, EOS

    def encode(self, text):
        return [4 + LETTERS.index(c) for c in text]

    def encode_batch(self, texts, num_threads=0):
        return [self.encode(t) for t in texts]

    def decode(self, ids):
        return "".join(LETTERS[i - 4] for i in ids if i >= 4)


TOK = CharTokenizer()


def ids(text, eos=True):
    return [*TOK.encode(text), *([EOS] if eos else [])]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# Reading.


def test_read_jsonl_with_custom_fields_skips_blank_lines(tmp_path):
    path = write(
        tmp_path,
        "train.jsonl",
        '{"en": "a b", "de": "c", "id": 1}\n\n{"en": "d", "de": "e f", "extra": null}\n',
    )
    got = read_parallel(path, source_field="en", target_field="de")
    assert got == [
        ParallelExample("a b", "c", f"{path}:1"),
        ParallelExample("d", "e f", f"{path}:3"),
    ]


def test_read_aligned_text_files_with_bom_and_crlf(tmp_path):
    src = tmp_path / "train.en"
    src.write_bytes("\ufeffhello world\r\nsecond line\r\n".encode())
    tgt = write(tmp_path, "train.de", "hallo welt\nzweite zeile")  # no final newline
    got = read_parallel(source_file=src, target_file=tgt)
    assert [(e.source, e.target) for e in got] == [
        ("hello world", "hallo welt"),
        ("second line", "zweite zeile"),
    ]
    assert got[1].where == f"{src}:2"


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"source": "a", "target": "b"}\n{"source": "a", ', r"train.jsonl:2: not valid JSON"),
        ('{"source": "a", "target": "b"}\n[1]\n', r"train.jsonl:2: a JSON list, not an object"),
        (
            '{"source": "a", "target": "b"}\n{"src": "a", "target": "b"}\n',
            r"train.jsonl:2: no 'source' field \(keys: \['src', 'target'\]\); set "
            r"task.source_field",
        ),
        ('{"source": "a"}\n', r"train.jsonl:1: no 'target' field .* set task.target_field"),
        (
            '{"source": "a", "target": " "}\n',
            r"train.jsonl:1: 'target' is empty; fill in the target text or remove the line",
        ),
        ('{"source": 3, "target": "b"}\n', r"train.jsonl:1: 'source' is a int, not a string"),
        ("\n\n", r"train.jsonl holds no pairs \(it is empty\)"),
    ],
)
def test_jsonl_errors_name_file_line_and_fix(tmp_path, text, match):
    path = write(tmp_path, "train.jsonl", text)
    with pytest.raises(DataError, match=match):
        read_parallel(path)


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(DataError, match=r"task data file '.*nope.jsonl' does not exist"):
        read_parallel(tmp_path / "nope.jsonl")


@pytest.mark.parametrize(
    "src, tgt, match",
    [
        ("a\nb\nc\n", "x\ny\n", r"src.txt has 3 lines but .*tgt.txt has 2; the files must be "),
        ("a\n\nc\n", "x\ny\nz\n", r"src.txt:2: empty source line; .*remove line 2 from both"),
        ("a\nb\n", "x\n  \n", r"tgt.txt:2: empty target line"),
        ("a\nb\n\n", "x\ny\nz\n", r"src.txt:3: empty source line"),  # a stray blank last line
        ("", "x\n", r"src.txt is empty; it needs one source sentence a line"),
    ],
)
def test_text_pair_errors(tmp_path, src, tgt, match):
    s, t = write(tmp_path, "src.txt", src), write(tmp_path, "tgt.txt", tgt)
    with pytest.raises(DataError, match=match):
        read_parallel(source_file=s, target_file=t)


def test_text_pair_missing_file_and_bad_utf8(tmp_path):
    s = write(tmp_path, "src.txt", "a\n")
    with pytest.raises(DataError, match=r"task.target_file '.*tgt.txt' does not exist"):
        read_parallel(source_file=s, target_file=tmp_path / "tgt.txt")
    t = tmp_path / "tgt.txt"
    t.write_bytes(b"ok\n\xff\n")
    s = write(tmp_path, "src.txt", "a\nb\n")
    with pytest.raises(DataError, match=r"tgt.txt:2: not valid UTF-8 .*convert the file"):
        read_parallel(source_file=s, target_file=t)


def test_read_parallel_needs_one_kind_of_input(tmp_path):
    with pytest.raises(ConfigError, match="not neither"):
        read_parallel()
    with pytest.raises(ConfigError, match="not both"):
        read_parallel("a.jsonl", source_file="a.en", target_file="a.de")
    with pytest.raises(ConfigError, match="task.source_file and task.target_file go together"):
        read_parallel(source_file="a.en")


# ---------------------------------------------------------------------------------------------
# Encoding.


def pairs(*texts):
    return [ParallelExample(s, t, f"f.jsonl:{i + 1}") for i, (s, t) in enumerate(texts)]


def test_encode_appends_eos_and_counts_truncation():
    examples = pairs(("abcdef", "xy"), ("ab", "vwxyz"), ("abcde", "vwxyz"), ("a", "b"))
    enc = encode_parallel(examples, TOK, max_source_len=5, max_target_len=4)
    assert [s.tolist() for s in enc.sources] == [ids("abcd"), ids("ab"), ids("abcd"), ids("a")]
    assert [t.tolist() for t in enc.targets] == [ids("xy"), ids("vwx"), ids("vwx"), ids("b")]
    assert all(s.dtype == np.int32 for s in enc.sources)
    assert (enc.num_truncated_sources, enc.num_truncated_targets) == (2, 2)
    assert (
        enc.truncation_summary() == "truncated 2 of 4 sources to 5 and 2 of 4 targets to 4 tokens"
    )
    fits = encode_parallel(examples, TOK, max_source_len=7, max_target_len=6)
    assert fits.truncation_summary() == "" and fits.num_truncated_sources == 0
    assert [s.tolist() for s in fits.sources][0] == ids("abcdef")


def test_encode_total_limit_cuts_longest_side_first():
    examples = pairs(("abcdefgh", "xy"), ("abc", "uvwxyz"), ("ab", "xy"))
    enc = encode_parallel(examples, TOK, max_source_len=20, max_target_len=20, max_total_len=8)
    # 8 tokens for both: 6 text tokens, the longer side loses tokens first (the target on a tie)
    assert [s.tolist() for s in enc.sources] == [ids("abcd"), ids("abc"), ids("ab")]
    assert [t.tolist() for t in enc.targets] == [ids("xy"), ids("uvw"), ids("xy")]
    assert (enc.num_truncated_sources, enc.num_truncated_targets) == (1, 1)
    assert enc.truncation_summary().endswith("(source + target to 8)")


def test_encode_with_a_sentencepiece_tokenizer(small_tokenizer):
    examples = pairs(("Return the value.", "Gibt den Wert zurück."))
    enc = encode_parallel(examples, small_tokenizer, max_source_len=64, max_target_len=64)
    eos = small_tokenizer.eos_id
    assert enc.sources[0].tolist() == [*small_tokenizer.encode("Return the value."), eos]
    assert enc.targets[0].tolist() == [*small_tokenizer.encode("Gibt den Wert zurück."), eos]


@pytest.mark.parametrize(
    "limits, match",
    [
        (
            dict(max_source_len=4, max_target_len=9),
            r"f.jsonl:2: the source is 5 tokens with eos, more than model.max_seq_len=4; raise "
            r"model.max_seq_len, or set task.overlong=truncate",
        ),
        (
            dict(max_source_len=9, max_target_len=3),
            r"f.jsonl:1: the target is 4 tokens with eos, more than task.max_target_len=3; raise "
            r"task.max_target_len .*or set task.overlong=truncate",
        ),
        (
            dict(max_source_len=9, max_target_len=9, max_total_len=7),
            r"f.jsonl:2: source and target are 5 \+ 3 tokens, more than model.max_seq_len=7 "
            r"together .*or set task.overlong=truncate",
        ),
    ],
)
def test_encode_overlong_error_names_the_first_line_and_both_fixes(limits, match):
    examples = pairs(("ab", "xyz"), ("abcd", "xy"), ("abcdefgh", "x"))
    with pytest.raises(DataError, match=match):
        encode_parallel(examples, TOK, overlong="error", **limits)


def test_encode_argument_errors():
    examples = pairs(("ab", "xy"))
    with pytest.raises(ConfigError, match="overlong='cut' must be 'truncate' or 'error'"):
        encode_parallel(examples, TOK, max_source_len=8, max_target_len=8, overlong="cut")
    with pytest.raises(ConfigError, match="leave no room for text beside eos"):
        encode_parallel(examples, TOK, max_source_len=8, max_target_len=1)
    with pytest.raises(ConfigError, match="leave no room"):
        encode_parallel(examples, TOK, max_source_len=8, max_target_len=8, max_total_len=3)


# ---------------------------------------------------------------------------------------------
# Encoder-decoder batches.


def encoded(texts):
    return encode_parallel(pairs(*texts), TOK, max_source_len=64, max_target_len=64)


def random_pairs(n, seed=0, longest=12):
    rng = np.random.default_rng(seed)

    def text():
        return "".join(rng.choice(list(LETTERS[:26]), size=rng.integers(1, longest)))

    return encoded([(text(), text()) for _ in range(n)])


def segments(row_ids, row_segments):
    """The token lists of segments 1, 2, ... of one row."""
    k = int(row_segments.max())
    return [row_ids[row_segments == s].tolist() for s in range(1, k + 1)]


def unpack(batch):
    """(source ids, target ids) of every example in a seq2seq batch, checking the layout."""
    out = []
    for r in range(len(batch["inputs"])):
        seg, dseg = batch["segment_ids"][r], batch["decoder_segment_ids"][r]
        if not seg.any():
            assert not dseg.any() and not batch["weights"][r].any()
            continue
        srcs, tgts = segments(batch["inputs"][r], seg), segments(batch["targets"][r], dseg)
        dins = segments(batch["decoder_inputs"][r], dseg)
        assert len(srcs) == len(tgts)
        for k, (src, tgt, din) in enumerate(zip(srcs, tgts, dins, strict=True), start=1):
            assert src[-1] == EOS and tgt[-1] == EOS
            assert din == [PAD, *tgt[:-1]]  # shifted right, the pad id as decoder start
            assert batch["positions"][r][seg == k].tolist() == list(range(len(src)))
            assert batch["decoder_positions"][r][dseg == k].tolist() == list(range(len(tgt)))
            out.append((tuple(src), tuple(tgt)))
        # segments are contiguous from the start of the row, padding after them
        n_src, n_tgt = int((seg > 0).sum()), int((dseg > 0).sum())
        assert (seg[:n_src] > 0).all() and (batch["inputs"][r][n_src:] == PAD).all()
        assert (batch["weights"][r] == (dseg > 0)).all()
        assert np.all(np.diff(seg[:n_src]) >= 0) and np.all(np.diff(dseg[:n_tgt]) >= 0)
    return out


def test_packed_row_layout_by_hand():
    # Sorted by source length: A (5 tokens), C (3), B (2). A row takes the longest, then the
    # shortest that fit: A, B, C.
    enc = encoded([("abcd", "xy"), ("a", "z"), ("ab", "xyz")])
    batcher = Seq2SeqBatcher(
        enc, global_batch=1, source_buckets=(8, 16), target_buckets=(4, 8, 12), pad_id=PAD
    )
    assert batcher.num_rows == 1 and batcher.batches_per_epoch == 1
    batch = next(batcher)
    a, b, c, d, x, y, z = 4, 5, 6, 7, 27, 28, 29
    expected = {
        "inputs": [a, b, c, d, EOS, a, EOS, a, b, EOS, 0, 0, 0, 0, 0, 0],
        "segment_ids": [1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 0, 0, 0, 0, 0, 0],
        "positions": [0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 0, 0, 0, 0, 0, 0],
        "targets": [x, y, EOS, z, EOS, x, y, z, EOS, 0, 0, 0],
        "decoder_inputs": [PAD, x, y, PAD, z, PAD, x, y, z, 0, 0, 0],
        "decoder_segment_ids": [1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 0],
        "decoder_positions": [0, 1, 2, 0, 1, 0, 1, 2, 3, 0, 0, 0],
        "weights": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    }
    assert set(batch) == set(expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(batch[key], [want], err_msg=key)
        assert batch[key].dtype == (np.float32 if key == "weights" else np.int32), key
    assert count_target_tokens(batch) == 9 == batcher.global_target_tokens(0, 0)


def test_decoder_start_is_the_pad_id_given():
    batch = next(
        Seq2SeqBatcher(
            encoded([("ab", "xy")]),
            global_batch=1,
            source_buckets=(4,),
            target_buckets=(4,),
            pad_id=1,
        )
    )
    assert batch["decoder_inputs"].tolist() == [[1, 27, 28, 1]]
    assert batch["inputs"].tolist() == [[4, 5, EOS, 1]]  # padding is the pad id too


@pytest.mark.parametrize("pack", [True, False])
def test_every_pair_once_per_epoch_with_fixed_bucket_shapes(pack):
    enc = random_pairs(203)
    src_b, tgt_b = bucket_lengths(32, min_len=4), bucket_lengths(24, min_len=4)
    batcher = Seq2SeqBatcher(
        enc, global_batch=8, source_buckets=src_b, target_buckets=tgt_b, seed=3, pack=pack
    )
    want = sorted((tuple(s), tuple(t)) for s, t in zip(enc.sources, enc.targets, strict=True))
    epochs = []
    for epoch in range(2):
        got, shapes = [], set()
        for batch in batcher.epoch_iter():
            got += unpack(batch)
            b, s = batch["inputs"].shape
            t = batch["targets"].shape[1]
            assert b == 8 and s in src_b and t in tgt_b
            # the smallest bucket that holds the batch's longest row, on each side
            fill_s = (batch["segment_ids"] > 0).sum(1).max()
            fill_t = (batch["decoder_segment_ids"] > 0).sum(1).max()
            assert s == min(x for x in src_b if x >= fill_s)
            assert t == min(x for x in tgt_b if x >= fill_t)
            shapes.add((b, s, t))
            assert ("example_index" in batch) == (not pack)
        assert sorted(got) == want
        assert batcher.get_state() == {"epoch": epoch + 1, "batch": 0}
        assert shapes <= batcher.shapes | {(8, s, t) for s in src_b for t in tgt_b}
        epochs.append(got)
    assert epochs[0] != epochs[1]  # a new order each epoch
    if pack:
        assert batcher.num_rows < 203 / 2  # short pairs share rows
        unpacked = Seq2SeqBatcher(
            enc, global_batch=8, source_buckets=src_b, target_buckets=tgt_b, pack=False
        )
        assert batcher.padding_fraction < unpacked.padding_fraction


def test_grouping_by_length_pads_less():
    lengths = np.random.default_rng(0).integers(1, 60, size=400)
    enc = encoded([("a" * n, "b" * (n // 2 + 1)) for n in lengths])  # targets follow sources
    buckets = tuple(range(8, 65, 8))
    kwargs = dict(global_batch=8, source_buckets=buckets, target_buckets=buckets, pack=False)
    grouped = Seq2SeqBatcher(enc, group_chunk=50, **kwargs).padding_fraction
    ungrouped = Seq2SeqBatcher(enc, group_chunk=1, **kwargs).padding_fraction  # sorts each batch
    assert grouped < 0.2 < 0.4 < ungrouped


def test_packing_keeps_rows_within_the_largest_buckets():
    enc = random_pairs(300, seed=1, longest=30)
    batcher = Seq2SeqBatcher(enc, global_batch=4, source_buckets=(16, 32), target_buckets=(32,))
    rows = [batcher.lengths[row].sum(0) for row in batcher._rows]
    assert max(r[0] for r in rows) <= 32 and max(r[1] for r in rows) <= 32
    assert sorted(i for row in batcher._rows for i in row) == list(range(300))


def test_batches_are_a_function_of_seed_and_epoch():
    enc = random_pairs(100)
    kwargs = dict(global_batch=4, source_buckets=(8, 16, 32), target_buckets=(8, 16, 32))
    one, two = Seq2SeqBatcher(enc, seed=5, **kwargs), Seq2SeqBatcher(enc, seed=5, **kwargs)
    other = Seq2SeqBatcher(enc, seed=6, **kwargs)
    n = one.batches_per_epoch + 3
    first = [next(one) for _ in range(n)]
    for a, b in zip(first, [next(two) for _ in range(n)], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    differ = [next(other) for _ in range(n)]
    assert any(
        a["inputs"].shape != b["inputs"].shape or (a["inputs"] != b["inputs"]).any()
        for a, b in zip(first, differ, strict=True)
    )


@pytest.mark.parametrize("k", [0, 3, 7, 9])
def test_set_state_continues_exactly(k):
    enc = random_pairs(60)
    kwargs = dict(global_batch=8, source_buckets=(8, 16), target_buckets=(8, 16), seed=1)
    whole = Seq2SeqBatcher(enc, **kwargs)
    per_epoch = whole.batches_per_epoch
    assert 3 < per_epoch < 9  # k=9 is in the second epoch
    reference = [next(whole) for _ in range(k + 4)]
    resumed = Seq2SeqBatcher(enc, **kwargs)
    for _ in range(k):
        next(resumed)
    state = json.loads(json.dumps(resumed.get_state()))
    assert state == {"epoch": k // per_epoch, "batch": k % per_epoch}
    fresh = Seq2SeqBatcher(enc, **kwargs)
    fresh.set_state(state)
    for want in reference[k:]:
        got = next(fresh)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_bad_state_is_rejected():
    batcher = Seq2SeqBatcher(
        random_pairs(10), global_batch=4, source_buckets=(16,), target_buckets=(16,)
    )
    for state in ({"epoch": 0, "batch": batcher.batches_per_epoch}, {"epoch": -1, "batch": 0}, {}):
        with pytest.raises(ConfigError, match="does not fit .* batches per epoch"):
            batcher.set_state(state)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("processes", [2, 4])
def test_processes_read_disjoint_slices_of_the_global_batch(shuffle, processes):
    enc = random_pairs(70)
    kwargs = dict(
        global_batch=8,
        source_buckets=(8, 16, 32),
        target_buckets=(8, 16, 32),
        seed=2,
        shuffle=shuffle,
    )
    whole = Seq2SeqBatcher(enc, **kwargs)
    parts = [
        Seq2SeqBatcher(enc, process_index=p, process_count=processes, **kwargs)
        for p in range(processes)
    ]
    for index in range(whole.batches_per_epoch):
        want = whole.batch_at(1, index)
        got = [part.batch_at(1, index) for part in parts]
        for key in want:
            assert {g[key].shape[1:] for g in got} == {want[key].shape[1:]}  # one shape
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])
        examples = [unpack(g) for g in got]
        flat = [e for ex in examples for e in ex]
        assert sorted(flat) == sorted(unpack(want))
        assert sum(count_target_tokens(g) for g in got) == whole.global_target_tokens(1, index)


def test_eval_is_one_example_a_row_in_order():
    enc = random_pairs(11)
    batcher = Seq2SeqBatcher(
        enc, global_batch=4, source_buckets=(4, 8, 16), target_buckets=(4, 8, 16), shuffle=False
    )
    batches = list(batcher)
    assert len(batches) == 3 and batcher.get_state() == {"epoch": 1, "batch": 0}
    index = np.concatenate([b["example_index"] for b in batches])
    assert index.tolist() == [*range(11), -1]
    for b in batches:
        assert b["segment_ids"].max() <= 1 and b["decoder_segment_ids"].max() <= 1
        for r, i in enumerate(b["example_index"]):
            if i >= 0:
                ((src, tgt),) = unpack({k: v[r : r + 1] for k, v in b.items()})
                assert list(src) == enc.sources[i].tolist() and list(tgt) == enc.targets[i].tolist()
    again = list(batcher)  # each pass is one epoch, in the same order
    assert len(again) == 3 and all(
        (a[k] == b[k]).all() for a, b in zip(batches, again, strict=True) for k in a
    )
    with pytest.raises(ConfigError, match="evaluation .* keeps one example a row"):
        Seq2SeqBatcher(
            enc,
            global_batch=4,
            source_buckets=(16,),
            target_buckets=(16,),
            shuffle=False,
            pack=True,
        )


def test_batcher_errors():
    enc = random_pairs(5, longest=12)
    with pytest.raises(ConfigError, match=r"example \d+ takes \[\d+, \d+\] tokens, more than"):
        Seq2SeqBatcher(enc, global_batch=2, source_buckets=(4,), target_buckets=(64,))
    empty = EncodedPairs([], [], 0, 0, 8, 8)
    with pytest.raises(DataError, match="no examples to batch"):
        Seq2SeqBatcher(empty, global_batch=2, source_buckets=(8,), target_buckets=(8,))
    with pytest.raises(ConfigError, match="batch size 3 must be a positive multiple of the 2"):
        Seq2SeqBatcher(
            enc, global_batch=3, source_buckets=(64,), target_buckets=(64,), process_count=2
        )
    with pytest.raises(ConfigError, match="strictly increasing"):
        Seq2SeqBatcher(enc, global_batch=2, source_buckets=(64,), target_buckets=(32, 16))


# ---------------------------------------------------------------------------------------------
# Decoder-only (prompt -> completion) batches.


def test_prompt_completion_row_by_hand():
    enc = encoded([("abc", "xy"), ("a", "z")])
    batcher = PromptCompletionBatcher(enc, global_batch=1, buckets=(8, 16), bos_id=BOS)
    batch = next(batcher)
    a, b, c, x, y, z = 4, 5, 6, 27, 28, 29
    # [bos] a b c eos x y eos, then [bos] a eos z eos: inputs drop the last token of each,
    # targets the first
    expected = {
        "inputs": [BOS, a, b, c, EOS, x, y, BOS, a, EOS, z, 0, 0, 0, 0, 0],
        "targets": [a, b, c, EOS, x, y, EOS, a, EOS, z, EOS, 0, 0, 0, 0, 0],
        "segment_ids": [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0, 0, 0, 0, 0],
        "positions": [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0, 0, 0, 0, 0],
        # completion tokens only: x y eos of the first pair, z eos of the second
        "weights": [0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0],
    }
    assert set(batch) == set(expected)
    for key, want in expected.items():
        np.testing.assert_array_equal(batch[key], [want], err_msg=key)
    assert count_target_tokens(batch) == 5 == batcher.global_target_tokens(0, 0)

    no_bos = next(PromptCompletionBatcher(enc, global_batch=1, buckets=(16,), shuffle=False))
    np.testing.assert_array_equal(no_bos["inputs"][0, :6], [a, b, c, EOS, x, y])
    np.testing.assert_array_equal(no_bos["targets"][0, :6], [b, c, EOS, x, y, EOS])
    np.testing.assert_array_equal(no_bos["weights"][0, :7], [0, 0, 0, 1, 1, 1, 0])
    assert no_bos["example_index"].tolist() == [0]


def test_prompt_completion_every_pair_once_and_bucketed():
    enc = encode_parallel(
        random_pairs_text(150), TOK, max_source_len=32, max_target_len=32, max_total_len=32
    )
    buckets = bucket_lengths(64, min_len=8)  # rows of up to 64 tokens hold pairs of <= 32
    batcher = PromptCompletionBatcher(enc, global_batch=4, buckets=buckets, bos_id=BOS, seed=4)
    want = sorted((tuple(s), tuple(t)) for s, t in zip(enc.sources, enc.targets, strict=True))
    got = []
    for batch in batcher.epoch_iter():
        assert batch["inputs"].shape[1] in buckets
        for r in range(4):
            seg = batch["segment_ids"][r]
            for k in range(1, seg.max() + 1):
                inputs, targets = batch["inputs"][r][seg == k], batch["targets"][r][seg == k]
                weights = batch["weights"][r][seg == k]
                assert inputs[0] == BOS and (inputs[1:] == targets[:-1]).all()
                sequence = [*inputs, targets[-1]]
                prompt_end = sequence.index(EOS) + 1  # the source's eos: the separator
                source, target = sequence[1:prompt_end], sequence[prompt_end:]
                assert weights.tolist() == [0] * (prompt_end - 1) + [1] * len(target)
                got.append((tuple(source), tuple(target)))
    assert sorted(got) == want
    assert batcher.num_rows < 150 / 2


def random_pairs_text(n, seed=0):
    rng = np.random.default_rng(seed)

    def text():
        return "".join(rng.choice(list(LETTERS[:26]), size=rng.integers(1, 16)))

    return pairs(*[(text(), text()) for _ in range(n)])


# ---------------------------------------------------------------------------------------------
# Config fields.


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["task.source_file=a.en"], r"task.source_file='a.en' and task.target_file='': set both"),
        (
            ["task.source_file=a.en", "task.target_file=a.de", "task.train_file=t.jsonl"],
            "task.train_file and task.source_file/target_file both give training pairs",
        ),
        (["task.source_field="], "task.source_field and task.target_field must name"),
        (["task.max_target_len=-1"], r"task.max_target_len=-1 must be 0 .* or at least 2"),
        (["task.max_decode_len=1"], r"task.max_decode_len=1 must be 0"),
        (["task.label_smoothing=1.0"], r"task.label_smoothing=1.0 must be in \[0, 1\)"),
        (["task.beam_size=0"], r"task.beam_size=0 must be >= 1"),
        (["task.length_penalty=.nan"], r"task.length_penalty=nan must be a finite number"),
        (["task.overlong=cut"], r"task.overlong='cut' is not allowed; choose one of"),
    ],
)
def test_translation_config_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_translation_config_lengths_against_the_model():
    ok = load_config(
        None,
        [
            "task.name=translation",
            "task.source_file=a.en",
            "task.target_file=a.de",
            "task.max_target_len=64",
            "task.label_smoothing=0.1",
            "task.beam_size=1",
            "task.length_penalty=0.6",
        ],
    )
    assert (ok.task.source_field, ok.task.target_field, ok.task.overlong) == (
        "source",
        "target",
        "truncate",
    )
    validate_for_devices(ok, 8)
    for key in ("max_target_len", "max_decode_len"):
        cfg = load_config(None, ["task.name=translation", f"task.{key}=129"])
        with pytest.raises(ConfigError, match=rf"task.{key}=129 is longer than model.max_seq_len"):
            validate_for_devices(cfg, 8)
    other = load_config(None, ["task.name=classification", "task.max_target_len=129"])
    validate_for_devices(other, 8)  # only translation reads it


# ---------------------------------------------------------------------------------------------
# scripts/gettext_pairs.py


def load_script():
    path = Path(__file__).parents[1] / "scripts" / "gettext_pairs.py"
    spec = importlib.util.spec_from_file_location("gettext_pairs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_mo(path, entries):
    """A GNU .mo catalog (little-endian, no hash table) of {msgid: msgstr}, as msgfmt writes."""
    keys = sorted(entries)
    ids = [k.encode() for k in keys]
    strs = [entries[k].encode() for k in keys]
    n = len(keys)
    data_start = 28 + 16 * n
    tables, blob = [], b""
    for strings in (ids, strs):
        table = []
        for s in strings:
            table += [len(s), data_start + len(blob)]
            blob += s + b"\0"
        tables.append(table)
    header = struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0)
    body = struct.pack(f"<{4 * n}I", *tables[0], *tables[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + body + blob)


HEADER = "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"


def make_locale(root):
    messages = root / "de" / "LC_MESSAGES"
    write_mo(
        messages / "a.mo",
        {
            "": HEADER,
            "Hello": "Hallo",
            "file\0files": "Datei\0Dateien",  # plural: (singular, first form) only
            "menu\x04Open": "Öffnen",  # a context is dropped
            "OK": "OK",  # untranslated
            "%s: %d": "%s : %d",  # format strings only
            "Error: %s": "Fehler: %s",
            "x" * 41: "y" * 41,  # too long for max_chars=40
            "Save": " ",  # empty translation
        },
    )
    write_mo(messages / "b.mo", {"": HEADER, "Hello": "Servus", "Quit": "Beenden"})
    (messages / "broken.mo").write_bytes(b"not a catalog")
    return messages


def test_gettext_catalog_filters_and_dedup(tmp_path):
    gp = load_script()
    messages = make_locale(tmp_path)
    assert sorted(gp.catalog_pairs(messages / "b.mo")) == [
        ("", HEADER),
        ("Hello", "Servus"),
        ("Quit", "Beenden"),
    ]
    got, counts = gp.collect_pairs(sorted(messages.glob("*.mo")), max_chars=40)
    assert sorted(got) == [
        ("Error: %s", "Fehler: %s"),
        ("Hello", "Hallo"),  # a.mo comes first
        ("Open", "Öffnen"),
        ("Quit", "Beenden"),
        ("file", "Datei"),
    ]
    assert counts == {
        "catalogs": 2,
        "unreadable catalogs": 1,
        "entries": 12,
        "skipped empty": 3,  # two headers and "Save"
        "skipped identical": 1,
        "skipped format only": 1,
        "skipped too long": 1,
        "skipped duplicate source": 1,
    }
    assert gp.is_format_only("%(name)s %%: %-5.2f {0} ${HOME} %1$s") and not gp.is_format_only(
        "%d files"
    )


def test_gettext_split_is_seeded_and_held_out_by_source(tmp_path):
    gp = load_script()
    data = [(f"source {i}", f"ziel {i}") for i in range(50)]
    split = gp.split_pairs(data, seed=1, valid=5, test=7)
    assert [len(split[k]) for k in ("train", "valid", "test")] == [38, 5, 7]
    sources = [{s for s, _ in split[k]} for k in ("train", "valid", "test")]
    assert set.union(*sources) == {s for s, _ in data} and sum(map(len, sources)) == 50
    assert gp.split_pairs(data[::-1], seed=1, valid=5, test=7) == split  # input order is ignored
    assert gp.split_pairs(data, seed=2, valid=5, test=7)["test"] != split["test"]
    with pytest.raises(ValueError, match="only 50 pairs"):
        gp.split_pairs(data, seed=0, valid=25, test=25)


def test_gettext_cli_writes_jsonl_and_prints_counts(tmp_path, capsys):
    gp = load_script()
    make_locale(tmp_path / "locale")
    out = tmp_path / "out"
    argv = ["--lang", "de", "--out", str(out), "--locale-dir", str(tmp_path / "locale")]
    assert gp.main([*argv, "--max-chars", "40", "--valid", "1", "--test", "2", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "skipped duplicate source 1" in printed
    assert "de: kept 5 pairs: train 2, valid 1, test 2" in printed
    rows = {
        name: [json.loads(line) for line in (out / f"{name}.jsonl").read_text("utf-8").splitlines()]
        for name in ("train", "valid", "test")
    }
    assert [len(rows[k]) for k in ("train", "valid", "test")] == [2, 1, 2]
    assert {"source": "Open", "target": "Öffnen"} in sum(rows.values(), [])
    read = read_parallel(out / "train.jsonl")  # the output is valid task data
    assert len(read) == 2
    text = (out / "train_text.txt").read_text("utf-8").splitlines()  # tokenizer text: train only
    assert text == [t for r in rows["train"] for t in (r["source"], r["target"])]
    assert gp.main([*argv, "--lang", "fr"]) == 2  # the last --lang counts
    assert "no .mo catalogs" in capsys.readouterr().err
