"""Tests of the BERT and LLaMA PyTorch peers (benchmarks/peers/torch_bert.py, torch_llama.py).

For each peer and `--impl`: one JSON line, consistent fields, a loss near log(V) after a few
steps from init, and `params_total` equal to plm_jax's closed-form count for the `bert-base` /
`llama-1b` preset at the same sizes. Then that the peers train the same function as plm_jax:
random weights (LayerNorm/RMSNorm scales near 1, nonzero biases) in the eager module, copied by
name into the `--impl hf` model (transformers' BertForMaskedLM + pooler, LlamaForCausalLM) and
from there through `plm_jax.convert.params_from_hf` into plm_jax's own model built from the
preset: equal logits (and BERT's pooler output) at 1e-4, equal clipped gradients of the peer's
training step (eager against hf), and the same parameters weight-decayed as plm_jax's optimizer
mask. Sizes: 2 layers, D=32, V=64, T=16, B=4; LLaMA with 4 query / 2 kv heads of size 16
(N*H = 64 != D). Torch runs single-threaded here (the test machine's cores are shared).
No timing is asserted.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

pytestmark = pytest.mark.hf

torch = pytest.importorskip("torch", reason="the PyTorch peers need torch (the hf extra)")
pytest.importorskip("transformers", reason="the hf peers need transformers (the hf extra)")

from benchmarks.peers import common, torch_bert, torch_llama  # noqa: E402 (needs torch)

V, D, LAYERS, T, B = 64, 32, 2, 16, 4
BERT = dict(heads=2, mlp_dim=48, max_seq_len=20)
LLAMA = dict(heads=4, kv_heads=2, head_dim=16, mlp_dim=48, rope_theta=500000.0)
RUN = ["--seq-len", str(T), "--batch", str(B), "--steps", "2", "--warmup", "1"]
FLAGS = {
    "bert": [
        "--layers", str(LAYERS), "--embed-dim", str(D), "--heads", "2", "--vocab", str(V),
        "--mlp-dim", "48", "--max-seq-len", "20",
    ],
    "llama": [
        "--layers", str(LAYERS), "--embed-dim", str(D), "--heads", "4", "--vocab", str(V),
        "--mlp-dim", "48", "--kv-heads", "2", "--head-dim", "16", "--rope-theta", "500000.0",
    ],
}  # fmt: skip
PEERS = {"bert": torch_bert, "llama": torch_llama}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on shared cores: a second intra-op thread only waits for the first."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plm_config(family: str):
    """plm_jax's preset config (`bert-base` / `llama-1b`) with the test's sizes."""
    from plm_jax.config import MODEL_PRESETS, ModelConfig

    preset = {"bert": "bert-base", "llama": "llama-1b"}[family]
    cfg = ModelConfig(**{**MODEL_PRESETS[preset], "preset": preset})
    sizes = dict(num_layers=LAYERS, embed_dim=D, vocab_size=V, max_seq_len=T)
    if family == "bert":
        assert (cfg.norm_placement, cfg.mlp, cfg.use_pooler, cfg.use_mlm_head) == (
            "post",
            "gelu_exact",
            True,
            True,
        )
        sizes.update(num_heads=2, mlp_dim=48, max_seq_len=BERT["max_seq_len"])
    else:
        assert (cfg.position, cfg.norm, cfg.mlp, cfg.use_bias) == (
            "rope",
            "rmsnorm",
            "swiglu",
            False,
        )
        sizes.update(num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=48)
        sizes.update(rope_theta=LLAMA["rope_theta"])
    assert cfg.tie_embeddings
    return dataclasses.replace(cfg, **sizes)


# ---------------------------------------------------------------------------------------------
# The benchmark records.


@pytest.mark.parametrize("impl", ["eager", "hf"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_record(family, impl, capsys):
    from plm_jax import metrics

    record = PEERS[family].main(FLAGS[family] + RUN + ["--impl", impl])
    assert capsys.readouterr().out.count("\n") == 1
    assert record["impl"] == impl and record["system"] == f"torch-{impl}"
    assert (record["steps"], record["warmup"], record["batch"], record["seq_len"]) == (2, 1, B, T)
    assert record["real_tokens_per_step"] == record["padded_tokens_per_step"] == B * T
    assert record["tokens_per_sec"] == pytest.approx(B * T / record["step_time_median_s"])
    assert record["step_time_min_s"] <= record["step_time_median_s"] <= record["step_time_max_s"]
    assert record["compile_s"] is None and record["threads"] == 1
    # Init N(0, 0.02) gives near-uniform logits, and 3 steps at lr 3e-4 barely move them.
    assert abs(record["final_loss"] - math.log(V)) < 0.1
    assert ("attn_implementation" in record) == (impl == "hf")
    cfg = plm_config(family)
    assert record["params_total"] == metrics.param_breakdown(cfg, V)["total"]
    assert record["model"]["mlp_dim"] == 48


@pytest.mark.parametrize(
    "family, flags, match",
    [
        ("bert", ["--heads", "3"], "not divisible by --heads"),
        ("bert", ["--max-seq-len", "8"], "shorter than --seq-len"),
        ("llama", ["--kv-heads", "3"], "not divisible by --kv-heads"),
        ("llama", ["--head-dim", "15"], "must be even"),
        ("llama", ["--head-dim", "0", "--heads", "3", "--kv-heads", "1"], "give --head-dim"),
    ],
)
def test_bad_flags_exit_with_usage(family, flags, match, capsys):
    with pytest.raises(SystemExit) as exc:
        PEERS[family].parse_args(FLAGS[family] + RUN + flags)
    assert exc.value.code == 2
    assert match in capsys.readouterr().err


def test_derived_sizes_follow_plm_jax():
    """0 = derive it, as plm_jax's resolve_model_config: 4D for BERT, LLaMA's 8D/3 rule."""
    from plm_jax.config import MODEL_PRESETS, ModelConfig
    from plm_jax.models import resolve_model_config

    args = torch_bert.parse_args(["--embed-dim", "32", "--heads", "2"] + RUN)
    assert (args.mlp_dim, args.max_seq_len) == (128, 512)  # bert-*: 512 positions
    args = torch_bert.parse_args(
        ["--embed-dim", "32", "--heads", "2", "--seq-len", "600"] + RUN[2:]
    )
    assert args.max_seq_len == 600  # raised to the sequence, as train_throughput raises it
    args = torch_llama.parse_args(["--embed-dim", "200", "--heads", "10"] + RUN)
    llama = ModelConfig(**{**MODEL_PRESETS["llama-1b"], "embed_dim": 200, "num_heads": 10})
    llama = resolve_model_config(dataclasses.replace(llama, num_kv_heads=0, head_dim=0, mlp_dim=0))
    sizes = (llama.mlp_dim, llama.num_kv_heads, llama.head_dim)
    assert (args.mlp_dim, args.kv_heads, args.head_dim) == sizes == (768, 10, 20)


# ---------------------------------------------------------------------------------------------
# Eager module == transformers == plm_jax, on the same random weights.


def randomise(model) -> None:
    """Every parameter random: norm scales (the 1-D weights) U(0.5, 1.5), the rest N(0, 0.3)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def bert_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The eager BERT's tensors (parameters or gradients) under BertForMaskedLM's names."""
    names = {
        "word.weight": "bert.embeddings.word_embeddings.weight",
        "position.weight": "bert.embeddings.position_embeddings.weight",
        "token_type.weight": "bert.embeddings.token_type_embeddings.weight",
        "ln_embed": "bert.embeddings.LayerNorm",
        "pooler": "bert.pooler.dense",
        "mlm_dense": "cls.predictions.transform.dense",
        "mlm_ln": "cls.predictions.transform.LayerNorm",
        "mlm_bias": "cls.predictions.bias",
    }
    layer = {
        "proj": "attention.output.dense",
        "ln_1": "attention.output.LayerNorm",
        "fc": "intermediate.dense",
        "fc_out": "output.dense",
        "ln_2": "output.LayerNorm",
    }
    out = {}
    for name, x in tensors.items():
        if name.startswith("layers."):
            _, i, module, kind = name.split(".")
            prefix = f"bert.encoder.layer.{i}."
            if module == "qkv":
                for part, chunk in zip(("query", "key", "value"), x.chunk(3), strict=True):
                    out[f"{prefix}attention.self.{part}.{kind}"] = chunk
            else:
                out[f"{prefix}{layer[module]}.{kind}"] = x
            continue
        module, _, kind = name.rpartition(".")
        out[names[name] if name in names else f"{names[module]}.{kind}"] = x
    return out


def llama_to_hf(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The eager LLaMA's tensors (parameters or gradients) under LlamaForCausalLM's names."""
    n, k, h, f = LLAMA["heads"], LLAMA["kv_heads"], LLAMA["head_dim"], LLAMA["mlp_dim"]
    layer = {
        "attn_norm": "input_layernorm",
        "proj": "self_attn.o_proj",
        "mlp_norm": "post_attention_layernorm",
        "down": "mlp.down_proj",
    }
    out = {}
    for name, x in tensors.items():
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = x
        elif name == "final_norm.weight":
            out["model.norm.weight"] = x
        else:
            _, i, module, kind = name.split(".")
            prefix = f"model.layers.{i}."
            if module == "qkv":
                parts = zip(("q", "k", "v"), x.split([n * h, k * h, k * h]), strict=True)
                out.update({f"{prefix}self_attn.{p}_proj.{kind}": c for p, c in parts})
            elif module == "gate_up":
                parts = zip(("gate", "up"), x.split([f, f]), strict=True)
                out.update({f"{prefix}mlp.{p}_proj.{kind}": c for p, c in parts})
            else:
                out[f"{prefix}{layer[module]}.{kind}"] = x
    return out


def peer_pair(family: str):
    """(eager module with random weights, the hf model holding them, the name mapping)."""
    torch.manual_seed(0)
    if family == "bert":
        shape = (LAYERS, D, BERT["heads"], V, BERT["mlp_dim"], BERT["max_seq_len"])
        eager, hf = torch_bert.Bert(*shape), torch_bert.hf_model(*shape)
        to_hf = bert_to_hf
    else:
        shape = (LAYERS, D, LLAMA["heads"], V, LLAMA["mlp_dim"], LLAMA["kv_heads"])
        shape += (LLAMA["head_dim"], LLAMA["rope_theta"])
        eager, hf = torch_llama.Llama(*shape), torch_llama.hf_model(*shape, T)
        to_hf = llama_to_hf
    randomise(eager)
    tensors = to_hf(dict(eager.named_parameters()))
    missing, unexpected = hf.load_state_dict(tensors, strict=False)
    tied = {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "lm_head.weight"}
    assert not unexpected and set(missing) <= tied, (missing, unexpected)
    if family == "bert":  # the decoder still shares the word embedding and the output bias
        head = hf.cls.predictions
        assert head.decoder.weight is hf.bert.embeddings.word_embeddings.weight
        assert torch.equal(head.decoder.bias, head.bias)
    else:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return eager, hf, to_hf


def plm_model(family: str, hf):
    """plm_jax's model from the preset config, holding the hf model's weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from plm_jax.convert import params_from_hf
    from plm_jax.train.state import model_graphdef

    cfg = plm_config(family)
    tensors = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params = params_from_hf(cfg, hf.config.to_dict(), tensors)
    graphdef, state = model_graphdef(cfg)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_eager_hf_and_plm_jax_compute_the_same_function(family):
    import jax.numpy as jnp

    eager, hf, _ = peer_pair(family)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(2))
    eager.eval()
    hf.eval()
    with torch.no_grad():
        out = eager(ids)
        logits, pooled = out if family == "bert" else (out, None)
        hf_logits = hf(input_ids=ids).logits.numpy()
    assert logits.shape == (2, T, V)
    np.testing.assert_allclose(logits.numpy(), hf_logits, atol=1e-4, rtol=0)
    ours = plm_model(family, hf)(jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(np.asarray(ours.logits), logits.numpy(), atol=1e-4, rtol=0)
    assert np.abs(logits.numpy()).max() > 1.0  # random weights: the check is not vacuous
    if family == "bert":
        with torch.no_grad():
            hf_pooled = hf.bert(input_ids=ids).pooler_output.numpy()
        np.testing.assert_allclose(pooled.numpy(), hf_pooled, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(ours.pooled), pooled.numpy(), atol=1e-5, rtol=0)
    else:  # causal: a later token does not change earlier logits
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % V
        with torch.no_grad():
            np.testing.assert_array_equal(eager(changed)[:, :-1].numpy(), logits[:, :-1].numpy())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_eager_and_hf_train_steps_agree(family):
    """The peers' training step (`common.make_step`, optimizer at lr 0 so the gradients stay):
    the same loss and clipped gradients, the same parameters without a gradient (BERT's
    pooler), and weight decay on the same parameters as plm_jax's decay mask."""
    import jax

    from plm_jax.train.optimizer import decay_mask
    from plm_jax.train.state import model_graphdef

    eager, hf, to_hf = peer_pair(family)
    inputs, targets = common.random_batch(B, T, V, seed=3)

    def eager_forward(ids):
        return eager(ids)[0] if family == "bert" else eager(ids)  # BERT: (logits, pooled)

    losses = []
    for model, forward in ((eager, eager_forward), (hf, lambda ids: hf(input_ids=ids).logits)):
        model.train()
        lr0 = torch.optim.SGD(model.parameters(), lr=0.0)
        losses.append(common.make_step(model, forward, lr0, inputs, targets)())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    grads = to_hf({n: p.grad for n, p in eager.named_parameters()})
    hf_grads = dict(hf.named_parameters())
    assert grads.keys() == hf_grads.keys()
    for name, g in grads.items():
        hf_g = hf_grads[name].grad
        assert (g is None) == (hf_g is None), name
        if g is not None:
            np.testing.assert_allclose(g.numpy(), hf_g.numpy(), atol=1e-5, rtol=1e-4, err_msg=name)
    pooler = {"bert.pooler.dense.weight", "bert.pooler.dense.bias"}
    assert {n for n, g in grads.items() if g is None} == (pooler if family == "bert" else set())

    _, abstract = model_graphdef(plm_config(family))
    params, mask = jax.tree.leaves(abstract), jax.tree.leaves(decay_mask(abstract))
    plm_decayed = sum(int(np.prod(p.shape)) for p, m in zip(params, mask, strict=True) if m)
    for model in (eager, hf):
        groups = common.make_optimizer(model).param_groups
        decayed = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
        assert decayed[0.1] == plm_decayed
        assert decayed[0.1] + decayed[0.0] == sum(int(np.prod(p.shape)) for p in params)
