"""PyTorch peer of `benchmarks.train_throughput`: the same GPT-2 style training step.

    python -m benchmarks.peers.torch_gpt --layers 4 --embed-dim 128 --heads 4 --vocab 4096 \
        --seq-len 128 --batch 16 --steps 10 --impl eager

Model (as plm_jax's tiny/GPT-2 decoder): token + learned position embeddings, pre-LayerNorm
blocks (eps 1e-5) with fused qkv and `scaled_dot_product_attention(is_causal=True)`, GELU-tanh
MLP 4x, biases everywhere, final LayerNorm, head tied to the token embedding; init N(0, 0.02),
residual output projections N(0, 0.02 / sqrt(2L)), biases 0. float32, no dropout.
Optimizer: AdamW(fused=False, betas 0.9/0.95, eps 1e-8, lr 3e-4 constant), weight decay 0.1 on
2-D weights only (matrices and embeddings), `clip_grad_norm_(1.0)`.

`--impl eager` runs the module as is, `compile` wraps it in `torch.compile` (the optimizer step
stays eager), `hf` builds `transformers.GPT2LMHeadModel` with the same config (eager, its default
attention implementation). Synthetic batch of random ids; `--warmup` untimed steps (for
`compile` the first one compiles and is reported as `compile_s`), then `--steps` steps timed by
wall clock. `--max-seq-len` sizes the position table (default `--seq-len`; `compare` passes the
preset's, so both systems train as many parameters). Prints one JSON line with
train_throughput's key names where they apply. The
flags, optimizer, timed loop and record are `benchmarks.peers.common`'s, shared with the other
peers.
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

INIT_STD = common.INIT_STD
LR = common.LR  # benchmarks.profile_cpu builds its optimizer with torch_gpt.LR


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d, eps=1e-5)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        h = F.gelu(self.fc(self.ln_2(x)), approximate="tanh")
        return x + self.fc_out(h)


class GPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, vocab: int, max_seq_len: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_seq_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        out_std = INIT_STD / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = out_std if name.endswith(("proj.weight", "fc_out.weight")) else INIT_STD
                nn.init.normal_(p, std=std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.wte.weight.T  # tied head


def hf_model(layers: int, d: int, heads: int, vocab: int, max_seq_len: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_positions=max_seq_len,
        n_embd=d,
        n_layer=layers,
        n_head=heads,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        initializer_range=INIT_STD,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common.make_parser("python -m benchmarks.peers.torch_gpt", ["eager", "compile", "hf"])
    parser.add_argument(
        "--max-seq-len", type=int, default=0, help="position table rows; 0: --seq-len"
    )
    args = common.parse_args(parser, argv)
    args.max_seq_len = args.max_seq_len or args.seq_len
    if args.max_seq_len < args.seq_len:
        parser.error(f"--max-seq-len {args.max_seq_len} is shorter than --seq-len {args.seq_len}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints its record as one JSON line and returns it."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    shape = (args.layers, args.embed_dim, args.heads, args.vocab, args.max_seq_len)
    if args.impl == "hf":
        model = hf_model(*shape)
        forward = lambda ids: model(input_ids=ids).logits  # noqa: E731
    else:
        model = GPT(*shape)
        forward = torch.compile(model) if args.impl == "compile" else model
    summary = {
        "num_layers": args.layers,
        "embed_dim": args.embed_dim,
        "num_heads": args.heads,
        "vocab_size": args.vocab,
        "max_seq_len": args.max_seq_len,
    }
    return common.run_benchmark(args, model, forward, summary)


if __name__ == "__main__":
    main()
