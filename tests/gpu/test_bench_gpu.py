"""GPU variants of the benchmarks: ``bench train`` on one GPU with the table peak (bf16) and
``bench rollout`` with the HF engine on CUDA; the JSON rows carry positive, finite numbers and the
GPU's name. Skipped without CUDA (the CPU machines that run CI have none). No timing is asserted."""
import json
import math

import pytest
import torch

from helpers.cli import run_dualrpo

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")]


def test_bench_train_gpu_small(tmp_path):
    out = tmp_path / "train.json"
    run_dualrpo("bench", "train", "--model", "small", "--precision", "bf16", "--rows", "4", "--image", "28x28",
                "--iters", "3", "--json", str(out), timeout=900, threads=None)
    doc = json.loads(out.read_text())
    assert doc["machine"]["gpu"] == torch.cuda.get_device_name()
    summary = doc["results"]["summary"]
    if not any(k in torch.cuda.get_device_name().upper() for k in ("H100", "H200", "A100")):
        pytest.skip(f"no table peak for {torch.cuda.get_device_name()} (the run needs --peak-tflops)")
    assert summary["peak_source"].startswith("table")
    for r in summary["rows"]:
        for k in ("step_s", "tokens_per_s_per_device", "mfu"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["method"], k)


def test_bench_rollout_gpu(tmp_path):
    out = tmp_path / "rollout.json"
    run_dualrpo("bench", "rollout", "--model", "small", "--prompts", "2", "--n", "4", "--max-new-tokens", "16",
                "--json", str(out), timeout=900, threads=None)
    doc = json.loads(out.read_text())
    assert doc["results"]["device"] == "cuda"
    for r in doc["results"]["rows"]:
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
