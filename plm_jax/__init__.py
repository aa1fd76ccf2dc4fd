"""plm_jax: pretrain and fine-tune Transformer language models in JAX.

The package map is in docs/architecture.md. Importing this package does not import jax, so the
CLI starts fast and `--help` works everywhere.
"""

__version__ = "0.1.0"
