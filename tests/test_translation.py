"""Translation fine-tuning end to end: an encoder-decoder learns a word-substitution "language",
`plm-jax eval` reproduces its BLEU with sacrebleu's signature, `predict` writes translations,
resume is exact, a decoder learns the same task as prompt -> completion, label smoothing, and
bad input."""

import json
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sacrebleu.metrics import BLEU, CHRF

from plm_jax.cli import main
from plm_jax.config import load_config
from plm_jax.errors import ConfigError, DataError
from plm_jax.tasks import finetune as ft_mod
from plm_jax.tasks.translation import translation_scores
from plm_jax.train.step import next_token_loss
from tests.numerics import assert_close

# A "language" whose words are other English words, in the same order: learnable in a few
# hundred steps by a tiny model, and copying the source scores BLEU 0 against it.
LEXICON = {
    "the": "module",
    "file": "value",
    "returns": "string",
    "list": "object",
    "name": "function",
    "new": "default",
    "data": "class",
    "time": "error",
}


def pairs(n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(list(LEXICON), k=rng.randint(2, 5))
        rows.append({"source": " ".join(words), "target": " ".join(LEXICON[w] for w in words)})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lexicon_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("lexicon")
    return write_jsonl(d / "train.jsonl", pairs(256, 0)), write_jsonl(
        d / "eval.jsonl", pairs(24, 1)
    )


T5_TINY = ("model.preset=t5-tiny", "model.family=encoder_decoder", "model.max_seq_len=32")


def tr_config(tmp_path, tokenizer, data, *extra, name="tr", model=T5_TINY):
    train, held_out = data
    return load_config(
        None,
        [
            f"tokenizer.path={tokenizer.path}",
            f"run.dir={tmp_path / name}",
            *model,
            "task.name=translation",
            f"task.train_file={train}",
            f"task.eval_file={held_out}",
            "task.beam_size=2",
            "train.batch_size=16",
            "train.warmup_steps=10",
            "train.lr=3e-3",
            "train.log_every=10",
            "train.eval_every=1000",
            "checkpoint.save_every=1000",
            *extra,
        ],
    )


@pytest.mark.e2e  # minutes of training: CI's second step
def test_encoder_decoder_learns_translation_and_eval_predict_reproduce_it(
    tmp_path, small_tokenizer, lexicon_data, capsys
):
    cfg = tr_config(tmp_path, small_tokenizer, lexicon_data, "train.steps=160")
    result = ft_mod.finetune(cfg, show_progress=False)
    held_out = [json.loads(x) for x in lexicon_data[1].read_text().splitlines()]
    copy = BLEU().corpus_score([r["source"] for r in held_out], [[r["target"] for r in held_out]])
    assert copy.score < 1.0
    # The lexicon is learnt (copying scores 0); word order in the longer sentences takes more
    # steps than a unit test spends (160 steps: BLEU 29-39, chrF 55-73 measured).
    assert result["eval/bleu"] > 15.0, result
    assert result["eval/chrf"] > 45.0 and result["eval/loss"] < 1.0
    assert result["compiled_shapes"] <= 2
    run = tmp_path / "tr"
    assert json.loads((run / "best.json").read_text())["metric"] == "bleu"

    assert main(["eval", str(run), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["eval/bleu"] == pytest.approx(result["best"], abs=1e-6)
    assert evaluated["examples"] == len(held_out)
    assert evaluated["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "nc:6" in evaluated["chrf_signature"]

    inputs = write_jsonl(tmp_path / "in.jsonl", [{"source": "the file"}, {"source": "new data"}])
    out = tmp_path / "pred.jsonl"
    assert main(["predict", str(run), "--input", str(inputs), "--output", str(out)]) == 0
    preds = [json.loads(x) for x in out.read_text().splitlines()]
    assert [p["source"] for p in preds] == ["the file", "new data"]
    assert [p["translation"] for p in preds] == ["module value", "default class"]
    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "BLEU signature: nrefs:1" in printed and "CHRF signature: nrefs:1" in printed


@pytest.mark.faults  # three runs that each compile a beam search: CI's second step
def test_translation_resume_mid_epoch_is_exact(tmp_path, small_tokenizer, lexicon_data):
    args = ["train.steps=12", "checkpoint.save_every=4", "train.log_every=1"]
    ft_mod.finetune(
        tr_config(tmp_path, small_tokenizer, lexicon_data, *args, name="whole"),
        show_progress=False,
    )
    split = tr_config(tmp_path, small_tokenizer, lexicon_data, *args, name="split")
    ft_mod.finetune(split, show_progress=False, until=10)
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "10")  # killed after step 8's save
    ft_mod.finetune(split, show_progress=False)

    def losses(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}

    whole = losses(tmp_path / "whole")
    assert sorted(whole) == list(range(1, 13)) and losses(tmp_path / "split") == whole


@pytest.mark.e2e  # minutes of training: CI's second step
def test_decoder_learns_the_same_task_as_prompt_completion(
    tmp_path, tiny_run, small_tokenizer, lexicon_data
):
    cfg = tr_config(
        tmp_path,
        small_tokenizer,
        lexicon_data,
        f"init_from={tiny_run}",  # a 1-layer, 32-wide decoder with max_seq_len 32
        "train.steps=60",
        "task.label_smoothing=0.1",
        model=(),  # the decoder's own settings: an encoder_decoder would be refused
    )
    result = ft_mod.finetune(cfg, show_progress=False)
    rows = [json.loads(x) for x in (tmp_path / "tr" / "metrics.jsonl").read_text().splitlines()]
    first = next(r["train/loss"] for r in rows if "train/loss" in r)
    # The loss reads the completion only: from about log(512) down to the lexicon's few words.
    assert first > 5.0 and result["eval/loss"] < 0.6 * first, (first, result)
    assert 0.0 <= result["eval/bleu"] <= 100.0 and result["eval/examples"] == 24


def test_label_smoothing_matches_the_smoothed_target_distribution():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, (2, 5)), jnp.int32)
    weights = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32)
    for eps in (0.0, 0.1, 0.3):
        smoothed = optax.smooth_labels(jax.nn.one_hot(targets, 11), eps)
        ref = jnp.sum(optax.softmax_cross_entropy(logits, smoothed) * weights)
        got = next_token_loss(logits, targets, weights, eps)
        assert_close(got, ref, ulps=16)  # two programs summing 10 weighted terms


def test_translation_scores_are_sacrebleu_corpus_scores():
    hyps = ["the cat sat on a mat", "hello there world", "Guten Tag"]
    refs = ["the cat sat on the mat", "hello world", "Guten Tag"]
    got = translation_scores(hyps, refs)
    assert got["bleu"] == pytest.approx(BLEU().corpus_score(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
    assert 0 < got["bleu"] < 100 and "tok:13a" in got["bleu_signature"]
    with pytest.raises(DataError, match="2 translations for 3 references"):
        translation_scores(hyps[:2], refs)
    with pytest.raises(DataError, match="no sentences"):
        translation_scores([], [])


def test_bad_translation_input_is_one_line_and_exit_2(
    tmp_path, small_tokenizer, lexicon_data, capsys
):
    src, tgt = tmp_path / "src.txt", tmp_path / "tgt.txt"
    src.write_text("a b\nc d\ne f\n")
    tgt.write_text("x y\nz w\n")
    base = [
        "finetune",
        f"tokenizer.path={small_tokenizer.path}",
        "model.preset=t5-tiny",
        "model.family=encoder_decoder",
        "task.name=translation",
        f"run.dir={tmp_path / 'bad'}",
    ]
    cases = [
        ([f"task.source_file={src}", f"task.target_file={tgt}"], "line"),
        ([], "task.train_file"),
        (
            [f"task.train_file={lexicon_data[0]}", "task.overlong=error", "model.max_seq_len=4"],
            "overlong",
        ),
    ]
    for extra, needle in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    with pytest.raises(ConfigError, match="task.train_file"):
        ft_mod.task_kind(load_config(None, ["task.name=translation"]))


@pytest.mark.e2e  # minutes of training: CI's second step
def test_span_corruption_pretraining_then_translation_from_its_weights(
    tmp_path, small_corpus, lexicon_data, capsys
):
    pre = tmp_path / "pre"
    args = [
        "pretrain",
        f"data.source={small_corpus}",
        f"data.cache_dir={tmp_path / 'cache'}",
        f"run.dir={pre}",
        "tokenizer.vocab_size=600",  # 100 of them the <extra_id_N> sentinels
        "model.preset=t5-tiny",
        "model.family=encoder_decoder",
        "model.max_seq_len=64",
        "train.batch_size=8",
        "train.steps=6",
        "train.warmup_steps=1",
        "train.eval_every=3",
        "train.eval_batches=2",
        "checkpoint.save_every=3",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "span-filling sample (greedy): Return the <extra_id_0> of the argument." in out
    rows = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]  # steps 0, 3 and 6
    mfu_rows = [r for r in rows if "perf/mfu" in r]
    assert mfu_rows and all(0 < r["perf/mfu"] <= 1 for r in mfu_rows)

    train, held_out = lexicon_data
    ft_args = [
        "finetune",
        f"init_from={pre}",
        f"run.dir={tmp_path / 'ft'}",
        "task.name=translation",
        f"task.train_file={train}",
        f"task.eval_file={held_out}",
        "task.beam_size=1",
        "train.batch_size=16",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.eval_every=4",
    ]
    assert main(ft_args) == 0
    cfg = load_config(tmp_path / "ft" / "config.yaml", [])
    assert cfg.model.family == "encoder_decoder" and cfg.model.max_seq_len == 64
    assert "<extra_id_0>" in (pre / "tokenizer" / "tokenizer.vocab").read_text()

    # Exported to Hugging Face, the pretrained model decodes as plm_jax does.
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    out_dir = tmp_path / "hf"
    assert main(["convert", "--to", "hf", "--input", str(pre), "--output", str(out_dir)]) == 0
    import plm_jax

    lm = plm_jax.load(pre)
    text = "Return the <extra_id_0> of the argument."
    (ours,) = lm.transform(text, beam_size=1, max_len=8)
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out_dir).eval()
    ids = torch.tensor([lm.tokenizer.encode(text) + [lm.tokenizer.eos_id]])
    config = json.loads((out_dir / "config.json").read_text())
    assert config["decoder_start_token_id"] == config["pad_token_id"] == lm.tokenizer.pad_id
    assert config["eos_token_id"] == lm.tokenizer.eos_id
    with torch.no_grad():
        gen = hf.generate(ids, max_new_tokens=8, num_beams=1, do_sample=False)[0].tolist()
    gen = [t for t in gen[1:] if t != lm.tokenizer.pad_id]
    if gen and gen[-1] == lm.tokenizer.eos_id:
        gen = gen[:-1]
    assert lm.tokenizer.decode(gen) == ours


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["model.preset=t5-tiny", "task.name=classification"], "task.name=translation"),
        (["model.family=encoder", "task.name=translation"], "not an encoder"),
        (
            ["model.preset=t5-tiny", "task.name=translation", "task.layer_lr_decay=0.9"],
            "task.layer_lr_decay=1",
        ),
    ],
)
def test_task_and_model_family_mismatches_are_config_errors(overrides, needle):
    from plm_jax.config import validate_for_devices

    cfg = load_config(None, ["task.train_file=x.jsonl", *overrides])
    with pytest.raises(ConfigError, match=needle):
        validate_for_devices(cfg, 1)
