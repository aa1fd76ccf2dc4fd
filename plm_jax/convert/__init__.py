"""Weight conversion between plm_jax and other formats: Hugging Face GPT-2 and LLaMA (`hf`).

Module map: `hf` (config and parameter mapping, whole models), `hf_files` (config.json and
safetensors I/O), `gpt2` and `llama` (one family each), `rules` (the tensor-rule building
blocks both directions share).
"""

from plm_jax.convert.hf import (
    FAMILIES,
    load_hf_decoder,
    model_config_from_hf,
    params_from_hf,
    params_to_hf,
    save_hf_decoder,
)
from plm_jax.convert.hf_files import read_hf_checkpoint, write_hf_checkpoint

__all__ = [
    "FAMILIES",
    "load_hf_decoder",
    "model_config_from_hf",
    "params_from_hf",
    "params_to_hf",
    "read_hf_checkpoint",
    "save_hf_decoder",
    "write_hf_checkpoint",
]
