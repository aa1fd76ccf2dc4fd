"""Joining JAX's multi-controller runtime: one Python process per host (or per device group).

    resolve        the `distributed` config section, gaps filled from $PLM_JAX_COORDINATOR,
                   $PLM_JAX_NUM_PROCESSES and $PLM_JAX_PROCESS_ID (set by `plm-jax launch`)
    initialize     `jax.distributed.initialize` with the configured timeouts, before anything
                   touches a device; a coordinator that cannot be reached, a port in use or a
                   process that never shows up becomes one line and exit code 2 instead of a
                   hang or a C++ abort
    primary_first  process 0 runs a block (training the tokenizer, tokenizing the corpus) while
                   the others wait at a barrier, then the others run it (and find its results)

A single-process run (nothing configured, nothing in the environment) never calls
`jax.distributed.initialize`. What this module leaves out: starting the processes
(`launch.py`), splitting batches per process (`data/loader.py`), and who writes what (the loop:
process 0 writes metrics and config; Orbax coordinates checkpoints across processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping

from plm_jax.config import DistributedConfig, validate_distributed
from plm_jax.errors import ConfigError, UserError

log = logging.getLogger(__name__)

COORDINATOR_ENV = "PLM_JAX_COORDINATOR"
NUM_PROCESSES_ENV = "PLM_JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "PLM_JAX_PROCESS_ID"

USER_ERROR_EXIT_CODE = 2  # the CLI's exit code for a UserError
PREEMPTED_EXIT_CODE = 75  # plm_jax.train.preemption's: every process saved and stops together
# JAX aborts the process (LOG(FATAL)) when its own initialization deadline passes; its deadline
# is set this much later than ours, so our watchdog reports the timeout first, in one line.
_JAX_DEADLINE_MARGIN_S = 10
_PROBE_INTERVAL_S = 0.25
_JAX_DETECTION = {"none": "deactivate", "auto": None}  # config value -> cluster_detection_method


class DistributedError(UserError):
    """The processes of a multi-process run could not connect or agree in time."""


def resolve(dist: DistributedConfig, environ: Mapping[str, str] | None = None) -> DistributedConfig:
    """The `distributed` section with unset values taken from the $PLM_JAX_* environment.

    Values in the config win over the environment.

    Raises:
      ConfigError: an environment value that is not a number, or an incomplete or
        inconsistent result.
    """
    environ = os.environ if environ is None else environ
    from_env = {
        COORDINATOR_ENV: not dist.coordinator_address,
        NUM_PROCESSES_ENV: not dist.num_processes,
        PROCESS_ID_ENV: dist.process_id < 0,
    }
    used = [name for name, unset in from_env.items() if unset and environ.get(name, "").strip()]
    process_id = dist.process_id if dist.process_id >= 0 else _env_int(environ, PROCESS_ID_ENV, -1)
    resolved = dataclasses.replace(
        dist,
        coordinator_address=dist.coordinator_address or environ.get(COORDINATOR_ENV, "").strip(),
        num_processes=dist.num_processes or _env_int(environ, NUM_PROCESSES_ENV, 0),
        process_id=process_id,
    )
    source = f" (with ${', $'.join(used)} from the environment)" if used else ""
    validate_distributed(resolved, source)
    if resolved.cluster_detection == "none":  # otherwise JAX detects what is unset
        _check_complete(resolved, source)
    return resolved


def _check_complete(dist: DistributedConfig, source: str) -> None:
    """Without cluster detection: all three settings for several processes, none for one."""
    partial = dist.coordinator_address or dist.process_id >= 0
    if dist.num_processes > 1 and (not dist.coordinator_address or dist.process_id < 0):
        raise ConfigError(
            f"distributed.num_processes={dist.num_processes}{source} needs "
            "distributed.coordinator_address (HOST:PORT of process 0) and "
            f"distributed.process_id (or ${COORDINATOR_ENV} and ${PROCESS_ID_ENV}); "
            "plm-jax launch sets them, or set distributed.cluster_detection=auto"
        )
    if dist.num_processes == 0 and partial:
        raise ConfigError(
            f"distributed.coordinator_address/process_id are set{source} but "
            "distributed.num_processes is not; set distributed.num_processes (or "
            f"${NUM_PROCESSES_ENV}) to the number of processes, or use plm-jax launch"
        )


def is_multiprocess(resolved: DistributedConfig) -> bool:
    """Whether a resolved section asks to join (or detect) a cluster of processes."""
    return resolved.cluster_detection != "none" or resolved.num_processes > 1


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"${name}={text!r} must be an integer") from None


def initialize(dist: DistributedConfig, environ: Mapping[str, str] | None = None) -> bool:
    """Joins the multi-process runtime if the config or the environment asks for it.

    Call it before anything touches a jax device. On CPU, collectives between processes go
    through gloo. Processes other than 0 log warnings and errors only.

    Returns:
      Whether this process joined a cluster of more than one process.

    Raises:
      ConfigError: an inconsistent `distributed` section or environment.
      DistributedError: the coordinator cannot be reached or its port is taken, or JAX found
        no cluster for `distributed.cluster_detection`.
    """
    import jax

    resolved = resolve(dist, environ)
    if not is_multiprocess(resolved):
        return False
    if jax.distributed.is_initialized():  # e.g. a library user initialised it already
        return jax.process_count() > 1
    if resolved.cluster_detection == "none":
        _check_coordinator(resolved)
    # Every process's CPU backend joins the cluster's collectives (the GPU/TPU backends ignore
    # this setting); it must be set before any backend exists.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not _initialize_jax(resolved):
        return False
    if jax.process_index() != 0:
        logging.getLogger("plm_jax").setLevel(logging.WARNING)
    sys.excepthook = _exit_after_traceback
    log.info(
        "process %d of %d joined the coordinator at %s",
        jax.process_index(),
        jax.process_count(),
        resolved.coordinator_address or "(detected)",
    )
    return jax.process_count() > 1


def exit_on_failure(code: int) -> int:
    """Returns `code`, except that a failing process of a multi-process run exits at once.

    A process that fails alone (bad data on one host, a bug) would otherwise sit in JAX's
    shutdown barrier for `distributed.shutdown_timeout` while the others wait for it inside a
    collective. Exiting now lets `plm-jax launch` (or `srun --kill-on-bad-exit`) stop the rest.
    Exit code 0 and `PREEMPTED_EXIT_CODE` runs, where every process stops together, shut down
    normally; so does a single process.
    """
    jax = sys.modules.get("jax")
    if code in (0, PREEMPTED_EXIT_CODE) or jax is None or not jax.distributed.is_initialized():
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _exit_after_traceback(kind: type[BaseException], error: BaseException, tb: object) -> None:
    sys.__excepthook__(kind, error, tb)
    exit_on_failure(1)


def _initialize_jax(dist: DistributedConfig) -> bool:
    """Calls jax.distributed.initialize under a watchdog; False when "auto" found no cluster."""
    import jax

    # "deactivate": JAX must not fill in anything (e.g. device ids from Slurm variables).
    method = _JAX_DETECTION.get(dist.cluster_detection, dist.cluster_detection)
    watchdog = _Watchdog(dist)
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=dist.coordinator_address or None,
            num_processes=dist.num_processes or None,
            process_id=dist.process_id if dist.process_id >= 0 else None,
            cluster_detection_method=method,
            initialization_timeout=dist.initialization_timeout + _JAX_DEADLINE_MARGIN_S,
            heartbeat_timeout_seconds=dist.heartbeat_timeout,
            shutdown_timeout_seconds=dist.shutdown_timeout,
        )
    except ValueError as e:  # a setting that neither the config nor detection provided
        if dist.cluster_detection == "auto" and "should be defined" in str(e):
            log.info("distributed.cluster_detection=auto found no cluster; running one process")
            return False
        raise DistributedError(
            f"distributed.cluster_detection={dist.cluster_detection!r}: {e} JAX found no such "
            "environment; run under that cluster's launcher (e.g. srun for slurm) or set the "
            "distributed.* values yourself"
        ) from None
    except RuntimeError as e:
        raise DistributedError(f"jax.distributed.initialize failed: {_first_line(e)}") from None
    finally:
        watchdog.stop()
    return True


class _Watchdog:
    """Ends the process with one clear line if initialization outlives its timeout.

    JAX's coordination client aborts with a C++ stack trace when its deadline passes (a process
    that never connected, a coordinator that went away); this thread fires first.
    """

    def __init__(self, dist: DistributedConfig):
        self.dist = dist
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="plm-jax-init-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._done.set()

    def _run(self) -> None:
        if self._done.wait(self.dist.initialization_timeout):
            return
        d = self.dist
        who = f"process {d.process_id}" if d.process_id >= 0 else "this process"
        count = f"all {d.num_processes} processes" if d.num_processes else "all processes"
        message = (
            f"plm-jax: error: {who} waited distributed.initialization_timeout="
            f"{d.initialization_timeout} s for {count} to connect to the coordinator at "
            f"{d.coordinator_address or '(detected)'}; start every process with the same "
            "coordinator and num_processes, check that they can reach each other, or raise "
            "distributed.initialization_timeout\n"
        )
        sys.stderr.write(message)
        sys.stderr.flush()
        os._exit(USER_ERROR_EXIT_CODE)


def _check_coordinator(dist: DistributedConfig) -> None:
    """Process 0: the coordinator port is free. Others: it accepts connections in time.

    Both failures would otherwise end in a segfault (port taken) or a C++ abort (unreachable).
    """
    host, _, port_text = dist.coordinator_address.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    if dist.process_id == 0:
        _check_port_free(dist.coordinator_address, port)
    else:
        _wait_for_coordinator(dist, host, port)


def _check_port_free(address: str, port: int) -> None:
    bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", "")  # JAX's own override
    if bind:
        return
    family, any_host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((any_host, port))
    except OSError as e:
        raise DistributedError(
            f"distributed.coordinator_address={address!r}: process 0 cannot serve the "
            f"coordinator on port {port} ({e.strerror}); pick a free port (plm-jax launch "
            "picks one when --port is not given)"
        ) from None


def _wait_for_coordinator(dist: DistributedConfig, host: str, port: int) -> None:
    deadline = time.monotonic() + dist.initialization_timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(min(remaining, 2.0), 0.1)):
                return
        except socket.gaierror as e:
            raise DistributedError(
                f"distributed.coordinator_address={dist.coordinator_address!r}: cannot resolve "
                f"host {host!r} ({e.strerror}); give process 0's host name or IP address"
            ) from None
        except OSError as e:
            if remaining <= _PROBE_INTERVAL_S:
                raise DistributedError(
                    f"process {dist.process_id} cannot reach the coordinator at "
                    f"{dist.coordinator_address} (process 0) within distributed."
                    f"initialization_timeout={dist.initialization_timeout} s "
                    f"({e.strerror or e}); check that process 0 is running on that host and "
                    "port, or raise distributed.initialization_timeout"
                ) from None
        time.sleep(_PROBE_INTERVAL_S)


def _first_line(error: BaseException) -> str:
    """The first sentence of an error from JAX's C++ runtime (which adds paragraphs of advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(error).__name__


# ---------------------------------------------------------------------------------------------
# Ordering work across processes.

_barrier_ids = itertools.count()


@contextlib.contextmanager
def primary_first(what: str, timeout: int) -> Iterator[None]:
    """Runs the block on process 0 first, and on the other processes once it has finished.

    For work whose result lands on a shared filesystem (a trained tokenizer, a tokenized
    corpus): process 0 does it, the others then find it done. Every process must enter the
    block (the barrier counts them), whatever it decides inside. Process 0 reaches the barrier
    even when its block raises, so the others go on and meet the same error themselves.
    In a single process, it only runs the block.

    Args:
      what: the work, for error messages ("training the tokenizer").
      timeout: seconds the other processes wait for process 0.

    Raises:
      DistributedError: process 0 did not finish within `timeout`.
    """
    jax = sys.modules.get("jax")  # not imported yet: no cluster, and data tools stay jax-free
    if jax is None or not jax.distributed.is_initialized() or jax.process_count() == 1:
        yield
        return
    barrier = f"plm_jax/primary_first/{next(_barrier_ids)}"
    if jax.process_index() != 0:
        _wait_at_barrier(barrier, timeout, what)
        yield
        return
    try:
        yield
    finally:
        _wait_at_barrier(barrier, timeout, what)


def _wait_at_barrier(barrier: str, timeout: int, what: str) -> None:
    import jax
    from jax._src import distributed as jax_distributed  # the client JAX's own barriers use

    try:
        jax_distributed.global_state.client.wait_at_barrier(barrier, timeout * 1000)
    except Exception as e:  # XlaRuntimeError: DEADLINE_EXCEEDED, or a process that died
        index = jax.process_index()
        waited = "process 0 to finish" if index else "the other processes after"
        raise DistributedError(
            f"process {index} waited distributed.prepare_timeout={timeout} s for {waited} "
            f"{what} ({_first_line(e)}); check the logs of the other processes, or raise "
            "distributed.prepare_timeout"
        ) from None
