"""Loader: mixing weights, exact resume, bad-row policy, formats, V-Triune conversion."""
import io
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dualrpo_mcore.data.config import DataConfig, SourceConfig
from dualrpo_mcore.data.loader import PromptLoader, TooManyBadRows
from dualrpo_mcore.data.schema import BadRow, arrow_schema, make_row


def _png(w=28, h=28, colour=(200, 10, 10)):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def _text_row(i, src="s"):
    return make_row(messages=[{"role": "user", "content": f"q {src} {i}"}], images=[],
                    reward={"verifier": "counting", "answer": i}, task="counting",
                    data_source=src, id=f"{src}-{i}")


def _img_row(i, img=None):
    return make_row(messages=[{"role": "user", "content": f"<image>count {i}"}],
                    images=[{"bytes": img or _png(), "path": None}],
                    reward={"verifier": "counting", "answer": i}, task="counting", data_source="img")


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), str(path))
    return str(path)


def _text_sources(tmp_path, sizes=(30, 50, 70), weights=(0.5, 0.3, 0.2)):
    srcs = []
    for k, (n, w) in enumerate(zip(sizes, weights)):
        p = _write(tmp_path / f"src{k}.parquet", [_text_row(i, f"s{k}") for i in range(n)])
        srcs.append(SourceConfig(path=p, weight=w, name=f"s{k}"))
    return srcs


def test_mixing_weights_hold_in_a_large_draw(tmp_path):
    weights = (0.5, 0.3, 0.2)
    loader = PromptLoader(DataConfig(sources=_text_sources(tmp_path, weights=weights), seed=1))
    n = 20000
    counts = np.zeros(3)
    for k in range(n):  # the source schedule alone; reading rows is checked below
        counts[loader.source_of_draw(k)] += 1
    expected = np.array(weights) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, chi2)  # p = 0.001 for 2 degrees of freedom
    drawn = [p.source for p in loader.next_prompts(3000)]
    frac = np.array([drawn.count(f"s{k}") for k in range(3)]) / 3000
    assert np.allclose(frac, weights, atol=0.04), frac


def test_each_epoch_is_a_permutation_and_seeded(tmp_path):
    src = [SourceConfig(path=_write(tmp_path / "a.parquet", [_text_row(i) for i in range(40)]))]
    a = [p.row for p in PromptLoader(DataConfig(sources=src, seed=3)).next_prompts(80)]
    b = [p.row for p in PromptLoader(DataConfig(sources=src, seed=3)).next_prompts(80)]
    c = [p.row for p in PromptLoader(DataConfig(sources=src, seed=4)).next_prompts(80)]
    assert a == b and a != c
    assert sorted(a[:40]) == list(range(40)) and sorted(a[40:]) == list(range(40))
    assert a[:40] != a[40:]  # reshuffled each epoch


@pytest.mark.parametrize("first", [7, 29, 30, 64, 151])  # mid-epoch and across epoch boundaries
def test_resume_restores_exact_next_sample(tmp_path, first):
    cfg = DataConfig(sources=_text_sources(tmp_path), seed=5)
    ref = PromptLoader(cfg)
    expected = [p.uid for p in ref.next_prompts(first + 40)][first:]
    a = PromptLoader(cfg)
    a.next_prompts(first)
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON checkpoint
    b = PromptLoader(cfg)
    b.load_state_dict(state)
    assert [p.uid for p in b.next_prompts(40)] == expected
    assert [p.uid for p in a.next_prompts(40)] == expected


def test_resume_rejects_other_sources(tmp_path):
    a = PromptLoader(DataConfig(sources=_text_sources(tmp_path), seed=5))
    b = PromptLoader(DataConfig(sources=_text_sources(tmp_path, sizes=(30, 50, 71)), seed=5))
    with pytest.raises(ValueError, match="sizes"):
        b.load_state_dict(a.state_dict())


def _corrupt_file(tmp_path):
    rows = [_img_row(i) for i in range(12)]
    rows[2] = _img_row(2, img=b"\x89PNG not really an image")
    rows[5] = dict(rows[5], task=None)  # missing field
    rows[7] = dict(rows[7], reward=json.dumps({"verifier": "no_such_verifier", "answer": 1}))
    rows[9] = _img_row(9, img=_png(400, 300))  # oversized for max_image_pixels below
    return _write(tmp_path / "corrupt.parquet", rows)


def _bad_cfg(path, **kw):
    base = dict(sources=[SourceConfig(path=path)], shuffle=False, max_image_pixels=200 * 200,
                min_pixels=28 * 28, max_pixels=56 * 56)
    base.update(kw)
    return DataConfig(**base)


def test_skip_policy_skips_and_reports_rows(tmp_path, caplog):
    path = _corrupt_file(tmp_path)
    loader = PromptLoader(_bad_cfg(path, max_bad_fraction=0.5))
    with caplog.at_level(logging.WARNING, logger="dualrpo.data"):
        rows = [p.row for p in loader.next_prompts(8)]
    assert rows == [0, 1, 3, 4, 6, 8, 10, 11]
    assert sorted(loader.bad) == sorted(f"{path}:{r}" for r in (2, 5, 7, 9))
    assert "images[0]" in loader.bad[f"{path}:2"] and "cannot decode" in loader.bad[f"{path}:2"]
    assert loader.bad[f"{path}:5"].startswith("task")
    assert "no_such_verifier" in loader.bad[f"{path}:7"]
    assert "oversized" in loader.bad[f"{path}:9"]
    for r in (2, 5, 7, 9):
        assert f"{path}:{r}" in caplog.text


def test_fail_policy_names_file_row_field(tmp_path):
    path = _corrupt_file(tmp_path)
    loader = PromptLoader(_bad_cfg(path, bad_rows="fail"))
    loader.next_prompts(2)
    with pytest.raises(BadRow) as e:
        next(loader)
    assert (e.value.file, e.value.row, e.value.field) == (path, 2, "images[0]")
    assert f"{path}:2" in str(e.value)


def test_abort_past_threshold(tmp_path):
    path = _corrupt_file(tmp_path)
    with pytest.raises(TooManyBadRows, match="max_bad_rows=2"):
        PromptLoader(_bad_cfg(path, max_bad_rows=2, max_bad_fraction=1.0)).next_prompts(12)
    with pytest.raises(TooManyBadRows, match="fraction"):
        PromptLoader(_bad_cfg(path, max_bad_fraction=0.1, min_rows_for_fraction=4)).next_prompts(12)


def test_jsonl_with_broken_lines_and_mixed_answer_types(tmp_path):
    p = tmp_path / "d.jsonl"
    good = [_text_row(0), dict(_text_row(1), reward={"verifier": "grounding", "answer": [1, 2, 5, 6]})]
    lines = [json.dumps(good[0]), "{not json", json.dumps(good[1]), json.dumps({"messages": []})]
    p.write_text("\n".join(lines) + "\n")
    loader = PromptLoader(DataConfig(sources=[SourceConfig(path=str(p))], shuffle=False,
                                     max_bad_fraction=1.0))
    got = loader.next_prompts(3)  # the third wraps past bad line 3 into the next epoch
    assert [g.row for g in got] == [0, 2, 0]
    assert got[1].reward["answer"] == [1, 2, 5, 6]
    assert set(loader.bad) == {f"{p}:1", f"{p}:3"}


def test_saved_dataset_dir_and_arrow(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([_text_row(i) for i in range(5)])
    ds.save_to_disk(str(tmp_path / "saved"))
    loader = PromptLoader(DataConfig(sources=[SourceConfig(path=str(tmp_path / "saved"))], shuffle=False))
    assert [p.row for p in loader.next_prompts(5)] == list(range(5))
    arrow = sorted((tmp_path / "saved").glob("*.arrow"))[0]
    loader = PromptLoader(DataConfig(sources=[SourceConfig(path=str(arrow))], shuffle=False))
    assert next(loader).reward == {"verifier": "counting", "answer": 0}


def test_hf_image_feature_column_loads_undecoded(tmp_path):
    import datasets

    feats = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                               "images": datasets.Sequence(datasets.Image()), "reward": datasets.Value("string"),
                               "task": datasets.Value("string"), "data_source": datasets.Value("string")})
    row = {k: v for k, v in _img_row(3).items() if k in feats}
    datasets.Dataset.from_list([row], features=feats).to_parquet(str(tmp_path / "hf.parquet"))
    p = next(PromptLoader(DataConfig(sources=[SourceConfig(path=str(tmp_path / "hf.parquet"))])))
    assert p.images[0].size == (28, 28) and p.image_grid_thw.tolist() == [[1, 4, 4]]


def test_vtriune_conversion_native_profile(tmp_path):
    from dualrpo_mcore.data.vtriune import convert_file

    def vt(verifier, answer, gt=None, ability="math", fmt=0.0, norm=None):
        return {"data_source": "mm_math", "images": [{"bytes": _png(112, 56), "path": None}],
                "prompt": [{"role": "user", "content": "<image>What is x?"}], "ability": ability,
                "reward_model": {"answer": answer, "ground_truth": gt, "accuracy_ratio": 1.0,
                                 "format_ratio": fmt, "verifier": verifier,
                                 "verifier_parm": {"det_verifier_normalized": norm}},
                "extra_info": {"id": "7", "image_path": None}}

    rows = [vt("mathverify", "", gt="\\boxed{4}"),
            vt("detection", "[{'bbox_2d': [10, 20, 500, 900], 'label': 'truck'}]", ability="detection", norm=True),
            vt("mathverify", "3", fmt=0.2),
            vt("what_is_this", "3", ability="cooking")]
    src = tmp_path / "vt.parquet"
    pq.write_table(pa.Table.from_pylist(rows), str(src))
    n, errors = convert_file(str(src), str(tmp_path / "out.parquet"), profile="native")
    assert n == 3 and len(errors) == 1 and f"{src}:3" in errors[0] and "reward_model.verifier" in errors[0]
    out = pq.read_table(tmp_path / "out.parquet").to_pylist()
    specs = [json.loads(r["reward"]) for r in out]
    assert specs[0] == {"verifier": "math", "answer": "4"}
    assert specs[1]["params"] == {"coords": "abs", "answer_coords": "norm1000", "image_size": [112, 56]}  # no resize needed
    assert specs[1]["answer"][0]["bbox_2d"] == [10, 20, 500, 900]
    assert [c["weight"] for c in specs[2]["components"]] == [1.0, 0.2]
    assert out[0]["task"] == "math" and out[0]["id"] == "7"
    from dualrpo_mcore.verifiers.scoring import score

    assert score(specs[0], "<answer>4</answer>") == 1.0


def test_config_checks():
    with pytest.raises(ValueError, match="weight"):
        SourceConfig(path="x", weight=0)
    with pytest.raises(ValueError, match="bad_rows"):
        DataConfig(bad_rows="ignore")
    with pytest.raises(ValueError, match="min_pixels"):
        DataConfig(min_pixels=10, max_pixels=5)
