"""``bench.flops`` (analytic Qwen2.5-VL FLOPs) against an independent count: PyTorch's
``FlopCounterMode`` on transformers' ``Qwen2_5_VLForConditionalGeneration``.

The HF model runs with eager attention: ``FlopCounterMode`` counts the ``bmm``/``matmul`` of the eager
path, but on CPU SDPA dispatches to ``_scaled_dot_product_flash_attention_for_cpu``, which it does not
count (checked below), so an SDPA run would under-count the attention. The vision tower has several
window blocks and two full-attention blocks, the images have ragged edge windows, and the batches are
LM-only, vision-only and mixed. Sensitivity: the same comparison without the vision term, or without
the attention-score terms, must fall outside the tolerance (so the test can fail).
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dualrpo_mcore.bench import flops
from dualrpo_mcore.models.qwen2_5_vl import from_hf, testing

TOL = 0.02  # relative; the analytic count leaves out no matmul, so agreement is in fact exact here


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = testing.tiny_hf_config(vision_depth=5)
    cfg.vision_config.fullatt_block_indexes = [1, 4]
    m = Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    assert m.config.text_config._attn_implementation == "eager"
    assert m.config.vision_config._attn_implementation == "eager"
    return m


def _counted(fn):
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        fn()
    return fc.get_total_flops(), {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


def _lm_batch(qc, rows):
    b = testing.make_batch(seed=1, rows=rows, patch_dim=qc.patch_dim)
    # transformers runs every row at the padded length S: count that many tokens per row.
    return b, [b["input_ids"].shape[1]] * b["input_ids"].shape[0]


def _rel(a, b):
    return abs(a - b) / b


def test_lm_only(model):
    qc = from_hf(model.config)
    b, lens = _lm_batch(qc, ((), (), ()))
    got, ops = _counted(lambda: testing.hf_forward(model, b))
    assert ops.get("aten.bmm", 0) > 0, f"the eager attention products were not counted: {ops}"
    want = flops.forward_flops(qc, lens, None, vocab=qc.vocab_size)
    assert _rel(want.total, got) <= TOL, (want.as_dict(), got)
    assert _rel(want.total - want.lm_attention, got) > TOL, "attention term too small to be tested"


def test_vision_only(model):
    qc = from_hf(model.config)
    grids = torch.tensor([[1, 6, 8], [1, 10, 4], [2, 6, 6]])  # ragged windows, a 2-frame image
    pixels = torch.randn(int(grids.prod(-1).sum()), qc.patch_dim)
    got, ops = _counted(lambda: model.model.visual(pixels, grid_thw=grids))
    assert ops.get("aten.convolution", 0) > 0, ops
    want = flops.vision_forward(qc, grids)
    assert _rel(want.vision, got) <= TOL, (want.as_dict(), got)
    assert _rel(want.vision - want.vision_attention, got) > TOL, "window/full attention term untested"
    # Window attention must differ from full attention everywhere, or the per-block split is untested.
    qc_full = from_hf(model.config)
    qc_full.fullatt_block_indexes = list(range(qc.vision_depth))
    assert _rel(flops.vision_forward(qc_full, grids).vision, got) > 1e-3


def test_mixed_batch(model):
    qc = from_hf(model.config)
    b, lens = _lm_batch(qc, ((), ((6, 8),), ((4, 10), (6, 6))))
    got, _ = _counted(lambda: testing.hf_forward(model, b))
    want = flops.forward_flops(qc, lens, b["image_grid_thw"], vocab=qc.vocab_size)
    assert _rel(want.total, got) <= TOL, (want.as_dict(), got)
    assert want.vision > 0 and _rel(want.lm, got) > TOL, "dropping the vision term must fail the check"


def test_sdpa_on_cpu_is_not_counted_hence_eager():
    """Why the fixture insists on eager: FlopCounterMode sees no FLOPs in CPU SDPA's attention op."""
    q = torch.randn(1, 2, 16, 8)
    got, _ = _counted(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert got < 2 * 2 * 16 * 16 * 8 * 2


def test_train_flops_and_batch_flops():
    qc = from_hf(testing.tiny_hf_config())
    b = testing.make_batch(rows=((), ((6, 8),)), patch_dim=qc.patch_dim)
    out = flops.batch_flops(qc, b, recompute="full")
    fwd = out["forward_total"]
    assert out["model"] == pytest.approx(3 * fwd)
    assert out["hardware"] == pytest.approx(3 * fwd + out["forward_lm"])
    real = b["attention_mask"].sum(-1).tolist()
    assert out["forward_lm_linear"] == pytest.approx(flops.lm_forward(qc, real).lm_linear)
    assert flops.train_flops(flops.forward_flops(qc, [8]), "selective")["hardware"] > 3 * flops.forward_flops(
        qc, [8]).total
    with pytest.raises(ValueError, match="recompute='bogus'"):
        flops.train_flops(flops.ForwardFlops(), "bogus")
    with pytest.raises(ValueError, match="spatial_merge_size"):
        flops.vision_forward(qc, [[1, 5, 8]])


def test_preset_7b_sanity():
    """7B at 1k text tokens: ~2 * 7.6e9 FLOPs/token forward (params incl. output layer), within 10%."""
    from dualrpo_mcore.models.qwen2_5_vl import presets

    qc = from_hf(presets.hf_config_dict("qwen2.5-vl-7b"))
    f = flops.forward_flops(qc, [1024], vocab=qc.vocab_size)
    per_token = (f.lm_linear + f.lm_output) / 1024
    assert per_token == pytest.approx(2 * 7.07e9, rel=0.1)
