"""Orbax checkpoints of a run: train state, data iterator state and resolved config.

`<run dir>/checkpoints/<step>/` holds three items:

    state   the `TrainState` (params, optimizer state, step, RNG key), saved as sharded arrays
    data    the data iterator state (JSON, e.g. {"next_index": 1234})
    config  the resolved config (JSON)

Saves are asynchronous (`checkpoint.use_async`): the step returns while Orbax writes in the
background, and a checkpoint becomes visible only once committed, so `latest_step()` never
names a half-written one. Restoring takes the abstract state with the *current* shardings, so a
checkpoint written on one mesh loads directly into another.

What it leaves out: checksum verification and fallback past corrupt checkpoints (issue #8).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from plm_jax.config import CheckpointConfig
from plm_jax.errors import DataError

log = logging.getLogger(__name__)


class Checkpointer:
    """Saves and restores the checkpoints of one run directory."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: CheckpointConfig,
        *,
        read_only: bool = False,
        best_metric: str = "eval/loss",
        higher_is_better: bool = False,
    ):
        """`keep_best` keeps, besides the newest `keep`, the checkpoint with the best
        `best_metric` among those saved with metrics (lowest, or highest when
        `higher_is_better`, e.g. a fine-tuning accuracy)."""
        self.directory = Path(run_dir).absolute() / "checkpoints"
        policy = None
        if cfg.keep_best and not read_only:  # newest `keep` plus the best by the metric
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [
                    ocp.checkpoint_managers.preservation_policy.LatestN(n=cfg.keep),
                    ocp.checkpoint_managers.preservation_policy.BestN(
                        get_metric_fn=lambda m: m[best_metric],
                        reverse=not higher_is_better,
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            max_to_keep=None if read_only or policy is not None else cfg.keep,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=cfg.use_async and not read_only,
            create=not read_only,
            read_only=read_only,
        )
        if read_only and not self.directory.is_dir():
            raise DataError(f"no checkpoints in {self.directory.parent}; train a model there first")
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_handlers=handlers
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        data_state: dict,
        config: dict,
        *,
        metrics: dict[str, float] | None = None,
        force: bool = False,
    ) -> bool:
        """Starts saving `step` (asynchronously); returns whether a save was started.

        `metrics` (e.g. {"eval/loss": ...}) rank checkpoints for `checkpoint.keep_best`.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        return self._manager.save(step, args=args, metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores `step` into the shardings of `abstract_state` (ShapeDtypeStructs).

        Raises:
          DataError: the checkpoint's arrays do not fit `abstract_state` (another architecture).
        """
        _check_shapes(self.read_metadata(step), abstract_state, self.directory / str(step))
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        with self._reading(step):
            restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"], restored["config"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restores only the parameters of `step` (no optimizer state is read).

        Raises:
          DataError: the checkpoint's parameters do not fit `abstract_params`.
        """
        target = {"params": abstract_params}
        _check_shapes(self.read_metadata(step), target, self.directory / str(step))
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        with self._reading(step), ocp.PyTreeCheckpointer() as reader:
            return reader.restore(self.directory / str(step) / "state", args=args)["params"]

    def restore_config(self, step: int) -> dict:
        with self._reading(step):
            args = ocp.args.Composite(config=ocp.args.JsonRestore())
            return self._manager.restore(step, args=args)["config"]

    def read_metadata(self, step: int) -> Any:
        """The saved state's tree of array metadata (shape, dtype)."""
        with self._reading(step):
            return self._manager.item_metadata(step)["state"]

    @contextlib.contextmanager
    def _reading(self, step: int) -> Iterator[None]:
        """Turns Orbax's errors about missing or unreadable items into one clear DataError."""
        try:
            yield
        except (KeyError, ValueError, OSError) as e:
            raise DataError(
                f"checkpoint {self.directory / str(step)} is incomplete or corrupt "
                f"({type(e).__name__}: {str(e)[:200]}); delete it to resume from an older one"
            ) from e

    def wait(self) -> None:
        """Blocks until background saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def locate_checkpoint(path: str | Path) -> tuple[Path, int | None]:
    """(run directory, checkpoint step or None for the newest) of a user-given path.

    Raises:
      DataError: a path that is neither a run directory nor `runs/NAME/checkpoints/STEP`.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{str(path)!r} does not exist; give a run directory or a checkpoint")
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path, None
    raise DataError(
        f"{str(path)!r} is neither a run directory (with checkpoints/) nor a checkpoint "
        "(runs/NAME/checkpoints/STEP)"
    )


def _path_name(path: tuple) -> str:
    """'params.blocks.0.attn.w_q.value' for both Orbax metadata and live pytrees."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return ".".join(parts)


def _shapes(tree: Any) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_path_name(p): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}


def _check_shapes(saved: Any, target: Any, where: Path) -> None:
    """Refuses a checkpoint whose array shapes differ from the model's, naming them."""
    if saved is None:
        raise DataError(f"checkpoint {where} has no state metadata; it is incomplete")
    saved_shapes, target_shapes = _shapes(saved), _shapes(target)
    mismatched = [
        f"{key}: checkpoint {saved_shapes.get(key, 'missing')} vs model {shape}"
        for key, shape in target_shapes.items()
        if key.startswith("params.") and saved_shapes.get(key) != shape
    ]
    extra = sorted(k for k in saved_shapes if k.startswith("params.") and k not in target_shapes)
    mismatched += [f"{key}: in checkpoint, not in model" for key in extra]
    if mismatched:
        more = f"; ... {len(mismatched) - 4} more" if len(mismatched) > 4 else ""
        raise DataError(
            f"checkpoint {where} does not fit this model ({len(mismatched)} parameters differ: "
            f"{'; '.join(mismatched[:4])}{more}); use the config the checkpoint was trained "
            "with, or a new run.dir"
        )
