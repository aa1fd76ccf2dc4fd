"""Orbax checkpoints of a run: train state, data iterator state and resolved config.

`<run dir>/checkpoints/<step>/` holds three items plus a checksum manifest:

    state   the `TrainState` (params, optimizer state, step, RNG key, loss window), saved as
            sharded arrays
    data    the data iterator state (JSON, e.g. {"next_index": 1234})
    config  the resolved config (JSON)
    plm_jax_manifest.json   size and CRC-32 of every file above (`plm_jax.integrity`)

Saves are asynchronous (`checkpoint.use_async`): the step returns while Orbax writes in the
background. A checkpoint counts once Orbax has committed it (renamed its temporary directory)
and its manifest is written; both happen before the next save starts or in `wait()`, and only
then does retention delete older checkpoints (by renaming them into `checkpoints/.trash/`
first, so an interrupted deletion never leaves a half-deleted step behind). A failed write
(e.g. a full disk) raises `CheckpointError`; the older checkpoints are untouched.

Restoring verifies the manifest (`checkpoint.verify`) and takes the abstract state with the
*current* shardings, so a checkpoint written on one mesh loads directly into another.
`restore_latest` falls back past corrupt checkpoints to the newest valid one, moving the
corrupt ones to `checkpoints/.corrupt/` (kept for inspection, never deleted).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from plm_jax import integrity
from plm_jax.config import CheckpointConfig
from plm_jax.errors import DataError, UserError

log = logging.getLogger(__name__)

TRASH = ".trash"  # retention renames doomed checkpoints here before deleting them
CORRUPT = ".corrupt"  # restore_latest moves corrupt checkpoints here


class CheckpointError(UserError):
    """A checkpoint could not be written (disk full, permissions); older ones are intact."""


class CorruptCheckpoint(DataError):
    """A checkpoint's files are missing, truncated or changed since they were written."""


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
        """Retention keeps the newest `cfg.keep` checkpoints and, with `cfg.keep_best`, the
        one with the best `best_metric` among those saved with metrics (lowest, or highest
        when `higher_is_better`, e.g. a fine-tuning accuracy)."""
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.cfg, self.read_only = cfg, read_only
        self.best_metric, self.higher_is_better = best_metric, higher_is_better
        self.is_primary = jax.process_index() == 0
        self._pending: tuple[int, dict[str, float] | None] | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # retention is ours: only after the new checkpoint is committed
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=cfg.use_async and not read_only,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # interrupted saves of an earlier process
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
        if not read_only and self.is_primary:
            shutil.rmtree(self.directory / TRASH, ignore_errors=True)  # an interrupted deletion

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

        The previous save is committed first (see `wait`). `metrics` (e.g.
        {"eval/loss": ...}) rank checkpoints for `checkpoint.keep_best`.

        Raises:
          CheckpointError: this or the previous save could not be written.
        """
        self._commit_pending()
        if step in self.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            config=ocp.args.JsonSave(config),
        )
        try:
            started = self._manager.save(step, args=args, metrics=metrics, force=force)
        except (OSError, ValueError) as e:
            raise self._write_error(step, e) from e
        if started:
            self._pending = (step, metrics)
            if not self.cfg.use_async:
                self._commit_pending()
        return started

    def wait(self) -> None:
        """Blocks until the last save is committed, its manifest written and old checkpoints
        deleted by retention.

        Raises:
          CheckpointError: the save failed; the checkpoints before it are intact.
        """
        self._commit_pending()

    def poll(self) -> None:
        """Commits the last save if its background write has finished (does not block), so a
        checkpoint gets its manifest soon after Orbax commits it, not at the next save."""
        if self._pending is not None and not self._manager.is_saving_in_progress():
            self._commit_pending()

    def _commit_pending(self) -> None:
        if self._pending is None:
            return
        step, metrics = self._pending
        self._pending = None
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # Orbax re-raises whatever its writer threads hit
            raise self._write_error(step, e) from e
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():  # Orbax logs some finalisation errors instead of raising
            raise self._write_error(step, RuntimeError("the checkpoint was never committed"))
        if self.is_primary:
            try:
                integrity.write_manifest(step_dir, step, metrics)
            except OSError as e:
                raise self._write_error(step, e) from e
            self._apply_retention(newest=step)

    def _write_error(self, step: int, error: BaseException) -> CheckpointError:
        older = [s for s in self._committed_steps() if s < step]
        keep = f"checkpoint {older[-1]} is intact" if older else "no older checkpoint exists"
        return CheckpointError(
            f"could not write checkpoint {step} to {self.directory} "
            f"({type(error).__name__}: {_brief(error)}); {keep}: free disk space or fix "
            "the directory, then rerun the same command to resume"
        )

    def _committed_steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(
            int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir()
        )

    def _apply_retention(self, newest: int) -> None:
        """Deletes checkpoints older than `newest` beyond `keep` (and the best one)."""
        steps = [s for s in self._committed_steps() if s <= newest]
        keep = set(steps[-self.cfg.keep :])
        if self.cfg.keep_best:
            ranked = []
            for s in steps:
                manifest = integrity.read_manifest(self.directory / str(s)) or {}
                value = manifest.get("metrics", {}).get(self.best_metric)
                if value is not None:
                    ranked.append((-value if self.higher_is_better else value, s))
            if ranked:
                keep.add(min(ranked)[1])
        doomed = [s for s in steps if s not in keep]
        for s in doomed:
            trash = self.directory / TRASH / f"{s}-{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(exist_ok=True)
            (self.directory / str(s)).rename(trash)  # atomic: the step is gone or intact
            shutil.rmtree(trash)
        if doomed:
            self._manager.reload()

    def check(self, step: int) -> integrity.Status:
        """The integrity state of one committed checkpoint (see `plm_jax.integrity`)."""
        return integrity.check(self.directory / str(step), step)

    def restore(
        self, step: int, abstract_state: Any, *, verify: bool | None = None
    ) -> tuple[Any, dict, dict]:
        """Restores `step` into the shardings of `abstract_state` (ShapeDtypeStructs).

        Raises:
          CorruptCheckpoint: the files fail verification or cannot be read.
          DataError: the checkpoint's arrays do not fit `abstract_state` (another architecture).
        """
        verified = self._verify(step, verify)
        with self._reading(step, verified):
            metadata = self._manager.item_metadata(step)["state"]
        _check_shapes(metadata, abstract_state, self.directory / str(step))
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        with self._reading(step, verified):
            restored = self._manager.restore(step, args=args)
        return restored["state"], restored["data"], restored["config"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
        """(step, state, data, config) of the newest checkpoint that verifies and restores,
        or None when the run has no checkpoint yet.

        Corrupt checkpoints (newest first) are logged with the reason and moved to
        `checkpoints/.corrupt/`; the run then continues from the newest valid one.

        Raises:
          DataError: every checkpoint is corrupt (they were moved aside; the message says
            where), or the newest valid one belongs to another architecture.
        """
        steps = sorted(self.all_steps(), reverse=True)
        moved = []
        for step in steps:
            try:
                return (step, *self.restore(step, abstract_state))
            except CorruptCheckpoint as e:
                log.warning("skipping checkpoint %d: %s", step, e)
                moved.append(self._quarantine(step))
        if moved:
            raise DataError(
                f"every checkpoint in {self.directory} is corrupt (moved to "
                f"{self.directory / CORRUPT}); rerun to start from scratch, or restore a backup"
            )
        return None

    def _quarantine(self, step: int) -> str:
        """Moves a corrupt checkpoint out of Orbax's view, keeping its files."""
        source = self.directory / str(step)
        target = self.directory / CORRUPT / f"{step}-{uuid.uuid4().hex[:8]}"
        if self.is_primary and not self.read_only and source.exists():
            target.parent.mkdir(exist_ok=True)
            source.rename(target)
            log.warning("moved corrupt checkpoint %s to %s", source, target)
        _sync(f"plm_jax_quarantine_{step}")
        self._manager.reload()
        return str(target)

    def _verify(self, step: int, verify: bool | None) -> bool:
        """Raises CorruptCheckpoint when `step` fails its manifest; returns whether it was
        verified ok (False: verification off, or no manifest)."""
        if not (self.cfg.verify if verify is None else verify):
            return False
        status = self.check(step)
        if status.state == "corrupt":
            raise CorruptCheckpoint(
                f"checkpoint {status.path} is corrupt ({status.detail}); an older checkpoint "
                "or a backup is needed"
            )
        return status.state == "ok"

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restores only the parameters of `step` (no optimizer state is read).

        Raises:
          DataError: the checkpoint's parameters do not fit `abstract_params`, or it is corrupt.
        """
        verified = self._verify(step, None)
        target = {"params": abstract_params}
        with self._reading(step, verified):
            metadata = self._manager.item_metadata(step)["state"]
        _check_shapes(metadata, target, self.directory / str(step))
        args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        with self._reading(step, verified), ocp.PyTreeCheckpointer() as reader:
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
    def _reading(self, step: int, verified: bool = False) -> Iterator[None]:
        """Turns Orbax's read errors into one clear line: CorruptCheckpoint, unless the files
        were just verified against their manifest (then the files are fine and the error is
        something else, e.g. a sharding the arrays cannot take: DataError, nothing moved)."""
        try:
            yield
        except (KeyError, ValueError, OSError, TypeError) as e:
            where, why = self.directory / str(step), f"{type(e).__name__}: {_brief(e)}"
            if verified:
                raise DataError(
                    f"could not read checkpoint {where} although its files match their "
                    f"checksums ({why}); the checkpoint is intact, check the model config, "
                    "mesh and library versions"
                ) from e
            raise CorruptCheckpoint(
                f"checkpoint {where} is incomplete or corrupt ({why}); training falls back "
                "to an older checkpoint"
            ) from e

    def close(self) -> None:
        """Commits the last save (see `wait`) and releases Orbax's threads."""
        try:
            self._commit_pending()
        finally:
            self._manager.close()


def _brief(error: BaseException, limit: int = 240) -> str:
    """An exception's message on one line, keeping its end (where the OS error is)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else "..." + text[-limit:]


def _sync(name: str) -> None:
    """A barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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
