"""Runs `plm-jax pretrain` in a subprocess with one injected fault (tests/test_faults.py).

    python -m tests.fault_driver FAULT OUT.npz key=value ...

FAULT is `none` or `POINT:N`. The process kills itself (SIGKILL) or signals itself
(SIGTERM/SIGINT) at a precise point, so each test hits the window it names:

    kill_step:N        right after dispatching the N-th train step (its computation in flight)
    kill_async_save:N  right after the asynchronous save of step N started
    kill_commit:N      after Orbax committed step N, while its manifest is half written
    kill_retention:N   while retention deletes checkpoint N (half of its files gone)
    kill_eval:N        in the middle of the N-th evaluation batch
    term_step:N        SIGTERM after the N-th train step (int_step:N: SIGINT)
    term_compile:1     SIGTERM just before the train step is compiled
    term_eval:N        SIGTERM during the N-th evaluation batch
    term_save:N        SIGTERM right after the asynchronous save of step N started
    term_twice:N       two SIGTERMs after the N-th train step: exit at once
    pause_step:N       after the N-th train step, write OUT.paused and wait until OUT.go
                       exists (a run caught mid-training, holding its run directory)

After the command returns 0, the parameters of the run's newest checkpoint are written to
OUT.npz (flattened by path); the process exits with the command's exit code.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np


def _kill(sig: int = signal.SIGKILL) -> None:
    os.kill(os.getpid(), sig)


def _counting(fn, n: int, action: tuple):
    """`fn` that runs `action[0]()` on its n-th call, "before" or "after" it (`action[1]`)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n and action[1] == "before":
            action[0]()
        out = fn(*args, **kwargs)
        if calls[0] == n and action[1] == "after":
            action[0]()
        return out

    return wrapped


def _pause(out: str) -> None:
    Path(f"{out}.paused").write_text(str(os.getpid()))
    while not Path(f"{out}.go").exists():
        time.sleep(0.05)


def install(fault: str, out: str) -> None:
    from plm_jax import checkpoint, integrity
    from plm_jax.train import loop

    if fault == "none":
        return
    point, n = fault.split(":")
    n = int(n)
    real_compile = loop.compile_steps
    signals = {
        "kill": lambda: _kill(),
        "term": lambda: _kill(signal.SIGTERM),
        "int": lambda: _kill(signal.SIGINT),
        "pause": lambda: _pause(out),
    }

    def on_steps(action, eval_action=None):
        def compile_steps(tr, batch):
            real_compile(tr, batch)
            if action is not None:
                tr.step_fn = _counting(tr.step_fn, n, action)
            if eval_action is not None:
                tr.eval_fn = _counting(tr.eval_fn, n, eval_action)

        loop.compile_steps = compile_steps

    kind, where = point.split("_", 1)
    if point == "term_twice":
        on_steps((lambda: (_kill(signal.SIGTERM), _kill(signal.SIGTERM)), "after"))
    elif where == "step":
        on_steps((signals[kind], "after"))
    elif where == "eval":
        on_steps(None, (signals[kind], "before"))
    elif point == "term_compile":

        def compile_steps(tr, batch):
            _kill(signal.SIGTERM)
            real_compile(tr, batch)

        loop.compile_steps = compile_steps
    elif where in ("async_save", "save"):
        real_save = checkpoint.Checkpointer.save

        def save(self, step, *args, **kwargs):
            started = real_save(self, step, *args, **kwargs)
            if step == n:
                signals[kind]()
            return started

        checkpoint.Checkpointer.save = save
    elif point == "kill_commit":
        real_write = integrity.write_manifest

        def write_manifest(step_dir, step, metrics):
            if step == n:
                (step_dir / f"{integrity.MANIFEST}.tmp").write_text('{"format": 1, "st')
                _kill()
            real_write(step_dir, step, metrics)

        integrity.write_manifest = write_manifest
    elif point == "kill_retention":
        import shutil

        real_rmtree = shutil.rmtree

        def rmtree(path, *args, **kwargs):
            path = Path(path)
            if path.parent.name == checkpoint.TRASH and path.name.startswith(f"{n}-"):
                files = sorted(p for p in path.rglob("*") if p.is_file())
                for p in files[: len(files) // 2]:
                    p.unlink()
                _kill()
            real_rmtree(path, *args, **kwargs)

        checkpoint.shutil.rmtree = rmtree
    else:
        raise SystemExit(f"unknown fault {fault!r}")


def newest_params(run_dir: Path) -> dict[str, np.ndarray]:
    from plm_jax.checkpoint import Checkpointer, _path_name
    from plm_jax.config import CheckpointConfig

    ck = Checkpointer(run_dir, CheckpointConfig(), read_only=True)
    try:
        step = ck.latest_step()
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), ck.read_metadata(step)
        )
        state, _, _ = ck.restore(step, abstract)
    finally:
        ck.close()
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {_path_name(p): np.asarray(x) for p, x in leaves}


def main() -> int:
    fault, out, *overrides = sys.argv[1:]
    install(fault, out)
    from plm_jax.cli import main as cli_main
    from plm_jax.config import load_config

    logging.root.handlers.clear()  # what install() imported set up; the CLI sets its own
    code = cli_main(["pretrain", *overrides])
    run_dir = load_config(None, overrides).run_dir
    if code == 0 and (run_dir / "checkpoints").is_dir():  # a refused run reads nothing
        np.savez(out, **newest_params(run_dir))
    return code


if __name__ == "__main__":
    sys.exit(main())
