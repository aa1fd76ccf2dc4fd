"""PyTorch peer of `benchmarks.train_throughput --preset llama-*`: the same LLaMA training step.

    python -m benchmarks.peers.torch_llama --layers 2 --embed-dim 128 --heads 4 --kv-heads 2 \
        --head-dim 32 --mlp-dim 512 --vocab 4096 --seq-len 128 --batch 16 --steps 10 --impl hf

Model (as plm_jax's `Decoder` with the `llama-1b` preset's architecture): token embedding, then
per layer `x + Attn(RMSNorm(x))`, `x + SwiGLU(RMSNorm(x))` (RMSNorm eps 1e-5 with a scale, no
biases anywhere), grouped-query attention (`--kv-heads` K of `--heads` N query heads, head size
`--head-dim` H, which need not be D / N) with RoPE (`--rope-theta`, the half-split "rotate half"
layout of transformers' Llama), causal; SwiGLU `down(silu(gate x) * up x)` of width `--mlp-dim`
F; final RMSNorm; output head tied to the token embedding (`llama-1b`: Llama 3.2 1B ties).
Next-token loss.

`--impl hf` builds `transformers.LlamaForCausalLM` with the same config (tied, eager, its
default attention implementation). `--impl eager` runs the plain module below: fused q/k/v and
fused gate/up projections, `scaled_dot_product_attention(is_causal=True, enable_gqa=True)`,
`nn.RMSNorm`; init N(0, 0.02), residual output projections N(0, 0.02 / sqrt(2L)) (plm_jax's),
norm scales 1. The flags, optimizer, timed loop and JSON record are `benchmarks.peers.common`'s.

What it leaves out: Llama 3.1's RoPE frequency scaling (`rope_scaling`; the 1B preset has none),
KV caches and `torch.compile`.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.peers import common

__all__ = ["Llama", "hf_model", "main"]

NORM_EPS = 1e-5


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, H] for positions 0..T-1, each frequency repeated for both halves."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, N, T, H] rotated pairwise (i, i + H/2) by the position's angles."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Layer(nn.Module):
    """Pre-norm LLaMA layer: `x + Attn(RMSNorm(x))`, then `x + SwiGLU(RMSNorm(x))`."""

    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, mlp_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.mlp_dim = heads, kv_heads, head_dim, mlp_dim
        self.attn_norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.qkv = nn.Linear(d, (heads + 2 * kv_heads) * head_dim, bias=False)
        self.proj = nn.Linear(heads * head_dim, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=NORM_EPS)
        self.gate_up = nn.Linear(d, 2 * mlp_dim, bias=False)
        self.down = nn.Linear(mlp_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D]; cos, sin: [T, H] -> [B, T, D]."""
        b, t, _ = x.shape
        n, k, h = self.heads, self.kv_heads, self.head_dim
        q, kk, v = self.qkv(self.attn_norm(x)).split([n * h, k * h, k * h], dim=2)
        q = apply_rope(q.view(b, t, n, h).transpose(1, 2), cos, sin)  # [B, N, T, H]
        kk = apply_rope(kk.view(b, t, k, h).transpose(1, 2), cos, sin)  # [B, K, T, H]
        v = v.view(b, t, k, h).transpose(1, 2)
        # Query head i reads kv head i // (N / K), as transformers' repeat_kv.
        y = F.scaled_dot_product_attention(q, kk, v, is_causal=True, enable_gqa=k != n)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, n * h))
        gate, up = self.gate_up(self.mlp_norm(x)).split(self.mlp_dim, dim=2)
        return x + self.down(F.silu(gate) * up)


class Llama(nn.Module):
    """LLaMA decoder with a tied head (plm_jax's `Decoder` on the `llama-1b` architecture)."""

    def __init__(
        self,
        layers: int,
        d: int,
        heads: int,
        vocab: int,
        mlp_dim: int,
        kv_heads: int,
        head_dim: int,
        rope_theta: float,
    ):
        super().__init__()
        self.head_dim, self.rope_theta = head_dim, rope_theta
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(
            Layer(d, heads, kv_heads, head_dim, mlp_dim) for _ in range(layers)
        )
        self.final_norm = nn.RMSNorm(d, eps=NORM_EPS)
        out_std = common.INIT_STD / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                residual = name.endswith(("proj.weight", "down.weight"))
                nn.init.normal_(p, std=out_std if residual else common.INIT_STD)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: [B, T] -> logits [B, T, V]."""
        cos, sin = rope_tables(ids.shape[1], self.head_dim, self.rope_theta)
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.final_norm(x) @ self.embed.weight.T  # tied head


def hf_model(
    layers: int,
    d: int,
    heads: int,
    vocab: int,
    mlp_dim: int,
    kv_heads: int,
    head_dim: int,
    rope_theta: float,
    max_seq_len: int,
) -> nn.Module:
    """`transformers.LlamaForCausalLM` with this shape, tied head, no biases or scaling."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=mlp_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=max_seq_len,
        initializer_range=common.INIT_STD,
        rms_norm_eps=NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(config)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common.make_parser("python -m benchmarks.peers.torch_llama", ["eager", "hf"])
    parser.add_argument(
        "--mlp-dim", type=int, default=0, help="0: LLaMA's 256 * ceil(int(8D/3) / 256)"
    )
    parser.add_argument("--kv-heads", type=int, default=0, help="0: --heads")
    parser.add_argument("--head-dim", type=int, default=0, help="0: embed-dim // heads")
    parser.add_argument("--rope-theta", type=float, default=500000.0)
    args = common.parse_args(parser, argv)
    # The derived sizes as plm_jax's models.sizes.resolve_model_config derives them.
    args.mlp_dim = args.mlp_dim or 256 * math.ceil(int(8 * args.embed_dim / 3) / 256)
    args.kv_heads = args.kv_heads or args.heads
    if not args.head_dim and args.embed_dim % args.heads:
        parser.error(
            f"--embed-dim {args.embed_dim} is not divisible by --heads {args.heads}; "
            "give --head-dim"
        )
    args.head_dim = args.head_dim or args.embed_dim // args.heads
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} is not divisible by --kv-heads {args.kv_heads}")
    if args.head_dim % 2:
        parser.error(f"--head-dim {args.head_dim} must be even (RoPE rotates pairs)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints its record as one JSON line and returns it."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    shape = (args.layers, args.embed_dim, args.heads, args.vocab, args.mlp_dim)
    shape += (args.kv_heads, args.head_dim, args.rope_theta)
    model = hf_model(*shape, args.seq_len) if args.impl == "hf" else Llama(*shape)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits if args.impl == "hf" else model(ids)

    summary = {
        "family": "decoder",
        "num_layers": args.layers,
        "embed_dim": args.embed_dim,
        "num_heads": args.heads,
        "num_kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "mlp_dim": args.mlp_dim,
        "vocab_size": args.vocab,
        "max_seq_len": args.seq_len,
        "rope_theta": args.rope_theta,
    }
    return common.run_benchmark(args, model, forward, summary)


if __name__ == "__main__":
    main()
