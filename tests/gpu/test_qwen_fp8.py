"""FP8 (Transformer Engine) forward/backward of the Qwen2.5-VL policy on one GPU, on an awkward batch
(3 rows of 36 tokens: 108 tokens, no multiple of 16) that goes through the padding the actor applies.

The CPU side of the same path (padding leaves real tokens unchanged, the FP8 switches reach the
configs) is tests/unit/test_actor_token_padding.py and tests/unit/test_qwen_fp8_config.py."""
import os

import pytest
import torch

from dualrpo_mcore.models.qwen2_5_vl.precision import te_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 needs a CUDA GPU (none visible)"),
    pytest.mark.skipif(not te_available(),
                       reason="Transformer Engine is not importable (pip install dualrpo-mcore[te])"),
]

# FP8 GEMMs want widths that are multiples of 16: a slightly larger tiny config (ViT heads of 16 dims).
TEXT = dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]})
VISION = dict(hidden_size=64, intermediate_size=128, num_heads=4)


@pytest.fixture(scope="module")
def hf():
    from dualrpo_mcore.models.qwen2_5_vl import testing
    from dualrpo_mcore.parallel import initialize
    from dualrpo_mcore.parallel.spawn import free_port

    os.environ.update(MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    initialize(1, 1, backend="nccl")
    return testing.tiny_hf_model(vision_overrides=VISION, **TEXT)


def _forward_backward(hf, prec, batch):
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, mapping
    from dualrpo_mcore.models.qwen2_5_vl.model import ModelOptions, QwenVLModel

    cfg = from_hf(hf.config)
    model = QwenVLModel(cfg, ModelOptions(precision=prec.dtype, fp8=prec.fp8, fp8_recipe=prec.fp8_recipe,
                                          fp8_vision=prec.fp8_vision, spec_backend="te")).cuda()
    model.load_state_dict(mapping.hf_state_dict_to_rank(cfg, hf.state_dict(), te_spec=True), strict=False)
    batch = {k: v.cuda() for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"],
                   image_grid_thw=batch["image_grid_thw"], runtime_gather_output=True)
    real = batch["attention_mask"].bool()
    (logits.float()[..., : cfg.vocab_size] * real[..., None]).sum().backward()
    assert torch.isfinite(logits).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    return logits.float()[..., : cfg.vocab_size]


@pytest.mark.parametrize("recipe,fp8_vision", [("delayed", False), ("tensorwise", False), ("tensorwise", True)])
def test_fp8_hybrid_forward_backward_tracks_bf16(hf, recipe, fp8_vision):
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, testing
    from dualrpo_mcore.models.qwen2_5_vl.precision import Precision
    from dualrpo_mcore.actor.microbatch import pad_tokens

    batch = testing.make_batch(patch_dim=from_hf(hf.config).patch_dim)
    b, s = batch["input_ids"].shape
    assert (b * s) % 16  # the shape that used to raise inside TE
    bf16 = _forward_backward(hf, Precision(dtype="bf16"), batch)
    prec = Precision(dtype="bf16", fp8="hybrid", fp8_recipe=recipe, fp8_vision=fp8_vision)
    padded = pad_tokens(batch, prec.token_multiple)
    assert (padded["input_ids"].numel() % prec.token_multiple) == 0
    fp8 = _forward_backward(hf, prec, padded)[:, :s]
    real = batch["attention_mask"].bool().cuda()
    diff = (fp8 - bf16)[real].abs().max()
    assert diff < 0.25 * bf16[real].abs().max() + 0.1


def test_unpadded_fp8_batch_is_refused_with_the_fix_named(hf):
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, testing
    from dualrpo_mcore.models.qwen2_5_vl.precision import Precision

    batch = testing.make_batch(patch_dim=from_hf(hf.config).patch_dim)
    with pytest.raises(ValueError, match="pad_tokens"):
        _forward_backward(hf, Precision(dtype="bf16", fp8="hybrid", fp8_recipe="tensorwise"), batch)


def test_actor_fp8_token_stats_on_an_awkward_batch(hf):
    """The actor's own micro-batching pads for FP8: 3 x 36 in one micro-batch, and single rows."""
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, testing
    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.actor.config import ActorConfig, MicroBatchConfig, ModelSourceConfig, ParallelConfig

    batch = testing.make_batch(patch_dim=from_hf(hf.config).patch_dim)
    batch["response_mask"] = batch["attention_mask"].clone()
    batch["response_mask"][:, :4] = 0
    stats = {}
    for name, fp8 in (("bf16", None), ("fp8", "hybrid")):
        for max_tokens in (40, 200):
            src = ModelSourceConfig(tiny=True, hf_config=hf.config, precision="bf16", fp8=fp8,
                                    fp8_recipe="tensorwise", fp8_vision=fp8 is not None, spec_backend="auto")
            actor = Actor(ActorConfig(model=src, parallel=ParallelConfig(backend="nccl"),
                                      micro=MicroBatchConfig(max_tokens=max_tokens)), hf_state_dict=hf.state_dict())
            assert actor.backend == "te" and actor.te_spec
            _, micro = actor._split(batch)
            assert all(mb["input_ids"].numel() % actor.token_multiple == 0 for mb in micro)
            stats[name, max_tokens] = actor.compute_token_stats(batch)["logprob"]
    resp = batch["response_mask"].bool()
    for max_tokens in (40, 200):
        got, want = stats["fp8", max_tokens], stats["bf16", max_tokens]
        assert torch.isfinite(got).all() and not got[~resp].any()
        assert (got - want)[resp].abs().max() < 0.5
