"""`dualrpo convert`: HF -> Megatron (TP=2, PP=2) -> HF is bitwise identical, side files carried over,
and the exported directory loads in transformers with the same outputs."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from dualrpo_mcore.cli import main
from dualrpo_mcore.models.qwen2_5_vl import convert, mapping, testing

SIDE_FILES = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
              "tokenizer_config.json": '{"model_max_length": 128}',
              "preprocessor_config.json": '{"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}',
              "chat_template.json": '{"chat_template": "{{ messages }}"}'}


def _hf_dir(path, tie):
    model = testing.tiny_hf_model(tie=tie, text_layers=2, vision_depth=2)
    model.save_pretrained(path)
    for name, text in SIDE_FILES.items():
        (path / name).write_text(text)
    return model


def _tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_tp2_pp2_is_bitwise(tmp_path, tie):
    src, mc, back = tmp_path / "hf", tmp_path / "mcore", tmp_path / "hf_back"
    model = _hf_dir(src, tie)
    assert main(["convert", "hf-to-mcore", "--hf", str(src), "--out", str(mc), "--tp", "2", "--pp", "2"]) == 0
    assert sorted(os.listdir(mc)) == ["hf", "meta.json", "mp_rank_00_000", "mp_rank_00_001",
                                      "mp_rank_01_000", "mp_rank_01_001"]
    assert main(["convert", "mcore-to-hf", "--mcore", str(mc), "--out", str(back)]) == 0
    a, b = _tensors(src), _tensors(back)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    for name, text in SIDE_FILES.items():
        assert (back / name).read_text() == text
    assert json.loads((back / "config.json").read_text()) == json.loads((src / "config.json").read_text())

    from transformers import Qwen2_5_VLForConditionalGeneration

    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(back)).eval()
    batch = testing.make_batch(rows=(((6, 8),),))
    with torch.no_grad():
        assert torch.equal(testing.hf_forward(model, batch), testing.hf_forward(again, batch))


def test_layouts_hold_the_same_global_tensors(tmp_path):
    _hf_dir(tmp_path / "hf", tie=False)
    one = convert.hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "a"), tp=1, pp=1)
    four = convert.hf_to_megatron(str(tmp_path / "hf"), str(tmp_path / "b"), tp=2, pp=2)
    ra, rb = convert.MegatronReader(one), convert.MegatronReader(four)
    for rule in mapping.rules(ra.cfg, 1):
        assert torch.equal(ra.global_tensor(rule), rb.global_tensor(rule)), rule.mcore
    ra.close(), rb.close()


def test_qkv_layout_is_grouped_per_kv_head():
    """Megatron's fused QKV: for each query group, its query heads then one k and one v head."""
    heads, groups, d = 4, 2, 1
    q = torch.arange(4.0).view(4, 1)
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    fused = mapping._qkv_fuse(q, k, v, heads, groups)
    assert fused.view(-1).tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(x, y) for x, y in zip(mapping._qkv_unfuse(fused, heads, groups), (q, k, v)))
    # TP=2 rank 1 holds group 1 entire; the GLU split keeps [gate_r; up_r]
    assert mapping.tp_shard(fused, "col", 1, 2).view(-1).tolist() == [2, 3, 11, 21]
    glu = torch.arange(8.0).view(8, 1)
    assert mapping.tp_shard(glu, "glu", 1, 2).view(-1).tolist() == [2, 3, 6, 7]
    assert torch.equal(mapping.tp_merge([mapping.tp_shard(glu, "glu", r, 2) for r in range(2)], "glu"), glu)


def test_errors_name_the_problem(tmp_path, capsys):
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 1
    assert "config.json" in capsys.readouterr().err
