"""Tokenizer + processor files for the tiny model, and the loader's image processing, checked
against transformers' own AutoTokenizer / Qwen2.5-VL processor."""
import json

import pytest
import torch

from dualrpo_mcore.data import synth
from dualrpo_mcore.data.config import DataConfig, SourceConfig
from dualrpo_mcore.data.loader import PromptLoader
from dualrpo_mcore.data.tokenizer import SPECIAL_TOKENS, TAG_TOKENS, build_model_files, load_processor


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    facts = build_model_files(synth.corpus_texts(num_per_task=8), str(d), vocab_size=1024,
                              min_pixels=56 * 56, max_pixels=168 * 112)
    return str(d), facts


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "train.parquet"
    synth.write_split(str(p), 2, seed=0, split="train")
    return str(p)


def test_autotokenizer_loads_with_qwen_special_tokens(model_dir):
    from transformers import AutoTokenizer

    d, facts = model_dir
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == facts["vocab_size"] <= 1024
    for t in SPECIAL_TOKENS + TAG_TOKENS:
        assert tok.convert_tokens_to_ids(t) == facts["ids"][t]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert facts["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>")
    # numbers are split digit by digit so the tiny model can learn arithmetic
    pieces = tok.tokenize("x 2024")
    assert [p for p in pieces if p.isdigit()] == ["2", "0", "2", "4"]
    text = "<think>ok</think><answer>42</answer>"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    with open(f"{d}/dualrpo_tokens.json") as f:
        assert json.load(f)["image_token_id"] == facts["image_token_id"]


def test_processor_is_qwen2_5_vl_and_expands_image_pads(model_dir):
    from PIL import Image
    from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor

    d, facts = model_dir
    proc = load_processor(d)
    assert isinstance(proc, Qwen2_5_VLProcessor)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 1
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>how many?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    out = proc(text=[text], images=[Image.new("RGB", (112, 84), (9, 9, 9))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 6, 8]]  # 84/14 x 112/14, no resize
    n_pad = int((out["input_ids"][0] == facts["image_token_id"]).sum())
    assert n_pad == 6 * 8 // 4


def test_loader_matches_hf_processor_and_processes_once_per_prompt(model_dir, data_file):
    d, facts = model_dir
    cfg = DataConfig(sources=[SourceConfig(path=data_file)], processor_dir=d,
                     min_pixels=56 * 56, max_pixels=168 * 112, seed=2)
    loader = PromptLoader(cfg)
    prompts = loader.next_prompts(16)
    assert loader.images.calls == 16  # once per prompt, whatever the group size later
    proc = load_processor(d)
    for p in prompts:
        ref = proc(text=[proc.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)],
                   images=p.images, return_tensors="pt")
        assert torch.equal(p.pixel_values, ref["pixel_values"])
        assert torch.equal(p.image_grid_thw, ref["image_grid_thw"])
        assert torch.equal(p.input_ids, ref["input_ids"][0])
        grid = p.image_grid_thw[0]
        assert int((p.input_ids == facts["image_token_id"]).sum()) == int(grid.prod()) // 4
        # synthetic images keep their size (sides are multiples of 28 within the bounds)
        assert (int(grid[1]) * 14, int(grid[2]) * 14) == (p.images[0].height, p.images[0].width)


def test_max_prompt_tokens_filters(model_dir, data_file):
    d, _ = model_dir
    cfg = DataConfig(sources=[SourceConfig(path=data_file)], processor_dir=d, max_pixels=168 * 112,
                     max_prompt_tokens=80, shuffle=False)
    loader = PromptLoader(cfg)
    got = loader.next_prompts(3)
    assert all(len(p.input_ids) <= 80 for p in got)
    assert loader.filtered.get("max_prompt_tokens", 0) > 0 and not loader.bad
