"""FP8's token padding on the real actor, on CPU: the local-spec model with ``pad_tokens_to`` forced on
(what FP8 sets) against the same model unpadded, and the ViT's FP8 region.

One spawned gloo process (Megatron's parallel state needs one) runs every setting:

* the micro-batches the actor feeds the model hold a multiple of 16 tokens for awkward row counts
  and lengths (3 rows of 36 tokens, single rows): the packed stream (the default) and, with
  ``actor.model.packing`` off, the padded rows; the ViT pads its patches to 16 x merge^2;
* log-prob / entropy / self-certainty of every real token, the reference log-probs, the update's
  loss and the weights after it are those of the unpadded run (to float32 rounding);
* the ViT's layers and the merger run inside the FP8 region of their own TransformerConfig, whose
  ``fp8`` is set exactly when ``fp8_vision`` is;
* the actor's weight export names tensors by the resolved backend ('auto' on a CUDA + TE machine ->
  TE naming), not by the unresolved config string.
"""
import contextlib

import pytest
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

MULTIPLE = 16
MAX_TOKENS = (40, 200)


def _batch():
    from dualrpo_mcore.models.qwen2_5_vl import testing

    # 3 rows, the longest 36 tokens: 108 tokens, not a multiple of 16 (nor of 8).
    b = testing.make_batch(seed=3)
    resp = b["attention_mask"].clone()
    resp[:, :4] = 0
    b["response_mask"] = resp
    return b


def _actor(hf, pad_tokens_to, max_tokens, packing=True):
    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.actor.config import ActorConfig, KLConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig

    cfg = ActorConfig(model=ModelSourceConfig(tiny=True, hf_config=hf.config, pad_tokens_to=pad_tokens_to,
                                              packing=packing),
                      parallel=ParallelConfig(backend="gloo"),
                      optim=OptimConfig(lr=1e-3, total_steps=10, adam_eps=1e-3),
                      micro=MicroBatchConfig(max_tokens=max_tokens), kl=KLConfig(beta0=0.1, normalizer="batch_minmax"),
                      seed=7)
    return Actor(cfg, hf_state_dict=hf.state_dict())


def _run_actor(hf, pad_tokens_to, max_tokens, packing=True):
    actor = _actor(hf, pad_tokens_to, max_tokens, packing)
    batch = _batch()
    _, micro = actor._split(batch)
    stats = actor.compute_token_stats(batch)
    ref = actor.compute_ref_logprobs(batch)
    g = torch.Generator().manual_seed(5)
    old = (stats["logprob"] + 0.3 * torch.randn(stats["logprob"].shape, generator=g)) * batch["response_mask"]
    metrics = actor.update(dict(batch, old_logprob=old, advantages=torch.tensor([1.0, -0.7, 0.4]),
                                self_certainty=torch.tensor([0.3, 0.1, 0.5])))
    # What the model is fed: one stream [1, T] per micro-batch when packed, else the padded rows.
    fed = [tuple(mb["packed"].input_ids.shape) if "packed" in mb else tuple(mb["input_ids"].shape) for mb in micro]
    return dict(shapes=[tuple(mb["input_ids"].shape) for mb in micro], fed=fed, stats=stats, ref=ref, metrics=metrics,
                weights={k: v.clone() for k, v in actor.export_hf()},
                vision_patch_multiple=actor.module.vision.patch_multiple)


def _fp8_regions(fp8_vision):
    """Which TransformerConfigs the ViT opens an FP8 region for during one forward."""
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, merger_config, testing, vision, vision_config
    from dualrpo_mcore.models.qwen2_5_vl.precision import Precision

    cfg = from_hf(testing.tiny_hf_config())
    prec = Precision(dtype="bf16", fp8="hybrid", fp8_recipe="tensorwise", fp8_vision=fp8_vision)
    entered = []

    def recorder(config):
        entered.append(config.fp8)
        return contextlib.nullcontext()

    real, vision.fp8_context = vision.fp8_context, recorder
    try:
        model = vision.VisionModel(cfg, vision_config(cfg, precision=prec), merger_config(cfg, precision=prec))
        batch = testing.make_batch(patch_dim=cfg.patch_dim)
        with torch.no_grad():
            model(batch["pixel_values"].bfloat16(), batch["image_grid_thw"])
    finally:
        vision.fp8_context = real
    return entered


def _te_named_export(actor_backend_requested):
    """``Actor.export_hf`` over a stand-in stage whose weights carry TE names (TE itself is not here):
    it finds them only if the actor hands on the resolved backend."""
    from types import SimpleNamespace

    from dualrpo_mcore.models.qwen2_5_vl import from_hf, mapping, testing
    from dualrpo_mcore.actor.actor import Actor
    from dualrpo_mcore.actor.config import ModelSourceConfig

    hf = testing.tiny_hf_model()
    cfg = from_hf(hf.config)
    padded = cfg.padded_vocab_size(128)
    te_named = dict(mapping.shard_for_rank(cfg, {mapping.normalize_hf_name(k): v for k, v in
                                                 hf.state_dict().items()}.__getitem__, 0, 1, 0, 1, te_spec=True,
                                           converter=mapping.Converter(cfg, padded)))
    src = ModelSourceConfig(tiny=True, spec_backend=actor_backend_requested)
    actor = Actor.__new__(Actor)  # no model build: the TE modules cannot be built on this machine
    actor.config = SimpleNamespace(model=src)
    actor.backend = src.resolve_backend(cuda_available=True, te_available=True)
    actor.module = SimpleNamespace(cfg=cfg, padded_vocab_size=padded, backend=actor.backend,
                                   state_dict=lambda keep_vars=False: te_named)
    return actor.backend, sorted(k for k, _ in actor.export_hf())


def _attempt(fn, *args):
    """One setting's result, or its traceback: a failing setting fails its own test only."""
    import traceback

    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - reported by the test that reads it
        return _Failed(traceback.format_exc())


class _Failed(str):
    pass


def _worker(rank, world):
    from dualrpo_mcore.models.qwen2_5_vl import mapping, testing
    from dualrpo_mcore.parallel import initialize

    initialize(1, 1, "gloo")
    hf = testing.tiny_hf_model()
    # 40 tokens per micro-batch: the 36-token row alone and the two shorter rows together (2 x 23);
    # 200: the whole 3 x 36 batch in one.
    out = {(name, max_tokens): _attempt(_run_actor, hf, pad, max_tokens) for max_tokens in MAX_TOKENS
           for name, pad in (("plain", None), ("padded", MULTIPLE))}
    out.update({("unpacked", max_tokens): _attempt(_run_actor, hf, MULTIPLE, max_tokens, False)
                for max_tokens in MAX_TOKENS})
    out["regions"] = {flag: _attempt(_fp8_regions, flag) for flag in (False, True)}
    out["export"] = _attempt(_te_named_export, "auto")
    out["hf_names"] = sorted(mapping.normalize_hf_name(k) for k in hf.state_dict())
    return out


@pytest.fixture(scope="module")
def result():
    return run_distributed(_worker, 1, timeout=600)[0]


def _ok(value):
    if isinstance(value, _Failed):
        pytest.fail(f"the setting raised in the worker:\n{value}")
    return value


def test_padded_micro_batches_hold_a_multiple_of_the_fp8_tokens(result):
    assert _ok(result["plain", 40])["shapes"] == [(2, 23), (1, 36)]
    assert _ok(result["plain", 200])["shapes"] == [(3, 36)]
    # Packed: one stream of the micro-batch's real tokens (5 + 23, 36; 5 + 23 + 36).
    assert _ok(result["plain", 40])["fed"] == [(1, 28), (1, 36)]
    assert _ok(result["plain", 200])["fed"] == [(1, 64)]
    for max_tokens in MAX_TOKENS:
        plain, unpacked = _ok(result["plain", max_tokens]), _ok(result["unpacked", max_tokens])
        for name in ("padded", "unpacked"):
            fed = _ok(result[name, max_tokens])["fed"]
            for b, s in fed:
                assert (b * s) % MULTIPLE == 0, (name, b, s)
            # Same micro-batches, each widened by less than one step of the multiple.
            base = plain["fed"] if name == "padded" else plain["shapes"]
            assert [b for b, _ in fed] == [b for b, _ in base], name
            assert all(0 <= s2 - s1 < MULTIPLE for (_, s1), (_, s2) in zip(base, fed)), name
        assert _ok(result["padded", max_tokens])["vision_patch_multiple"] == MULTIPLE * 4
        assert plain["vision_patch_multiple"] == 4  # the merge unit: no padding


@pytest.mark.parametrize("max_tokens", MAX_TOKENS)
def test_padding_leaves_every_real_token_and_the_update_unchanged(result, max_tokens):
    """Per-token results match (bit-identical on this machine's BLAS: padding sits behind every real
    token under a causal mask, and in its own ViT segment; the 1e-6 slack only allows for a BLAS
    that blocks a longer reduction differently, a leak would show at 1e-2); the loss and weights
    differ only by the summation order of float32 reductions over the wider micro-batches."""
    plain = _ok(result["plain", max_tokens])
    for padded in (_ok(result["padded", max_tokens]), _ok(result["unpacked", max_tokens])):
        _same_results(plain, padded)


def _same_results(plain, padded):
    for key in ("logprob", "entropy", "self_certainty", "seq_self_certainty"):
        assert padded["stats"][key].shape == plain["stats"][key].shape
        torch.testing.assert_close(padded["stats"][key], plain["stats"][key], rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(padded["ref"], plain["ref"], rtol=0, atol=1e-6)
    for key in ("loss", "pg_loss", "kl_loss", "tokens", "entropy"):
        assert padded["metrics"][key] == pytest.approx(plain["metrics"][key], rel=1e-5, abs=1e-7), key
    assert padded["metrics"]["tokens"] == plain["metrics"]["tokens"]  # no padded token was counted
    for name, w in plain["weights"].items():
        torch.testing.assert_close(padded["weights"][name], w, rtol=0, atol=1e-6, msg=name)


def test_vision_and_merger_run_in_their_own_fp8_region_only_with_fp8_vision(result):
    # One region for the ViT's layers and one for the merger, each from its own config.
    assert _ok(result["regions"][True]) == ["hybrid", "hybrid"]
    assert _ok(result["regions"][False]) == [None, None]


def test_export_uses_the_resolved_backend_not_the_config_string(result):
    backend, names = _ok(result["export"])
    assert backend == "te"
    assert names == result["hf_names"]
