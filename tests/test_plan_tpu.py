"""`plm-jax plan --topology`: the train step compiled for compile-only TPU devices (libtpu).

CI's second step installs the `tpu` extra and runs these (`-m tpu_aot`); without libtpu they
are skipped, saying so."""

from __future__ import annotations

import pytest

from plm_jax.cli import main
from plm_jax.config import load_config
from plm_jax.plan import plan

pytest.importorskip("libtpu", reason="compile-only TPU plans need libtpu: pip install '.[tpu]'")
pytestmark = pytest.mark.tpu_aot

TINY = {
    "decoder": [],
    "encoder": ["model.family=encoder", "model.norm_placement=post"],
    "encoder_decoder": ["model.preset=t5-tiny", "tokenizer.num_sentinels=16"],
}


def cfg(tmp_path, *extra):
    return load_config(
        None,
        [
            f"run.dir={tmp_path / 'run'}",
            "model.num_layers=2",
            "model.max_seq_len=128",
            "train.batch_size=8",
            *extra,
        ],
    )


@pytest.mark.parametrize("family", list(TINY))
def test_every_family_compiles_for_a_tpu_slice(tmp_path, family):
    report = plan(cfg(tmp_path, "mesh.fsdp=2", *TINY[family]), topology="v5e:2x2")
    assert report["devices"]["kind"] == "TPU v5 lite" and report["devices"]["count"] == 4
    assert report["model"]["dtype"] == "bfloat16"  # model.dtype=auto, resolved for the TPU
    assert report["devices"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    mem = report["memory_per_device"]
    assert mem["limit"] == 16 * 2**30 and report["fits"] is True
    # AdamW: two moments per parameter, and a step count
    assert 0 < 2 * mem["parameters"] <= mem["optimizer_state"] <= 2 * mem["parameters"] + 64
    assert report["collectives_per_step"]["all-gather"]["count"] > 0  # FSDP gathers weights
    roof = report["roofline"]
    assert roof["bound"] and roof["step_seconds"] >= roof["compute_seconds"] > 0


def test_scanned_layers_multiply_the_collectives_of_one_layer(tmp_path):
    one = plan(
        cfg(tmp_path, "mesh.fsdp=4", "model.num_layers=1", "model.use_scan_layers=true"),
        topology="v5e:2x2",
    )
    four = plan(
        cfg(tmp_path, "mesh.fsdp=4", "model.num_layers=4", "model.use_scan_layers=true"),
        topology="v5e:2x2",
    )
    gathers = [r["collectives_per_step"]["all-gather"]["count"] for r in (one, four)]
    assert gathers[1] > gathers[0]
    assert four["flops_per_device"]["xla_counts_scanned_layer_once"]
    assert "memory_seconds_why_not" in four["roofline"]


def test_fit_remat_takes_the_cheapest_policy_that_fits(tmp_path, capsys):
    # A 1.2 B-parameter model at 8 x 2048 tokens per chip needs more than a v5e chip's 16 GiB
    # without remat; the search stops at the first policy that fits (or reports them all).
    args = [
        f"run.dir={tmp_path / 'run'}",
        "model.preset=llama-1b",
        "model.dtype=bfloat16",
        "model.use_scan_layers=true",
        "model.num_layers=2",
        "tokenizer.vocab_size=32000",
        "model.max_seq_len=2048",
        "train.batch_size=32",
        "mesh.fsdp=4",
        "mesh.data=1",
    ]
    code = main(["plan", *args, "--topology", "v5e:2x2", "--fit", "remat"])
    out = capsys.readouterr().out
    tried = [line for line in out.splitlines() if line.strip().startswith("tried model.remat=")]
    assert tried[0].startswith("  tried model.remat=none") and "does not fit" in tried[0]
    assert ("fits" in tried[-1] and "does not" not in tried[-1]) == (code == 0)


@pytest.mark.slow  # a minute or more of compiling
def test_llama_3_8b_fits_a_v5p_32_at_2_x_4096_per_chip_with_full_remat(tmp_path):
    args = ["model.preset=llama-3-8b", "model.use_scan_layers=true", "model.remat=full"]
    args += ["model.max_seq_len=4096", "train.batch_size=32", "mesh.fsdp=16", "mesh.data=1"]
    report = plan(cfg(tmp_path, *args, "model.num_layers=32"), topology="v5p-32")
    assert report["model"]["parameters"] == 8_030_261_248
    mem = report["memory_per_device"]
    assert report["fits"] and mem["limit"] == 95 * 2**30
    assert 8_030_261_248 * 4 / 16 <= mem["parameters"] <= 8_030_261_248 * 4 / 16 * 1.01
