"""Commands that run for more than a few seconds show progress while they run: `convert` counts the
tensors it writes up to the checkpoint's own count, and the benches announce each measured case."""
import os
import re

import pytest
from safetensors import safe_open

from dualrpo_mcore.cli import main
from dualrpo_mcore.models.qwen2_5_vl import testing


def _last_count(err, desc):
    """The final ``done/total`` of the tqdm line named ``desc``."""
    counts = re.findall(rf"{desc}: .*?(\d+)/(\d+) ", err)
    assert counts, f"no {desc} progress line in:\n{err}"
    return tuple(int(x) for x in counts[-1])


@pytest.mark.parametrize("tie", [False, True])
def test_convert_counts_every_tensor_both_ways(tmp_path, capsys, tie):
    src = tmp_path / "hf"
    testing.tiny_hf_model(tie=tie, text_layers=2, vision_depth=2).save_pretrained(src)
    assert main(["convert", "hf-to-mcore", "--hf", str(src), "--out", str(tmp_path / "mc"), "--tp", "2"]) == 0
    done, total = _last_count(capsys.readouterr().err, "hf-to-mcore")
    assert done == total > 0
    assert main(["convert", "mcore-to-hf", "--mcore", str(tmp_path / "mc"), "--out", str(tmp_path / "back")]) == 0
    done, total = _last_count(capsys.readouterr().err, "mcore-to-hf")
    # the independent count: the tensors of the HF checkpoint we started from
    names = set()
    for f in os.listdir(src):
        if f.endswith(".safetensors"):
            with safe_open(str(src / f), framework="pt") as h:
                names |= set(h.keys())
    assert done == total == len(names)


def test_bench_verifiers_announces_each_batch(capsys):
    assert main(["bench", "verifiers", "--workers", "1", "--num-samples", "16", "--num-adversarial", "8",
                 "--timeout", "1", "--math-cases", "/nonexistent"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"mixed / serial score \(in-process\): 16 samples in [\d.]+ s", err), err
    assert re.search(r"adversarial / .*: 8 samples in [\d.]+ s", err), err


def test_bench_token_stats_announces_each_case(capsys):
    assert main(["bench", "token-stats", "--tokens", "16", "--vocab", "64", "96", "--repeats", "1",
                 "--backend", "torch", "--skip", "mcore"]) == 0
    err = capsys.readouterr().err
    for v in (64, 96):
        for method in ("fused", "naive"):
            assert re.search(rf"V_local {v} {method}: [\d.]+ s", err), err
