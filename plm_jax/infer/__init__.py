"""Inference with a trained decoder: scoring text (`score.py`) and generating it (`generate.py`).

Pure library functions over a live `Decoder` and `Tokenizer`; loading a checkpoint into them
is `plm_jax.load`'s job, and the CLI wraps these functions.
"""

from plm_jax.infer.generate import Generation, generate, generate_ids
from plm_jax.infer.score import TextScore, score_texts

__all__ = ["Generation", "TextScore", "generate", "generate_ids", "score_texts"]
