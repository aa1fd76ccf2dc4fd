"""Preemption: SIGTERM/SIGINT end a training run with a committed checkpoint.

The first SIGTERM or SIGINT only sets a flag. The training loop checks it after every step
(in a multi-process run: at every `train.log_every` boundary, where all processes agree on
it through one all-gather, so they stop at the same step), saves a checkpoint of the current
step, waits until it is committed and raises `Preempted`; the CLI exits with
`PREEMPTED_EXIT_CODE`. Rerunning the same command resumes exactly.

A second signal exits at once (code 128 + signal number) without touching the disk again:
an asynchronous save still in flight is left uncommitted, so the previous checkpoint stays
the newest valid one.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; the rerun resumes
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Training stopped on a signal after committing the checkpoint of `step`."""

    def __init__(self, step: int, signame: str):
        super().__init__(
            f"stopped by {signame} at step {step} with a committed checkpoint; rerun the same "
            "command to resume"
        )
        self.step, self.signame = step, signame


class SignalGuard:
    """Context manager that turns the first SIGTERM/SIGINT into a request to stop.

    Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.signame: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signame is not None:
            os.write(2, f"plm-jax: second {name}: exiting now\n".encode())
            os._exit(128 + signum)
        self.signame = name
        log.warning(
            "%s received: saving a checkpoint after this step, then exiting "
            "(send it again to exit at once)",
            name,
        )

    @property
    def local(self) -> bool:
        """Whether this process has received a signal (no communication)."""
        return self.signame is not None

    def should_stop(self, at_sync_point: bool) -> bool:
        """Whether to stop now. A single process stops as soon as it has a signal; processes
        of a multi-process run agree only at sync points (all must pass the same ones)."""
        import jax  # not at import time: the CLI imports this module before jax is needed
        import numpy as np
        from jax.experimental import multihost_utils

        if jax.process_count() == 1:
            return self.local
        if not at_sync_point:
            return False

        flags = multihost_utils.process_allgather(np.int32(self.local))
        if np.any(flags) and self.signame is None:
            self.signame = "SIGTERM (on another process)"
        return bool(np.any(flags))
