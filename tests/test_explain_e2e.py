"""`plm-jax explain` on a real fine-tuned classifier: it explains the label the classifier
predicts, refuses a label it does not have, and its report renders in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from plm_jax.cli import main
from plm_jax.tasks import finetune as ft_mod
from tests.test_finetune import cls_args, ft_config, sentiment  # noqa: F401 - the data fixture

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_run, sentiment):  # noqa: F811 - the fixture
    tmp = tmp_path_factory.mktemp("explain_classifier")
    cfg = ft_config(tmp, cls_args(sentiment), tiny_run, "train.steps=36")
    result = ft_mod.finetune(cfg, show_progress=False)
    assert result["eval/accuracy"] >= 0.9, result
    return tmp / "ft"


def test_classifier_explains_its_label(classifier, tmp_path, capsys):
    out = tmp_path / "report"
    text = "the movie was really great and happy"
    assert main(["explain", str(classifier), "--text", text, "--output", str(out)]) == 0
    assert "explained 'pos' (class)" in capsys.readouterr().out
    data = json.loads((out / "explain.json").read_text())
    assert data["kind"] == "class" and data["top"][0][0] == "pos"
    assert data["attributions"]["relative_error"] < 0.01
    ig = np.array(data["attributions"]["integrated_gradients"])
    assert ig.shape == (len(data["tokens"]),)
    diff = data["attributions"]["score"] - data["attributions"]["baseline_score"]
    assert ig.sum() == pytest.approx(diff, rel=0.01)
    # The lens's last layer is the classifier's own output.
    assert data["logit_lens"][-1]["top"][0][0] == "pos"
    assert data["logit_lens"][-1]["top"][0][1] == pytest.approx(data["top"][0][1], abs=1e-5)

    argv = ["explain", str(classifier), "--text", text, "--output", str(tmp_path / "o")]
    assert main([*argv, "--target", "neutral"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and "not a label of this classifier; choose one of ['neg', 'pos']" in err[0]
    )


def test_report_renders_in_headless_chromium(classifier, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    import matplotlib.image

    out = tmp_path / "report"
    text = "awful sad movie"
    assert main(["explain", str(classifier), "--text", text, "--output", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert not re.search(r"(src|href)=\"(?!data:)", page) and "http" not in page
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--offline",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            (out / "report.html").as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = matplotlib.image.imread(shot)[..., :3]
    ink = (pixels.min(axis=-1) < 0.9).mean()  # the fraction of pixels that are not white
    assert ink > 0.05, ink  # text, tables and figures, not a blank page
    # The figures themselves were drawn: some pixels are strongly coloured.
    assert (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3).mean() > 0.01
