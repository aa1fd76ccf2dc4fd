"""Weight conversion between plm_jax and Hugging Face GPT-2, LLaMA, BERT and T5 (`hf`).

Module map: `hf` (config and parameter mapping, whole models), `hf_files` (config.json and
safetensors I/O), `gpt2`, `llama`, `bert` and `t5` (one family each), `rules` (the tensor-rule
building blocks both directions share), `run` (whole run directories, for `plm-jax convert`).
"""

from plm_jax.convert.hf import (
    FAMILIES,
    load_hf_decoder,
    load_hf_model,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
    save_hf_decoder,
    save_hf_model,
)
from plm_jax.convert.hf_files import read_hf_checkpoint, write_hf_checkpoint

__all__ = [
    "FAMILIES",
    "load_hf_decoder",
    "load_hf_model",
    "model_config_from_hf",
    "params_from_hf",
    "params_to_hf",
    "read_hf_checkpoint",
    "save_hf_decoder",
    "save_hf_model",
    "write_hf_checkpoint",
]
