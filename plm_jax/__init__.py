"""plm_jax: pretrain and fine-tune Transformer language models in JAX.

The package map is in docs/architecture.md. Importing this package does not import jax, so the
CLI starts fast and `--help` works everywhere.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`plm_jax.load` imports jax on first use only."""
    if name in ("load", "LoadedModel"):
        from plm_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'plm_jax' has no attribute {name!r}")
