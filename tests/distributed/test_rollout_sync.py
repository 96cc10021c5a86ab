"""Weight sync Megatron actor -> HF rollout engine, as 2 gloo processes on CPU (one spawn, several
checks, because process start-up dominates on CI's 2 cores):

* TP=2: the first bucketed export reproduces the HF weights bit for bit; after an Adam step on the
  actor (ViT frozen) the synced engine samples a response whose per-token rollout log-probs equal the
  actor's (``ops.token_stats`` over the vocab-parallel logits) within 1e-4 in fp32, while the stale
  engine's differ (so the check can fail); frozen ViT tensors are sent once, not on the second sync.
* Memory: the peak of new tensor storage during a sync (a dispatcher census, ``rollout.memcensus``,
  independent of the exporter's own accounting) stays within bucket + largest tensor, as does the
  exporter's accounting; an unbucketed export of the same model exceeds that bound (so the
  measurement can fail). The census does not see gloo's internal staging copy (not a tensor).
* PP=2: every HF tensor reaches every stage, equal to the HF weights, through receive buffers placed
  for the pipeline group's backend (CPU under gloo; the NCCL choice is checked without NCCL).
"""
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

TOL = 1e-4
BUCKET = 192 << 10  # above the largest tensor (padded embedding, 144 KiB)
TEMPERATURE = 0.8


def _build(tp, pp, hf):
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, mapping
    from dualrpo_mcore.models.qwen2_5_vl.model import ModelOptions, QwenVLModel
    from dualrpo_mcore.parallel import initialize

    info = initialize(tp, pp, backend="gloo")
    cfg = from_hf(hf.config)
    model = QwenVLModel(cfg, ModelOptions(spec_backend="local"), pre_process=info.is_first_stage,
                        post_process=info.is_last_stage, tp=tp, pp=pp)
    model.load_state_dict(mapping.hf_state_dict_to_rank(cfg, hf.state_dict(), info.tp_rank, tp, info.pp_rank, pp))
    return info, cfg, model


def _census_peak(fn, *models):
    """Peak bytes of new tensor storage while ``fn`` runs (dispatcher census, independent of the
    exporter's own accounting); the models' parameters are pre-existing and not counted."""
    from dualrpo_mcore.rollout.memcensus import peak_new_bytes

    existing = [t for m in models if m is not None for t in m.state_dict(keep_vars=True).values()
                if isinstance(t, torch.Tensor)]
    return peak_new_bytes(fn, existing)


def _actor_logprobs(model, cfg, info, ids, batch, prompt_len):
    from megatron.core import parallel_state as ps

    from dualrpo_mcore.ops import token_stats

    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), pixel_values=batch["pixel_values"],
                       image_grid_thw=batch["image_grid_thw"])[0]
    v_local = logits.shape[-1]
    return token_stats(logits[prompt_len - 1:-1], ids[0, prompt_len:], vocab_start=info.tp_rank * v_local,
                       vocab_size=cfg.vocab_size, group=ps.get_tensor_model_parallel_group(),
                       temperature=TEMPERATURE).logprob.double()


def _engine_score(engine, ids, batch, prompt_len):
    """Log-probs of a fixed response under the engine's HF model (teacher-forced, HF positions)."""
    from dualrpo_mcore.models.qwen2_5_vl import testing

    with torch.no_grad():
        logits = testing.hf_forward(engine.model, dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                       pixel_values=batch["pixel_values"],
                                                       image_grid_thw=batch["image_grid_thw"]))[0]
    lp = torch.log_softmax(logits[prompt_len - 1:-1].double() / TEMPERATURE, -1)
    return lp.gather(-1, ids[0, prompt_len:, None])[:, 0]


def _train_step(model, cfg, batch):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    logits = model(batch["input_ids"], batch["attention_mask"], pixel_values=batch.get("pixel_values"),
                   image_grid_thw=batch.get("image_grid_thw"))
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(7))
    (logits * w).sum().backward()
    opt.step()


def _drain(it):
    for _ in it:
        pass


class _Recorder:
    """Names handed to the engine (rank 1 has no engine but records what it would feed)."""

    def __init__(self, engine):
        self.engine, self.names = engine, []

    def update_weights(self, bucket):
        self.names += [n for n, _ in bucket]
        return self.engine.update_weights(bucket) if self.engine is not None else len(bucket)


def _first_sync(exporter, model, engine, hf):
    """Everything (ViT included) goes over, bit-exact HF tensors; returns (mismatches, names, stats)."""
    from dualrpo_mcore.models.qwen2_5_vl import mapping

    want = {mapping.normalize_hf_name(k): v for k, v in hf.state_dict().items()}
    got, names = {}, []
    for bucket in exporter.buckets(model):
        names += [n for n, _ in bucket]
        got.update((n, t.clone()) for n, t in bucket)
        if engine is not None:
            engine.update_weights(bucket)
    mismatch = sorted(set(want) ^ set(got)) + [k for k in got if not torch.equal(got[k], want[k])]
    return mismatch, names, vars(exporter.last_stats).copy()


def _tp2_checks(rank):
    import torch.distributed as dist

    from dualrpo_mcore.models.qwen2_5_vl import testing
    from dualrpo_mcore.models.qwen2_5_vl.training import ModuleTraining, apply_freeze
    from dualrpo_mcore.models.qwen2_5_vl.weights import export_hf
    from dualrpo_mcore.rollout import RolloutRequest, SamplingParams
    from dualrpo_mcore.rollout.hf_engine import HFEngine
    from dualrpo_mcore.rollout.sync import BucketedExporter

    hf = testing.tiny_hf_model(seed=0)
    info, cfg, model = _build(2, 1, hf)
    apply_freeze(model, ModuleTraining(freeze_vision=True))  # frozen before the first sync
    # Another random init: the engine is right only if every tensor arrives.
    engine = HFEngine(testing.tiny_hf_model(seed=5), eos_token_ids=[2]) if rank == 0 else None
    exporter = BucketedExporter(BUCKET)
    out = {}
    out["first_mismatch"], names1, out["first_stats"] = _first_sync(exporter, model, engine, hf)

    batch = testing.make_batch(patch_dim=cfg.patch_dim)
    _train_step(model, cfg, batch)

    one = testing.make_batch(seed=3, rows=(((6, 8),),), patch_dim=cfg.patch_dim)
    plen = one["input_ids"].shape[1]
    probe = torch.tensor([one["input_ids"][0].tolist() + [5, 9, 17, 33, 2]])  # a fixed response
    stale = _engine_score(engine, probe, one, plen) if rank == 0 else None
    recorder = _Recorder(engine)
    out["sync_peak"] = _census_peak(lambda: _drain(map(recorder.update_weights, exporter.buckets(model))), model,
                                   engine.model if engine is not None else None)
    out["second_stats"] = vars(exporter.last_stats).copy()
    out["first_names"], out["second_names"] = names1, recorder.names
    resend = BucketedExporter(BUCKET, skip_frozen=False)  # for engines that lose weights on release
    out["resend_skipped"] = []
    for _ in range(2):
        _drain(resend.buckets(model))
        out["resend_skipped"].append(resend.last_stats.skipped_frozen)
    out["unbucketed_peak"] = _census_peak(lambda: dict(export_hf(model)), model)

    box = [None]
    if rank == 0:
        req = RolloutRequest(one["input_ids"][0], one["pixel_values"], one["image_grid_thw"], uid="p0")
        samples = engine.generate([req], SamplingParams(n=2, temperature=TEMPERATURE, max_new_tokens=8, seed=11))
        box = [[(s.token_ids, s.logprobs) for s in samples[0]]]
    dist.broadcast_object_list(box, src=0)
    diffs, lens = [], []
    for tokens, rollout_lp in box[0]:
        ids = torch.tensor([one["input_ids"][0].tolist() + tokens])
        actor = _actor_logprobs(model, cfg, info, ids, one, plen)
        diffs.append(float((actor - torch.tensor(rollout_lp, dtype=torch.float64)).abs().max()))
        lens.append(len(tokens))
    out["logprob_diffs"], out["response_lens"] = diffs, lens
    actor = _actor_logprobs(model, cfg, info, probe, one, plen)  # collective: every rank runs it
    if rank == 0:
        out["stale_diff"] = float((actor - stale).abs().max())
        out["synced_probe_diff"] = float((actor - _engine_score(engine, probe, one, plen)).abs().max())
    return out


def _pp2_checks(rank):
    from dualrpo_mcore.models.qwen2_5_vl import mapping, testing
    from dualrpo_mcore.rollout import sync

    hf = testing.tiny_hf_model(seed=1, tie=True)
    _, _, model = _build(1, 2, hf)
    want = {mapping.normalize_hf_name(k): v for k, v in hf.state_dict().items()}
    want.pop("lm_head.weight", None)
    got, asked = {}, []
    real = sync._buffer_device
    sync._buffer_device = lambda backend: asked.append(str(backend)) or real(backend)
    try:
        for bucket in sync.BucketedExporter(BUCKET).buckets(model):
            got.update((n, t.clone()) for n, t in bucket)
    finally:
        sync._buffer_device = real
    mismatch = sorted(set(want) ^ set(got)) + [k for k in got if not torch.equal(got[k], want[k])]
    return dict(mismatch=mismatch, buffer_backends=sorted(set(asked)), received=len(asked))


def test_pp_broadcast_buffers_live_where_the_backend_moves_memory(monkeypatch):
    """NCCL moves only CUDA memory (the rank's current device), gloo only host memory; the receive
    buffers of the PP broadcast must follow (checked here without NCCL: the device chosen)."""
    from dualrpo_mcore.rollout import sync

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert sync._buffer_device("nccl") == torch.device("cuda", 3)
    assert sync._buffer_device("cpu:gloo,cuda:nccl") == torch.device("cuda", 3)
    assert sync._buffer_device("gloo") == torch.device("cpu")


def _worker(rank, world):
    return dict(tp2=_tp2_checks(rank), pp2=_pp2_checks(rank))


def test_rollout_weight_sync():
    results = run_distributed(_worker, 2, timeout=600)
    for rank, res in enumerate(results):
        r = res["tp2"]
        assert r["first_mismatch"] == [], (rank, r["first_mismatch"][:5])
        assert all(d <= TOL for d in r["logprob_diffs"]), (rank, r["logprob_diffs"])
        assert all(n > 0 for n in r["response_lens"])
        s1, s2 = r["first_stats"], r["second_stats"]
        frozen = [n for n in r["first_names"] if n.startswith("visual.") and not n.startswith("visual.merger.")]
        assert frozen and s1["skipped_frozen"] == 0 and s2["skipped_frozen"] > 0
        assert not set(frozen) & set(r["second_names"]), "frozen ViT tensors were sent again"
        assert set(r["first_names"]) - set(frozen) == set(r["second_names"])  # everything trainable is
        assert s2["tensors"] == len(r["second_names"]) == s1["tensors"] - len(frozen), (s1, s2)
        bound = max(BUCKET, s1["largest_bytes"]) + s1["largest_bytes"]
        assert s1["peak_held_bytes"] <= bound, (s1, bound)
        assert s2["peak_held_bytes"] <= bound, (s2, bound)
        assert r["sync_peak"] <= bound, (r["sync_peak"], bound)
        assert r["unbucketed_peak"] > bound, (r["unbucketed_peak"], bound)  # the measurement can fail
        assert r["resend_skipped"] == [0, 0]
        pp2 = res["pp2"]
        assert pp2["mismatch"] == [], (rank, pp2["mismatch"][:5])
        # Each stage receives the other's tensors into buffers placed for the group's backend.
        assert pp2["received"] > 0 and pp2["buffer_backends"] == ["gloo"], (rank, pp2)
    r0 = results[0]["tp2"]
    assert r0["synced_probe_diff"] <= TOL, r0
    assert r0["stale_diff"] > 1e-3, r0  # the optimizer step moved the policy: a stale engine would fail
    print({k: v for k, v in r0.items() if not k.endswith("names") and k != "first_mismatch"})
