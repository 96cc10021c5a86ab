"""Packed (padding-free) forward of QwenVLModel against the padded one, as 2 gloo processes on CPU, fp32,
local spec: per-row logits (and hidden states) within 1e-5 relative at TP=2 and TP=1, no row changing
another's logits by a bit, each distinct image encoded once, and the gradients of every parameter at
TP=1. One spawned group runs every setting (process start-up dominates on 2 cores)."""
import pytest
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

TOL = 1e-5
# Rows of different lengths: text only, one image, two images of other grids, text only, a small image.
ROWS = ((), ((6, 8),), ((4, 10), (6, 6)), (), ((4, 4),))
# Rows 0, 2 and 3 show the same image (a GRPO group's rows do); row 1 shows another.
SHARED_ROWS = (((6, 8),), ((4, 4),), ((6, 8),), ((6, 8),))


def _model(tp, recompute="none"):
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, testing
    from dualrpo_mcore.models.qwen2_5_vl.model import ModelOptions, QwenVLModel
    from dualrpo_mcore.parallel import initialize

    initialize(tp, 1)
    cfg = from_hf(testing.tiny_hf_config())
    model = QwenVLModel(cfg, ModelOptions(spec_backend="local", recompute=recompute), tp=tp)
    # Megatron starts biases at 0 and norms at 1: move every tensor so none of them is inert.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return cfg, model


def _batch(cfg, rows=ROWS, text_len=5):
    from dualrpo_mcore.models.qwen2_5_vl import testing

    return testing.make_batch(rows=rows, patch_dim=cfg.patch_dim, text_len=text_len)


def _forward_both(model, cfg, batch, multiple=16, positions=True, **kw):
    """(padded output [B, S, ...], packed output unpacked to [B, S, ...], the pack); ``positions``: hand
    the packed forward pack()'s position ids, else let it compute them."""
    from dualrpo_mcore.models.qwen2_5_vl.packing import pack

    images = dict(pixel_values=batch.get("pixel_values"), image_grid_thw=batch.get("image_grid_thw"))
    padded = model(batch["input_ids"], batch["attention_mask"], **images, **kw)
    ids, pos, packing = pack(batch["input_ids"], batch["attention_mask"], batch.get("image_grid_thw"),
                             cfg.image_token_id, cfg.spatial_merge_size, multiple=multiple)
    packed = model(ids, position_ids=pos if positions else None, packed=packing, **images, **kw)
    if kw.get("return_hidden"):  # [S, B, H] and [T, 1, H]
        return padded.transpose(0, 1), packing.unpack(packed[:, 0]), packing
    return padded, packing.unpack(packed), packing


def _rel(got, want, mask):
    return float((got - want)[mask].abs().max() / want[mask].abs().max())


def _leak(model, cfg, batch, row=2):
    """Logits of the pack before and after replacing row ``row``'s text tokens: (max abs change over the
    other rows' real tokens, which must be exactly 0, and over the changed row, which must not)."""
    from dualrpo_mcore.models.qwen2_5_vl.packing import pack

    changed = {k: v.clone() for k, v in batch.items()}
    ids = changed["input_ids"][row]
    text = changed["attention_mask"][row].bool() & (ids != cfg.image_token_id)
    ids[text] = torch.randint(3, 190, (int(text.sum()),), generator=torch.Generator().manual_seed(3))
    out = []
    for b in (batch, changed):
        ids_, pos, packing = pack(b["input_ids"], b["attention_mask"], b["image_grid_thw"], cfg.image_token_id,
                                  cfg.spatial_merge_size, multiple=16)
        with torch.no_grad():
            out.append(packing.unpack(model(ids_, position_ids=pos, packed=packing, pixel_values=b["pixel_values"],
                                            image_grid_thw=b["image_grid_thw"], runtime_gather_output=True)))
    real = batch["attention_mask"].bool()
    others = real.clone()
    others[row] = False
    delta = (out[1] - out[0]).abs()
    return float(delta[others].max()), float(delta[row][real[row]].max())


def _vit_patches(model, cfg):
    calls = []
    handle = model.vision.register_forward_pre_hook(lambda _m, args: calls.append(int(args[0].shape[0])))
    batch = _batch(cfg, SHARED_ROWS)
    px = batch["pixel_values"]
    px[64:112] = px[0:48]  # images 2 and 3 (patch offsets 64 and 112) repeat image 0
    px[112:160] = px[0:48]
    from dualrpo_mcore.models.qwen2_5_vl.packing import pack

    ids, pos, packing = pack(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                             cfg.image_token_id, cfg.spatial_merge_size)
    with torch.no_grad():
        model(ids, position_ids=pos, packed=packing, pixel_values=px, image_grid_thw=batch["image_grid_thw"])
    handle.remove()
    return calls


def _grad_diffs(cfg, model, batch):
    """Max relative difference, over every parameter, of the gradient of one scalar of the logits
    (a fixed random weight on each real token's real-vocabulary logits) packed vs padded."""
    weights = torch.randn(*batch["input_ids"].shape, cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    real = batch["attention_mask"].bool()[..., None]
    grads = []
    for out in _forward_both(model, cfg, batch)[:2]:  # padded, packed
        for p in model.parameters():
            p.grad = None
        (out[..., : cfg.vocab_size] * weights * real).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    padded, packed = grads
    assert set(padded) == set(packed) and padded
    return {n: float((packed[n] - g).abs().max() / max(float(g.abs().max()), 1e-30)) for n, g in padded.items()}


def _vit_segmented_vs_masked(model, batch):
    """The local spec's ViT, each window (or image) attended as a row of its own, against the block-diagonal
    mask over all the micro-batch's patches (the layout the TE spec runs): relative differences of the
    merged embeddings and of every ViT gradient; and, segmented, the largest change of the other images'
    embeddings when image 1's pixels change (must be exactly 0) and of image 1's own."""
    vit = model.vision
    px, grid = batch["pixel_values"], batch["image_grid_thw"]
    weight = torch.randn(int(grid.prod(-1).sum()) // 4, vit.cfg.hidden_size, generator=torch.Generator().manual_seed(5))
    outs, grads = [], []
    for segmented in (True, False):
        vit.segmented = segmented
        for q in vit.parameters():
            q.grad = None
        y = vit(px, grid)
        (y * weight).sum().backward()
        outs.append(y.detach())
        grads.append({n: q.grad.clone() for n, q in vit.named_parameters() if q.grad is not None})
    vit.segmented = True
    seg, masked = outs
    res = dict(out=float((seg - masked).abs().max() / masked.abs().max()),
               grads={n: float((grads[0][n] - g).abs().max() / max(float(g.abs().max()), 1e-30))
                      for n, g in grads[1].items()})
    starts = [0] + grid.prod(-1).cumsum(0).tolist()  # patch offsets; merged rows are a quarter of them
    changed = px.clone()
    changed[starts[1]:starts[2]] = torch.randn(starts[2] - starts[1], px.shape[1])
    with torch.no_grad():
        delta = (vit(changed, grid) - vit(px, grid)).abs()
    own = torch.zeros(delta.shape[0], dtype=torch.bool)
    own[starts[1] // 4:starts[2] // 4] = True
    res["leak"] = (float(delta[~own].max()), float(delta[own].max()))
    return res


def _refusals(model, cfg, batch):
    """The error messages of packed forwards that break the contract."""
    from dualrpo_mcore.models.qwen2_5_vl.packing import pack

    ids, pos, packing = pack(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                             cfg.image_token_id, cfg.spatial_merge_size)
    calls = [dict(input_ids=ids, attention_mask=torch.ones_like(ids)), dict(input_ids=ids[:, :-1])]
    messages = []
    for kw in calls:
        try:
            model(packed=packing, position_ids=pos, pixel_values=batch["pixel_values"],
                  image_grid_thw=batch["image_grid_thw"], **kw)
            messages.append(None)
        except ValueError as e:
            messages.append(str(e))
    return messages


def _sdpa_rules(model):
    """The local core attention against Megatron's own ``DotProductAttention.forward`` on one LM layer's
    padded inputs, per configuration: (max abs difference, whether it took SDPA, the packed call's refusal).
    SDPA must agree within float rounding; where a setting rules SDPA out (attention dropout in training,
    a sliding window) the layer must be Megatron's own path, bitwise (same RNG state), and packed refuses."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    core = model.language_model.decoder.layers[0].self_attention.core_attention
    s, b, h, d = 12, 2, core.num_attention_heads_per_partition, core.hidden_size_per_attention_head
    g = torch.Generator().manual_seed(5)
    q = torch.randn(s, b, h, d, generator=g)
    k, v = (torch.randn(s, b, core.num_query_groups_per_partition, d, generator=g) for _ in range(2))
    real = torch.ones(b, s, dtype=torch.bool)
    real[1, 9:] = False  # row 1 ends with padding
    mask = ~(real[:, None, :, None] & real[:, None, None, :] & torch.ones(s, s, dtype=torch.bool).tril())
    cu = torch.tensor([0, 7, s], dtype=torch.int32)
    thd = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    out = {}
    for name, dropout, window in (("default", 0.0, None), ("dropout", 0.5, None), ("window", 0.0, (4, 0))):
        core.attention_dropout.p, core.scale_mask_softmax.window_size = dropout, window
        core.train(dropout > 0)
        tracker = get_cuda_rng_tracker()  # attention dropout draws from the model-parallel RNG stream
        states = tracker.get_states()
        got = core(q, k, v, mask, core.attn_mask_type)
        tracker.set_states(states)
        want = DotProductAttention.forward(core, q, k, v, mask, core.attn_mask_type)
        try:
            core(q[:, 0], k[:, 0], v[:, 0], None, core.attn_mask_type, packed_seq_params=thd)
            refused = None
        except NotImplementedError as e:
            refused = str(e)
        # Real queries only: a padding query sees no key, where Megatron's fill makes its softmax uniform and an
        # additive mask keeps the scores' order (its output is dropped either way).
        out[name] = (float((got - want)[real.T].abs().max()), core.sdpa_applies(), refused)
    core.attention_dropout.p, core.scale_mask_softmax.window_size = 0.0, None
    core.eval()
    return out


def _all_settings(rank, world_size):
    out = {}
    cfg, model = _model(2)
    batch = _batch(cfg)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        padded, packed, _ = _forward_both(model, cfg, batch, positions=False, runtime_gather_output=True)
    out["tp2_logits"] = _rel(packed, padded, real)
    out["tp2_leak"] = _leak(model, cfg, batch)
    out["tp2_vit_patches"] = _vit_patches(model, cfg)

    cfg, model = _model(1)
    with torch.no_grad():
        padded, packed, packing = _forward_both(model, cfg, batch)
        out["tp1_logits"] = _rel(packed, padded, real)
        padded_hidden, packed_hidden, _ = _forward_both(model, cfg, batch, return_hidden=True)
    out["tp1_hidden"] = _rel(packed_hidden, padded_hidden, real)
    out["tp1_pack"] = (packing.cu_seqlens.tolist(), packing.total)
    out["tp1_refusals"] = _refusals(model, cfg, batch)
    out["tp1_leak"] = _leak(model, cfg, batch)
    out["tp1_grads"] = _grad_diffs(cfg, model, batch)
    out["tp1_vit"] = _vit_segmented_vs_masked(model, batch)
    out["tp1_sdpa_rules"] = _sdpa_rules(model)
    # Recomputation re-runs attention in backward, which must see the packed layout again.
    cfg, model = _model(1, recompute="selective")
    out["tp1_selective_grads"] = _grad_diffs(cfg, model, batch)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_settings, 2, timeout=600)


def test_pack_layout(results):
    """Five rows of 5, 23, 36, 8 and 18 tokens, padded to a multiple of 16."""
    cu, total = results[0]["tp1_pack"]
    assert cu == [0, 5, 28, 64, 72, 90] and total == 96


@pytest.mark.parametrize("setting", ["tp2_logits", "tp1_logits", "tp1_hidden"])
def test_packed_equals_padded_on_every_row(results, setting):
    for rank, res in enumerate(results):
        assert res[setting] <= TOL, f"{setting} rank {rank}: relative difference {res[setting]:.3g}"


@pytest.mark.parametrize("setting", ["tp2_leak", "tp1_leak"])
def test_no_row_sees_another(results, setting):
    for rank, res in enumerate(results):
        others, own = res[setting]
        assert others == 0.0, f"{setting} rank {rank}: other rows' logits moved by {others:.3g}"
        assert own > 1e-3, f"{setting} rank {rank}: the changed row's logits did not change"


def test_contract_breaches_are_refused(results):
    with_mask, short = results[0]["tp1_refusals"]
    assert with_mask and "no attention_mask" in with_mask
    assert short and "input_ids must be [1, 90]" in short


def test_each_distinct_image_encoded_once(results):
    """Four images (three copies of one 6x8 grid and a 4x4 one) reach the ViT as the two distinct ones."""
    for res in results:
        assert res["tp2_vit_patches"] == [48 + 16]


@pytest.mark.parametrize("setting", ["tp1_grads", "tp1_selective_grads"])
def test_packed_gradients_equal_padded(results, setting):
    for rank, res in enumerate(results):
        grads = res[setting]
        assert any(n.startswith("vision.") for n in grads) and any("output_layer" in n for n in grads)
        bad = {n: v for n, v in grads.items() if v > TOL}
        assert not bad, f"{setting} rank {rank}: gradients differ (relative) {bad}"


def test_vit_windows_as_rows_equal_the_block_diagonal_mask(results):
    """Windows of 2x2 merged units with edge windows of one (grids 6x8, 4x10, 6x6, 4x4), full attention at
    layer 1: the segmented ViT computes what the masked one does, and no image sees another."""
    for rank, res in enumerate(results):
        vit = res["tp1_vit"]
        assert vit["out"] <= TOL, f"rank {rank}: ViT output differs by {vit['out']:.3g}"
        assert vit["grads"] and max(vit["grads"].values()) <= TOL, \
            f"rank {rank}: ViT gradients differ: {max(vit['grads'].items(), key=lambda kv: kv[1])}"
        others, own = vit["leak"]
        assert others == 0.0 and own > 1e-3, f"rank {rank}: other images moved {others:.3g}, own {own:.3g}"


def test_sdpa_only_where_it_computes_megatrons_attention(results):
    rules = results[0]["tp1_sdpa_rules"]
    diff, sdpa, refused = rules["default"]
    assert sdpa and diff < 1e-5 and refused is None
    for name in ("dropout", "window"):
        diff, sdpa, refused = rules[name]
        assert not sdpa and diff == 0.0, name  # Megatron's own path, bitwise
        assert refused and "packed attention needs attention dropout 0" in refused, name
