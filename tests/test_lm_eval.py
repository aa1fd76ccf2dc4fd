"""`plm-jax lm-eval`: local harness tasks give the numbers of the harness's own `hf` model.

Tiny random GPT-2 (no bos) and LLaMA (bos from the tokenizer's post-processor) checkpoints,
converted with `plm-jax convert --from hf`, are evaluated on three local YAML tasks with local
JSONL data: multiple choice (loglikelihood), perplexity (loglikelihood_rolling over several
windows of the 64-token context) and a greedy generation task (generate_until). Everything runs
offline.
"""

import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read by datasets at import: no hub calls
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from plm_jax.cli import main  # noqa: E402 - the offline switches above come first

pytest.importorskip("lm_eval", reason="needs lm-eval (the eval extra)")
EOT = "<|endoftext|>"
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]

MC = [
    {"question": "What does abs return?", "choices": ["the absolute value", "a list", "None"]},
    {"question": "Which keyword defines a function?", "choices": ["def", "class", "lambda x"]},
    {"question": "Return the", "choices": ["sum of the values", "value of x", "list"]},
    {"question": "A module is", "choices": ["a file of Python code", "a number", "red"]},
]


def _tokenizer(corpus: Path, kind: str):
    """A byte-level BPE tokenizer: GPT-2's framing (none) or LLaMA's (`<s> A`)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = [EOT] if kind == "gpt2" else ["<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([str(corpus)], trainer)
    if kind == "gpt2":
        return tok, transformers.PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok, transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="</s>"
    )


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def converted(request, tmp_path_factory, small_corpus):
    """(Hugging Face directory, converted run directory) of a tiny random model."""
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    kind = request.param
    path = tmp_path_factory.mktemp(f"hf_{kind}") / "hf"
    tok, fast = _tokenizer(small_corpus, kind)
    fast.save_pretrained(path)
    vocab = tok.get_vocab_size()
    if kind == "gpt2":
        eot = tok.token_to_id(EOT)
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
            bos_token_id=eot, eos_token_id=eot,
        )  # fmt: skip
        cls = transformers.GPT2LMHeadModel
    else:
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            bos_token_id=tok.token_to_id("<s>"), eos_token_id=tok.token_to_id("</s>"),
            tie_word_embeddings=False,
        )  # fmt: skip
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(path, safe_serialization=True)
    run = path.parent / "run"
    assert main(["convert", "--from", "hf", "--input", str(path), "--output", str(run)]) == 0
    return path, run


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, small_corpus):
    """Local YAML tasks with local JSONL data: multiple choice, perplexity, generation."""
    d = tmp_path_factory.mktemp("tasks")
    docs = small_corpus.read_text().split("\n\n")
    mc = [dict(r, label=i % len(r["choices"])) for i, r in enumerate(MC)]
    long_doc = " ".join(docs[:12])[:1200]  # several 64-token windows
    rows = {
        "mc": mc,
        "ppl": [{"text": docs[3]}, {"text": long_doc}, {"text": docs[8]}],
        "gen": [{"prompt": "Return the", "answer": "x"}, {"prompt": "def f(", "answer": "a"}],
    }
    for name, records in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + head.format(d / "mc.jsonl") + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (d / "tiny_ppl.yaml").write_text(
        "task: tiny_ppl\n" + head.format(d / "ppl.jsonl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\n" + head.format(d / "gen.jsonl") + "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 12\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n"
    )
    return d


def _hf_results(hf_dir: Path, task_dir: Path) -> dict:
    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    return evaluator.simple_evaluate(
        model="hf",
        model_args=f"pretrained={hf_dir},dtype=float32",
        tasks=TASKS,
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        bootstrap_iters=0,
        log_samples=True,
        device="cpu",
        batch_size=4,
    )


@pytest.mark.hf
@pytest.mark.e2e  # about 30 s per model on 2 cores: the harness, torch and jax all compile/load
def test_local_tasks_match_the_harness_hf_model(converted, task_dir, tmp_path, capsys):
    import plm_jax
    from plm_jax.evals.scoring import starts_with_bos

    hf_dir, run = converted
    is_llama = hf_dir.parent.name.startswith("hf_llama")
    assert starts_with_bos(plm_jax.load(run).tokenizer) == is_llama  # LLaMA frames `<s> A`
    out = tmp_path / "results.json"
    argv = ["lm-eval", str(run), "--tasks", ",".join(TASKS), "--include-path", str(task_dir)]
    argv += ["--output", str(out), "--log-samples", "--bootstrap-iters", "0", "--batch-size", "4"]
    assert main(argv) == 0
    assert "tiny_mc" in capsys.readouterr().out  # the harness's results table
    ours = json.loads(out.read_text())
    ref = _hf_results(hf_dir, task_dir)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["tiny_mc"][metric] == ref["results"]["tiny_mc"][metric]
    assert (
        ours["results"]["tiny_gen"]["exact_match,none"]
        == (ref["results"]["tiny_gen"]["exact_match,none"])
    )
    for task in ("tiny_mc", "tiny_ppl"):
        mine = [s["resps"] for s in ours["samples"][task]]
        theirs = [s["resps"] for s in ref["samples"][task]]
        assert len(mine) == len(theirs) > 0
        for a, b in zip(mine, theirs, strict=True):
            for (x,), (y,) in zip(a, b, strict=True):
                x, y = (x, y) if task == "tiny_ppl" else (x[0], y[0])  # (logprob, is_greedy)
                assert x == pytest.approx(y, abs=1e-4)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["tiny_ppl"][metric] == pytest.approx(
            ref["results"]["tiny_ppl"][metric], rel=1e-5
        )
    gen = [s["resps"] for s in ours["samples"]["tiny_gen"]]
    assert gen == [s["resps"] for s in ref["samples"]["tiny_gen"]]  # greedy text, same cut


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_inputs_exit_2_with_one_line(tiny_run, task_dir, tmp_path, capsys):
    run = tiny_run  # a plm_jax run with its SentencePiece tokenizer
    capsys.readouterr()
    base = ["lm-eval", str(run), "--include-path", str(task_dir)]
    assert main([*base, "--tasks", "tiny_mcc"]) == 2
    line = _error(capsys)
    assert "unknown lm-eval task(s) ['tiny_mcc']" in line and "did you mean 'tiny_mc'" in line
    assert main(["lm-eval", str(tmp_path / "nope"), "--tasks", "tiny_mc"]) == 2
    assert "nope" in _error(capsys)
    assert main(["lm-eval", str(run), "--tasks", "tiny_mc", "--include-path", "/no/dir"]) == 2
    assert "is not a directory" in _error(capsys)
    assert main([*base, "--tasks", "tiny_mc", "--limit", "0"]) == 2
    assert "--limit=0.0 must be positive" in _error(capsys)


def test_lm_eval_not_installed_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.delitem(sys.modules, "plm_jax.evals.harness", raising=False)
    assert main(["lm-eval", str(tmp_path), "--tasks", "piqa"]) == 2
    assert "lm-eval is not installed; `pip install 'plm-jax[eval]'`" in _error(capsys)


def test_multiple_choice_scores_equal_plm_jax_text_scores(tiny_run, task_dir, tmp_path):
    """On a plm_jax run (SentencePiece, bos first), each choice's log-likelihood is the sum of
    the continuation's token log-probs that `plm_jax.score` gives the whole text."""
    import plm_jax
    from plm_jax.evals.harness import run_lm_eval

    results = run_lm_eval(
        tiny_run, ["tiny_mc"], include_path=task_dir, log_samples=True, bootstrap_iters=0
    )
    lm = plm_jax.load(tiny_run)
    checked = 0
    for sample in results["samples"]["tiny_mc"]:
        for (context, continuation), ((ll, _),) in zip(
            sample["arguments"], sample["resps"], strict=True
        ):
            ids = lm.tokenizer.encode(context)
            (whole,) = lm.score(context + continuation)
            if whole.windows > 1 or whole.token_ids[: len(ids)] != ids:
                continue  # past max_seq_len=32 (sliding vs cut), or a merge across the split
            assert ll == pytest.approx(sum(whole.token_logprobs[len(ids) :]), abs=1e-4)
            checked += 1
    assert checked >= 8
    acc = results["results"]["tiny_mc"]["acc,none"]
    assert acc in {i / len(MC) for i in range(len(MC) + 1)}
