"""Tests for plm_jax.convert: Hugging Face GPT-2 / LLaMA checkpoints <-> plm_jax Decoder.

Two groups:
  * no torch (the default suite): hand-computed tensor layouts, exact round trips, and every
    ConfigError/DataError, on HF-style directories built with numpy + safetensors + json;
  * `hf` (needs torch + transformers, skipped otherwise): tiny random HF models give the same
    hidden states (1e-5 per layer) and logits (1e-4) through plm_jax, and the export reloads
    in transformers with identical logits.

Sizes follow the brief: 2 layers, D=64, 4 heads (LLaMA: 2 kv heads), V=100, 32 positions,
LLaMA F=96. No forward pass is jitted: the models are tiny and each runs a few times.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from plm_jax.config import ModelConfig
from plm_jax.convert import (
    load_hf_decoder,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
    read_hf_checkpoint,
    save_hf_decoder,
    write_hf_checkpoint,
)
from plm_jax.errors import ConfigError, DataError
from plm_jax.models import attention_mask, rope_tables
from plm_jax.models.layers import RopeScaling, rope_frequencies, rope_scaling_from_config
from plm_jax.train.state import model_graphdef
from tests.numerics import assert_close, assert_not_close

V, D, N, K, H, L_LAYERS, P = 100, 64, 4, 2, 16, 2, 32
GPT2_HF = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": V,
    "n_positions": P,
    "n_embd": D,
    "n_layer": L_LAYERS,
    "n_head": N,
}
LLAMA_HF = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": V,
    "hidden_size": D,
    "intermediate_size": 96,
    "num_hidden_layers": L_LAYERS,
    "num_attention_heads": N,
    "num_key_value_heads": K,
    "max_position_embeddings": P,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "tie_word_embeddings": False,
}


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Random numpy values for every parameter of `Decoder(cfg)` (no jax compute)."""
    rng = np.random.default_rng(seed)
    _, abstract = model_graphdef(cfg)
    return jax.tree.map(
        lambda a: rng.standard_normal(a.shape).astype(a.dtype), nnx.to_pure_dict(abstract)
    )


def hf_tensors(hf_config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors with the checkpoint names and shapes `hf_config` implies."""
    cfg = model_config_from_hf(hf_config)
    return params_to_hf(cfg, random_params(cfg, seed))[1]


def write_dir(tmp_path: Path, hf_config: dict, tensors: dict | None = None) -> Path:
    """An HF-style checkpoint directory: config.json + model.safetensors."""
    tensors = hf_tensors(hf_config) if tensors is None else tensors
    write_hf_checkpoint(tmp_path / "ckpt", hf_config, tensors)
    return tmp_path / "ckpt"


# ---------------------------------------------------------------------------------------------
# Hand-computed layouts (no torch).


def test_gpt2_layout_literal():
    """c_attn [D, 3D] packs q | k | v, each column block head-major: col = n*H + h."""
    tensors = hf_tensors(GPT2_HF)
    c_attn = np.arange(D * 3 * D, dtype=np.float32).reshape(D, 3 * D)
    tensors["transformer.h.1.attn.c_attn.weight"] = c_attn
    bias = np.arange(3 * D, dtype=np.float32)
    tensors["transformer.h.1.attn.c_attn.bias"] = bias
    c_proj = np.arange(D * D, dtype=np.float32).reshape(D, D)
    tensors["transformer.h.1.attn.c_proj.weight"] = c_proj
    params = params_from_hf(model_config_from_hf(GPT2_HF), GPT2_HF, tensors)
    attn = params["blocks"][1]["attn"]
    assert attn["w_q"][3, 2, 5] == c_attn[3, 2 * H + 5]
    assert attn["w_k"][3, 2, 5] == c_attn[3, D + 2 * H + 5]
    assert attn["w_v"][7, 3, 15] == c_attn[7, 2 * D + 3 * H + 15]
    assert attn["b_v"][1, 4] == bias[2 * D + H + 4]
    assert attn["w_o"][2, 5, 9] == c_proj[2 * H + 5, 9]  # Conv1D is [in, out]: no transpose
    np.testing.assert_array_equal(
        params["blocks"][0]["mlp"]["w_in"], tensors["transformer.h.0.mlp.c_fc.weight"]
    )


def test_llama_layout_literal():
    """torch Linear is [out, in]: w_q[d, n, h] = q_proj[n*H + h, d]; w_o[n, h, d] = o[d, n*H+h]."""
    tensors = hf_tensors(LLAMA_HF)
    q = np.arange(N * H * D, dtype=np.float32).reshape(N * H, D)
    k = np.arange(K * H * D, dtype=np.float32).reshape(K * H, D)
    o = np.arange(D * N * H, dtype=np.float32).reshape(D, N * H)
    tensors["model.layers.0.self_attn.q_proj.weight"] = q
    tensors["model.layers.0.self_attn.k_proj.weight"] = k
    tensors["model.layers.0.self_attn.o_proj.weight"] = o
    params = params_from_hf(model_config_from_hf(LLAMA_HF), LLAMA_HF, tensors)
    attn, mlp = params["blocks"][0]["attn"], params["blocks"][0]["mlp"]
    assert attn["w_q"].shape == (D, N, H) and attn["w_k"].shape == (D, K, H)
    assert attn["w_q"][3, 2, 5] == q[2 * H + 5, 3]
    assert attn["w_k"][9, 1, 7] == k[H + 7, 9]
    assert attn["w_o"][2, 5, 9] == o[9, 2 * H + 5]
    gate = tensors["model.layers.0.mlp.gate_proj.weight"]
    assert mlp["w_gate"][4, 17] == gate[17, 4]
    assert params["head"][5, 42] == tensors["lm_head.weight"][42, 5]


# ---------------------------------------------------------------------------------------------
# Exact round trips (no torch).


@pytest.mark.parametrize("hf_config", [GPT2_HF, LLAMA_HF], ids=["gpt2", "llama"])
def test_tensors_round_trip_exactly(hf_config):
    tensors = hf_tensors(hf_config, seed=1)
    cfg = model_config_from_hf(hf_config)
    params = params_from_hf(cfg, hf_config, tensors)
    out_config, out = params_to_hf(cfg, params)
    assert set(out) == set(tensors)
    for name, x in tensors.items():
        assert out[name].dtype == x.dtype and np.array_equal(out[name], x), name
    assert model_config_from_hf(out_config) == cfg
    # Scanned layers hold the same arrays stacked on a leading axis, and export the same.
    scan_cfg = dataclasses.replace(cfg, use_scan_layers=True)
    stacked = params_from_hf(scan_cfg, hf_config, tensors)
    np.testing.assert_array_equal(
        stacked["blocks"]["attn"]["w_q"],
        np.stack([params["blocks"][i]["attn"]["w_q"] for i in range(L_LAYERS)]),
    )
    _, scan_out = params_to_hf(scan_cfg, stacked)
    assert all(np.array_equal(scan_out[name], x) for name, x in tensors.items())


@pytest.mark.parametrize("scan", [False, True])
def test_save_and_load_decoder_round_trip(tmp_path, scan):
    cfg = dataclasses.replace(model_config_from_hf(LLAMA_HF), use_scan_layers=scan)
    params = random_params(cfg, seed=2)
    graphdef, state = model_graphdef(cfg)
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, params))
    save_hf_decoder(nnx.merge(graphdef, state), tmp_path / "out")
    loaded = load_hf_decoder(tmp_path / "out", use_scan_layers=scan)
    assert loaded.cfg == dataclasses.replace(cfg, num_kv_heads=K, head_dim=H)
    got = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, got, params)


def test_bfloat16_checkpoint_loads_and_exports_in_its_dtype(tmp_path):
    """Most published LLaMA checkpoints are bfloat16: upcast exactly on load, kept on export."""
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in hf_tensors(LLAMA_HF).items()}
    root = write_dir(tmp_path, LLAMA_HF, bf16)
    model = load_hf_decoder(root)
    w_q = model.blocks[0].attn.w_q[...]
    assert w_q.dtype == jnp.float32
    q_proj = bf16["model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    np.testing.assert_array_equal(np.asarray(w_q), q_proj.T.reshape(D, N, H))
    model = load_hf_decoder(root, param_dtype="bfloat16", dtype="bfloat16")
    save_hf_decoder(model, tmp_path / "out")
    config, out = read_hf_checkpoint(tmp_path / "out")
    assert config["dtype"] == "bfloat16"
    assert all(out[k].dtype == jnp.bfloat16 and np.array_equal(out[k], bf16[k]) for k in bf16)


def test_read_sharded_checkpoint(tmp_path):
    tensors = hf_tensors(GPT2_HF)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002.safetensors": names[10:]}
    root = tmp_path / "sharded"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(GPT2_HF))
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, root / file)
    weight_map = {n: f for f, part in shards.items() for n in part}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config, got = read_hf_checkpoint(root)
    assert config == GPT2_HF and set(got) == set(tensors)
    assert all(np.array_equal(got[n], tensors[n]) for n in names)

    # A shard listed in the index but absent, and a tensor the index promises but no shard has.
    (root / "model-00002.safetensors").unlink()
    with pytest.raises(DataError, match="model-00002.safetensors.*not found"):
        read_hf_checkpoint(root)
    save_file({n: tensors[n] for n in names[10:-1]}, root / "model-00002.safetensors")
    with pytest.raises(DataError, match=f"lists tensors no shard holds: '{names[-1]}'"):
        read_hf_checkpoint(root)
    save_file({n: tensors[n] for n in names[9:]}, root / "model-00002.safetensors")
    with pytest.raises(DataError, match=f"'{names[9]}' appears in more than one shard"):
        read_hf_checkpoint(root)
    (root / "model.safetensors.index.json").write_text(json.dumps({"files": []}))
    with pytest.raises(DataError, match="no 'weight_map'"):
        read_hf_checkpoint(root)


def test_config_mapping():
    gpt2 = model_config_from_hf({**GPT2_HF, "layer_norm_epsilon": 1e-3, "n_inner": None})
    assert (gpt2.mlp_dim, gpt2.norm_eps, gpt2.head_dim, gpt2.tie_embeddings) == (
        4 * D,
        1e-3,
        H,
        True,
    )
    assert (gpt2.position, gpt2.norm, gpt2.mlp, gpt2.use_bias) == (
        "learned",
        "layernorm",
        "gelu",
        True,
    )
    llama = model_config_from_hf(LLAMA_HF)
    assert (llama.num_kv_heads, llama.head_dim, llama.mlp_dim, llama.norm_eps) == (K, H, 96, 1e-6)
    assert (llama.position, llama.norm, llama.mlp, llama.use_bias) == (
        "rope",
        "rmsnorm",
        "swiglu",
        False,
    )
    # transformers 4.x spelling: top-level rope_theta, rope_scaling null, head_dim null.
    v4 = {k: v for k, v in LLAMA_HF.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling=None, head_dim=None, num_key_value_heads=None)
    llama4 = model_config_from_hf(v4)
    assert (llama4.rope_theta, llama4.head_dim, llama4.num_kv_heads) == (500000.0, H, N)
    v5 = {**LLAMA_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}
    assert model_config_from_hf(v5).rope_theta == 123.0


# ---------------------------------------------------------------------------------------------
# Errors (no torch).


@pytest.mark.parametrize(
    "base, changes, match",
    [
        (GPT2_HF, {"model_type": "t5"}, "model_type='t5' is not supported"),
        (GPT2_HF, {"model_type": None}, "model_type=None is not supported"),
        (GPT2_HF, {"architectures": ["GPT2ForSequenceClassification"]}, "architectures="),
        (GPT2_HF, {"activation_function": "relu"}, "activation_function='relu'"),
        (GPT2_HF, {"activation_function": "gelu"}, "activation_function='gelu'"),
        (GPT2_HF, {"scale_attn_weights": False}, "scale_attn_weights=False"),
        (GPT2_HF, {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
        (GPT2_HF, {"add_cross_attention": True}, "add_cross_attention=True"),
        (GPT2_HF, {"n_head": 5}, "n_embd=64 is not divisible by n_head=5"),
        (GPT2_HF, {"n_embd": "64"}, "n_embd='64' must be a int"),
        (GPT2_HF, {"tie_word_embeddings": 1}, "tie_word_embeddings=1 must be a bool"),
        (LLAMA_HF, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
        (LLAMA_HF, {"attention_bias": True}, "attention_bias=True"),
        (LLAMA_HF, {"mlp_bias": True}, "mlp_bias=True"),
        (LLAMA_HF, {"num_key_value_heads": 3}, "not divisible by num_key_value_heads=3"),
        (LLAMA_HF, {"head_dim": 15}, "head_dim=15 must be even"),
        (
            LLAMA_HF,
            {"rope_scaling": {"rope_type": "llama3", "factor": 32.0}},
            "rope_scaling.rope_type='llama3' needs rope_scaling.low_freq_factor",
        ),
        (LLAMA_HF, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
        (
            LLAMA_HF,
            {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
            "rope_parameters.rope_type='yarn'",
        ),
        (
            LLAMA_HF,
            {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
            "partial_rotary_factor=0.5",
        ),
        (LLAMA_HF, {"rope_parameters": {"rope_theta": 1e4, "factor": 2.0}}, "factor=2.0"),
        (LLAMA_HF, {"rope_scaling": "linear"}, "rope_scaling='linear' must be a mapping"),
    ],
)
def test_unsupported_options_raise_config_error(base, changes, match):
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf({**base, **changes})


def test_missing_and_corrupt_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="is not a directory"):
        read_hf_checkpoint(tmp_path / "nope")
    root = write_dir(tmp_path, GPT2_HF)
    with pytest.raises(DataError, match="is not a directory; pass its directory"):
        read_hf_checkpoint(root / "model.safetensors")

    weights = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(DataError, match="not a readable safetensors file"):
        read_hf_checkpoint(root)
    (root / "model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(DataError, match="not a readable safetensors file"):
        read_hf_checkpoint(root)

    (root / "model.safetensors").unlink()
    with pytest.raises(DataError, match="has no model.safetensors or"):
        read_hf_checkpoint(root)
    (root / "pytorch_model.bin").write_bytes(b"not a pickle we would ever open")
    with pytest.raises(DataError, match=r"only PyTorch pickle weights \(pytorch_model.bin\).*"):
        read_hf_checkpoint(root)

    (root / "config.json").write_text("{not json")
    with pytest.raises(DataError, match="config.json' is not valid JSON"):
        read_hf_checkpoint(root)
    (root / "config.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="must hold a JSON object, got list"):
        read_hf_checkpoint(root)
    (root / "config.json").unlink()
    with pytest.raises(DataError, match="config.json' not found"):
        read_hf_checkpoint(root)


def test_tensor_problems_raise_data_error():
    cfg = model_config_from_hf(LLAMA_HF)
    tensors = hf_tensors(LLAMA_HF)
    bad = {**tensors, "model.layers.1.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
    with pytest.raises(
        DataError,
        match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(64, 64\).*\(32, 64\)",
    ):
        params_from_hf(cfg, LLAMA_HF, bad)
    missing = {k: v for k, v in tensors.items() if k != "lm_head.weight"}
    with pytest.raises(DataError, match="lacks tensors 'lm_head.weight'"):
        params_from_hf(cfg, LLAMA_HF, missing)
    extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    with pytest.raises(DataError, match="'model.layers.0.self_attn.q_proj.bias' are not part"):
        params_from_hf(cfg, LLAMA_HF, extra)

    # Tied: a stored head must equal the embedding; old causal-mask buffers are skipped.
    gpt2_cfg = model_config_from_hf(GPT2_HF)
    gpt2 = hf_tensors(GPT2_HF)
    buffers = {"transformer.h.0.attn.bias": np.tril(np.ones((1, 1, P, P), np.float32))}
    same_head = {**gpt2, **buffers, "lm_head.weight": gpt2["transformer.wte.weight"]}
    params_from_hf(gpt2_cfg, GPT2_HF, same_head)
    other_head = {**gpt2, "lm_head.weight": gpt2["transformer.wte.weight"] + 1}
    with pytest.raises(DataError, match="'lm_head.weight' differs from 'transformer.wte.weight'"):
        params_from_hf(gpt2_cfg, GPT2_HF, other_head)
    # Weights saved from the bare GPT2Model carry no "transformer." prefix.
    bare = {k.removeprefix("transformer."): v for k, v in gpt2.items()}
    params = params_from_hf(gpt2_cfg, GPT2_HF, bare)
    np.testing.assert_array_equal(params["embed"]["embedding"], gpt2["transformer.wte.weight"])
    # A model config that cannot hold the family's weights.
    with pytest.raises(ConfigError, match="cannot hold GPT2LMHeadModel weights"):
        params_from_hf(dataclasses.replace(gpt2_cfg, norm="rmsnorm"), GPT2_HF, gpt2)


def test_export_errors():
    # RoPE with LayerNorm is neither GPT-2 nor LLaMA.
    cfg = ModelConfig(vocab_size=V, num_layers=1, embed_dim=D, num_heads=N, position="rope")
    with pytest.raises(ConfigError, match=r"gpt2: model.position='rope'.*llama: model.norm"):
        params_to_hf(cfg, random_params(cfg))
    gpt2_cfg = model_config_from_hf(GPT2_HF)
    post = dataclasses.replace(gpt2_cfg, norm_placement="post")  # computes another function
    with pytest.raises(ConfigError, match=r"gpt2: model.norm_placement='post'"):
        params_to_hf(post, random_params(post))
    params = random_params(gpt2_cfg)
    del params["final_norm"]["bias"]
    with pytest.raises(DataError, match=r"missing \['final_norm/bias'\], unexpected none"):
        params_to_hf(gpt2_cfg, params)
    params = random_params(gpt2_cfg)
    params["blocks"][1]["attn"]["w_q"] = np.zeros((D, N, 8), np.float32)
    with pytest.raises(DataError, match=r"blocks/1/attn/w_q has shape \(64, 4, 8\).*\(64, 4, 16\)"):
        params_to_hf(gpt2_cfg, params)


# ---------------------------------------------------------------------------------------------
# Llama 3.1 RoPE scaling (rope_type "llama3"), no torch.
#
# With H=16 and theta=1e4 the wavelengths 2*pi*10^(i/2) are 6.3, 19.9, 62.8, ... positions.
# original_max_position_embeddings=32 with low/high factors 1/4 puts the limits at 32 and 8:
# pair 0 keeps its frequency (6.3 < 8), pair 1 is blended (8 <= 19.9 <= 32) and pairs 2..7 are
# slowed by `factor` (> 32), so all three branches run. Sequences of 48 > 32 positions.

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
LLAMA3_SCALING = RopeScaling(4.0, 1.0, 4.0, 32)
P3, L3 = 64, 48  # max_position_embeddings, test sequence length
LLAMA3_HF = {**LLAMA_HF, "max_position_embeddings": P3, "rope_parameters": LLAMA3_ROPE}


def test_llama3_frequencies_literal():
    base = 10000.0 ** (-np.arange(8) / 8)  # theta^(-2i/H)
    smooth = (32 / (2 * np.pi / base[1]) - 1.0) / (4.0 - 1.0)  # (L_orig / wavelength - low) / ...
    blended = (1 - smooth) * base[1] / 4 + smooth * base[1]
    expected = np.concatenate([base[:1], [blended], base[2:] / 4])
    # Wavelengths below 8, in [8, 32] and above 32: each branch is taken.
    assert list(np.digitize(2 * np.pi / base, [8, 32])) == [0, 1, 2, 2, 2, 2, 2, 2]
    got = rope_frequencies(H, 10000.0, LLAMA3_SCALING)
    assert got.dtype == np.float32 and 0.2 < smooth < 0.21
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(rope_frequencies(H, 10000.0), base, rtol=1e-6)
    positions = jnp.array([[0, 5, 47]])
    cos, sin = rope_tables(positions, H, 10000.0, scaling=LLAMA3_SCALING)
    angles = np.array([0, 5, 47])[:, None] * np.concatenate([expected, expected])
    np.testing.assert_allclose(np.asarray(cos)[0, :, 0], np.cos(angles), atol=1e-5)
    np.testing.assert_allclose(np.asarray(sin)[0, :, 0], np.sin(angles), atol=1e-5)


def test_llama3_config_spellings_and_export():
    cfg = model_config_from_hf(LLAMA3_HF)
    assert rope_scaling_from_config(cfg) == LLAMA3_SCALING
    assert (cfg.rope_scaling, cfg.rope_theta) == ("llama3", 10000.0)
    assert rope_scaling_from_config(model_config_from_hf(LLAMA_HF)) is None
    with pytest.raises(ValueError, match="model.rope_scaling='yarn'; supported: '', 'llama3'"):
        rope_scaling_from_config(dataclasses.replace(cfg, rope_scaling="yarn"))
    # The Hub's transformers 4.x spelling: rope_scaling without rope_theta, which is top level.
    v4_scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    v4 = {k: v for k, v in LLAMA3_HF.items() if k != "rope_parameters"}
    assert model_config_from_hf({**v4, "rope_theta": 1e4, "rope_scaling": v4_scaling}) == cfg
    old_type = {**v4_scaling, "type": "llama3"}
    del old_type["rope_type"]
    assert model_config_from_hf({**v4, "rope_scaling": old_type}) == cfg
    # Like transformers: a top-level original length wins, then the section's, then max length.
    top = model_config_from_hf({**LLAMA3_HF, "original_max_position_embeddings": 20})
    assert top.rope_original_max_len == 20
    no_len = {k: v for k, v in LLAMA3_ROPE.items() if k != "original_max_position_embeddings"}
    no_len_cfg = model_config_from_hf({**LLAMA3_HF, "rope_parameters": no_len})
    assert no_len_cfg.rope_original_max_len == P3
    # Export writes both spellings; each alone, and both together, read back the same config.
    out_config, _ = params_to_hf(cfg, random_params(cfg))
    assert out_config["rope_parameters"] == LLAMA3_ROPE
    assert out_config["rope_scaling"] == v4_scaling and out_config["rope_theta"] == 1e4
    assert model_config_from_hf(out_config) == cfg
    assert model_config_from_hf({**out_config, "rope_scaling": None}) == cfg
    assert model_config_from_hf({**out_config, "rope_parameters": None}) == cfg
    plain_config, _ = params_to_hf(model_config_from_hf(LLAMA_HF), random_params(cfg))
    assert plain_config["rope_scaling"] is None
    assert plain_config["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e4}


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
        ({"rope_parameters": {**LLAMA3_ROPE, "rope_type": "longrope"}}, "rope_type='longrope'"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type='yarn'"),
        ({"rope_parameters": {**LLAMA3_ROPE, "beta_fast": 32}}, "beta_fast=32 is not supported"),
        (
            {"rope_parameters": {**LLAMA3_ROPE, "high_freq_factor": 1.0}},
            "high_freq_factor=1.0.*needs .*high_freq_factor > low_freq_factor",
        ),
        ({"rope_parameters": {**LLAMA3_ROPE, "factor": 0.5}}, "factor=0.5.*needs factor >= 1"),
        (
            {"rope_parameters": {**LLAMA3_ROPE, "original_max_position_embeddings": 0}},
            "original_max_position_embeddings=0;",
        ),
        (
            {"rope_parameters": {**LLAMA3_ROPE, "factor": None}},
            "rope_type='llama3' needs rope_parameters.factor",
        ),
        (
            {"rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}},
            "rope_parameters .* and rope_scaling .* disagree",
        ),
    ],
)
def test_unsupported_rope_raises_config_error(changes, match):
    with pytest.raises(ConfigError, match=match):
        model_config_from_hf({**LLAMA3_HF, **changes})


# ---------------------------------------------------------------------------------------------
# Against Hugging Face transformers (PyTorch).

HF_MODELS = ["gpt2", "gpt2-untied", "llama", "llama-tied"]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Tiny HF models with every parameter randomised (norm scales and biases too, so a
    mis-mapped bias or scale shows), saved as safetensors: {name: (dir, torch model)}."""
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    transformers = pytest.importorskip(
        "transformers", reason="HF reference tests need transformers (the hf extra)"
    )
    configs = {
        "gpt2": transformers.GPT2Config(
            vocab_size=V,
            n_positions=P,
            n_embd=D,
            n_layer=L_LAYERS,
            n_head=N,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "llama": transformers.LlamaConfig(
            vocab_size=V,
            hidden_size=D,
            intermediate_size=96,
            num_hidden_layers=L_LAYERS,
            num_attention_heads=N,
            num_key_value_heads=K,
            max_position_embeddings=P,
            rope_theta=10000.0,
            tie_word_embeddings=False,
        ),
    }
    configs["gpt2-untied"] = transformers.GPT2Config(**configs["gpt2"].to_dict())
    configs["gpt2-untied"].tie_word_embeddings = False
    configs["llama-tied"] = transformers.LlamaConfig(**configs["llama"].to_dict())
    configs["llama-tied"].tie_word_embeddings = True
    classes = {"gpt2": transformers.GPT2LMHeadModel, "llama": transformers.LlamaForCausalLM}
    torch.manual_seed(0)
    out = {}
    for name, config in configs.items():
        model = classes[name.split("-")[0]](config).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                p.copy_(torch.randn_like(p) * _init_std(pname) + _init_mean(pname, p.ndim))
        path = tmp_path_factory.mktemp(name) / "hf"
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


def _init_std(name: str) -> float:
    """Embeddings and head large enough for logits of std ~4; layers keep the stream O(1)."""
    return 0.5 if any(s in name for s in ("wte", "wpe", "embed_tokens", "lm_head")) else 0.1


def _init_mean(name: str, ndim: int) -> float:
    """Norm scales around 1 (random, so a misplaced scale shows); everything else around 0."""
    is_scale = ndim == 1 and ("ln_" in name or "norm" in name) and name.endswith("weight")
    return 1.0 if is_scale else 0.0


def plm_hidden_states(model, tokens: np.ndarray) -> list[np.ndarray]:
    """The residual stream after the embeddings and after each block (before the final norm)."""
    batch, length = tokens.shape
    positions = np.broadcast_to(np.arange(length), (batch, length))
    segments = np.ones((batch, length), np.int32)
    index = np.arange(length)
    mask = attention_mask(segments, segments, index, index)
    x = model.embed(tokens)
    rope = None
    if model.pos_embed is not None:
        x = x + model.pos_embed(positions)
    else:
        scaling = rope_scaling_from_config(model.cfg)
        rope = rope_tables(positions, model.cfg.head_dim, model.cfg.rope_theta, scaling=scaling)
    states = [np.asarray(x)]
    for block in model.blocks:
        x, _ = block(x, mask=mask, rope=rope)
        states.append(np.asarray(x))
    return states


@pytest.mark.hf
@pytest.mark.parametrize("name", HF_MODELS)
def test_logits_match_transformers(hf_dirs, name):
    import torch

    path, hf_model = hf_dirs[name]
    tokens = np.random.default_rng(0).integers(0, V, (2, P))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens), output_hidden_states=True)
    model = load_hf_decoder(path)
    out = model(tokens)
    # HF: embeddings, each block's output but the last, then the final norm's output.
    ref_states = [h.numpy() for h in ref.hidden_states]
    ours = plm_hidden_states(model, tokens)
    assert len(ref_states) == L_LAYERS + 1
    for layer in range(L_LAYERS):
        np.testing.assert_allclose(ours[layer], ref_states[layer], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.hidden), ref_states[-1], rtol=0, atol=1e-5)
    logit_diff = np.abs(np.asarray(out.logits) - ref.logits.numpy()).max()
    print(f"{name}: max |logit diff| = {logit_diff:.3g}, logit scale {ref.logits.abs().max():.3g}")
    assert logit_diff < 1e-4
    assert ref.logits.std() > 1.0  # the random weights give non-trivial logits


@pytest.mark.hf
@pytest.mark.parametrize("name", ["gpt2", "llama-tied"])
def test_scanned_load_matches_transformers(hf_dirs, name):
    import torch

    path, hf_model = hf_dirs[name]
    tokens = np.random.default_rng(1).integers(0, V, (2, 16))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.numpy()
    logits = load_hf_decoder(path, use_scan_layers=True)(tokens).logits
    np.testing.assert_allclose(np.asarray(logits), ref, rtol=0, atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("name", HF_MODELS)
def test_export_reloads_in_transformers(hf_dirs, tmp_path, name):
    import torch
    import transformers

    path, hf_model = hf_dirs[name]
    hf_config, tensors = read_hf_checkpoint(path)
    cfg = model_config_from_hf(hf_config)
    out_config, out = params_to_hf(cfg, params_from_hf(cfg, hf_config, tensors))
    assert set(out) == set(tensors)
    assert all(np.array_equal(out[k], tensors[k]) for k in tensors)
    write_hf_checkpoint(tmp_path / "export", out_config, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(reloaded) is type(hf_model)
    tokens = torch.tensor(np.random.default_rng(2).integers(0, V, (2, P)))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf_model(tokens).logits)


@pytest.mark.hf
def test_transformers_sharded_checkpoint_reads_the_same(hf_dirs, tmp_path):
    path, hf_model = hf_dirs["llama"]
    hf_model.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _, sharded = read_hf_checkpoint(tmp_path / "sharded")
    _, single = read_hf_checkpoint(path)
    assert set(sharded) == set(single)
    assert all(np.array_equal(sharded[k], single[k]) for k in single)


# ---------------------------------------------------------------------------------------------
# Llama 3.1 RoPE scaling against transformers.


@pytest.fixture(scope="module")
def llama3_hf(tmp_path_factory):
    """A tiny random LlamaForCausalLM with llama3 RoPE scaling, saved: (dir, torch model)."""
    torch = pytest.importorskip("torch", reason="HF reference tests need torch (the hf extra)")
    transformers = pytest.importorskip(
        "transformers", reason="HF reference tests need transformers (the hf extra)"
    )
    config = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=96,
        num_hidden_layers=L_LAYERS,
        num_attention_heads=N,
        num_key_value_heads=K,
        max_position_embeddings=P3,
        rope_parameters=dict(LLAMA3_ROPE),
        tie_word_embeddings=False,
    )
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * _init_std(pname) + _init_mean(pname, p.ndim))
    path = tmp_path_factory.mktemp("llama3") / "hf"
    model.save_pretrained(path, safe_serialization=True)
    return path, model


@pytest.mark.hf
def test_llama3_frequencies_match_transformers(llama3_hf):
    """Within 4 float32 ulps of each frequency: torch and numpy each round a pow, a division and
    the band blend (<= 1 ulp each), so bit equality depends on the CPU's libm; a frequency off by
    more than 4 ulps (a wrong band, a factor off by 1e-5) would shift every long-range angle."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, hf_model = llama3_hf
    ours = rope_frequencies(H, 10000.0, LLAMA3_SCALING)
    hf_freqs = hf_model.model.rotary_emb.inv_freq.numpy()
    assert_close(ours, hf_freqs, ulps=4, per_element=True)
    # The bound can fail: the low/high bands swapped, or the factor off by 1e-5.
    factor, low, high, old = LLAMA3_SCALING
    swapped = rope_frequencies(H, 10000.0, RopeScaling(factor, high, low, old))
    assert_not_close(swapped, hf_freqs, ulps=4, per_element=True)
    nudged = rope_frequencies(H, 10000.0, RopeScaling(factor * (1 + 1e-5), low, high, old))
    assert_not_close(nudged, hf_freqs, ulps=4, per_element=True)
    # Llama 3.1 8B's settings and a few others, through transformers' own function.
    cases = [(128, 500000.0, 8.0, 1.0, 4.0, 8192), (64, 10000.0, 32.0, 0.5, 3.0, 100)]
    for head_dim, theta, factor, low, high, old_len in cases:
        rope = {"rope_type": "llama3", "rope_theta": theta, "factor": factor}
        rope |= {"low_freq_factor": low, "high_freq_factor": high}
        rope["original_max_position_embeddings"] = old_len
        config = transformers.LlamaConfig(
            hidden_size=4 * head_dim,
            num_attention_heads=4,
            max_position_embeddings=2 * old_len,
            rope_parameters=rope,
        )
        ref = ROPE_INIT_FUNCTIONS["llama3"](config)[0].numpy()
        scaling = RopeScaling(factor, low, high, old_len)
        assert_close(rope_frequencies(head_dim, theta, scaling), ref, ulps=4, per_element=True)


@pytest.mark.hf
def test_llama3_logits_match_transformers(llama3_hf):
    import torch

    path, hf_model = llama3_hf
    tokens = np.random.default_rng(4).integers(0, V, (2, L3))
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens), output_hidden_states=True)
    model = load_hf_decoder(path)
    assert rope_scaling_from_config(model.cfg) == LLAMA3_SCALING
    ours = plm_hidden_states(model, tokens)
    for layer in range(L_LAYERS):
        np.testing.assert_allclose(ours[layer], ref.hidden_states[layer].numpy(), atol=1e-5)
    logits = np.asarray(model(tokens).logits)
    np.testing.assert_allclose(logits, ref.logits.numpy(), rtol=0, atol=1e-4)
    # The test can fail: the same weights with plain RoPE are far off.
    model.cfg = dataclasses.replace(model.cfg, rope_scaling="")
    assert np.abs(np.asarray(model(tokens).logits) - ref.logits.numpy()).max() > 1e-2


@pytest.mark.hf
def test_llama3_export_reloads_in_transformers(llama3_hf, tmp_path):
    import torch
    import transformers

    path, hf_model = llama3_hf
    hf_config, tensors = read_hf_checkpoint(path)
    assert "rope_scaling" not in hf_config  # transformers 5 writes rope_parameters only
    cfg = model_config_from_hf(hf_config)
    out_config, out = params_to_hf(cfg, params_from_hf(cfg, hf_config, tensors))
    tokens = torch.tensor(np.random.default_rng(5).integers(0, V, (2, L3)))
    with torch.no_grad():
        ref = hf_model(tokens).logits
    # As written (both spellings), and with only the 4.x spelling that older versions read.
    v4_only = {k: v for k, v in out_config.items() if k != "rope_parameters"}
    for name, config in [("both", out_config), ("v4", v4_only)]:
        write_hf_checkpoint(tmp_path / name, config, out)
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert reloaded.config.rope_parameters == LLAMA3_ROPE, name
        with torch.no_grad():
            assert torch.equal(reloaded(tokens).logits, ref), name
