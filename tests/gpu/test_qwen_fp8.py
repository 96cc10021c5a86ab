"""FP8 (Transformer Engine) forward/backward of the Qwen2.5-VL policy on one GPU."""
import pytest
import torch

from dualrpo_mcore.models.qwen2_5_vl.precision import te_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 needs a CUDA GPU (none visible)"),
    pytest.mark.skipif(not te_available(),
                       reason="Transformer Engine is not importable (pip install dualrpo-mcore[te])"),
]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_hybrid_forward_backward_tracks_bf16(recipe):
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, mapping, testing
    from dualrpo_mcore.models.qwen2_5_vl.model import ModelOptions, QwenVLModel
    from dualrpo_mcore.models.qwen2_5_vl.precision import Precision
    from dualrpo_mcore.parallel import initialize
    from dualrpo_mcore.parallel.spawn import free_port

    import os
    os.environ.update(MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    initialize(1, 1, backend="nccl")
    # FP8 GEMMs want dims that are multiples of 16: a slightly larger tiny config.
    hf = testing.tiny_hf_model(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                               num_key_value_heads=2,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
    cfg = from_hf(hf.config)
    outs = {}
    for name, prec in (("bf16", Precision(dtype="bf16")),
                       ("fp8", Precision(dtype="bf16", fp8="hybrid", fp8_recipe=recipe))):
        model = QwenVLModel(cfg, ModelOptions(precision=prec, backend="te")).cuda()
        model.load_state_dict(mapping.hf_state_dict_to_rank(cfg, hf.state_dict(), te_spec=True), strict=False)
        batch = {k: v.cuda() for k, v in testing.make_batch(patch_dim=cfg.patch_dim).items()}
        batch["pixel_values"] = batch["pixel_values"].bfloat16()
        logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"], runtime_gather_output=True)
        logits.float().sum().backward()
        assert torch.isfinite(logits).all()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        outs[name] = logits.float()[..., : cfg.vocab_size]
    assert (outs["fp8"] - outs["bf16"]).abs().max() < 0.25 * outs["bf16"].abs().max() + 0.1
