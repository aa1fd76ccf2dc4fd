"""`plm-jax launch`: one plm-jax command as N local processes that form one JAX cluster.

    plm-jax launch --num-processes 2 --devices-per-process 4 -- pretrain CONFIG.yaml key=value

Each child runs `python -m plm_jax.cli COMMAND ...` with $PLM_JAX_COORDINATOR (127.0.0.1 and a
free port), $PLM_JAX_NUM_PROCESSES and $PLM_JAX_PROCESS_ID set, which `plm_jax.distributed`
reads. Their output comes back line by line, prefixed with `[i] `. SIGTERM and SIGINT are
forwarded to every child (a training run then saves a checkpoint and exits with code 75);
the children run in their own process groups, so a Ctrl-C in the terminal reaches them once,
through the launcher. When a child fails, the others get a short grace period and are then
killed, so nothing hangs. The exit code is 0 if every child succeeded, else the first failing
child's code.

This is for tests and small single-host clusters. On Slurm or TPU VMs the cluster's own
launcher starts the processes instead (docs/multihost.md). The module does not import jax.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO

from plm_jax.errors import ConfigError

LAUNCHABLE = ("pretrain", "finetune", "eval")
PREEMPTED_EXIT_CODE = 75  # plm_jax.train.preemption.PREEMPTED_EXIT_CODE (a test checks they agree)
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_POLL_S = 0.05
_DEVICE_COUNT_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S*")


@dataclass
class _Child:
    """One launched process and the threads that copy its output."""

    index: int
    process: subprocess.Popen
    readers: list[threading.Thread] = field(default_factory=list)

    @property
    def exit_code(self) -> int | None:
        """The exit code, 128 + N for a process killed by signal N, None while running."""
        code = self.process.poll()
        return None if code is None else (128 - code if code < 0 else code)


def launch(
    command: Sequence[str],
    *,
    num_processes: int,
    devices_per_process: int | None = None,
    port: int | None = None,
    grace_period: float = 10.0,
    debug: bool = False,
    program: Sequence[str] | None = None,
) -> int:
    """Runs `plm-jax COMMAND...` as `num_processes` local processes and waits for them.

    Args:
      command: the plm-jax command and its arguments, e.g. ["pretrain", "cfg.yaml", "a=1"].
      num_processes: how many processes (N >= 1).
      devices_per_process: K devices per process: on CPU, K fake devices (XLA_FLAGS); on a
        GPU host, process i sees devices i*K ... i*K+K-1 ($JAX_LOCAL_DEVICE_IDS).
        None leaves both alone.
      port: the coordinator's port; None picks a free one.
      grace_period: seconds the other processes get after one fails, before they are killed.
      debug: pass --debug to the children.
      program: the command line that runs plm-jax (tests substitute a script).

    Returns:
      0 if every process succeeded, else the exit code of the first one that failed.

    Raises:
      ConfigError: a count, port or command that cannot be launched.
    """
    command = list(command)
    _check_args(command, num_processes, devices_per_process, port, grace_period)
    port = port or free_port()
    argv = [*(program or (sys.executable, "-m", "plm_jax.cli")), *(["--debug"] if debug else [])]
    _note(f"{num_processes} processes of plm-jax {command[0]}, coordinator 127.0.0.1:{port}")
    children: list[_Child] = []
    with _forward_signals(children):  # before the first child, so no signal is lost
        for i in range(num_processes):
            env = child_env(os.environ, i, num_processes, port, devices_per_process)
            children.append(_start(i, [*argv, *command], env))
        for child in children:  # readers start after every fork (see _die_with_parent)
            _copy_output(child)
        code = _wait(children, grace_period)
    for child in children:
        for reader in child.readers:
            reader.join(timeout=5)
    return code


def _check_args(
    command: list[str],
    num_processes: int,
    devices_per_process: int | None,
    port: int | None,
    grace_period: float,
) -> None:
    if num_processes < 1:
        raise ConfigError(f"--num-processes={num_processes} must be at least 1")
    if devices_per_process is not None and devices_per_process < 1:
        raise ConfigError(f"--devices-per-process={devices_per_process} must be at least 1")
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"--port={port} must be in [1, 65535]; omit it to pick a free port")
    if grace_period < 0:
        raise ConfigError(f"--grace-period={grace_period} must be >= 0 seconds")
    if not command:
        raise ConfigError(
            "plm-jax launch needs a command after '--', e.g. "
            "plm-jax launch --num-processes 2 -- pretrain CONFIG.yaml"
        )
    if command[0] not in LAUNCHABLE:
        raise ConfigError(
            f"plm-jax launch runs one of {list(LAUNCHABLE)}, got {command[0]!r}; write the "
            "command after '--', e.g. -- pretrain CONFIG.yaml train.steps=100"
        )


def free_port() -> int:
    """A TCP port that is free on every interface now (the coordinator binds all of them)."""
    family, host = (socket.AF_INET6, "::") if socket.has_ipv6 else (socket.AF_INET, "0.0.0.0")
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(
    base: Mapping[str, str],
    index: int,
    num_processes: int,
    port: int,
    devices_per_process: int | None,
) -> dict[str, str]:
    """The environment of child `index`: `base` plus the $PLM_JAX_* cluster settings."""
    env = dict(base)
    env.update(
        PLM_JAX_COORDINATOR=f"127.0.0.1:{port}",
        PLM_JAX_NUM_PROCESSES=str(num_processes),
        PLM_JAX_PROCESS_ID=str(index),
        PYTHONUNBUFFERED="1",  # lines arrive as they are printed, not when a buffer fills
    )
    if devices_per_process is not None:
        flag = f"--xla_force_host_platform_device_count={devices_per_process}"
        flags = _DEVICE_COUNT_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, flag])
        first = index * devices_per_process
        env["JAX_LOCAL_DEVICE_IDS"] = ",".join(
            str(i) for i in range(first, first + devices_per_process)
        )
    return env


def _start(index: int, argv: list[str], env: dict[str, str]) -> _Child:
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        process_group=0,  # the terminal's Ctrl-C reaches the launcher only, which forwards it
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    return _Child(index, process)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if the launcher dies (even by SIGKILL).

    A training run takes SIGTERM as a preemption: it saves a checkpoint and exits. Code run
    between fork and exec is unsafe once other threads exist, hence readers start afterwards.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


_output_lock = threading.Lock()


def _copy_output(child: _Child) -> None:
    pairs = ((child.process.stdout, sys.stdout), (child.process.stderr, sys.stderr))
    for source, sink in pairs:
        reader = threading.Thread(
            target=_copy_lines, args=(source, sink, f"[{child.index}] "), daemon=True
        )
        reader.start()
        child.readers.append(reader)


def _copy_lines(source: IO[bytes], sink: IO[str], prefix: str) -> None:
    for raw in iter(source.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with _output_lock:
            sink.write(f"{prefix}{line}\n")
            sink.flush()
    source.close()


def _note(message: str) -> None:
    with _output_lock:
        sys.stderr.write(f"plm-jax launch: {message}\n")
        sys.stderr.flush()


@contextlib.contextmanager
def _forward_signals(children: list[_Child]) -> Iterator[None]:
    """While inside, SIGTERM and SIGINT sent to the launcher go to every running child."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Python installs signal handlers in the main thread only
        return

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.process.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(children: list[_Child], grace_period: float) -> int:
    """Waits for every child; after the first failure, kills the rest once `grace_period` ends.

    A child that exits with `PREEMPTED_EXIT_CODE` saved a checkpoint on a signal; the others
    are saving the same checkpoint, so they are not hurried.
    """
    first_failure: _Child | None = None
    kill_at: float | None = None
    running = list(children)
    while running:
        time.sleep(_POLL_S)
        for child in [c for c in running if c.exit_code is not None]:
            running.remove(child)
            code = child.exit_code
            if code == 0 or first_failure is not None:
                continue
            first_failure = child
            if code != PREEMPTED_EXIT_CODE and running:
                kill_at = time.monotonic() + grace_period
                _note(
                    f"process {child.index} exited with code {code}; stopping the other "
                    f"{len(running)} in {grace_period:g} s unless they exit first"
                )
        if kill_at is not None and time.monotonic() >= kill_at and running:
            _note(f"killing processes {[c.index for c in running]}")
            for child in running:
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
            kill_at = None
    return 0 if first_failure is None else first_failure.exit_code
