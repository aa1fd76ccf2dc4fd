"""Peer implementations of the plm_jax benchmarks (same model, same shapes, other frameworks).

`torch_gpt`: the GPT-2 style training step in PyTorch (a nanoGPT-style module, optionally
`torch.compile`d, or Hugging Face `GPT2LMHeadModel`). `torch_bert`: BERT-style MLM (a plain
module or `BertForMaskedLM`). `torch_llama`: LLaMA-style decoders (a plain module or
`LlamaForCausalLM`). `common`: their shared flags, optimizer, timed loop and record.
`benchmarks.compare` runs them alternately with `benchmarks.train_throughput`.
"""
