"""The quick start as a user runs it: `plm-jax pretrain` with no arguments (slow: ~6 min)."""

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quickstart_trains_and_its_eval_loss_falls_by_1_5_nats(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "plm_jax.cli",
            "pretrain",
            f"run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval/loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 600
    assert evals[0]["eval/loss"] - evals[-1]["eval/loss"] >= 1.5
    assert "sample (temperature 0.8, top-k 40): Return the" in proc.stdout
