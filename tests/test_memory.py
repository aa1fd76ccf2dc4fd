"""A run that cannot fit in memory says so before its first step (plm_jax/train/memory.py)."""

from __future__ import annotations

import types

import pytest

from plm_jax.cli import main
from plm_jax.train.memory import GIB, DoesNotFit, _meminfo_available, check_step_fits


def analysis(arguments, outputs, alias, temp):
    memory = types.SimpleNamespace(
        argument_size_in_bytes=arguments,
        output_size_in_bytes=outputs,
        alias_size_in_bytes=alias,
        temp_size_in_bytes=temp,
    )
    return types.SimpleNamespace(memory_analysis=lambda: memory)


class Gpu:
    platform, device_kind, process_index = "gpu", "NVIDIA H100 80GB HBM3", 0

    def memory_stats(self):
        return {"bytes_limit": 80 * GIB}


def test_an_accelerator_counts_state_outputs_and_temporaries_against_its_limit():
    # 30 GiB of state donated into 30 GiB of outputs (aliased) + 40 GiB temporaries = 70: fits.
    fits = analysis(30 * GIB, 30 * GIB, 30 * GIB, 40 * GIB)
    check_step_fits(fits, [Gpu()], grad_accum=1, accum_choices=[], recompile=None)
    too_big = analysis(30 * GIB, 30 * GIB, 30 * GIB, 50 * GIB)  # 80 GiB > 90% of 80
    smaller = {2: analysis(30 * GIB, 30 * GIB, 30 * GIB, 45 * GIB), 4: fits}
    with pytest.raises(DoesNotFit) as refused:
        check_step_fits(
            too_big, [Gpu()], grad_accum=1, accum_choices=[2, 4], recompile=smaller.__getitem__
        )
    message = str(refused.value)
    assert "needs 80.00 GiB per device (compiler estimate at train.grad_accum=1)" in message
    assert "NVIDIA H100 80GB HBM3 memory per device is 80.00 GiB" in message
    assert "train.grad_accum=4 fits (compiler estimate 70.00 GiB)" in message  # 2 does not


def test_available_host_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   20000000 kB\n")
    assert _meminfo_available(str(meminfo)) == 20000000 * 1024
    assert _meminfo_available(str(tmp_path / "missing")) is None


def test_a_pretraining_run_that_cannot_fit_exits_2_before_its_first_step(
    tmp_path, small_corpus, small_tokenizer, capsys
):
    """Batch 1024 at 512 tokens: about 90 GiB for the tiny model on a 24 GiB machine."""
    code = main(
        [
            "pretrain",
            f"run.dir={tmp_path / 'run'}",
            f"data.source={small_corpus}",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"tokenizer.path={small_tokenizer.path}",
            "model.max_seq_len=512",
            "train.batch_size=1024",
            "train.steps=2",
            "train.warmup_steps=1",
        ]
    )
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2
    assert len(err) == 1 and "the train step does not fit in memory: it needs" in err[0], err
    assert "available host memory shared by 8 CPU device(s)" in err[0]
    assert "train.batch_size" in err[0] and "model.remat=full" in err[0]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "run" / "checkpoints").iterdir()
    )


def test_fine_tuning_checks_its_longest_bucket_before_the_first_step(
    tmp_path, tiny_run, monkeypatch
):
    from plm_jax.tasks import finetune as ft_mod
    from plm_jax.train import memory
    from tests.test_finetune import cls_args, ft_config, sentiment_rows, write_jsonl

    rows = [{**r, "text": r["text"][:20]} for r in sentiment_rows(40, 0)]  # short texts only
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = ft_config(tmp_path, cls_args((train, train)), tiny_run, "train.steps=4")
    seen = []

    def small_host(devices):  # a 256 KiB machine: the 32-token bucket cannot fit
        seen.append(len(devices))
        return 256 * 2**10, len(devices), "a small host"

    monkeypatch.setattr(memory, "memory_limit", small_host)
    with pytest.raises(DoesNotFit, match=r"the fine-tuning step at the longest bucket \(32 tokens"):
        ft_mod.finetune(cfg, show_progress=False)
    metrics = tmp_path / "ft" / "metrics.jsonl"
    assert seen and "train/loss" not in (metrics.read_text() if metrics.exists() else "")
