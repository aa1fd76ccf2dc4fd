"""See inside a model: attention maps, the logit lens, token attributions (gradient x input,
integrated gradients) and head/sublayer ablations, for decoders, encoders (and fine-tuned
classifiers on either) and encoder-decoders, with a self-contained HTML report.

Module map: `trace` (an instrumented replay of the model's forward pass), `subject` (the
input and the output that is read), `methods` (the numbers), `figures` (matplotlib PNGs),
`report` (report.html, JSON, NPZ), `run` (`explain_model`, `explain_task`, `explain_path`).
matplotlib is needed only for the report (the `explain` extra).
"""

from plm_jax.explain.run import (
    METHODS,
    Explanation,
    explain_model,
    explain_path,
    explain_task,
    parse_methods,
)

__all__ = [
    "METHODS",
    "Explanation",
    "explain_model",
    "explain_path",
    "explain_task",
    "parse_methods",
]
