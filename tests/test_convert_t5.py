"""Tests for plm_jax.convert's T5 family: Hugging Face T5 checkpoints <-> plm_jax `EncoderDecoder`.

Two groups:
  * no torch (the default suite): hand-computed tensor layouts (the query's sqrt(H) factor),
    the config mapping (v1.0, v1.1, transformers 5's `scale_decoder_outputs`), exact round
    trips, older checkpoints' extra tensors, and every ConfigError/DataError, on checkpoints
    built with numpy;
  * `hf` (needs torch + transformers, skipped otherwise): T5's relative position buckets equal
    transformers' for many settings; tiny random `T5ForConditionalGeneration` v1.0 (ReLU, tied)
    and v1.1 (gated GELU, untied) give the same logits and encoder output through plm_jax
    (1e-4, with encoder padding); the export reloads in transformers with identical logits and
    re-imports bit for bit.

Sizes: 1 encoder and 2 decoder layers, D=32, 4 heads of H=16 (N*H != D, and sqrt(H) = 4 keeps
the query's rescaling exact), F=37, V=99, 8 buckets up to distance 20.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from plm_jax.config import ModelConfig
from plm_jax.convert import (
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

V, D, N, H, F, LAYERS, DECODER_LAYERS = 99, 32, 4, 16, 37, 1, 2
T5_HF = {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "vocab_size": V,
    "d_model": D,
    "d_kv": H,
    "d_ff": F,
    "num_layers": LAYERS,
    "num_decoder_layers": DECODER_LAYERS,
    "num_heads": N,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 20,
    "feed_forward_proj": "relu",
}
V11_HF = {**T5_HF, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
# transformers 5 saves a v1.1 config as tied (it always is, in its config) but unscaled.
V11_HF5 = {**V11_HF, "tie_word_embeddings": True, "scale_decoder_outputs": False}
ATTN = "encoder.block.0.layer.0.SelfAttention."


@functools.cache
def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random numpy values for every parameter of `build_model(cfg)` (no jax compute); cached,
    so callers must not change the arrays."""
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


def imported(hf_config: dict, tensors: dict) -> dict:
    return params_from_hf(model_config_from_hf(hf_config, tensors), hf_config, tensors)


# ---------------------------------------------------------------------------------------------
# Hand-computed layouts and config mapping (no torch).


def test_t5_layout_literal():
    """torch Linear is [out, in]; T5 does not scale logits by 1/sqrt(H), so w_q carries
    sqrt(H) = 4: w_q[d, n, h] = 4 * q[n*H + h, d]; w_o[n, h, d] = o[d, n*H + h]."""
    tensors = hf_tensors(V11_HF)
    q = np.arange(N * H * D, dtype=np.float32).reshape(N * H, D)
    o = np.arange(D * N * H, dtype=np.float32).reshape(D, N * H)
    cross_k = np.arange(N * H * D, dtype=np.float32).reshape(N * H, D) - 7
    tensors[f"{ATTN}q.weight"] = q
    tensors[f"{ATTN}o.weight"] = o
    tensors["decoder.block.1.layer.1.EncDecAttention.k.weight"] = cross_k
    params = params_from_hf(model_config_from_hf(V11_HF), V11_HF, tensors)
    attn = params["encoder_blocks"][0]["attn"]
    assert attn["w_q"][3, 2, 5] == 4 * q[2 * H + 5, 3]
    assert attn["w_o"][2, 5, 9] == o[9, 2 * H + 5]
    assert params["decoder_blocks"][1]["cross_attn"]["w_k"][6, 1, 3] == cross_k[H + 3, 6]
    gate = tensors["decoder.block.0.layer.2.DenseReluDense.wi_0.weight"]  # [F, D]
    assert params["decoder_blocks"][0]["mlp"]["w_gate"][4, 17] == gate[17, 4]
    down = tensors["encoder.block.0.layer.1.DenseReluDense.wo.weight"]  # [D, F]
    assert params["encoder_blocks"][0]["mlp"]["w_down"][30, 2] == down[2, 30]
    head = tensors["lm_head.weight"]  # [V, D]
    assert params["head"][5, 60] == head[60, 5]
    bias = "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    np.testing.assert_array_equal(params["decoder_rel_bias"]["embedding"], tensors[bias])
    np.testing.assert_array_equal(
        params["decoder_blocks"][1]["cross_norm"]["scale"],
        tensors["decoder.block.1.layer.1.layer_norm.weight"],
    )
    np.testing.assert_array_equal(params["embed"]["embedding"], tensors["shared.weight"])


def test_config_mapping():
    cfg = model_config_from_hf(T5_HF)
    expected = dict(
        family="encoder_decoder",
        vocab_size=V,
        num_layers=LAYERS,
        num_decoder_layers=DECODER_LAYERS,
        embed_dim=D,
        num_heads=N,
        num_kv_heads=N,
        head_dim=H,
        mlp_dim=F,
        position="relative",
        relative_buckets=8,
        relative_max_distance=20,
        norm="rmsnorm",
        norm_eps=1e-6,
        mlp="relu",
        use_bias=False,
        tie_embeddings=True,
        dropout=0.0,
    )
    assert {k: getattr(cfg, k) for k in expected} == expected
    for v11 in (V11_HF, V11_HF5):
        cfg = model_config_from_hf(v11)
        assert (cfg.mlp, cfg.tie_embeddings) == ("geglu", False)
    # transformers 5 also stores the derived activation fields; older names of the tanh GELU.
    stored = {**V11_HF, "dense_act_fn": "gelu_new", "is_gated_act": True}
    assert model_config_from_hf(stored).mlp == "geglu"
    assert model_config_from_hf({**V11_HF, "feed_forward_proj": "gated-gelu_new"}).mlp == "geglu"
    defaults = model_config_from_hf({"model_type": "t5"})  # T5Config's defaults: t5-small
    assert (defaults.num_decoder_layers, defaults.embed_dim, defaults.vocab_size) == (6, 512, 32128)
    symmetric = {k: v for k, v in T5_HF.items() if k != "num_decoder_layers"}
    assert model_config_from_hf(symmetric).num_decoder_layers == LAYERS


@pytest.mark.parametrize("hf_config", [T5_HF, V11_HF], ids=["v1.0", "v1.1"])
def test_tensors_round_trip_exactly(hf_config):
    tensors = hf_tensors(hf_config, seed=1)
    cfg = model_config_from_hf(hf_config, tensors)
    for scan in (False, True):
        scanned = dataclasses.replace(cfg, use_scan_layers=scan)
        params = params_from_hf(scanned, hf_config, tensors)
        if scan:
            assert params["decoder_blocks"]["attn"]["w_q"].shape == (DECODER_LAYERS, D, N, H)
        back_config, back = params_to_hf(scanned, params)
        assert back.keys() == tensors.keys()
        for name, x in tensors.items():
            np.testing.assert_array_equal(back[name], x, err_msg=name)
    assert ("lm_head.weight" in tensors) is (hf_config is V11_HF)
    assert not any("embed_tokens" in n for n in tensors)  # transformers re-ties them
    assert back_config["tie_word_embeddings"] is back_config["scale_decoder_outputs"]
    assert back_config["feed_forward_proj"] == hf_config["feed_forward_proj"]
    assert model_config_from_hf(back_config) == cfg


def test_older_checkpoints_extra_tensors_are_read():
    """Per-stack embedding copies, a stored tied head (all equal to shared.weight) and the
    decoder's unused cross-attention relative-bias table import as without them."""
    tensors = hf_tensors(T5_HF)
    expected = flat(imported(T5_HF, tensors))
    shared = tensors["shared.weight"]
    unused = "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
    variants = [
        {**tensors, "encoder.embed_tokens.weight": shared.copy()},
        {**tensors, "decoder.embed_tokens.weight": shared.copy(), "lm_head.weight": shared.copy()},
        {**tensors, unused: np.ones((8, N), np.float32)},
    ]
    for variant in variants:
        got = flat(imported(T5_HF, variant))
        assert got.keys() == expected.keys()
        for path, value in expected.items():
            np.testing.assert_array_equal(got[path], value)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu' is not supported"),
        ({"feed_forward_proj": "gelu"}, "feed_forward_proj='gelu' is not supported"),
        ({"dense_act_fn": "gelu"}, "feed_forward_proj='relu', dense_act_fn='gelu' is not"),
        ({"is_gated_act": True}, "feed_forward_proj='relu', is_gated_act=True is not"),
        ({"is_encoder_decoder": False}, "is_encoder_decoder=False is not supported"),
        ({"tie_encoder_decoder": True}, "tie_encoder_decoder=True is not supported"),
        ({"relative_attention_num_buckets": 2}, "relative_attention_num_buckets=2"),
        ({"relative_attention_max_distance": 3}, "relative_attention_max_distance=3"),
        (
            {"tie_word_embeddings": False, "scale_decoder_outputs": True},
            "scale_decoder_outputs=True with tie_word_embeddings=False",
        ),
        ({"layer_norm_epsilon": "1e-6"}, "layer_norm_epsilon='1e-6' must be a float"),
        ({"architectures": ["T5ForSequenceClassification"]}, "T5ForSequenceClassification"),
    ],
)
def test_unsupported_options_raise_config_error(changes, match):
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf({**T5_HF, **changes})


def test_tied_head_without_scaling_raises():
    """A transformers 5 v1.1 model created from scratch ties its head to the embedding but does
    not scale: plm_jax has no such model."""
    tensors = {k: v for k, v in hf_tensors(V11_HF5).items() if k != "lm_head.weight"}
    with pytest.raises(ConfigError, match="no lm_head.weight, so its head is the input embed"):
        model_config_from_hf(V11_HF5, tensors)
    assert not model_config_from_hf(V11_HF5, hf_tensors(V11_HF5)).tie_embeddings


def test_tensor_problems_raise_data_error():
    tensors = hf_tensors(T5_HF)
    cfg = model_config_from_hf(T5_HF)
    name = "decoder.block.1.layer.1.EncDecAttention.v.weight"
    with pytest.raises(
        DataError, match=f"T5ForConditionalGeneration checkpoint lacks tensors '{name}'"
    ):
        params_from_hf(cfg, T5_HF, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(DataError, match=rf"'{name}' has shape \(64, 16\).*implies \(64, 32\)"):
        params_from_hf(cfg, T5_HF, {**tensors, name: np.zeros((N * H, 16), np.float32)})
    extra = "decoder.block.2.layer.0.layer_norm.weight"  # a layer the config does not have
    with pytest.raises(DataError, match=f"'{extra}' are not part of a T5ForConditionalGeneration"):
        params_from_hf(cfg, T5_HF, {**tensors, extra: np.ones((D,), np.float32)})
    with pytest.raises(DataError, match="'lm_head.weight' differs from 'shared.weight'"):
        params_from_hf(cfg, T5_HF, {**tensors, "lm_head.weight": np.zeros((V, D), np.float32)})
    copy = "encoder.embed_tokens.weight"
    with pytest.raises(DataError, match=f"'{copy}' differs from 'shared.weight'"):
        params_from_hf(cfg, T5_HF, {**tensors, copy: np.zeros((V, D), np.float32)})
    untied = model_config_from_hf(V11_HF)
    with pytest.raises(DataError, match="lacks tensors 'lm_head.weight'"):
        no_head = {k: v for k, v in hf_tensors(V11_HF).items() if k != "lm_head.weight"}
        params_from_hf(untied, V11_HF, no_head)


def test_export_errors():
    rope = dataclasses.replace(model_config_from_hf(T5_HF), position="rope", mlp="swiglu")
    with pytest.raises(ConfigError, match=r"t5: model.position='rope'.*model.mlp='swiglu'"):
        params_to_hf(rope, random_params(rope))
    gqa = dataclasses.replace(model_config_from_hf(T5_HF), num_kv_heads=2, use_bias=True)
    with pytest.raises(ConfigError, match=r"model.use_bias=True .*model.num_kv_heads=2"):
        params_to_hf(gqa, random_params(gqa))


def test_save_and_load_round_trip(tmp_path):
    """`load_hf_model` / `save_hf_model` through files, bit for bit."""
    tensors = hf_tensors(V11_HF, seed=3)
    write_hf_checkpoint(tmp_path / "in", V11_HF, tensors)
    model = load_hf_model(tmp_path / "in", use_scan_layers=True)
    assert model.cfg.family == "encoder_decoder" and model.head is not None
    save_hf_model(model, tmp_path / "out")
    hf_config, back = read_hf_checkpoint(tmp_path / "out")
    assert back.keys() == tensors.keys()
    for name, x in tensors.items():
        np.testing.assert_array_equal(back[name], x, err_msg=name)
    assert hf_config["scale_decoder_outputs"] is False and hf_config["decoder_start_token_id"] == 0


# ---------------------------------------------------------------------------------------------
# Against transformers (PyTorch) on tiny random models.

SOURCE = np.array([[5, 17, 33, 8, 41, 1, 0, 0, 0], [9, 44, 12, 70, 23, 61, 88, 30, 1]])
SOURCE_MASK = (np.arange(9)[None] < np.array([[6], [9]])).astype(np.int64)
TARGET = np.array([[0, 12, 55, 3, 87, 20, 1], [0, 4, 4, 91, 16, 7, 62]])  # decoder inputs
KINDS = ("v1.0", "v1.1")


@pytest.fixture(scope="module")
def hf_t5s(tmp_path_factory):
    """{kind: (dir, torch model)}: tiny random T5s, every parameter randomised (norm scales near
    1), saved as transformers saves them. Weights have std 0.2: at 0.3 the gated model's float32
    rounding alone (torch's, against its own float64 run) reaches 1.6e-4."""
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    transformers = pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    out = {}
    for seed, kind in enumerate(KINDS):
        fields = {k: v for k, v in (T5_HF if kind == "v1.0" else V11_HF).items()}
        del fields["architectures"], fields["model_type"]
        config = transformers.T5Config(**fields, dropout_rate=0.0)
        torch.manual_seed(seed)
        model = transformers.T5ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer_norm" in name:
                    p.uniform_(0.5, 1.5)
                else:
                    p.normal_(0.0, 0.2)
            if kind == "v1.1":  # transformers 5 ties every new T5's head: untie it
                model.lm_head.weight = torch.nn.Parameter(torch.randn(V, D) * 0.2)
                model.config.tie_word_embeddings = False
        assert (model.lm_head.weight is model.shared.weight) is (kind == "v1.0")
        path = tmp_path_factory.mktemp(f"hf_t5_{kind}")
        model.save_pretrained(path, safe_serialization=True)
        out[kind] = (path, model)
    return out


def torch_outputs(model) -> dict[str, np.ndarray]:
    import torch

    with torch.no_grad():
        result = model(
            input_ids=torch.tensor(SOURCE),
            attention_mask=torch.tensor(SOURCE_MASK),
            decoder_input_ids=torch.tensor(TARGET),
        )
    return {"logits": result.logits.numpy(), "encoded": result.encoder_last_hidden_state.numpy()}


@functools.partial(jax.jit, static_argnums=0)
def _plm_outputs(graphdef, state, source, mask, target):
    model = nnx.merge(graphdef, state)
    encoded = model.encode(source, segment_ids=mask)
    logits = model.decode(target, encoded, encoder_segment_ids=mask).logits
    return {"logits": logits, "encoded": encoded}


def plm_outputs(model) -> dict[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    arrays = (jnp.asarray(a, jnp.int32) for a in (SOURCE, SOURCE_MASK, TARGET))
    out = _plm_outputs(graphdef, state, *arrays)
    return {k: np.asarray(v) for k, v in out.items()}


@pytest.mark.hf
def test_relative_buckets_match_transformers():
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    pytest.importorskip("transformers", reason="needs transformers (the hf extra)")
    from transformers.models.t5.modeling_t5 import T5Attention

    from plm_jax.models.encoder_decoder import relative_position_bucket

    relative = np.arange(-1100, 1100)
    settings = [
        (buckets, distance, bidirectional)
        for buckets, distance in ((32, 128), (8, 20), (5, 3), (16, 64), (64, 1000), (33, 129))
        for bidirectional in (True, False)
    ]
    ours = jax.jit(
        lambda r: [relative_position_bucket(r, b, d, bidirectional=bi) for b, d, bi in settings]
    )(jnp.asarray(relative))
    for (buckets, distance, bidirectional), got in zip(settings, ours, strict=True):
        ref = T5Attention._relative_position_bucket(
            torch.tensor(relative), bidirectional, buckets, distance
        ).numpy()
        np.testing.assert_array_equal(got, ref, err_msg=f"{buckets} {distance} {bidirectional}")


@pytest.mark.hf
@pytest.mark.parametrize("kind", KINDS)
def test_outputs_match_transformers(hf_t5s, kind):
    """Logits of the real decoder tokens and the encoder output at real source tokens (plm_jax's
    padding rows attend nothing; transformers still computes them)."""
    path, model = hf_t5s[kind]
    ours = load_hf_model(path, use_scan_layers=kind == "v1.1")
    assert ours.cfg.mlp == ("relu" if kind == "v1.0" else "geglu")
    assert ours.cfg.tie_embeddings is (kind == "v1.0")
    ref, got = torch_outputs(model), plm_outputs(ours)
    np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-4, rtol=0)
    real = SOURCE_MASK.astype(bool)
    np.testing.assert_allclose(got["encoded"][real], ref["encoded"][real], atol=1e-4, rtol=0)


@pytest.mark.hf
@pytest.mark.parametrize("kind", KINDS)
def test_export_reloads_in_transformers(hf_t5s, tmp_path, kind):
    import transformers

    path, model = hf_t5s[kind]
    ours = load_hf_model(path)
    save_hf_model(ours, tmp_path / "out")
    again, info = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensors
    assert again.config.scale_decoder_outputs is (kind == "v1.0")
    assert (again.lm_head.weight is again.shared.weight) is (kind == "v1.0")
    ref = torch_outputs(model)
    for key, value in torch_outputs(again.eval()).items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)
    first = flat(nnx.to_pure_dict(nnx.state(ours, nnx.Param)))
    second = flat(nnx.to_pure_dict(nnx.state(load_hf_model(tmp_path / "out"), nnx.Param)))
    assert first.keys() == second.keys()
    for path_, value in first.items():
        np.testing.assert_array_equal(np.asarray(second[path_]), np.asarray(value))
