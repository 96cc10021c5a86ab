"""Megatron Qwen2.5-VL vs transformers' Qwen2_5_VLForConditionalGeneration on tiny random configs,
as 2 gloo processes on CPU: logits (fp32, max abs diff <= 1e-4) and gradients of chosen parameters
at TP=2, TP=1 (also an odd-sized config) and PP=2 (through Megatron's 1F1B schedule), and TP=2 == TP=1;
and, at a released model's widths (few layers), the logits of the packed (padding-free) stream at TP=2 and TP=1.
One spawned group runs every setting, re-initialising Megatron's parallel state in between, because
process start-up (importing Megatron and transformers) dominates the cost on CI's 2 cores.
"""
import pytest
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

TOL = 1e-4
# Megatron (canonical) name -> compared gradient; a mix of ViT, merger, embedding and LM tensors.
GRAD_PARAMS = [
    "vision.patch_embed.proj.weight",
    "vision.layers.0.self_attention.linear_qkv.weight",
    "vision.layers.1.mlp.linear_fc1.weight",
    "vision.merger.mlp.linear_fc1.weight",
    "language_model.embedding.word_embeddings.weight",
    "language_model.decoder.layers.0.self_attention.linear_qkv.bias",
    "language_model.decoder.layers.1.mlp.linear_fc1.weight",
    "language_model.decoder.final_layernorm.weight",
    "language_model.output_layer.weight",
]


# Rows 0, 1 and 3 show the same image (as a GRPO group's rows do); row 2 has two others.
SHARED_ROWS = (((6, 8),), ((6, 8),), ((4, 10), (6, 6)), ((6, 8),))


def _shared_image_batch(patch_dim):
    from dualrpo_mcore.models.qwen2_5_vl import testing

    batch = testing.make_batch(rows=SHARED_ROWS, patch_dim=patch_dim)
    px = batch["pixel_values"]
    starts = [0, 48, 96, 136, 172]  # patch offsets of the five images
    px[starts[1]:starts[1] + 48] = px[0:48]
    px[starts[4]:starts[4] + 48] = px[0:48]
    return batch


def _setup(tp, pp, hf_kwargs, ckpt=None, recompute="none", shared_images=False, rows=None):
    """HF reference + this rank's Megatron stage, loaded from the HF weights through the mapping
    table, or (``ckpt``) from a converted Megatron checkpoint of another TP/PP layout."""
    from dualrpo_mcore.models.qwen2_5_vl import convert, from_hf, mapping, testing
    from dualrpo_mcore.models.qwen2_5_vl.model import ModelOptions, QwenVLModel
    from dualrpo_mcore.parallel import initialize

    info = initialize(tp, pp)
    hf = testing.tiny_hf_model(**hf_kwargs)
    cfg = from_hf(hf.config)
    model = QwenVLModel(cfg, ModelOptions(spec_backend="local", recompute=recompute), pre_process=info.is_first_stage,
                        post_process=info.is_last_stage, tp=tp, pp=pp)
    if ckpt is None:
        model.load_state_dict(mapping.hf_state_dict_to_rank(cfg, hf.state_dict(), info.tp_rank, tp, info.pp_rank, pp))
    else:
        convert.load_into(model, ckpt, info.tp_rank, tp, info.pp_rank, pp)
    if shared_images:
        batch = _shared_image_batch(cfg.patch_dim)
    else:
        batch = testing.make_batch(patch_dim=cfg.patch_dim, **({"rows": rows} if rows else {}))
    weights = torch.randn(*batch["input_ids"].shape, cfg.vocab_size, generator=torch.Generator().manual_seed(1))
    return info, hf, cfg, model, batch, weights


def _objective(logits, batch, weights, vocab):
    """A scalar touching every real logit with a fixed random weight (padding rows excluded)."""
    valid = batch["attention_mask"].bool()[..., None]
    return (logits[..., :vocab] * weights * valid).sum()


def _hf_reference(hf, batch, weights, cfg):
    from dualrpo_mcore.models.qwen2_5_vl import testing

    hf.zero_grad()
    logits = testing.hf_forward(hf, batch)
    _objective(logits, batch, weights, cfg.vocab_size).backward()
    return logits.detach()


def _grad_diffs(model, hf, cfg, info, pp):
    """Max abs diff of TP-merged Megatron grads vs the HF grads fused the same way, for the chosen
    parameters this stage owns."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dualrpo_mcore.models.qwen2_5_vl import mapping

    hf_grads = {mapping.normalize_hf_name(n): p.grad for n, p in hf.named_parameters() if p.grad is not None}
    if cfg.tie_word_embeddings:
        hf_grads["lm_head.weight"] = hf_grads["model.embed_tokens.weight"]
    conv = mapping.Converter(cfg, model.padded_vocab_size)
    params = dict(model.named_parameters())
    out = {}
    for rule in mapping.rules(cfg, pp):
        if rule.mcore not in GRAD_PARAMS or mapping.owner_stage(rule, cfg, pp) != info.pp_rank:
            continue
        name = mapping.from_canonical(mapping.local_name(rule, cfg, pp), te_spec=False)
        if name not in params:  # tied output layer at pp=1
            continue
        g = params[name].grad
        pieces = [torch.empty_like(g) for _ in range(info.tp_size)]
        dist.all_gather(pieces, g.contiguous(), group=ps.get_tensor_model_parallel_group())
        got = mapping.tp_merge(pieces, rule.split)
        want = conv.to_mcore(rule, [hf_grads[n] for n in rule.hf])
        out[rule.mcore] = float((got - want).abs().max()) / max(float(want.abs().max()), 1.0)
    return out


def _run_plain(tp, hf_kwargs, recompute="none", shared_images=False):
    info, hf, cfg, model, batch, weights = _setup(tp, 1, hf_kwargs, recompute=recompute, shared_images=shared_images)
    ref = _hf_reference(hf, batch, weights, cfg)
    vit_patches = []
    model.vision.register_forward_pre_hook(lambda _m, args: vit_patches.append(int(args[0].shape[0])))
    logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch.get("pixel_values"),
                   image_grid_thw=batch.get("image_grid_thw"), runtime_gather_output=True)
    _objective(logits, batch, weights, cfg.vocab_size).backward()
    valid = batch["attention_mask"].bool()
    diff = float((logits[..., : cfg.vocab_size] - ref).abs()[valid].max())
    from dualrpo_mcore.models.qwen2_5_vl.training import part_of

    parts = sorted({part_of(n) for n, _ in model.named_parameters()})
    return dict(logit_diff=diff, grads=_grad_diffs(model, hf, cfg, info, 1),
                logits=logits[..., : cfg.vocab_size].detach(), parts=parts,
                export_mismatch=_export_mismatch(model, hf), vit_patches=vit_patches)


def _export_mismatch(model, hf):
    """Weight-sync export (TP-gathered, HF names) must reproduce the HF weights bit for bit."""
    from dualrpo_mcore.models.qwen2_5_vl import mapping
    from dualrpo_mcore.models.qwen2_5_vl.weights import export_hf

    want = {mapping.normalize_hf_name(k): v for k, v in hf.state_dict().items()}
    if model.cfg.tie_word_embeddings:
        want.pop("lm_head.weight", None)
    got = dict(export_hf(model))
    return sorted(set(want) ^ set(got)) + [k for k in got if k in want and not torch.equal(got[k], want[k])]


def _run_pipeline(hf_kwargs, ckpt=None):
    from megatron.core.pipeline_parallel.schedules import get_forward_backward_func

    info, hf, cfg, model, batch, weights = _setup(1, 2, hf_kwargs, ckpt)
    ref = _hf_reference(hf, batch, weights, cfg)
    captured = {}

    def loss_func(logits):
        captured["logits"] = logits.detach()
        return _objective(logits, batch, weights, cfg.vocab_size), {}

    def forward_step(data_iterator, m):
        b = next(data_iterator)
        out = m(b["input_ids"], b["attention_mask"], pixel_values=b.get("pixel_values"),
                image_grid_thw=b.get("image_grid_thw"), runtime_gather_output=True)
        return out, loss_func

    bsz, seq = batch["input_ids"].shape
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
                                num_microbatches=1, seq_length=seq, micro_batch_size=bsz, forward_only=False)
    if cfg.tie_word_embeddings:
        _sync_tied_embedding_grads(model)
    result = dict(grads=_grad_diffs(model, hf, cfg, info, 2))
    if info.is_last_stage:
        valid = batch["attention_mask"].bool()
        result["logit_diff"] = float((captured["logits"][..., : cfg.vocab_size] - ref).abs()[valid].max())
    return result


def _sync_tied_embedding_grads(model):
    """What Megatron's finalize_model_grads does for tied embeddings split over pipeline stages:
    the first stage's input-embedding grad and the last stage's output-layer grad are summed."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    lm = model.language_model
    weight = lm.embedding.word_embeddings.weight if lm.pre_process else lm.output_layer.weight
    dist.all_reduce(weight.grad, group=ps.get_embedding_group())


ODD = dict(hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=37,
           rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})


def _real_width():
    """Qwen2.5-VL-3B's widths (LM 2048 wide, 16 heads in 2 KV groups of head_dim 128, ffn 11008, rope
    theta 1e6 and mrope [16, 24, 24], tied head; ViT 1280 wide, 16 heads, ffn 3420, 14-pixel patches,
    112-pixel windows) on 2 LM layers and 2 ViT blocks (one windowed, one full). Rounding grows with the
    width, which the tiny configs cannot show; the vocabulary stays tiny (the head's width is the LM's)."""
    from dualrpo_mcore.models.qwen2_5_vl import presets

    real = presets.hf_config_dict("qwen2.5-vl-3b")
    text, vision = real["text_config"], real["vision_config"]
    lm = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rope_parameters",
          "rms_norm_eps")
    vit = ("hidden_size", "intermediate_size", "num_heads", "patch_size", "temporal_patch_size", "window_size",
           "spatial_merge_size")
    return dict(tie=real["tie_word_embeddings"], text_layers=2, vision_depth=2, **{k: text[k] for k in lm},
                vision_overrides=dict(fullatt_block_indexes=[1], **{k: vision[k] for k in vit}))


# Rows of different lengths: text only, an image over several windows, two images, a small image.
REAL_WIDTH_ROWS = ((), ((12, 16),), ((8, 20), (6, 6)), ((4, 4),))


def _run_real_width(tp):
    """Max abs logit difference vs transformers over the real tokens, padded and packed (the packed
    stream unpacked to the padded batch's places), forward only."""
    from dualrpo_mcore.models.qwen2_5_vl import testing
    from dualrpo_mcore.models.qwen2_5_vl.packing import pack

    _info, hf, cfg, model, batch, _ = _setup(tp, 1, _real_width(), rows=REAL_WIDTH_ROWS)
    images = dict(pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    valid = batch["attention_mask"].bool()
    ids, pos, packing = pack(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                             cfg.image_token_id, cfg.spatial_merge_size, multiple=16)
    with torch.no_grad():
        ref = testing.hf_forward(hf, batch)
        padded = model(batch["input_ids"], batch["attention_mask"], **images, runtime_gather_output=True)
        packed = packing.unpack(model(ids, position_ids=pos, packed=packing, **images, runtime_gather_output=True))
    out = {"hidden": cfg.hidden_size, "vision_hidden": cfg.vision_hidden_size, "pack": packing.cu_seqlens.tolist(),
           "scale": float(ref.abs()[valid].max())}
    for name, logits in (("padded", padded), ("packed", packed)):
        out[name] = float((logits[..., : cfg.vocab_size] - ref).abs()[valid].max())
    return out


def _all_settings(rank, world_size, tp2_checkpoint):
    torch.manual_seed(0)
    out = {"tp2": _run_plain(2, {})}
    out["tp1"] = _run_plain(1, {})
    out["tp1_odd_tied"] = _run_plain(1, dict(tie=True, **ODD))
    # Recomputation must not change a single number the planner's memory saving is paid with.
    out["tp2_full_recompute"] = _run_plain(2, {}, recompute="full")
    out["tp1_selective_recompute"] = _run_plain(1, {}, recompute="selective")
    # Repeated images are encoded once (ModelOptions.dedup_images); transformers encodes every copy.
    out["tp2_shared_images"] = _run_plain(2, {}, shared_images=True)
    # PP=2 loads a checkpoint converted for TP=2/PP=1: resharding on load is exercised too.
    out["pp2"] = _run_pipeline({}, tp2_checkpoint)
    out["pp2_tied"] = _run_pipeline(dict(tie=True))
    out["tp2_real_width"] = _run_real_width(2)
    out["tp1_real_width"] = _run_real_width(1)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from dualrpo_mcore.models.qwen2_5_vl import convert, testing

    root = tmp_path_factory.mktemp("qwen_ckpt")
    testing.tiny_hf_model().save_pretrained(root / "hf")
    ckpt = convert.hf_to_megatron(str(root / "hf"), str(root / "mcore_tp2"), tp=2, pp=1)
    return run_distributed(_all_settings, 2, ckpt, timeout=600)


@pytest.mark.parametrize("setting", ["tp2", "tp1", "tp1_odd_tied", "tp2_full_recompute", "tp1_selective_recompute",
                                     "tp2_shared_images"])
def test_logits_and_grads_match_transformers(results, setting):
    for rank, res in enumerate(results):
        r = res[setting]
        assert r["logit_diff"] <= TOL, f"{setting} rank {rank}: logits differ by {r['logit_diff']:.3g}"
        assert r["grads"], f"{setting}: no gradient compared"
        bad = {k: v for k, v in r["grads"].items() if v > TOL}
        assert not bad, f"{setting} rank {rank}: gradients differ (relative) {bad}"
        assert r["parts"] == ["language", "merger", "vision"]  # every parameter has a part (lr mult)
        assert r["export_mismatch"] == [], f"{setting}: weight export differs for {r['export_mismatch'][:5]}"


def test_shared_images_encoded_once(results):
    """The shared batch's five images (3 x 48 + 40 + 36 = 220 patches) reach the ViT as its three
    distinct ones; the default batch's three distinct images go in whole. (Their outputs were
    compared with transformers, which encodes every copy, above.)"""
    for res in results:
        assert res["tp2_shared_images"]["vit_patches"] == [48 + 40 + 36]
        assert res["tp2"]["vit_patches"] == [48 + 40 + 36]


def test_tp2_equals_tp1(results):
    for res in results:
        diff = float((res["tp2"]["logits"] - res["tp1"]["logits"]).abs().max())
        assert diff <= TOL, f"TP=2 and TP=1 logits differ by {diff:.3g}"


@pytest.mark.parametrize("setting", ["pp2", "pp2_tied"])
def test_pipeline_parallel_matches_transformers(results, setting):
    first, last = results[0][setting], results[1][setting]
    assert "logit_diff" in last and last["logit_diff"] <= TOL, f"{setting}: {last.get('logit_diff')}"
    # the ViT and the embedding live on stage 0, the head on stage 1: both had gradients checked
    assert "vision.patch_embed.proj.weight" in first["grads"]
    assert "language_model.decoder.final_layernorm.weight" in last["grads"]
    for stage, res in enumerate((first, last)):
        bad = {k: v for k, v in res["grads"].items() if v > TOL}
        assert not bad, f"{setting} stage {stage}: gradients differ (relative) {bad}"


@pytest.mark.parametrize("setting", ["tp2_real_width", "tp1_real_width"])
def test_real_width_packed_logits_match_transformers(results, setting):
    """At a released model's widths, packed Megatron logits (and padded ones) equal transformers' on
    every row's real tokens within 1e-4."""
    for rank, res in enumerate(results):
        r = res[setting]
        assert (r["hidden"], r["vision_hidden"]) == (2048, 1280)
        assert len(r["pack"]) == len(REAL_WIDTH_ROWS) + 1  # every row went into the stream
        assert r["scale"] > 0.1, f"{setting}: logits too small ({r['scale']:.3g}) for 1e-4 to mean much"
        for layout in ("packed", "padded"):
            assert r[layout] <= TOL, f"{setting} rank {rank} {layout}: logits differ by {r[layout]:.3g}"
