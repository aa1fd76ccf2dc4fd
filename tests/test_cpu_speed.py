"""`layers.token_einsum`, the CPU-speed change of issue 7, leaves every result unchanged (to
float rounding), and the compiled train step keeps the shape that made it faster
(docs/performance.md, "CPU").

- `token_einsum` (B and L merged into one token axis for weight matmuls) equals `jnp.einsum`,
  values and gradients, for every layout the models use.
- Whole decoders (GPT-2 style; Llama style with GQA and RoPE), encoders and encoder-decoders
  (T5's relative position bias, cross-attention) give the same logits and parameter gradients
  as with plain einsums, on causal, padded and packed rows.
- The train step's weight gradients no longer copy a residual-stream gradient into a
  transposed [X, B*L] layout with its producers recomputed inside the copy.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks import profile_cpu
from plm_jax.config import ModelConfig
from plm_jax.models import attention, build_model, layers, transformer
from plm_jax.sharding import use_mesh
from plm_jax.train import loop

FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _plain_einsum(spec, x, w, **kwargs):
    return jnp.einsum(spec, x, w, **kwargs)


# ---------------------------------------------------------------------------------------------
# token_einsum


@pytest.mark.parametrize(
    "spec, x_shape, w_shape",
    [
        ("BLD,DF->BLF", (3, 5, 8), (8, 12)),
        ("BLD,DNH->BLNH", (3, 5, 8), (8, 2, 4)),
        ("BLNH,NHD->BLD", (3, 5, 2, 4), (2, 4, 8)),
        ("BLD,VD->BLV", (3, 5, 8), (16, 8)),
    ],
)
def test_token_einsum_equals_einsum(spec, x_shape, w_shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    want = jnp.einsum(spec, x, w)
    got = layers.token_einsum(spec, x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    cot = jax.random.normal(kg, want.shape)

    def grads(f):
        return jax.grad(lambda x, w: jnp.sum(f(spec, x, w) * cot), argnums=(0, 1))(x, w)

    for g, r in zip(grads(layers.token_einsum), grads(_plain_einsum), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_token_einsum_keeps_preferred_element_type():
    x, w = jnp.ones((2, 3, 4), jnp.bfloat16), jnp.ones((4, 5), jnp.bfloat16)
    out = layers.token_einsum("BLD,DV->BLV", x, w, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32 and out.shape == (2, 3, 5)


@pytest.mark.parametrize("spec", ["BLD,BDF->BLF", "LBD,DF->LBF", "BLD,DF->BFL", "BLD,LF->BLF"])
def test_token_einsum_rejects_other_layouts(spec):
    with pytest.raises(ValueError, match="token_einsum needs"):
        layers.token_einsum(spec, jnp.ones((2, 2, 2)), jnp.ones((2, 2, 2)))


# ---------------------------------------------------------------------------------------------
# Whole models: token_einsum against plain einsums.

GPT = ModelConfig(vocab_size=96, num_layers=1, embed_dim=32, num_heads=4, max_seq_len=16)
LLAMA = dataclasses.replace(
    GPT, position="rope", norm="rmsnorm", mlp="swiglu", num_kv_heads=2, use_bias=False,
    tie_embeddings=False,
)  # fmt: skip
BERT = dataclasses.replace(GPT, family="encoder", norm_placement="post", mlp="gelu_exact")
T5 = ModelConfig(
    family="encoder_decoder", vocab_size=64, num_layers=1, num_decoder_layers=1, embed_dim=32,
    num_heads=4, head_dim=8, mlp_dim=48, max_seq_len=16, position="relative",
    relative_buckets=8, relative_max_distance=16, norm="rmsnorm", norm_eps=1e-6, mlp="relu",
    use_bias=False, tie_embeddings=True,
)  # fmt: skip
B, L = 3, 10
# Row 0 one document, row 1 right padding, row 2 two packed documents (positions restart).
SEGMENTS = np.array([[1] * 10, [1] * 6 + [0] * 4, [1] * 4 + [2] * 6], np.int32)
POSITIONS = np.array([list(range(10)), list(range(6)) + [0] * 4, list(range(4)) + list(range(6))])


def _loss_and_grads(cfg: ModelConfig, tokens: np.ndarray) -> tuple[jax.Array, nnx.State]:
    model = build_model(cfg, rngs=nnx.Rngs(params=0))
    graphdef, params = nnx.split(model)
    seg, pos = jnp.asarray(SEGMENTS), jnp.asarray(POSITIONS)

    def loss(params):
        m = nnx.merge(graphdef, params)
        if cfg.family == "encoder_decoder":
            out = m(tokens, tokens[:, ::-1], positions=pos, segment_ids=seg,
                    decoder_positions=pos, decoder_segment_ids=seg)  # fmt: skip
        else:
            out = m(tokens, positions=pos, segment_ids=seg)
        real = (seg != 0)[..., None]
        return jnp.sum(jnp.where(real, out.logits, 0.0) ** 2), out.logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST)(
        params
    )
    return logits, grads


@pytest.mark.parametrize("name, cfg", [("gpt", GPT), ("llama", LLAMA), ("bert", BERT), ("t5", T5)])
def test_models_equal_with_plain_einsums(name, cfg, monkeypatch):
    tokens = jax.random.randint(jax.random.key(1), (B, L), 0, cfg.vocab_size)
    logits, grads = _loss_and_grads(cfg, tokens)
    for module in (layers, attention, transformer):
        monkeypatch.setattr(module, "token_einsum", _plain_einsum)
    ref_logits, ref_grads = _loss_and_grads(cfg, tokens)
    real = SEGMENTS != 0
    np.testing.assert_allclose(logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat) > 0
    for g, r in zip(flat, ref_flat, strict=True):
        scale = float(jnp.max(jnp.abs(r))) + 1e-6
        np.testing.assert_allclose(g / scale, r / scale, atol=1e-5)


def test_train_step_recomputes_no_gradient_chain_in_transposed_copies():
    """Every copy in the compiled train step that writes a token-major [X, B*L] array is a
    plain transpose. Before `token_einsum`, the weight gradients contracted over B and L, and
    XLA copied each layer's residual-stream gradient into [D, B*L] with the gradient's whole
    chain of producers (through every later layer) fused into the copy: 47 to 145 fused
    instructions at this size, ~21% of the quick-start step (docs/performance.md, "CPU")."""
    args = profile_cpu.parse_args(
        ["--layers", "2", "--embed-dim", "32", "--heads", "4", "--vocab", "96",
         "--seq-len", "16", "--batch", "4"]
    )  # fmt: skip
    train_step, state, batch, *_ = profile_cpu.build_step(args)
    ops = profile_cpu.parse_hlo(train_step.lower(state, batch).compile().as_text())
    tokens = args.batch * args.seq_len
    shape = dict(batch=args.batch, seq_len=args.seq_len, vocab=96)
    token_major = {
        op.name: len(op.fused_ops)
        for op in ops.values()
        if profile_cpu.classify(op, **shape) == "copies / transposes"
        and any(len(d) == 2 and d[-1] == tokens for d in profile_cpu._dims(op.shape))
    }
    assert all(n <= 10 for n in token_major.values()), token_major


# ---------------------------------------------------------------------------------------------
# Remat on CPU: only with scanned layers (docs/performance.md, "Remat on CPU").


def _step_temp_bytes(*extra: str) -> int:
    args = profile_cpu.parse_args(
        ["--layers", "2", "--embed-dim", "64", "--heads", "4", "--vocab", "96",
         "--seq-len", "64", "--batch", "4", *extra]
    )  # fmt: skip
    step, state, batch, _, mesh, rules = profile_cpu.build_step(args)
    with use_mesh(mesh, rules):
        return step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.e2e  # four compiles of the benchmark step, ~25 s
def test_remat_saves_memory_on_cpu_only_with_scanned_layers():
    """What `warn_if_remat_saves_nothing` tells users: unrolled, XLA's CPU backend merges the
    rematerialised forward away; scanned, remat cuts the step's temporary memory."""
    unrolled = {r: _step_temp_bytes("--remat", r) for r in ("none", "full")}
    scanned = {r: _step_temp_bytes("--remat", r, "--scan") for r in ("none", "full")}
    assert unrolled["full"] > 0.95 * unrolled["none"], unrolled
    assert scanned["full"] < 0.6 * scanned["none"], scanned


def test_the_remat_warning_names_the_fix(caplog):
    full = ModelConfig(remat="full")
    assert loop.warn_if_remat_saves_nothing(full, "cpu")
    assert "set model.use_scan_layers=true" in caplog.text
    assert not loop.warn_if_remat_saves_nothing(
        dataclasses.replace(full, use_scan_layers=True), "cpu"
    )
    assert not loop.warn_if_remat_saves_nothing(full, "gpu")
    assert not loop.warn_if_remat_saves_nothing(ModelConfig(), "cpu")
