"""HF config.json -> Megatron TransformerConfigs for the LM, ViT and merger; precision switch."""
import pytest
import torch.nn.functional as F

from dualrpo_mcore.models.qwen2_5_vl import Precision, from_hf, language_config, merger_config, testing, vision_config


@pytest.fixture(scope="module")
def cfg():
    return from_hf(testing.tiny_hf_config())


def test_fields_read_from_hf(cfg):
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (203, 96, 6, 2)
    assert cfg.mrope_section == [2, 3, 3] and cfg.rope_theta == 10000.0
    assert (cfg.vision_hidden_size, cfg.vision_depth, cfg.fullatt_block_indexes) == (48, 3, [1])
    assert cfg.padded_vocab_size() == 256 and cfg.patch_dim == 96 and cfg.merger_hidden_size == 192


def test_reads_a_saved_config_dir(tmp_path):
    testing.tiny_hf_config(tie=True).save_pretrained(tmp_path)
    c = from_hf(str(tmp_path))
    assert c.tie_word_embeddings and c.image_token_id == testing.IMAGE


def test_transformer_configs(cfg):
    lm = language_config(cfg, tp=2, pp=2)
    assert (lm.num_query_groups, lm.kv_channels, lm.ffn_hidden_size) == (2, 16, 70)
    assert lm.add_qkv_bias and not lm.add_bias_linear and lm.gated_linear_unit
    assert lm.activation_func is F.silu and lm.normalization == "RMSNorm" and lm.layernorm_epsilon == 1e-6
    assert lm.mrope_section == [2, 3, 3] and lm.pipeline_model_parallel_size == 2
    assert lm.hidden_dropout == 0 and not lm.apply_rope_fusion and lm.attention_softmax_in_fp32
    vit = vision_config(cfg, tp=2)
    assert vit.add_bias_linear and vit.pipeline_model_parallel_size == 1 and vit.kv_channels == 12
    merger = merger_config(cfg)
    assert merger.activation_func is F.gelu and not merger.gated_linear_unit and merger.ffn_hidden_size == 192


def test_bad_fields_are_named():
    c = testing.tiny_hf_config().to_dict()
    c["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ValueError, match="mrope_section"):
        from_hf(c)
    from dualrpo_mcore.models.qwen2_5_vl.config import check_parallel

    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by tensor parallel size 4"):
        check_parallel(from_hf(testing.tiny_hf_config()), 4, 1)


def test_precision_maps_to_megatron_fp8_fields(cfg):
    p = Precision(dtype="bf16", fp8="hybrid", fp8_recipe="blockwise")
    kw = p.transformer_kwargs()
    assert kw["fp8"] == "hybrid" and kw["fp8_recipe"] == "blockwise" and kw["bf16"]
    assert p.for_part("vision").fp8 is None  # the ViT stays bf16 unless asked
    with pytest.raises(ValueError, match="fp8_recipe"):
        Precision(dtype="bf16", fp8="e4m3", fp8_recipe="bogus")
    with pytest.raises(ValueError, match="needs dtype"):
        Precision(fp8="e4m3")
