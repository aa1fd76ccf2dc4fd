"""The W&B writer, offline: records under the run directory, the config attached, the same
metric names as metrics.jsonl. WANDB_MODE=offline keeps it off the network."""

import json
import struct
import sys

import pytest

from plm_jax.cli import main
from plm_jax.config import load_config
from plm_jax.errors import ConfigError
from plm_jax.metrics import read_metrics
from plm_jax.tracking import open_metrics_writer

BLOCK = 32768  # W&B's transaction log: LevelDB-style 32 KiB blocks of 7-byte-headed chunks


def _wandb_records(path):
    """The protobuf records of an offline run's run-ID.wandb file."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb", reason="needs wandb (the track extra)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")


def test_wandb_offline_writes_the_jsonl_metrics_and_config(offline, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [f"run.dir={run}", "run.trackers=[wandb]", "train.lr=0.0007"])
    writer = open_metrics_writer(cfg, enabled=True)
    writer.write(2, {"train/loss": 2.5, "perf/tokens_per_sec": 1000.0})
    writer.write(4, {"eval/loss": 2.25, "eval/tiny_mc/acc": 0.4})
    writer.close()
    assert not (run / "tensorboard").exists()  # run.trackers no longer names it
    (log,) = run.glob("wandb/offline-run-*/run-*.wandb")
    records = _wandb_records(log)
    (started,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert started.run_id == (run / "wandb_id").read_text().strip()
    config = {u.key: json.loads(u.value_json) for u in started.config.update}
    assert config["train"]["lr"] == 0.0007 and config["run"]["dir"] == str(run)
    assert config["run"]["trackers"] == ["wandb"]
    history = [  # slash names are stored split, as nested keys
        {k: float(i.value_json) for i in r.history.item if not (k := _key(i)).startswith("_")}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    jsonl = [{k: v for k, v in r.items() if k != "step"} for r in read_metrics(run)]
    assert history == jsonl


def test_resumed_writer_continues_the_same_wandb_run(offline, tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "run.trackers=[wandb]"])
    for step in (1, 2):
        writer = open_metrics_writer(cfg, enabled=True)
        writer.write(step, {"train/loss": 1.0 / step})
        writer.close()
    logs = sorted((tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb"))
    assert len({p.name for p in logs}) == 1  # one W&B run id, two segments


def test_disabled_writer_opens_no_tracker(offline, tmp_path):
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "run.trackers=[wandb]"])
    open_metrics_writer(cfg, enabled=False).close()
    assert not (tmp_path / "run").exists()


def test_wandb_not_installed_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    cfg = load_config(None, [f"run.dir={tmp_path / 'run'}", "run.trackers=[wandb]"])
    with pytest.raises(ConfigError, match="wandb is not installed; `pip install wandb`"):
        open_metrics_writer(cfg, enabled=True)
    assert main(["pretrain", f"run.dir={tmp_path / 'r2'}", "run.trackers=[wandb]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "wandb is not installed" in err[0]


def test_tracker_names_are_checked():
    with pytest.raises(ConfigError, match="run.trackers"):
        load_config(None, ["run.trackers=[mlflow]"])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        load_config(None, ["run.trackers=[wandb,wandb]"])
