"""`plm-jax plot`: curves of several runs, one panel per metric, checked on the figure."""

import sys

import pytest

from plm_jax.cli import main
from plm_jax.errors import ConfigError
from plm_jax.metrics import MetricsWriter

pytest.importorskip("matplotlib", reason="needs matplotlib (the plot extra)")


def _run(path, batch_tokens, losses):
    writer = MetricsWriter(path, use_tensorboard=False)
    for i, loss in enumerate(losses, 1):
        writer.write(10 * i, {"train/loss": loss, "train/input_tokens": batch_tokens})
        if i % 2 == 0:
            writer.write(10 * i, {"eval/loss": loss + 0.5})
    writer.write(10 * len(losses) + 1, {"train/loss": float("nan")})  # null: left out
    writer.close()
    return path


@pytest.fixture
def runs(tmp_path):
    return (
        _run(tmp_path / "small", 100, [4.0, 3.0, 2.5, 2.2]),
        _run(tmp_path / "large", 300, [3.8, 2.8, 2.3]),
    )


def test_plot_draws_one_curve_per_run_and_metric(runs, tmp_path):
    from plm_jax.plot import plot_runs

    result = plot_runs(
        runs, output=tmp_path / "out" / "curves.png", metrics=["train/loss", "eval/loss"]
    )
    assert result.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = result.figure.axes
    assert [ax.get_ylabel() for ax in axes] == ["train/loss", "eval/loss"]
    assert [len(ax.get_lines()) for ax in axes] == [2, 2]
    assert [c.run for c in result.curves] == ["small", "large", "small", "large"]
    (small_loss,) = [c for c in result.curves if c.run == "small" and c.metric == "train/loss"]
    assert small_loss.x == [10, 20, 30, 40] and small_loss.y == [4.0, 3.0, 2.5, 2.2]
    line = axes[1].get_lines()[1]  # large's eval/loss: steps 20 only (3 records, every 2nd)
    assert list(line.get_xdata()) == [20] and list(line.get_ydata()) == [3.3]


def test_plot_against_tokens(runs, tmp_path):
    from plm_jax.plot import plot_runs

    result = plot_runs(runs, output=tmp_path / "t.svg", metrics=["eval/loss"], x_axis="tokens")
    assert [c.x for c in result.curves] == [[200.0, 400.0], [600.0]]
    assert result.figure.axes[0].get_xlabel() == "input tokens"
    assert result.path.read_text().lstrip().startswith("<?xml")


def test_cli_plot_default_metrics(runs, tmp_path, capsys):
    out = tmp_path / "p.png"
    assert main(["plot", *map(str, runs), "--output", str(out), "--labels", "a,b"]) == 0
    assert "4 curves of eval/loss, train/loss" in capsys.readouterr().out  # no perf/ logged


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_plot_inputs_exit_2(runs, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "p.png")
    assert main(["plot", str(tmp_path / "missing"), "--output", out]) == 2
    assert "has no metrics.jsonl" in _error(capsys)
    assert main(["plot", str(runs[0]), "--metrics", "train/los", "--output", out]) == 2
    line = _error(capsys)
    assert "['train/los'] are in none of the runs" in line and "train/loss" in line
    assert main(["plot", str(runs[0]), "--output", str(tmp_path / "p.jpg")]) == 2
    assert "use a file ending in .png" in _error(capsys)
    assert main(["plot", *map(str, runs), "--labels", "a", "--output", out]) == 2
    assert "1 labels for 2 runs" in _error(capsys)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    from plm_jax.plot import plot_runs

    with pytest.raises(ConfigError, match="needs matplotlib"):
        plot_runs(runs, output=out)
