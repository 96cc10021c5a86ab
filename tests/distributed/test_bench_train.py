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


def test_bench_train_compare_packing_tp2(tmp_path):
    """One run, both layouts on the same heavy-tailed rows: both rows measured, the layouts' token counts
    and the padding fraction agree with the drawn lengths (no timing is asserted)."""
    out = tmp_path / "packing.json"
    proc = run_dualrpo("bench", "train", "--tp", "2", "--rows", "4", "--response-len", "32", "--prompt-len", "8",
                       "--length-mix", "heavy-tail", "--compare-packing", "--no-baseline", "--iters", "1",
                       "--warmup", "0", "--json", str(out), check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "packed vs padded" in proc.stdout and "padding:" in proc.stdout
    doc = json.loads(out.read_text())
    res = doc["results"]
    lens = res["raw"]["response_lengths"]
    assert len(lens) == 4 and all(1 <= x <= 32 for x in lens) and len(set(lens)) > 1
    pk = res["summary"]["packing"]
    rows = {r["layout"]: r for r in pk["rows"]}
    real = 4 * (8 + 2 + 16) + sum(lens)
    assert pk["real_tokens"] == real == rows["packed"]["layout_tokens"]  # no SP / FP8 multiple on CPU
    assert rows["padded"]["layout_tokens"] == 4 * (8 + 2 + 16 + max(lens))  # one micro-batch, widest row
    assert 0 < pk["padding_fraction"] < 1
    assert 0 < pk["step_padding_fraction"] < pk["padding_fraction"]  # the ViT and the head carry no padding
    for r in rows.values():
        assert math.isfinite(r["tokens_per_s_per_device"]) and r["tokens_per_s_per_device"] > 0
        assert r["peak_extra_mib"] > 0
    assert math.isclose(pk["speedup"], rows["packed"]["tokens_per_s_per_device"] /
                        rows["padded"]["tokens_per_s_per_device"])
