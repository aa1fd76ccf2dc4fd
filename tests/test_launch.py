"""Multi-process runs: the `distributed` config, `plm_jax.distributed` and `plm-jax launch`.

The `faults` tests train through `plm-jax launch` (2 processes x 4 CPU devices, gloo
collectives) and compare with a 1-process, 8-device run, and kill a 2-process run mid-way.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from plm_jax.cli import main
from plm_jax.config import DistributedConfig, load_config
from plm_jax.distributed import DistributedError, initialize, resolve
from plm_jax.errors import ConfigError
from plm_jax.launch import PREEMPTED_EXIT_CODE, child_env, free_port, launch

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 420  # a hung run fails the test instead of blocking it


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a `python -m plm_jax.cli` subprocess (conftest's XLA flags kept)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLM_JAX_")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", **extra)
    return env


# ---------------------------------------------------------------------------------------------
# The `distributed` config section and its environment.


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["distributed.num_processes=-1"], r"distributed.num_processes=-1 must be >= 0"),
        (
            ["distributed.num_processes=2", "distributed.process_id=2"],
            r"distributed.process_id=2 must be in \[0, distributed.num_processes=2\)",
        ),
        (["distributed.process_id=-2"], r"distributed.process_id=-2 must be in"),
        (["distributed.coordinator_address=localhost"], r"'localhost' is not HOST:PORT"),
        (["distributed.coordinator_address=host:70000"], r"'host:70000' is not HOST:PORT"),
        (["distributed.initialization_timeout=0"], r"initialization_timeout=0 must be positive"),
        (["distributed.heartbeat_timeout=-5"], r"heartbeat_timeout=-5 must be positive"),
        (["distributed.prepare_timeout=0"], r"prepare_timeout=0 must be positive"),
        (["distributed.cluster_detection=slurmm"], r"did you mean 'slurm'"),
    ],
)
def test_invalid_distributed_values_raise_config_error(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_unset_values_come_from_the_environment_and_config_wins():
    env = {
        "PLM_JAX_COORDINATOR": "10.0.0.1:1234",
        "PLM_JAX_NUM_PROCESSES": "4",
        "PLM_JAX_PROCESS_ID": "3",
    }
    assert resolve(DistributedConfig(), env) == DistributedConfig(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3
    )
    explicit = DistributedConfig(coordinator_address="h:1", num_processes=2, process_id=1)
    assert resolve(explicit, env) == explicit
    assert resolve(DistributedConfig(), {}) == DistributedConfig()


@pytest.mark.parametrize(
    "dist, env, match",
    [
        (DistributedConfig(), {"PLM_JAX_NUM_PROCESSES": "two"}, r"NUM_PROCESSES='two' must be an"),
        (
            DistributedConfig(),
            {"PLM_JAX_COORDINATOR": "h:1", "PLM_JAX_NUM_PROCESSES": "2", "PLM_JAX_PROCESS_ID": "2"},
            r"process_id=2 \(with \$PLM_JAX_COORDINATOR, \$PLM_JAX_NUM_PROCESSES, "
            r"\$PLM_JAX_PROCESS_ID from the environment\) must be in \[0, ",
        ),
        (DistributedConfig(num_processes=2), {}, r"needs distributed.coordinator_address"),
        (
            DistributedConfig(num_processes=2, coordinator_address="h:1"),
            {},
            r"and distributed.process_id",
        ),
        (DistributedConfig(), {"PLM_JAX_PROCESS_ID": "0"}, r"num_processes is not"),
    ],
)
def test_incomplete_or_bad_settings_raise_config_error(dist, env, match):
    with pytest.raises(ConfigError, match=match):
        resolve(dist, env)


def test_a_single_process_run_never_initializes_the_runtime():
    import jax

    assert initialize(DistributedConfig(), environ={}) is False
    assert initialize(DistributedConfig(num_processes=1, process_id=0), environ={}) is False
    assert not jax.distributed.is_initialized()


def test_process_zero_reports_a_coordinator_port_in_use():
    with socket.socket(socket.AF_INET6 if socket.has_ipv6 else socket.AF_INET) as busy:
        busy.bind(("::" if socket.has_ipv6 else "0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        dist = DistributedConfig(
            coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=0
        )
        with pytest.raises(DistributedError, match=rf"cannot serve the coordinator on port {port}"):
            initialize(dist, environ={})


def test_an_unreachable_coordinator_exits_2_with_one_line(tmp_path):
    port = free_port()  # nothing listens there
    start = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "plm_jax.cli",
            "pretrain",
            f"run.dir={tmp_path / 'run'}",
            f"distributed.coordinator_address=127.0.0.1:{port}",
            "distributed.num_processes=2",
            "distributed.process_id=1",
            "distributed.initialization_timeout=1",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"plm-jax: error: process 1 cannot reach the coordinator at 127.0.0.1:{port} (process 0) "
        "within distributed.initialization_timeout=1 s (Connection refused); check that process "
        "0 is running on that host and port, or raise distributed.initialization_timeout"
    ]
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run").exists()  # nothing was written


def test_missing_processes_time_out_with_one_line_not_a_crash(tmp_path):
    """Process 0 alone: JAX's own deadline would abort with a C++ stack trace instead."""
    port = free_port()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "plm_jax.cli",
            "pretrain",
            f"run.dir={tmp_path / 'run'}",
            "distributed.initialization_timeout=2",
        ],
        env=cli_env(
            PLM_JAX_COORDINATOR=f"127.0.0.1:{port}",
            PLM_JAX_NUM_PROCESSES="2",
            PLM_JAX_PROCESS_ID="0",
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "plm-jax: error: process 0 waited distributed.initialization_timeout=2 s for all 2 "
        f"processes to connect to the coordinator at 127.0.0.1:{port}; start every process "
        "with the same coordinator and num_processes, check that they can reach each other, "
        "or raise distributed.initialization_timeout"
    ]


ORDERED = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import jax
    from plm_jax.config import DistributedConfig
    from plm_jax.distributed import initialize, primary_first
    assert initialize(DistributedConfig(initialization_timeout=60))
    index, marker = jax.process_index(), Path(sys.argv[-1]) / "marker"
    with primary_first("writing the marker", 60):
        if index == 0:
            time.sleep(1)
            marker.write_text("done")
        else:
            assert marker.read_text() == "done"  # process 0 finished first
    try:
        with primary_first("failing", 60):
            raise ValueError(f"failed in {index}")
    except ValueError as e:
        print(e)
    print("ok")
    """
)


def test_process_zero_runs_first_and_its_error_releases_the_others(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    code = launch(
        ["pretrain", str(tmp_path)], num_processes=2, program=[sys.executable, "-c", ORDERED]
    )
    out = capfd.readouterr().out
    assert code == 0, out
    assert sorted(line for line in out.splitlines() if "Gloo" not in line) == [
        "[0] failed in 0",
        "[0] ok",
        "[1] failed in 1",
        "[1] ok",
    ]


# ---------------------------------------------------------------------------------------------
# The launcher, with stand-in children (no jax).

CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    index = int(os.environ["PLM_JAX_PROCESS_ID"])
    mode = sys.argv[-1]  # argv: -c COMMAND MODE
    def on_term(signum, frame):
        print(f"process {index} got {signal.Signals(signum).name}", flush=True)
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    print(f"ready {os.environ['PLM_JAX_NUM_PROCESSES']} {os.environ['PLM_JAX_COORDINATOR']}",
          flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if mode == "fail" and index == 1:
        sys.exit(3)
    if mode in ("fail", "wait"):
        time.sleep(600)
    """
)


def test_children_get_the_cluster_environment_and_their_output_is_prefixed(capfd):
    code = launch(["pretrain", "ok"], num_processes=2, program=[sys.executable, "-c", CHILD])
    assert code == 0
    out, err = capfd.readouterr()
    lines = sorted(out.splitlines())
    assert len(lines) == 2
    assert lines[0].startswith("[0] ready 2 127.0.0.1:") and lines[1].startswith("[1] ready 2 ")
    assert lines[0].split()[-1] == lines[1].split()[-1]  # one coordinator for both
    assert "[0] to stderr" in err and "[1] to stderr" in err


def test_a_failing_child_ends_the_launch_with_its_code_and_the_others_are_killed(capfd):
    start = time.monotonic()
    code = launch(
        ["pretrain", "fail"],
        num_processes=3,
        grace_period=0.5,
        program=[sys.executable, "-c", CHILD],
    )
    assert code == 3
    assert time.monotonic() - start < 60  # the sleepers did not run their 600 s
    err = capfd.readouterr().err
    assert "process 1 exited with code 3; stopping the other 2 in 0.5 s" in err
    assert "killing processes [0, 2]" in err


def test_sigterm_is_forwarded_to_every_child_and_preemption_is_the_exit_code():
    launcher = textwrap.dedent(
        f"""
        import sys
        from plm_jax.launch import launch
        sys.exit(launch(["pretrain", "wait"], num_processes=2,
                        program=[sys.executable, "-c", {CHILD!r}]))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = [proc.stdout.readline() for _ in range(2)]
        assert all(" ready 2 " in line for line in ready), ready
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE
    assert sorted(out.splitlines()) == ["[0] process 0 got SIGTERM", "[1] process 1 got SIGTERM"]


def test_the_preempted_exit_code_is_the_training_loops():
    from plm_jax.train import preemption

    assert PREEMPTED_EXIT_CODE == preemption.PREEMPTED_EXIT_CODE


@pytest.mark.parametrize(
    "argv, match",
    [
        (["launch", "--num-processes", "0", "--", "pretrain"], "--num-processes=0 must be at"),
        (["launch", "-n", "2", "--devices-per-process", "0", "--", "pretrain"], "at least 1"),
        (["launch", "-n", "2", "--port", "70000", "--", "pretrain"], r"--port=70000 must be in"),
        (["launch", "-n", "2", "--", "score", "run"], "runs one of"),
        (["launch", "-n", "2"], "needs a command after '--'"),
    ],
)
def test_bad_launch_arguments_exit_2(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_launch_has_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["launch", "--help"])
    assert exit_info.value.code == 0
    assert "--num-processes N" in capsys.readouterr().out


def test_child_env_sets_the_cluster_and_replaces_the_device_count():
    base = {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8 --b", "KEEP": "x"}
    env = child_env(base, 1, 2, 4321, devices_per_process=4)
    assert env["PLM_JAX_COORDINATOR"] == "127.0.0.1:4321"
    assert (env["PLM_JAX_NUM_PROCESSES"], env["PLM_JAX_PROCESS_ID"]) == ("2", "1")
    assert env["XLA_FLAGS"] == "--a=1 --b --xla_force_host_platform_device_count=4"
    assert env["JAX_LOCAL_DEVICE_IDS"] == "4,5,6,7"
    assert env["KEEP"] == "x"
    assert child_env(base, 0, 2, 1, None)["XLA_FLAGS"] == base["XLA_FLAGS"]


# ---------------------------------------------------------------------------------------------
# Training through `plm-jax launch` (faults: each run takes tens of seconds on 2 cores).

STEPS = 6


def run_overrides(run_dir: Path, corpus: Path, cache: Path, tokenizer: str = "") -> list[str]:
    """A 1-layer decoder, global batch 8, logging every step, checkpoints every 2 steps."""
    return [
        f"run.dir={run_dir}",
        f"data.source={corpus}",
        f"data.cache_dir={cache}",
        f"tokenizer.path={tokenizer}",
        "tokenizer.vocab_size=512",
        "model.max_seq_len=32",
        "model.num_layers=1",
        "model.embed_dim=32",
        "train.batch_size=8",
        f"train.steps={STEPS}",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=3",
        "train.eval_batches=0",
        "checkpoint.save_every=2",
    ]


def start_launch(overrides: list[str], compile_cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "plm_jax.cli", "launch", "--num-processes", "2"]
        + ["--devices-per-process", "4", "--", "pretrain", *overrides],
        env=cli_env(
            JAX_COMPILATION_CACHE_DIR=str(compile_cache),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen) -> str:
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail(f"plm-jax launch did not finish in {RUN_TIMEOUT_S} s")
    assert proc.returncode == 0, output[-4000:]
    return output


def kill_tree(pid: int) -> None:
    """SIGKILL the launcher's children (in their own process groups), then the launcher."""
    for child in child_pids(pid):
        os.kill(child, signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)


def child_pids(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if parent == pid:
            children.append(int(stat.parent.name))
    return children


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """{step: value} of `key` in metrics.jsonl (each step once)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    values = [(r["step"], r[key]) for r in rows if key in r]
    assert len({s for s, _ in values}) == len(values), f"a step logged twice: {values}"
    return dict(values)


def final_params(run_dir: Path) -> list[np.ndarray]:
    import jax
    from flax import nnx

    import plm_jax

    _, params = nnx.split(plm_jax.load(run_dir).model, nnx.Param)
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, small_corpus):
    """An uninterrupted 2-process run that trains its own tokenizer and prepares its data."""
    tmp = tmp_path_factory.mktemp("launch")
    run_dir, cache = tmp / "run2", tmp / "cache"
    finish(start_launch(run_overrides(run_dir, small_corpus, cache), tmp / "xla_cache"))
    return run_dir, cache, tmp / "xla_cache"


@pytest.mark.faults
def test_two_processes_train_exactly_like_one_process_with_the_same_global_batch(
    two_process_run, small_corpus, tmp_path
):
    from plm_jax.train.loop import pretrain

    run2, cache, _ = two_process_run
    # Both processes started at once on an empty run directory and cache: one tokenizer and
    # one prepared corpus came out, with no temporary leftovers.
    assert sorted(p.name for p in (run2 / "tokenizer").iterdir() if p.name.startswith(".")) == []
    assert len(list((cache / "tokens").iterdir())) == 1

    one = tmp_path / "run1"
    tokenizer = str(run2 / "tokenizer")
    pretrain(
        load_config(None, run_overrides(one, small_corpus, cache, tokenizer)), show_progress=False
    )

    for key in ("train/loss", "eval/loss", "train/grad_norm"):
        single, multi = logged(one, key), logged(run2, key)
        assert sorted(single) == sorted(multi)
        steps = sorted(single)
        np.testing.assert_allclose(
            [multi[s] for s in steps], [single[s] for s in steps], rtol=1e-5, err_msg=key
        )
    assert sorted(logged(run2, "train/loss")) == list(range(1, STEPS + 1))


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, step: int) -> None:
    """Returns once checkpoint `step` is committed (Orbax renames a save when it commits)."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not (run_dir / "checkpoints" / str(step)).is_dir():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, f"checkpoint {step} was not committed"
        time.sleep(0.02)


def assert_rerun_matches(reference: Path, overrides: list[str], compile_cache: Path) -> None:
    """Reruns an interrupted run: it resumes mid-way and ends as `reference` ended."""
    run_dir = Path(overrides[0].removeprefix("run.dir="))
    assert not (run_dir / "checkpoints" / str(STEPS)).exists(), "interrupted too late"
    output = finish(start_launch(overrides, compile_cache))
    resumed = re.search(r"resumed from \S+ at step (\d+)", output)
    assert resumed and 2 <= int(resumed[1]) < STEPS, output[-4000:]
    for key in ("train/loss", "eval/loss"):
        assert logged(run_dir, key) == logged(reference, key), key
    for got, want in zip(final_params(run_dir), final_params(reference), strict=True):
        np.testing.assert_array_equal(got, want)


@pytest.mark.faults
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_result(
    two_process_run, small_corpus, tmp_path
):
    reference, cache, compile_cache = two_process_run
    overrides = run_overrides(tmp_path / "run", small_corpus, cache, str(reference / "tokenizer"))
    proc = start_launch(overrides, compile_cache)
    wait_for_checkpoint(proc, tmp_path / "run", 2)
    kill_tree(proc.pid)
    proc.communicate(timeout=60)
    assert_rerun_matches(reference, overrides, compile_cache)


@pytest.mark.faults
def test_sigterm_to_the_launcher_preempts_every_process_at_one_step(
    two_process_run, small_corpus, tmp_path
):
    reference, cache, compile_cache = two_process_run
    overrides = run_overrides(tmp_path / "run", small_corpus, cache, str(reference / "tokenizer"))
    proc = start_launch(overrides, compile_cache)
    wait_for_checkpoint(proc, tmp_path / "run", 2)
    proc.send_signal(signal.SIGTERM)
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        pytest.fail("a preempted run did not stop")
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-4000:]
    stops = re.findall(r"^\[(\d)\] plm-jax: stopped by SIGTERM at step (\d+)", output, re.M)
    assert sorted(i for i, _ in stops) == ["0", "1"] and len({s for _, s in stops}) == 1, output
    assert_rerun_matches(reference, overrides, compile_cache)


@pytest.mark.faults
def test_two_process_eval_matches_the_logged_eval_loss(two_process_run):
    reference, _, compile_cache = two_process_run
    proc = subprocess.run(
        [sys.executable, "-m", "plm_jax.cli", "launch", "-n", "2", "--devices-per-process", "4"]
        + ["--", "eval", str(reference), "--json"],
        env=cli_env(JAX_COMPILATION_CACHE_DIR=str(compile_cache)),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line[4:5] == "{"]
    assert len(results) == 2  # one line per process, the same numbers
    for result in results:
        assert result["step"] == STEPS
        np.testing.assert_allclose(result["eval/loss"], logged(reference, "eval/loss")[STEPS], 1e-5)
