"""PyTorch peer of `benchmarks.train_throughput --preset bert-*`: the same BERT training step.

    python -m benchmarks.peers.torch_bert --layers 2 --embed-dim 128 --heads 2 --mlp-dim 512 \
        --vocab 4096 --seq-len 128 --batch 16 --steps 10 --impl eager

Model (as plm_jax's `Encoder` with the `bert-*` presets: post-LayerNorm, eps 1e-12, exact GELU,
biases everywhere, pooler and tied MLM head on): word + learned position + token-type embeddings
(2 types; every token is type 0), embedding LayerNorm, then per layer `x = LN(x + Attn(x))`,
`x = LN(x + Mlp(x))` with a fused qkv and bidirectional `scaled_dot_product_attention` (no
mask: no padding in the synthetic batch); the pooler `tanh(W x[:, 0] + b)`, and the MLM head
`LN(gelu(W x + b)) E^T + bias` (E the word embedding) at every position. init N(0, 0.02),
residual output projections N(0, 0.02 / sqrt(2L)) (plm_jax's), biases 0. The loss is
cross-entropy against random targets at every position, as plm_jax's synthetic batch weighs
every token 1 (a real masked-LM batch weighs only the ~15% masked ones, but still computes the
logits everywhere).

`--impl eager` runs the module above, `hf` builds `transformers.BertForMaskedLM` with the same
config (eager, its default attention implementation) and gives it a `BertPooler`, which
`BertForMaskedLM` lacks but plm_jax's BERT presets (and `BertModel`) have. Both compute the
pooler in the forward pass; nothing depends on it, so it gets no gradient and AdamW skips it
(plm_jax's jitted step drops its matmul and applies weight decay alone; D*D + D parameters).
`--max-seq-len` sizes the position table; its default, the `bert-*` presets' 512 (raised to
`--seq-len` when that is longer, as train_throughput raises a preset's), gives the parameter
count plm_jax trains at the same `--seq-len`. The flags, optimizer, timed loop and JSON record
are `benchmarks.peers.common`'s.

What it leaves out: padding masks, real token types, dropout, and the next-sentence head.
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

__all__ = ["Bert", "hf_model", "main"]

LN_EPS = 1e-12
TYPE_VOCAB = 2
MAX_SEQ_LEN = 512  # the bert-* presets' position table (max_position_embeddings)


class Layer(nn.Module):
    """Post-norm encoder layer: `LN(x + Attn(x))`, then `LN(x + Mlp(x))`."""

    def __init__(self, d: int, heads: int, mlp_dim: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_1 = nn.LayerNorm(d, eps=LN_EPS)
        self.fc = nn.Linear(d, mlp_dim)
        self.fc_out = nn.Linear(mlp_dim, d)
        self.ln_2 = nn.LayerNorm(d, eps=LN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, D] -> [B, T, D]."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)  # [B, N, T, H], bidirectional
        x = self.ln_1(x + self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return self.ln_2(x + self.fc_out(F.gelu(self.fc(x))))


class Bert(nn.Module):
    """BERT encoder with pooler and tied MLM head (plm_jax's `Encoder` on a `bert-*` preset)."""

    def __init__(self, layers: int, d: int, heads: int, vocab: int, mlp_dim: int, max_seq_len: int):
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_seq_len, d)
        self.token_type = nn.Embedding(TYPE_VOCAB, d)
        self.ln_embed = nn.LayerNorm(d, eps=LN_EPS)
        self.layers = nn.ModuleList(Layer(d, heads, mlp_dim) for _ in range(layers))
        self.pooler = nn.Linear(d, d)
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_ln = nn.LayerNorm(d, eps=LN_EPS)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab))
        out_std = common.INIT_STD / math.sqrt(2 * layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                residual = name.endswith(("proj.weight", "fc_out.weight"))
                nn.init.normal_(p, std=out_std if residual else common.INIT_STD)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: [B, T] -> (MLM logits [B, T, V], pooled [B, D])."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        types = torch.zeros_like(ids)  # all sentence A, as plm_jax's default token types
        x = self.ln_embed(self.word(ids) + self.position(pos) + self.token_type(types))
        for layer in self.layers:
            x = layer(x)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        h = self.mlm_ln(F.gelu(self.mlm_dense(x)))
        return h @ self.word.weight.T + self.mlm_bias, pooled  # tied decoder


def hf_model(
    layers: int, d: int, heads: int, vocab: int, mlp_dim: int, max_seq_len: int
) -> nn.Module:
    """`transformers.BertForMaskedLM` with this shape, tied, no dropout, plus a `BertPooler`
    (`model.bert.pooler`, initialised as transformers initialises it)."""
    from transformers import BertConfig, BertForMaskedLM
    from transformers.models.bert.modeling_bert import BertPooler

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=d,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=mlp_dim,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=max_seq_len,
        type_vocab_size=TYPE_VOCAB,
        initializer_range=common.INIT_STD,
        layer_norm_eps=LN_EPS,
        tie_word_embeddings=True,
        pad_token_id=None,  # a padding row would get no gradient; plm_jax has none
        use_cache=False,
    )
    model = BertForMaskedLM(config)
    model.bert.pooler = BertPooler(config)
    nn.init.normal_(model.bert.pooler.dense.weight, std=common.INIT_STD)
    nn.init.zeros_(model.bert.pooler.dense.bias)
    return model


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common.make_parser("python -m benchmarks.peers.torch_bert", ["eager", "hf"])
    parser.add_argument("--mlp-dim", type=int, default=0, help="0: 4 * embed-dim")
    parser.add_argument(
        "--max-seq-len",
        type=int,
        default=0,
        help=f"position table rows; 0: max({MAX_SEQ_LEN}, --seq-len)",
    )
    args = common.parse_args(parser, argv)
    args.mlp_dim = args.mlp_dim or 4 * args.embed_dim
    args.max_seq_len = args.max_seq_len or max(MAX_SEQ_LEN, args.seq_len)
    if args.embed_dim % args.heads:
        parser.error(f"--embed-dim {args.embed_dim} is not divisible by --heads {args.heads}")
    if args.max_seq_len < args.seq_len:
        parser.error(f"--max-seq-len {args.max_seq_len} is shorter than --seq-len {args.seq_len}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints its record as one JSON line and returns it."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    shape = (args.layers, args.embed_dim, args.heads, args.vocab, args.mlp_dim, args.max_seq_len)
    model = hf_model(*shape) if args.impl == "hf" else Bert(*shape)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids).logits if args.impl == "hf" else model(ids)[0]

    summary = {
        "family": "encoder",
        "num_layers": args.layers,
        "embed_dim": args.embed_dim,
        "num_heads": args.heads,
        "mlp_dim": args.mlp_dim,
        "vocab_size": args.vocab,
        "max_seq_len": args.max_seq_len,
        "type_vocab_size": TYPE_VOCAB,
    }
    return common.run_benchmark(args, model, forward, summary)


if __name__ == "__main__":
    main()
