"""Presets at published sizes: shapes equal the checkpoints' config.json, closed-form parameter
counts equal the published counts, and the built (abstract) model agrees with the formula.

The published counts were measured with transformers 5.25.0 / torch 2.13.0: the Hugging Face
model class built from the config.json below on `torch.device("meta")`, summing
`numel()` over `named_parameters()` (a tied head counted once). `test_hf_counts` repeats that
measurement when torch is installed. They agree with the figures usually quoted (Llama-3-8B
8.03 B, GPT-2 xl 1.56 B, t5-large 738 M).
"""

from __future__ import annotations

import dataclasses

import jax
import pytest
from flax import nnx

from plm_jax.config import MODEL_PRESETS, ModelConfig, load_config
from plm_jax.convert import model_config_from_hf
from plm_jax.models import build_model, count_params, param_count, resolve_model_config

_LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "vocab_size": 128256,
    "num_key_value_heads": 8,
}
_LLAMA32_ROPE = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
_GPT2 = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "activation_function": "gelu_new",
    "layer_norm_epsilon": 1e-05,
    "n_ctx": 1024,
    "n_positions": 1024,
    "vocab_size": 50257,
}

# preset -> (the Hub checkpoint's config.json fields, published parameter count)
PUBLISHED = {
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": (
        dict(
            _LLAMA,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        ),
        8_030_261_248,
    ),
    # meta-llama/Meta-Llama-3-70B
    "llama-3-70b": (
        dict(
            _LLAMA,
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            max_position_embeddings=8192,
            tie_word_embeddings=False,
        ),
        70_553_706_496,
    ),
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": (
        dict(
            _LLAMA,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            head_dim=64,
            max_position_embeddings=131072,
            rope_scaling=_LLAMA32_ROPE,
            tie_word_embeddings=True,
        ),
        1_235_814_400,
    ),
    # meta-llama/Llama-3.2-3B
    "llama-3.2-3b": (
        dict(
            _LLAMA,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=28,
            num_attention_heads=24,
            head_dim=128,
            max_position_embeddings=131072,
            rope_scaling=_LLAMA32_ROPE,
            tie_word_embeddings=True,
        ),
        3_212_749_824,
    ),
    # openai-community/gpt2-medium, gpt2-large, gpt2-xl
    "gpt2-medium": (dict(_GPT2, n_embd=1024, n_head=16, n_layer=24), 354_823_168),
    "gpt2-large": (dict(_GPT2, n_embd=1280, n_head=20, n_layer=36), 774_030_080),
    "gpt2-xl": (dict(_GPT2, n_embd=1600, n_head=25, n_layer=48), 1_557_611_200),
    # google-t5/t5-large (T5 v1.0: ReLU MLP, head tied to the shared embedding)
    "t5-large": (
        {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "d_ff": 4096,
            "d_kv": 64,
            "d_model": 1024,
            "num_heads": 16,
            "num_layers": 24,
            "n_positions": 512,
            "relative_attention_num_buckets": 32,
            "layer_norm_epsilon": 1e-06,
            "feed_forward_proj": "relu",
            "is_encoder_decoder": True,
            "vocab_size": 32128,
        },
        737_668_096,
    ),
}


def preset(name: str, **changes) -> ModelConfig:
    return ModelConfig(**{**MODEL_PRESETS[name], "preset": name, **changes})


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_closed_form_count_is_published(name):
    assert count_params(preset(name)) == PUBLISHED[name][1]


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shapes_equal_the_checkpoint_config(name):
    """The preset computes what the converter makes of the checkpoint's config.json (the
    converter is tested against transformers in test_convert.py), RoPE scaling included.
    Only the training length differs for Llama 3.2 (8192 here, 131072 published; RoPE has no
    position table, so the parameters are the same)."""
    hub = model_config_from_hf(PUBLISHED[name][0])  # float32 compute, as transformers
    ours = preset(name, max_seq_len=hub.max_seq_len, dtype="float32")
    assert dataclasses.replace(resolve_model_config(ours), preset="tiny") == resolve_model_config(
        hub
    )
    assert load_config(overrides=[f"model.preset={name}"]).model == preset(name)


def test_llama_3_2_context_and_rope():
    for name in ("llama-3.2-1b", "llama-3.2-3b"):
        m = preset(name)
        assert (m.rope_scaling, m.rope_scaling_factor, m.rope_original_max_len) == (
            "llama3",
            32.0,
            8192,
        )
        assert (m.max_seq_len, m.tie_embeddings, m.rope_theta) == (8192, True, 500000.0)
    assert preset("llama-3-8b").rope_scaling == "" and not preset("llama-3-70b").tie_embeddings


# Built abstractly (no memory), the model has the parameters the formula counts, as the same
# arrays transformers has: 9 per Llama layer (4 attention, 3 MLP, 2 norms) + embedding, final
# norm and an untied head = 291 for Llama-3-8B (LlamaForCausalLM: 291 named parameters), 146
# for the tied 16-layer 3.2-1B; T5 v1.0 large 509 as in T5ForConditionalGeneration. GPT-2's
# fused c_attn weight and bias are three each here (q, k, v): 12 + 4 arrays per layer, so 388
# against transformers' 292 for gpt2-medium. Scanned layers stack each layer array once.
STRUCTURE = [
    ("llama-3-8b", False, 291),
    ("llama-3.2-1b", False, 146),
    ("t5-large", False, 509),
    ("gpt2-medium", True, 4 + 16),
]


@pytest.mark.parametrize("name, scan, arrays", STRUCTURE)
def test_abstract_model_matches_formula(name, scan, arrays):
    cfg = preset(name, use_scan_layers=scan)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert (len(leaves), param_count(model)) == (arrays, PUBLISHED[name][1])
    if scan:
        stacked = [x for x in leaves if x.ndim >= 2 and x.shape[0] == cfg.num_layers]
        assert len(stacked) == arrays - 4  # every per-layer array carries the layers axis


@pytest.mark.hf
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_hf_counts(name):
    """The published counts, measured again on the meta device (no weights allocated)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hub, published = PUBLISHED[name]
    config = transformers.AutoConfig.for_model(**hub)
    model_class = getattr(transformers, hub["architectures"][0])
    with torch.device("meta"):
        model = model_class(config)
    named = dict(model.named_parameters())
    assert sum(p.numel() for p in named.values()) == published
