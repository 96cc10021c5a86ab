"""trainer.model_source: every kind of ModelSourceConfig gives the HF config it names, the rollout side
(hf_config) and the Megatron side (resolve_model_config) agree, and the named small presets keep
the shapes the tests and recipes were built on."""
import json

import pytest
from transformers import AutoConfig

from dualrpo_mcore.models.qwen2_5_vl import convert, from_hf, presets, testing
from dualrpo_mcore.actor.config import ModelSourceConfig
from dualrpo_mcore.actor.megatron_setup import resolve_model_config
from dualrpo_mcore.actor.model_source import hf_config


def _norm(cfg):
    d = cfg.to_dict()
    for k in ("transformers_version", "_name_or_path"):  # where it was read from, not what it is
        d.pop(k, None)
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    hf = root / "hf"
    testing.tiny_hf_model(text_layers=3, vision_depth=2, hidden_size=48, num_attention_heads=4,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                           "mrope_section": [2, 2, 2]}).save_pretrained(hf)
    mc = root / "mcore"
    convert.hf_to_megatron(str(hf), str(mc), tp=1, pp=1)
    return hf, mc


def test_hf_dir_and_its_megatron_checkpoint_give_the_same_config(dirs):
    hf, mc = dirs
    want = _norm(AutoConfig.from_pretrained(hf))  # the reference: transformers reading the directory
    got_dir = hf_config(ModelSourceConfig(hf_dir=str(hf)))
    got_ckpt = hf_config(ModelSourceConfig(megatron_ckpt=str(mc)))
    assert _norm(got_dir) == want
    assert _norm(got_ckpt) == want  # the case steps._hf_config used to miss
    assert got_ckpt.text_config.num_hidden_layers == 3 and got_ckpt.text_config.hidden_size == 48
    # the Megatron side reads the same architecture from both
    a = resolve_model_config(ModelSourceConfig(hf_dir=str(hf)))
    b = resolve_model_config(ModelSourceConfig(megatron_ckpt=str(mc)))
    assert (a.num_layers, a.hidden_size, a.num_heads, a.vocab_size) == (b.num_layers, b.hidden_size, b.num_heads,
                                                                        b.vocab_size) == (3, 48, 4, 203)


def test_megatron_checkpoint_without_meta_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json is missing"):
        hf_config(ModelSourceConfig(megatron_ckpt=str(tmp_path)))


def test_preset_tiny_and_ready_config(tmp_path):
    p = hf_config(ModelSourceConfig(preset="qwen2.5-vl-7b"))
    assert (p.text_config.hidden_size, p.text_config.num_hidden_layers, p.vision_config.out_hidden_size) == (
        3584, 28, 3584)
    t = hf_config(ModelSourceConfig(tiny=True, tiny_overrides={"tie": True, "text_layers": 3}))
    assert t.tie_word_embeddings and t.text_config.num_hidden_layers == 3 and t.text_config.vocab_size == 203
    ready = testing.tiny_hf_config(vision_depth=1)
    assert hf_config(ModelSourceConfig(tiny=True, hf_config=ready)) is ready
    from_dict = hf_config(ModelSourceConfig(tiny=True, hf_config=presets.hf_config_dict("bench-tiny")))
    assert from_dict.vision_config.patch_size == 14 and from_dict.image_token_id == 200
    # actor and engine agree on every kind
    for src in (ModelSourceConfig(preset="qwen2.5-vl-3b"), ModelSourceConfig(tiny=True),
                ModelSourceConfig(tiny=True, hf_config=ready)):
        assert from_hf(hf_config(src)).__dict__.keys() == resolve_model_config(src).__dict__.keys()
        assert from_hf(hf_config(src)).num_layers == resolve_model_config(src).num_layers


# Shapes written out by hand (not through presets): the tests and the demo depend on them exactly.
def test_small_presets_keep_their_shapes():
    t = presets.hf_config_dict("tiny")
    assert t["text_config"]["vocab_size"] == 203 and t["text_config"]["intermediate_size"] == 70
    assert (t["text_config"]["num_attention_heads"], t["text_config"]["num_key_value_heads"]) == (6, 2)
    assert (t["vision_config"]["hidden_size"], t["vision_config"]["intermediate_size"],
            t["vision_config"]["patch_size"], t["vision_config"]["window_size"]) == (48, 54, 4, 16)
    assert (t["image_token_id"], t["video_token_id"], t["vision_start_token_id"], t["vision_end_token_id"]) == (
        200, 201, 198, 199)
    s = presets.hf_config_dict("bench-small")
    assert s["text_config"]["rope_parameters"]["mrope_section"] == [8, 12, 12]  # head_dim 64
    assert (s["vision_config"]["num_heads"], s["image_token_id"]) == (4, 16381)
    m = presets.hf_config_dict("bench-medium")
    assert (m["text_config"]["hidden_size"], m["text_config"]["num_hidden_layers"], m["vision_config"]["depth"]) == (
        1024, 8, 4)


def test_scaled_preset_from_a_tokenizer_dir(tmp_path):
    facts = dict(vocab_size=920, bos_token_id=902, eos_token_id=904, pad_token_id=902, image_token_id=914,
                 video_token_id=915, vision_start_token_id=911, vision_end_token_id=912, ids={})
    (tmp_path / "dualrpo_tokens.json").write_text(json.dumps(facts))
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}))
    d = presets.hf_config_dict("scaled", hidden_size=96, vision_hidden=48, **presets.tokenizer_overrides(tmp_path))
    text, vis = d["text_config"], d["vision_config"]
    assert (text["vocab_size"], text["eos_token_id"], d["image_token_id"], d["vision_end_token_id"]) == (
        920, 904, 914, 912)
    assert text["rope_parameters"]["mrope_section"] == [4, 4, 4] and sum([4, 4, 4]) * 2 == 96 // 4
    assert (vis["num_heads"], vis["window_size"], vis["out_hidden_size"]) == (3, 56, 96)
    with pytest.raises(ValueError, match="--hidden-size 72"):
        presets.hf_config_dict("scaled", hidden_size=72, **presets.tokenizer_overrides(tmp_path))
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json is missing"):
        presets.tokenizer_overrides(tmp_path)


def test_unknown_preset_and_overrides_of_a_released_size():
    with pytest.raises(KeyError, match="bench-small"):
        presets.hf_config_dict("nope")
    with pytest.raises(TypeError, match="takes no overrides"):
        presets.hf_config_dict("qwen2.5-vl-7b", vocab_size=10)
