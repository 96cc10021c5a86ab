"""W&B beside the JSONL: offline runs read back from the .wandb file wandb-core writes, and the
``logging.wandb`` config branch.

The .wandb file is a LevelDB-style log (W&B's "datastore" format): a 7-byte file header ``:W&B``,
magic 0xBEE1, version; then 32 KiB blocks of chunks, each ``crc32 | length | type`` + payload,
payloads being serialized ``wandb.proto.Record`` messages. wandb 0.31 ships no Python reader for
it (the writer is the Go wandb-core), so ``_records`` below reads it independently, checking every
chunk's checksum, and compares what W&B stored against ``metrics.jsonl``.
"""
import glob
import json
import struct
import sys
import time
import zlib

import pytest

from dualrpo_mcore.trainer.metrics import MetricsLogger, read_jsonl
from dualrpo_mcore.trainer.rl_config import LoggingConfig, WandbConfig

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(path):
    """Every Record in a .wandb file, in order; fails on a bad header or checksum."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path}: not a W&B log"
    pos, pending, out = _HEADER, b"", []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER:pos + _HEADER + length]
        if len(chunk) < length:  # the writer is still appending this chunk
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"{path}: bad checksum at {pos}"
        pos += _HEADER + length
        pending += chunk
        if kind in (_FULL, _LAST):
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
            pending = b""
    return out


def _finished(path, timeout=60.0):
    """``path`` once wandb-core has written the run's exit record. ``run.finish()`` returns when the
    service has the records, and its writer may still be appending them to the file."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.WhichOneof("record_type") == "exit" for r in _records(path)):
            return path
        time.sleep(0.1)
    raise AssertionError(f"{path}: no exit record after {timeout:g} s")


def _history(path):
    """{step: {metric: value}} of the history records (W&B's own _step/_runtime/_timestamp removed)."""
    out = {}
    for rec in _records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            out[int(row.pop("_step"))] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out


def _run_config(path):
    for rec in _records(path):
        if rec.WhichOneof("record_type") == "run":
            return {i.key: json.loads(i.value_json) for i in rec.run.config.update}
    raise AssertionError(f"{path}: no run record")


def _config(tmp_path, **wandb):
    wb = dict(mode="offline", project="dualrpo-test", dir=str(tmp_path / "wb"), tags=["unit"])
    wb.update(wandb)
    return {"reward_mode": "dualrpo", "seed": 3, "logging": {"run_dir": str(tmp_path / "run"), "wandb": wb}}


def _metrics(step):
    return {"accuracy/all": 0.25 * step, "accuracy/math": 1.0 / (step + 1),
            "kl": float("nan") if step == 2 else 0.01 * step, "reward_mode": "dualrpo"}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed: pip install 'dualrpo-mcore[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def _wandb_files(tmp_path):
    return [_finished(p) for p in sorted(glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "run-*.wandb")))]


def test_offline_run_holds_the_jsonl_metrics_at_the_same_steps(offline):
    run = offline / "run"
    with MetricsLogger(str(run), tensorboard=False, progress=False, enabled=True) as log:
        log.log_config(_config(offline))
        for step in range(4):
            log.log(step, _metrics(step))
    files = _wandb_files(offline)
    assert len(files) == 1, files
    history = _history(files[0])
    records = read_jsonl(str(run / "metrics.jsonl"))
    assert sorted(history) == [r["step"] for r in records] == [0, 1, 2, 3]
    for r in records:
        expected = {k: v for k, v in r.items() if k not in ("step", "time") and isinstance(v, float)}
        assert history[r["step"]] == pytest.approx(expected), r["step"]
    assert "kl" not in history[2]  # NaN is null in the JSONL and absent in W&B, never a fake 0
    cfg = _run_config(files[0])
    assert cfg["reward_mode"] == "dualrpo" and cfg["seed"] == 3 and cfg["logging"]["wandb"]["tags"] == ["unit"]
    run_id = (run / "wandb_run_id").read_text()
    assert files[0].endswith(f"run-{run_id}.wandb")


def test_a_resumed_run_continues_the_same_wandb_run_after_its_resume_step(offline):
    run = offline / "run"
    with MetricsLogger(str(run), tensorboard=False, progress=False, enabled=True) as log:
        log.log_config(_config(offline))
        for step in range(1, 5):
            log.log(step, _metrics(step))
    first_id = (run / "wandb_run_id").read_text()
    # W&B names an offline run's directory by the second it started and the run id: a resume within
    # the same second would share it (a real resume rebuilds the model first, which takes longer).
    time.sleep(1.1)
    with MetricsLogger(str(run), tensorboard=False, progress=False, enabled=True, resume_step=2) as log:
        log.log_config(_config(offline))
        for step in (3, 4, 5):
            log.log(step, _metrics(step))
    assert (run / "wandb_run_id").read_text() == first_id
    files = _wandb_files(offline)
    assert len(files) == 2 and all(f.endswith(f"run-{first_id}.wandb") for f in files)
    assert sorted(sorted(_history(f)) for f in files) == [[1, 2, 3, 4], [3, 4, 5]]
    assert [r["step"] for r in read_jsonl(str(run / "metrics.jsonl"))] == [1, 2, 3, 4, 5]


def test_a_fresh_start_in_a_used_directory_is_a_new_wandb_run(offline):
    run = offline / "run"
    ids = []
    for _ in range(2):
        with MetricsLogger(str(run), tensorboard=False, progress=False, enabled=True) as log:
            log.log_config(_config(offline))
            log.log(1, _metrics(1))
        ids.append((run / "wandb_run_id").read_text())
    assert ids[0] != ids[1]


def test_disabled_by_default_writes_nothing_and_needs_no_wandb(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # an import of wandb would now fail
    assert LoggingConfig().wandb.mode == "disabled"
    cfg = _config(tmp_path, mode="disabled")
    with MetricsLogger(str(tmp_path / "run"), tensorboard=False, progress=False, enabled=True) as log:
        log.log_config(cfg)
        log.log(1, _metrics(1))
    assert not (tmp_path / "wb").exists() and not (tmp_path / "run" / "wandb_run_id").exists()


def test_turned_on_without_wandb_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with MetricsLogger(str(tmp_path / "run"), tensorboard=False, progress=False, enabled=True) as log:
        with pytest.raises(ImportError, match=r"dualrpo-mcore\[wandb\]"):
            log.log_config(_config(tmp_path))


@pytest.mark.parametrize("field, value, message", [
    ("mode", "cloud", "logging.wandb.mode must be one of disabled, offline, online"),
    ("project", " ", "logging.wandb.project"),
    ("name", "", "logging.wandb.name"),
    ("tags", "a,b", "logging.wandb.tags"),
    ("tags", ["x" * 65], "logging.wandb.tags"),
])
def test_bad_wandb_fields_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        WandbConfig(**{field: value})


def test_wandb_fields_reach_the_run_config_and_its_overrides():
    from dualrpo_mcore.trainer.overrides import apply_overrides
    from dualrpo_mcore.trainer.recipes_paper import qwen2_5_vl_7b_paper

    cfg = qwen2_5_vl_7b_paper("/nonexistent/data")  # builds without any file
    cfg = apply_overrides(cfg, ["logging.wandb.mode=offline", 'logging.wandb.tags=["a","b"]',
                                "logging.wandb.entity=me"])
    assert cfg.logging.wandb.tags == ["a", "b"] and cfg.logging.wandb.entity == "me"
    assert cfg.to_dict()["logging"]["wandb"]["mode"] == "offline"
    with pytest.raises(ValueError, match="logging.wandb.mode"):
        apply_overrides(cfg, ["logging.wandb.mode=cloud"])
