"""lm-evaluation-harness bridge: a plm_jax decoder as the harness's model `plm_jax`.

`PlmJaxLM` implements the harness's model interface (`lm_eval.api.model.TemplateLM`):
`loglikelihood` (multiple-choice tasks such as HellaSwag, ARC, PIQA, MMLU),
`loglikelihood_rolling` (perplexity tasks such as WikiText) and `generate_until` (generative
tasks), batched with length bucketing (`plm_jax.evals.scoring`, `plm_jax.infer.generate_ids`).
`run_lm_eval` is `plm-jax lm-eval`: harness tasks by name, or local YAML tasks from
`include_path` (tasks found there alone do not index the harness's ~15k built-in ones), with
the harness's own results dictionary as the answer.

Text becomes tokens as in the harness's `hf` model, so the numbers compare with published
ones: `context + continuation` is tokenized whole and split where the context's tokens end
(trailing spaces of the context move to the continuation); an empty context is the bos token
(eos when there is none). A text starts with bos when the tokenizer's own post-processor puts
one there (LLaMA), not for GPT-2's; a plm_jax SentencePiece tokenizer always does, as its
training documents start with bos. `add_bos_token` overrides this either way.

What it leaves out: encoders (no causal LM to ask) and encoder-decoders (refused: the harness's
seq2seq scoring is not wired to `plm_jax.infer.seq2seq`), chat templates, multi-process
evaluation (one process, one device) and the harness's `!function` task code, which the harness
itself imports from the task directory: include only task directories you trust.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plm_jax.errors import ConfigError, DataError

try:
    import lm_eval.models  # noqa: F401 - fills the registry's lazy table before we add to it
    from lm_eval import evaluator, utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager, get_task_dict
except ImportError:  # the optional `eval` extra
    raise ConfigError(
        "lm-eval is not installed; `pip install 'plm-jax[eval]'` (lm-eval==0.4.13) to use "
        "plm-jax lm-eval or harness tasks in train.evals"
    ) from None

import plm_jax
from plm_jax.api import LoadedModel
from plm_jax.evals.scoring import (
    TokenRequest,
    compiled_forward,
    loglikelihoods,
    starts_with_bos,
)
from plm_jax.infer.generate import generate_ids
from plm_jax.models import Decoder

__all__ = ["PlmJaxLM", "get_task_dict", "make_task_manager", "results_table", "run_lm_eval"]

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generative tasks


@register_model("plm_jax")
class PlmJaxLM(TemplateLM):
    """A plm_jax decoder checkpoint as an lm-evaluation-harness model.

    Args:
      pretrained: a run directory, a `runs/NAME/checkpoints/STEP` directory, or a loaded model.
      batch_size: rows per forward pass (and prompts per generation call).
      max_gen_toks: new tokens for generative tasks that name no `max_gen_toks`.
      add_bos_token: start every text with bos (True), never (False), or as the tokenizer
        frames a text (None; see `starts_with_bos`).

    Raises:
      ConfigError: the checkpoint is not a decoder, or `batch_size < 1`.
      DataError: the checkpoint cannot be loaded.
    """

    def __init__(
        self,
        pretrained: str | Path | LoadedModel,
        batch_size: int | str = 8,
        max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | str | None = None,
        **_: Any,  # the harness passes device= and friends to every model; jax places arrays
    ):
        super().__init__()
        lm = pretrained if isinstance(pretrained, LoadedModel) else plm_jax.load(pretrained)
        if not isinstance(lm.model, Decoder):
            raise ConfigError(
                f"lm-eval needs a decoder (causal LM); {lm.path} holds a "
                f"model.family={lm.config.model.family!r} model. Encoders have no text "
                "likelihood and encoder-decoders are not supported by plm-jax lm-eval yet"
            )
        self.lm = lm
        self.tokenizer_ = lm.tokenizer
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1 (--batch-size)")
        self._max_gen_toks = int(max_gen_toks)
        if isinstance(add_bos_token, str):  # from a model_args string
            add_bos_token = add_bos_token.lower() in ("1", "true", "yes")
        self.add_bos = starts_with_bos(lm.tokenizer) if add_bos_token is None else add_bos_token
        self._forward = compiled_forward(lm.model)

    @property
    def tokenizer_name(self) -> str:  # fingerprints the harness's request cache
        return str(self.tokenizer_.path)

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer_.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer_.bos_id

    @property
    def max_length(self) -> int:
        return self.lm.model.cfg.max_seq_len

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        use_bos = self.add_bos if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer_.encode(string)
        return [self.tokenizer_.bos_id, *ids] if use_bos else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer_.decode(list(ids))

    def _score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]):
        requests = [TokenRequest(context, continuation) for context, continuation in pairs]
        return loglikelihoods(
            self._forward, requests, max_seq_len=self.max_length, batch_size=self.batch_size
        )

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_: Any):
        results = self._score([(context, continuation) for _, context, continuation in requests])
        for (key, _, _), result in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood over disjoint windows of `max_length` tokens (the first
        predicted from the bos token), as the harness's `hf` model computes it."""
        windows, owners = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            rolling = utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for window in map(utils.make_disjoint_window, rolling):
                windows.append(window)
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._score(windows), strict=True):
            totals[owner] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with `do_sample`/`temperature`) continuations, cut at the
        first stop string of each request's `until`."""
        outputs: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for indices in groups.values():
            settings = _generation_settings(
                requests[indices[0]].args[1],
                self._max_gen_toks,
                self.tok_decode([self.eot_token_id]),
            )
            new_tokens, until = settings.pop("max_new_tokens"), settings.pop("until")
            room = self.max_length - new_tokens
            if room < 1:
                raise DataError(
                    f"the task asks for {new_tokens} new tokens but the model's max_seq_len is "
                    f"{self.max_length}; lower max_gen_toks (--max-gen-toks)"
                )
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [
                    self.tok_encode(requests[i].args[0])[-room:] or [self.prefix_token_id]
                    for i in chunk
                ]
                padded = prompts + [prompts[0]] * (self.batch_size - len(prompts))  # fixed shape
                new_ids = generate_ids(
                    self.lm.model,
                    padded,
                    max_new_tokens=new_tokens,
                    eos_id=self.eot_token_id,
                    vocab_size=self.tokenizer_.vocab_size,
                    **settings,
                )
                for i, ids in zip(chunk, new_ids, strict=False):
                    text = self.tok_decode([t for t in ids if t != self.eot_token_id])
                    for stop in until:
                        text = text.split(stop)[0] if stop else text
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return [o or "" for o in outputs]


def _generation_settings(kwargs: dict[str, Any], max_gen_toks: int, eot: str) -> dict[str, Any]:
    """The harness's generation kwargs as `generate_ids` arguments (+ max_new_tokens, until)."""
    kwargs = dict(kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    if eot and eot not in until:
        until.append(eot)
    settings: dict[str, Any] = {
        "max_new_tokens": int(kwargs.pop("max_gen_toks", max_gen_toks)),
        "until": until,
    }
    do_sample = bool(kwargs.pop("do_sample", False))
    temperature = float(kwargs.pop("temperature", 1.0 if do_sample else 0.0))
    settings["temperature"] = temperature if do_sample or temperature > 0 else 0.0
    for key in ("top_k", "top_p", "seed"):
        if key in kwargs:
            settings[key] = type({"top_k": 0, "top_p": 1.0, "seed": 0}[key])(kwargs.pop(key))
    if kwargs:
        log.warning(
            "generation settings %s are not supported by plm_jax and are ignored", sorted(kwargs)
        )
    return settings


def make_task_manager(tasks: Sequence[str], include_path: str | Path | None) -> TaskManager:
    """A TaskManager that knows every name in `tasks`, indexing the built-in tasks only when
    `include_path` lacks one (indexing them takes seconds).

    Raises:
      DataError: `include_path` does not exist.
      ConfigError: a task name neither the include path nor the harness knows.
    """
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise DataError(
                f"--include-path {str(include_path)!r} is not a directory; give the folder that "
                "holds your task YAML files"
            )
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([t]) for t in tasks):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        where = f" nor in {include_path}" if include_path else ""
        raise ConfigError(
            f"unknown lm-eval task(s) {unknown}: not among the harness's tasks{where}{hint} "
            "(`lm-eval ls tasks` lists them; --include-path DIR adds local YAML tasks)"
        )
    return manager


def run_lm_eval(
    checkpoint: str | Path,
    tasks: Sequence[str],
    *,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    output: str | Path | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = 100_000,
) -> dict[str, Any]:
    """`plm-jax lm-eval`: evaluates a checkpoint on harness tasks; returns the harness's results.

    Args:
      checkpoint: a run directory or a checkpoint directory.
      tasks: task (or group) names.
      include_path: a directory of local YAML tasks.
      num_fewshot: few-shot examples per prompt (None: each task's default).
      limit: examples per task (a fraction when below 1); None: all.
      batch_size: rows per forward pass.
      output: where to write the results JSON (the harness's dictionary).
      log_samples: also keep every request and response (`samples`) in the results.
      bootstrap_iters: resamples for the standard errors of metrics without a closed form
        (the harness's default); 0 skips them (stderr "N/A"), the metrics are unchanged.

    Raises:
      ConfigError: no tasks, an unknown task, a bad number, or a checkpoint that is not a decoder.
      DataError: a missing checkpoint or include path.
    """
    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ConfigError("--tasks is empty; name one or more tasks, e.g. --tasks hellaswag,piqa")
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"--num-fewshot={num_fewshot} must be >= 0")
    if limit is not None and not limit > 0:
        raise ConfigError(f"--limit={limit} must be positive (a count, or a fraction below 1)")
    model = PlmJaxLM(checkpoint, batch_size=batch_size)  # a bad checkpoint fails before tasks load
    manager = make_task_manager(tasks, include_path)
    start = time.perf_counter()
    results = evaluator.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
    )
    log.info("lm-eval: %s in %.1f s", ", ".join(tasks), time.perf_counter() - start)
    if output is not None:
        path = Path(output)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(results, indent=2, default=utils.handle_non_serializable)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text + os.linesep, encoding="utf-8")
        tmp.replace(path)
    return results


def results_table(results: dict[str, Any]) -> str:
    """The harness's markdown table of a results dictionary (what `lm_eval` prints)."""
    return utils.make_table(results)
