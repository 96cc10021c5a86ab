"""``dualrpo bench train --length-mix``: the drawn response lengths are deterministic, within [1, max],
``heavy-tail`` is heavy-tailed, ``demo`` reproduces its histogram's proportions; the synthetic batch is
right-padded to its longest row; bad flag combinations are named."""
import argparse
import json
import statistics

import pytest

from dualrpo_mcore.bench import length_mix


def test_mixes_are_deterministic_and_capped():
    hist = {5: 3, 40: 1, 200: 1}  # 200 > the cap: capped, not dropped
    for mix in length_mix.MIXES:
        a = length_mix.draw_lengths(mix, 500, 64, seed=3, histogram=hist)
        assert a == length_mix.draw_lengths(mix, 500, 64, seed=3, histogram=hist), mix
        assert len(a) == 500 and all(1 <= x <= 64 for x in a), mix
    assert length_mix.draw_lengths("fixed", 4, 64) == [64] * 4
    assert length_mix.draw_lengths("heavy-tail", 200, 64, seed=0) != \
        length_mix.draw_lengths("heavy-tail", 200, 64, seed=1)
    assert 64 in length_mix.draw_lengths("demo", 500, 64, seed=0, histogram=hist)
    assert length_mix.draw_lengths("demo", 50, 64, histogram={0: 1}) == [1] * 50  # an empty response still is 1


def test_heavy_tail_is_heavy_tailed():
    lens = length_mix.draw_lengths("heavy-tail", 20000, 1024, seed=0)
    median = statistics.median(lens)
    assert 100 <= median <= 156  # max / 8
    assert max(lens) == 1024 and max(lens) / median >= 6
    at_cap = sum(x == 1024 for x in lens) / len(lens)
    assert 0.01 < at_cap < 0.03  # P(log-normal > 8 x median) with sigma 1 is 1.9%
    assert statistics.mean(lens) > 1.4 * median  # right-skewed: the tail pulls the mean up


def test_demo_reproduces_histogram_proportions(tmp_path):
    hist = {8: 50, 16: 30, 33: 15, 64: 5}
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"histogram": {str(k): v for k, v in hist.items()}, "command": "x"}))
    loaded = length_mix.load_histogram(str(path))
    assert loaded == hist
    lens = length_mix.draw_lengths("demo", 20000, 64, seed=0, histogram=loaded)
    total = sum(hist.values())
    for k, v in hist.items():
        assert abs(lens.count(k) / len(lens) - v / total) < 0.015, k
    assert set(lens) == set(hist)
    with pytest.raises(ValueError, match="histogram"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        length_mix.load_histogram(str(bad))


def test_shipped_demo_histogram_loads():
    path = length_mix.default_demo_file()
    hist = length_mix.load_histogram(path)
    with open(path) as f:
        doc = json.load(f)
    assert sum(hist.values()) == doc["samples"] and min(hist) >= 0
    for key in ("command", "date", "commit"):
        assert doc[key], key


def test_synthetic_batch_right_pads_variable_rows():
    from dualrpo_mcore.bench.train import hf_config, synthetic_batch
    from dualrpo_mcore.models.qwen2_5_vl import from_hf

    cfg = from_hf(hf_config("tiny"))
    fixed = synthetic_batch(cfg, 3, 8, 5, (8, 8), 1)
    same = synthetic_batch(cfg, 3, 8, [5, 5, 5], (8, 8), 1)
    assert all(fixed[k].equal(same[k]) for k in ("input_ids", "attention_mask", "response_mask"))
    b = synthetic_batch(cfg, 3, 8, [2, 9, 4], (8, 8), 1)
    base = 8 + 2 + 16  # prompt, vision start/end, 8x8 image = 16 merged tokens
    assert b["input_ids"].shape == (3, base + 9)
    assert b["attention_mask"].sum(-1).tolist() == [base + 2, base + 9, base + 4]
    assert b["response_mask"].sum(-1).tolist() == [2, 9, 4]
    assert (b["input_ids"][b["attention_mask"] == 0] == 0).all()
    from dualrpo_mcore.actor.batching import check_batch

    check_batch(b)


def _args(*argv):
    from dualrpo_mcore.bench import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_bad_mix_flags_are_named(tmp_path):
    from dualrpo_mcore.bench.train import check_args

    with pytest.raises(ValueError, match="--no-packing"):
        check_args(_args("--compare-packing", "--no-packing"))
    with pytest.raises(ValueError, match="--length-mix-file"):
        check_args(_args("--length-mix-file", "x.json"))
    with pytest.raises(ValueError, match="--length-mix-file"):
        check_args(_args("--length-mix", "demo", "--length-mix-file", str(tmp_path / "missing.json")))
    args = _args("--length-mix", "heavy-tail", "--compare-packing")
    check_args(args)
    assert args.length_mix == "heavy-tail" and args.compare_packing and args.seed == 0
