"""``dualrpo bench train`` as a user runs it, at TP=2 on 2 gloo processes with the tiny model: it
exits 0 and writes JSON whose per-device rows (actor and transformers baseline) carry positive,
finite throughput, FLOPs and MFU. Timings are never asserted, only that they were measured."""
import json
import math

from helpers.cli import run_dualrpo


def test_bench_train_tp2_writes_json(tmp_path):
    out = tmp_path / "train.json"
    proc = run_dualrpo("bench", "train", "--tp", "2", "--rows", "2", "--response-len", "16", "--prompt-len", "8",
                       "--iters", "1", "--warmup", "0", "--json", str(out), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MFU" in proc.stdout and "vs baseline" in proc.stdout
    doc = json.loads(out.read_text())
    for key in ("bench", "date", "commit", "command", "machine", "args", "results"):
        assert key in doc, key
    assert doc["args"]["tp"] == 2 and "torch" in doc["machine"] and "--tp 2" in doc["command"]
    summary = doc["results"]["summary"]
    assert "measured" in summary["peak_source"]  # CPU: the matmul roofline of this run
    rows = {r["method"].split(" ")[0]: r for r in summary["rows"]}
    assert set(rows) == {"megatron", "hf-sdpa-adamw"}
    assert rows["megatron"]["devices"] == 2
    for name, r in rows.items():
        for k in ("step_s", "tokens_per_s_per_device", "tflops_per_device", "mfu", "hfu"):
            assert math.isfinite(r[k]) and r[k] > 0, (name, k, r[k])
    assert summary["tokens"] == 2 * (8 + 2 + 16 + 16)  # prompt, vision start/end, 8x8 image = 16 tokens, response
    raw = doc["results"]["raw"]
    assert raw["flops"]["forward_vision"] > 0 and raw["flops"]["model"] == 3 * raw["flops"]["forward_total"]


def test_bench_train_bad_flag_is_named():
    proc = run_dualrpo("bench", "train", "--image", "7x8", check=False)
    assert proc.returncode == 2 and "--image" in proc.stdout
