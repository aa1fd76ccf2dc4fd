"""Experiment trackers beside metrics.jsonl: an opt-in Weights & Biases writer.

`run.trackers` picks them (`["tensorboard"]` by default; add `wandb`). `open_metrics_writer`
builds a run's writer: `metrics.MetricsWriter` forwards every record to the trackers of
`open_trackers(cfg)`, under the names the JSONL uses (`train/loss`, `eval/loss`,
`eval/<task>/acc`, `perf/mfu`).

W&B: the run lives in `<run.dir>/wandb/`, its id is kept in `<run.dir>/wandb_id`, so a resumed
run continues the same W&B run (`resume="allow"`), and the resolved config is attached as the
run's config. `WANDB_MODE=offline` (W&B's own setting) writes everything locally for a later
`wandb sync <run.dir>/wandb/offline-run-*`; `WANDB_MODE=disabled` turns it off.
`run.wandb_project` names the project; W&B's other settings come from its environment
variables (`WANDB_ENTITY`, `WANDB_API_KEY`, ...). A resumed run re-logs the steps after its
checkpoint; W&B keeps the values it had for steps at or below its last one, which are the same
numbers (resumed runs recompute those steps exactly).

What it leaves out: TensorBoard (metrics.py writes it), artifacts (checkpoints stay on disk),
and other trackers (MLflow, ...).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from plm_jax.config import Config, config_to_dict
from plm_jax.errors import ConfigError
from plm_jax.metrics import MetricsWriter

__all__ = ["WandbWriter", "check_trackers", "open_metrics_writer", "open_trackers"]

log = logging.getLogger(__name__)

WANDB_ID_FILE = "wandb_id"


WANDB_MISSING = (
    "run.trackers names wandb but wandb is not installed; `pip install wandb` "
    "(or 'plm-jax[track]'), or remove wandb from run.trackers"
)


def check_trackers(cfg: Config) -> None:
    """Raises ConfigError now, before any data or device work, for a tracker whose package is
    missing (the writers themselves open at the end of setup)."""
    if "wandb" in cfg.run.trackers:
        try:
            import wandb  # noqa: F401 - only whether it imports
        except ImportError:
            raise ConfigError(WANDB_MISSING) from None


class WandbWriter:
    """Logs metrics to one W&B run per run directory.

    Args:
      run_dir: the run directory; W&B writes under `run_dir/wandb/`.
      config: the resolved config (nested dict), attached to the W&B run.
      name: the W&B run's display name.
      project: the W&B project.

    Raises:
      ConfigError: wandb is not installed.
    """

    def __init__(self, run_dir: str | Path, config: Mapping[str, Any], *, name: str, project: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError(WANDB_MISSING) from None
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / WANDB_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n", encoding="utf-8")
        self._run = wandb.init(
            project=project,
            name=name,
            id=run_id,
            dir=str(run_dir),
            config=dict(config),
            resume="allow",
            reinit="create_new",  # several plm_jax runs in one process get their own W&B runs
        )
        log.info("W&B run %s in %s", run_id, self._run.dir)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log({k: float(v) for k, v in metrics.items()}, step=int(step))

    def write_text(self, tag: str, text: str, step: int = 0) -> None:
        self._run.summary[tag] = text

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def open_trackers(cfg: Config) -> list[WandbWriter]:
    """The writers `run.trackers` asks for besides TensorBoard (which metrics.py owns).

    Raises:
      ConfigError: a tracker's package is not installed.
    """
    trackers = []
    if "wandb" in cfg.run.trackers:
        trackers.append(
            WandbWriter(
                cfg.run_dir,
                config_to_dict(cfg),
                name=cfg.run.name,
                project=cfg.run.wandb_project,
            )
        )
    return trackers


def open_metrics_writer(cfg: Config, *, enabled: bool) -> MetricsWriter:
    """The run's `MetricsWriter`: metrics.jsonl, plus TensorBoard and W&B as `run.trackers`
    says; `enabled=False` (processes other than 0) writes nothing and opens no tracker.

    Raises:
      ConfigError: a tracker's package is not installed.
    """
    return MetricsWriter(
        cfg.run_dir,
        enabled=enabled,
        use_tensorboard="tensorboard" in cfg.run.trackers,
        trackers=open_trackers(cfg) if enabled else [],
    )
