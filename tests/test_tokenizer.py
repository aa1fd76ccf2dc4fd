"""Tests for plm_jax.tokenizer: exact round trip, special ids, loading, fingerprints, errors."""

import hashlib
import json
import pickle
import random
import shutil

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from plm_jax.errors import ConfigError, DataError
from plm_jax.tokenizer import Tokenizer, _chunks, train_tokenizer

SPACE_SYMBOL = "\u2581"
# Strings that SentencePiece treats specially, or that look like special pieces.
TRICKY = [
    "",
    " ",
    "   ",
    "\n",
    "\r\n",
    "\t",
    "\x00",
    "\x1b[0m",
    "\x7f",
    "\x85",
    "\u2028",
    "\ufeff",
    "\u200b",
    "\ufffd",
    "\u00a0",
    "e\u0301",
    "\ufb01",
    "\uff21",
    SPACE_SYMBOL,
    " \u2047 ",
    "<mask>",
    "<s>",
    "</s>",
    "<pad>",
    "<unk>",
    "<|sep|>",
    "<0x41>",
    "\U0001f4a5",
    "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "日本語",
    "한국어",
    "hello",
    " world",
]


def english_like(num_bytes: int, seed: int = 0) -> list[str]:
    """Documents of Zipf-distributed made-up words, with some code, CJK and emoji."""
    rng = random.Random(seed)
    letters = "theronanreheinedndhaatenesofornteatitoitstioleisou"
    syllables = [letters[i : i + 2] for i in range(0, len(letters), 2)]
    made_up = {"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(4000)}
    words = sorted(made_up, key=lambda w: (len(w), w))  # short words are the frequent ones
    cum, total = [], 0.0
    for rank in range(len(words)):
        total += 1.0 / (rank + 1)
        cum.append(total)
    docs, size = [], 0
    while size < num_bytes:
        sentences = [
            " ".join(rng.choices(words, cum_weights=cum, k=rng.randint(4, 14))).capitalize() + "."
            for _ in range(rng.randint(2, 8))
        ]
        doc = " ".join(sentences)
        if rng.random() < 0.2:
            doc += "\n\ndef f(x):\n    return x  # café 日本 \U0001f600\n\tdone\n"
        docs.append(doc)
        size += len(doc.encode())
    return docs


@pytest.fixture(scope="module")
def corpus():
    return english_like(60_000)


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok(request, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"tok_{request.param}")
    return train_tokenizer(
        corpus,
        out,
        vocab_size=500,
        model_type=request.param,
        user_defined_symbols=["<|sep|>"],
        show_progress=False,
    )


@pytest.fixture(scope="module")
def bpe_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe")
    train_tokenizer(corpus, out, vocab_size=400, show_progress=False)
    return out


# ---------------------------------------------------------------------------------------------
# Round trip.

fragments = st.sampled_from(TRICKY + ["<", ">", "s", "/", "  ", "\t\t", "x" * 50])
texts = st.lists(st.one_of(st.text(st.characters(codec="utf-8")), fragments), max_size=8).map(
    "".join
)


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.unk_id not in ids  # byte fallback covers every character


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tok, text):
    for t in (text, f"a{text}b", f" {text} {text}\n"):
        assert tok.decode(tok.encode(t)) == t


def test_round_trip_every_code_point(tok):
    # All of Unicode except the surrogates (not encodable), 1000 code points per string.
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    texts = ["".join(chars[i : i + 1000]) for i in range(0, len(chars), 1000)]
    assert tok.decode_batch(tok.encode_batch(texts)) == texts


def test_round_trip_corpus(tok, corpus):
    assert tok.decode_batch(tok.encode_batch(corpus)) == corpus


def test_literal_space_symbol_is_encoded_as_bytes(tok):
    # SentencePiece alone decodes its own "▁" piece as a space: show that, then our fix.
    sp = spm.SentencePieceProcessor(model_file=str(tok.path))
    assert sp.decode(sp.encode(f"a{SPACE_SYMBOL}b")) == "a b"
    ids = tok.encode(SPACE_SYMBOL)
    assert [tok.id_to_piece(i) for i in ids] == ["<0xE2>", "<0x96>", "<0x81>"]
    assert tok.decode(tok.encode(f"a{SPACE_SYMBOL} b")) == f"a{SPACE_SYMBOL} b"


def test_literal_special_pieces_are_plain_text(tok):
    for piece in ("<mask>", "<s>", "</s>", "<pad>", "<unk>"):
        ids = tok.encode(f"x {piece} y")
        assert not {tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id} & set(ids)
        assert tok.decode(ids) == f"x {piece} y"
    # A user-defined symbol is matched in text and decodes to itself.
    sep = tok.piece_to_id("<|sep|>")
    assert tok.encode("a<|sep|>b").count(sep) == 1
    assert tok.decode([sep]) == "<|sep|>"


def test_encode_adds_no_bos_eos(tok):
    ids = tok.encode("hello there")
    assert ids and tok.bos_id not in ids and tok.eos_id not in ids


def test_decode_drops_special_ids(tok):
    ids = tok.encode("the end")
    with_specials = [tok.bos_id, *ids, tok.mask_id, tok.eos_id, tok.pad_id, tok.pad_id]
    assert tok.decode(with_specials) == "the end"
    assert tok.decode(np.array(with_specials, dtype=np.int32)) == "the end"
    assert tok.decode([]) == ""


def test_batch_equals_single(tok, corpus):
    batch = [*corpus[:40], *TRICKY, f"x{SPACE_SYMBOL}y"]
    singles = [tok.encode(t) for t in batch]
    assert tok.encode_batch(batch) == singles
    assert tok.encode_batch(tuple(batch), num_threads=1) == singles
    assert tok.decode_batch(singles) == [tok.decode(ids) for ids in singles]
    assert tok.decode_batch([np.array(ids, dtype=np.int64) for ids in singles]) == batch
    assert tok.encode_batch([]) == [] and tok.decode_batch([]) == []


# ---------------------------------------------------------------------------------------------
# Special ids, files, loading.


def test_special_ids(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(6)] == [
        "<pad>",
        "<unk>",
        "<s>",
        "</s>",
        "<mask>",
        "<|sep|>",
    ]
    assert tok.piece_to_id("<mask>") == 4 and tok.piece_to_id("<unk>") == 1
    assert tok.vocab_size == 500


def test_custom_pieces_and_no_mask(corpus, tmp_path):
    tok = train_tokenizer(
        corpus[:100],
        tmp_path,
        vocab_size=300,
        pad_piece="[PAD]",
        unk_piece="[UNK]",
        bos_piece="[BOS]",
        eos_piece="[EOS]",
        mask_piece="",
        show_progress=False,
    )
    assert tok.mask_id is None
    assert [tok.id_to_piece(i) for i in range(4)] == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    assert tok.id_to_piece(4) == "<0x00>"  # no mask: byte pieces follow the specials
    assert json.loads((tmp_path / "tokenizer.json").read_text())["mask_piece"] == ""
    with pytest.raises(KeyError, match="<mask>"):
        tok.piece_to_id("<mask>")
    # A bare .model file: nothing else is a control symbol, so still no mask.
    shutil.copy(tok.path, tmp_path / "bare.model")
    assert Tokenizer.load(tmp_path / "bare.model").mask_id is None


def test_files_written(bpe_dir):
    names = sorted(p.name for p in bpe_dir.iterdir())
    assert names == ["tokenizer.json", "tokenizer.model", "tokenizer.vocab"]  # no temp files
    meta = json.loads((bpe_dir / "tokenizer.json").read_text())
    model_bytes = (bpe_dir / "tokenizer.model").read_bytes()
    assert meta["model_sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert meta["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    assert meta["mask_piece"] == "<mask>"
    assert meta["options"]["vocab_size"] == 400 and meta["options"]["model_type"] == "bpe"
    vocab = (bpe_dir / "tokenizer.vocab").read_text().split("\n")
    assert vocab[:2] == ["<pad>\t0", "<unk>\t0"] and len(vocab) == 401


def test_load_from_dir_and_model_file(bpe_dir, tmp_path):
    from_dir = Tokenizer.load(bpe_dir)
    from_file = Tokenizer.load(bpe_dir / "tokenizer.model")
    shutil.copy(bpe_dir / "tokenizer.model", tmp_path / "other.model")
    bare = Tokenizer.load(str(tmp_path / "other.model"))  # no json: mask inferred
    for t in (from_file, bare):
        assert (t.vocab_size, t.fingerprint) == (from_dir.vocab_size, from_dir.fingerprint)
        assert (t.pad_id, t.unk_id, t.bos_id, t.eos_id, t.mask_id) == (0, 1, 2, 3, 4)
        assert t.encode("Hello there.\n") == from_dir.encode("Hello there.\n")
    assert from_dir.path == bpe_dir / "tokenizer.model"
    assert bare.path == tmp_path / "other.model"


def test_load_ignores_foreign_tokenizer_json(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.model", tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    assert Tokenizer.load(tmp_path).mask_id == 4


def test_fingerprint(corpus, bpe_dir, tmp_path):
    tok = Tokenizer.load(bpe_dir)
    assert tok.fingerprint == hashlib.sha256(tok.path.read_bytes()).hexdigest()
    same = train_tokenizer(corpus, tmp_path / "same", vocab_size=400, show_progress=False)
    other = train_tokenizer(corpus, tmp_path / "other", vocab_size=401, show_progress=False)
    assert same.fingerprint == tok.fingerprint  # same data and options: same model bytes
    assert other.fingerprint != tok.fingerprint
    # Retraining into the same directory replaces the model and its fingerprint.
    shutil.copytree(bpe_dir, tmp_path / "copy")
    retrained = train_tokenizer(corpus[:50], tmp_path / "copy", vocab_size=400, show_progress=False)
    assert retrained.fingerprint != tok.fingerprint
    assert Tokenizer.load(tmp_path / "copy").fingerprint == retrained.fingerprint


def test_pickle(tok):
    tok.word_starts(), tok.special_ids  # cached values travel too
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.fingerprint == tok.fingerprint and clone.mask_id == tok.mask_id
    assert clone.special_ids == tok.special_ids
    assert (clone.word_starts() == tok.word_starts()).all()
    assert clone.encode(f"a{SPACE_SYMBOL}b\n") == tok.encode(f"a{SPACE_SYMBOL}b\n")


def test_without_byte_fallback_unknown_characters_become_unk(corpus, tmp_path):
    tok = train_tokenizer(
        corpus[:200], tmp_path, vocab_size=200, byte_fallback=False, show_progress=False
    )
    ids = tok.encode("a\u4e07e")  # a character absent from the corpus
    assert ids[1] == tok.unk_id
    assert tok.decode(ids) == "a \u2047 e"  # SentencePiece's unk surface: the text is lost


# ---------------------------------------------------------------------------------------------
# Model inputs: encode_pair, special_ids, word_starts.


def test_encode_pair_adds_bos_and_eos(small_tokenizer):
    tok = small_tokenizer
    a, b = tok.encode("Return the value."), tok.encode(" of x")
    assert a and b
    assert tok.encode_pair("Return the value.") == ([2, *a, 3], [0] * (len(a) + 2))
    ids, type_ids = tok.encode_pair("Return the value.", " of x")
    assert ids == [2, *a, 3, *b, 3]
    assert type_ids == [0] * (len(a) + 2) + [1] * (len(b) + 1)
    assert tok.encode_pair("") == ([2, 3], [0, 0])
    assert tok.encode_pair("", "") == ([2, 3, 3], [0, 0, 1])  # an empty pair still gets its eos
    with pytest.raises(DataError, match="not valid Unicode"):
        tok.encode_pair("fine", "bad \ud800")


def test_special_ids_set(small_tokenizer, tok, corpus, tmp_path):
    assert small_tokenizer.special_ids == frozenset({0, 1, 2, 3, 4})
    assert isinstance(small_tokenizer.special_ids, frozenset)
    # The user-defined "<|sep|>" (id 5) is matched in text like a word: not special.
    assert tok.id_to_piece(5) == "<|sep|>" and tok.special_ids == frozenset({0, 1, 2, 3, 4})
    no_mask = train_tokenizer(
        corpus[:100], tmp_path, vocab_size=300, mask_piece="", show_progress=False
    )
    assert no_mask.special_ids == frozenset({0, 1, 2, 3})


def test_word_starts(small_tokenizer):
    tok = small_tokenizer
    starts = tok.word_starts()
    assert starts.dtype == bool and starts.shape == (tok.vocab_size,)
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    expected = [p.startswith(SPACE_SYMBOL) or i < 5 for i, p in enumerate(pieces)]
    assert starts.tolist() == expected
    assert starts[:5].all()  # pad, unk, bos, eos, mask: each its own word
    byte_ids = [i for i, p in enumerate(pieces) if p.startswith("<0x")]
    assert len(byte_ids) == 256 and not starts[byte_ids].any()  # bytes continue a word
    assert starts[5:].any() and not starts[5:].all()
    # With single spaces, exactly one piece of each " word" starts with "▁".
    words = ["the", "value", "of", "the", "given", "argument", "is", "returned"]
    ids = tok.encode(" " + " ".join(words))
    assert len(ids) > len(words)  # some words take several pieces ...
    assert int(starts[ids].sum()) == len(words)  # ... but each starts once
    assert tok.word_starts() is starts  # cached
    with pytest.raises(ValueError, match="read-only"):
        starts[0] = False


# ---------------------------------------------------------------------------------------------
# Character offsets and pair framing (question answering).


def check_offsets(tok, text):
    """encode_with_offsets(text) gives encode's ids, and spans that read back the pieces."""
    ids, spans = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(spans) == len(ids)
    covered = [False] * len(text)
    char_bytes: dict[int, bytes] = {}
    last_end = 0
    for i, (start, end) in zip(ids, spans, strict=True):
        piece = tok.id_to_piece(i)
        assert 0 <= start < end <= len(text)
        if tok._sp.is_byte(i):  # one byte of the character text[start]
            assert end == start + 1
            assert start >= last_end or (start, end) == (last_end - 1, last_end)
            char_bytes[start] = char_bytes.get(start, b"") + bytes([int(piece[3:5], 16)])
        else:
            surface = piece.replace(SPACE_SYMBOL, " ")
            assert start >= last_end
            assert text[start:end] == (surface.lstrip(" ") or surface)  # no leading space
        covered[start:end] = [True] * (end - start)
        last_end = end
    assert all(text[c].encode() == b for c, b in char_bytes.items())
    assert all(covered[c] or text[c] == " " for c in range(len(text)))  # spaces of "▁word"
    return ids, spans


@pytest.mark.parametrize("text", TRICKY + ["Hello  world, café 🙂 日本\n  x", "a\u2581b \u2581 c"])
def test_encode_with_offsets_tricky_strings(tok, text):
    check_offsets(tok, text)


@settings(max_examples=100, deadline=None)
@given(text=texts)
def test_encode_with_offsets_any_text(tok, text):
    check_offsets(tok, text)


def test_encode_with_offsets_hand_computed(small_tokenizer):
    tok = small_tokenizer
    # " 🙂" is the piece "▁" and the emoji's four UTF-8 byte pieces, which all span the emoji.
    ids, spans = check_offsets(tok, "a 🙂")
    assert [tok.id_to_piece(i) for i in ids] == ["a", "▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert spans == [(0, 1), (1, 2)] + [(2, 3)] * 4
    # A literal "▁" is its three byte pieces (see encode), spanning that one character.
    ids, spans = check_offsets(tok, "a\u2581b")
    assert spans[1:4] == [(1, 2)] * 3 and spans[-1] == (2, 3)
    text = "return the value."
    ids, spans = check_offsets(tok, text)
    the = next(k for k, i in enumerate(ids) if tok.id_to_piece(i) == "▁the")
    assert spans[the] == (7, 10)  # "the", not " the"
    assert tok.encode_with_offsets("") == ([], [])
    with pytest.raises(DataError, match="not valid Unicode"):
        tok.encode_with_offsets("bad \ud800")


@pytest.mark.parametrize(
    "a, b", [("Return the value.", " of x"), ("", ""), ("", "x"), ("a\u2581b", "日本 \n")]
)
def test_frame_pair_equals_encode_pair(small_tokenizer, a, b):
    tok = small_tokenizer
    ids_a = tok.encode(a)
    ids, type_ids, b_start = tok.frame_pair(ids_a, tok.encode(b))
    assert (ids, type_ids) == tok.encode_pair(a, b)
    assert b_start == len(ids_a) + 2 and ids[b_start:-1] == tok.encode(b)
    assert tok.frame_pair([7], []) == ([2, 7, 3, 3], [0, 0, 0, 1], 3)


# ---------------------------------------------------------------------------------------------
# Training input: line splitting, chunking, the byte budget, progress output.


def test_chunks_respect_the_limit_and_utf8():
    data = ("日本語" * 3000).encode()  # 27 kB, no spaces: cut between characters
    parts = list(_chunks(data))
    assert b"".join(parts) == data
    assert all(0 < len(p) <= 4000 for p in parts)
    assert all(p.decode() for p in parts)
    words = ("word " * 2000).encode()  # cut before a space
    parts = list(_chunks(words))
    assert b"".join(parts) == words and all(p.startswith(b" ") for p in parts[1:])
    assert list(_chunks(b"")) == []


def test_long_single_line_document_is_used(tmp_path):
    # One 80 kB line: SentencePiece would drop it whole (over 4192 bytes) without the chunking.
    rng = random.Random(1)
    words = ["zanzibar", "quokka", "xylophone", "marmalade", "kumquat", "jib"]
    doc = " ".join(rng.choice(words) for _ in range(10_000))
    tok = train_tokenizer([doc], tmp_path, vocab_size=320, show_progress=False)
    assert tok.encode(" xylophone") == [tok.piece_to_id("\u2581xylophone")]  # learned whole
    assert tok.decode(tok.encode(doc)) == doc


def test_reading_stops_at_max_train_bytes(tmp_path):
    pulled = 0
    docs = english_like(200_000, seed=3)

    def stream():
        nonlocal pulled
        while True:  # endless: training must stop reading on its own
            pulled += 1
            yield docs[pulled % len(docs)]

    train_tokenizer(stream(), tmp_path, vocab_size=300, max_train_bytes=20_000, show_progress=False)
    read = sum(len(docs[i % len(docs)].encode()) for i in range(1, pulled))
    assert read < 20_000 and pulled < 200


def test_progress_output(corpus, tmp_path, capfd):
    train_tokenizer(corpus[:100], tmp_path / "a", vocab_size=300, show_progress=True)
    err = capfd.readouterr().err
    assert "training SentencePiece bpe tokenizer" in err and "done in" in err
    assert "reading tokenizer text" in err
    train_tokenizer(corpus[:100], tmp_path / "b", vocab_size=300, show_progress=False)
    captured = capfd.readouterr()  # captures fd 2, so SentencePiece's C++ log would show here
    assert captured.err == "" and captured.out == ""


def test_one_megabyte_vocab_2000(tmp_path):
    # Acceptance size: ~1 MB of English-like text, vocab 2000 (about 1 s for BPE on 2 cores).
    docs = english_like(1_000_000, seed=7)
    tok = train_tokenizer(docs, tmp_path, vocab_size=2000, show_progress=False)
    ids = tok.encode_batch(docs)
    assert tok.decode_batch(ids) == docs
    num_bytes = sum(len(d.encode()) for d in docs)
    assert num_bytes / sum(map(len, ids)) > 3.0  # bytes per token: merges were learned


# ---------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("docs", [[], [""], ["", "\n\n", "\n"]])
def test_empty_input(docs, tmp_path):
    with pytest.raises(DataError, match="no text to train the tokenizer"):
        train_tokenizer(docs, tmp_path, vocab_size=300, show_progress=False)
    assert not (tmp_path / "tokenizer.model").exists()


def test_vocab_too_large_for_data(tmp_path):
    with pytest.raises(DataError, match=r"too large .* lower --vocab-size .* at most \d+"):
        train_tokenizer(["hello world"] * 10, tmp_path, vocab_size=5000, show_progress=False)
    assert not (tmp_path / "tokenizer.model").exists()


def test_vocab_too_small_for_bytes(tmp_path):
    with pytest.raises(DataError, match=r"raise --vocab-size .* at least \d+"):
        train_tokenizer(["hello world"] * 10, tmp_path, vocab_size=100, show_progress=False)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(model_type="wordpiece"), "model_type='wordpiece' is unknown"),
        (dict(vocab_size=8), "vocab_size=8 is too small"),
        (dict(character_coverage=0.0), "character_coverage"),
        (dict(max_train_bytes=0), "max_train_bytes"),
        (dict(num_threads=-1), "num_threads"),
        (dict(mask_piece="<s>"), "must be distinct"),
        (dict(user_defined_symbols=["<pad>"]), "must be distinct"),
        (dict(user_defined_symbols=[""]), "non-empty"),
        (dict(eos_piece=""), "non-empty"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    kwargs = {"vocab_size": 300, **kwargs}
    with pytest.raises(ConfigError, match=match):
        train_tokenizer(["hello"], tmp_path, show_progress=False, **kwargs)


def test_single_string_instead_of_documents(tmp_path):
    with pytest.raises(ConfigError, match="iterable of documents"):
        train_tokenizer("hello world", tmp_path, vocab_size=300, show_progress=False)


def test_non_str_document(tmp_path):
    with pytest.raises(DataError, match="must be str, got bytes"):
        train_tokenizer(["ok", b"bytes"], tmp_path, vocab_size=300, show_progress=False)


def test_error_from_the_document_stream_keeps_its_type(tmp_path):
    def stream():
        yield "some text"
        raise DataError("data file gone")

    with pytest.raises(DataError, match="data file gone"):
        train_tokenizer(stream(), tmp_path, vocab_size=300, show_progress=False)


def test_load_missing_path(tmp_path):
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "nope.model")
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.model


@pytest.mark.parametrize("content", ["empty", "garbage", "truncated"])
def test_load_corrupt_model(content, bpe_dir, tmp_path):
    good = (bpe_dir / "tokenizer.model").read_bytes()
    data = {"empty": b"", "garbage": b"\x00\x01not a model" * 50, "truncated": good[:-7]}
    (tmp_path / "bad.model").write_bytes(data[content])
    with pytest.raises(DataError, match="is not a valid SentencePiece model"):
        Tokenizer.load(tmp_path / "bad.model")


def test_load_model_without_pad(corpus, tmp_path):
    path = tmp_path / "nopad"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus[:100]), model_prefix=str(path), vocab_size=300, minloglevel=2
    )
    with pytest.raises(DataError, match="has no pad piece"):
        Tokenizer.load(path.with_suffix(".model"))


def test_load_json_of_another_model(bpe_dir, tmp_path):
    shutil.copytree(bpe_dir, tmp_path / "t")
    meta_path = tmp_path / "t" / "tokenizer.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "model_sha256": "0" * 64}))
    with pytest.raises(DataError, match="describes a different model"):
        Tokenizer.load(tmp_path / "t")
    meta_path.write_text(json.dumps({**meta, "mask_piece": "<MASK>"}))
    with pytest.raises(DataError, match="names mask piece '<MASK>', which is not in the model"):
        Tokenizer.load(tmp_path / "t")


def test_encode_invalid_unicode(tok):
    with pytest.raises(DataError, match="not valid Unicode"):
        tok.encode("ok \ud800")
    with pytest.raises(DataError, match="not valid Unicode"):
        tok.encode_batch(["fine", "bad \udcff"])


def test_ids_out_of_range(tok):
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.decode_batch([[5], [-1]])
    with pytest.raises(IndexError, match="outside the vocabulary"):
        tok.id_to_piece(tok.vocab_size)
    with pytest.raises(KeyError, match="not in the vocabulary"):
        tok.piece_to_id("no such piece")
