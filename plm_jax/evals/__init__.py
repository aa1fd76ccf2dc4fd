"""Downstream evaluation: lm-evaluation-harness tasks for plm_jax decoders.

- `scoring`: log P(continuation | context) of token requests, batched with length buckets, and
  the harness's rules for turning text pairs into them.
- `harness`: the harness model `plm_jax` and `run_lm_eval` (`plm-jax lm-eval`); imports
  lm-eval, so import it only when it is wanted (the `eval` extra).
- `downstream`: multiple-choice accuracy during pretraining (`train.evals`).

What it leaves out: loading checkpoints (`plm_jax.load`) and the held-out loss (`train/loop.py`).
"""
