"""The SGLang engine's own logic on CPU, against ``tests/fakes/sglang_fake.py`` (sglang itself needs
CUDA and is not installable here): the fake copies sglang 0.5.23's contract (0.5.20's for the
no-session variant) and holds real tensors, so a weight sync either lands or visibly does not.
Covered: weight-update sessions and status checks, release / resume tags, image-less prompts in
mixed batches, seeded per-sample draws under deterministic inference, frozen weights lost without a
CPU backup, image-token agreement with the trainer's processor, teacher-forced scoring."""
import importlib.util
import json
import logging
import os
import re

import pytest
import torch
from fakes import sglang_fake
from fakes.sglang_fake import FakeSGLangEngine, FakeSGLangEngine0520
from PIL import Image

from dualrpo_mcore.rollout import RolloutRequest, SamplingParams, build_engine
from dualrpo_mcore.rollout.sglang_engine import (SGLangEngine, build_generate_kwargs, check_status,
                                                 collapse_image_pads, parse_outputs)

IMG, VS, VE = 200, 198, 199
TRAINER_PIXELS = (56 * 56, 28 * 28 * 64)  # the trainer's data.min_pixels / max_pixels


def _engine(cls=FakeSGLangEngine, fake=None, **kw):
    fake = dict(image_token_id=IMG, **(fake or {}))
    return SGLangEngine("/ckpt/qwen", image_token_id=IMG, engine_factory=sglang_fake.factory(cls, **fake), **kw)


def _policy(seed):
    g = torch.Generator().manual_seed(seed)
    return [("model.embed_tokens.weight", torch.randn(48, 8, generator=g)),
            ("lm_head.weight", torch.randn(48, 8, generator=g))]


def _named(sizes):
    return [(f"w{i}", torch.full((s // 4,), float(i + 1))) for i, s in enumerate(sizes)]


def _image_request(uid, size=(320, 240), pixels=TRAINER_PIXELS):
    """A prompt whose pad run is expanded the way the trainer's processor (``pixels``) sees the image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    image = Image.new("RGB", size, (90, 20, 160))
    h, w = smart_resize(image.height, image.width, factor=28, min_pixels=pixels[0], max_pixels=pixels[1])
    return RolloutRequest([1, VS] + [IMG] * ((h // 28) * (w // 28)) + [VE, 5, 6], images=[image], uid=uid)


def test_constructor_colocates_with_memory_saver_and_deterministic_inference():
    eng = _engine(tp_size=2, mem_fraction_static=0.4, dtype="float32", attention_backend="fa3")
    kw = eng._engine.server_args
    assert kw["enable_memory_saver"] is True and kw["model_path"] == "/ckpt/qwen"
    assert kw["enable_weights_cpu_backup"] is True and eng.retains_weights_on_release
    assert kw["enable_deterministic_inference"] is True  # reproducible by default
    assert (kw["tp_size"], kw["mem_fraction_static"], kw["dtype"], kw["attention_backend"]) == \
        (2, 0.4, "float32", "fa3")
    assert not _engine(weights_cpu_backup=False).retains_weights_on_release
    assert _engine(deterministic=False)._engine.server_args["enable_deterministic_inference"] is False
    eng = _engine(min_pixels=3136, max_pixels=200704,
                  mm_process_config={"image": {"max_pixels": 1}, "video": {"fps": 1}})
    assert eng._engine.server_args["mm_process_config"] == {
        "image": {"size": {"shortest_edge": 3136, "longest_edge": 200704}}, "video": {"fps": 1}}
    with pytest.raises(ValueError, match="together"):
        _engine(min_pixels=3136)


@pytest.mark.parametrize("cls", [FakeSGLangEngine, FakeSGLangEngine0520], ids=["0.5.23", "0.5.20"])
def test_weights_arrive_on_every_sglang_version(cls):
    eng = _engine(cls)
    fake, sent = eng._engine, _policy(1)
    assert fake.mismatches(sent)  # the checkpoint's own init differs
    assert eng.update_weights(iter(sent)) == 2
    assert fake.mismatches(sent) == []  # loaded as sent, not refused
    session = [c[0] for c in fake.calls if c[0] in ("begin", "end")]
    assert session == (["begin", "end"] if cls is FakeSGLangEngine else [])


def test_fake_refuses_updates_outside_a_session():
    fake = FakeSGLangEngine(model_path="/ckpt")
    assert fake.update_weights_from_tensor(_policy(1)) == (False, sglang_fake.SESSION_REFUSAL)
    assert fake.mismatches(_policy(1))
    assert fake.end_weight_update()[0] is False


@pytest.mark.parametrize("method", ["begin_weight_update", "update_weights_from_tensor", "end_weight_update",
                                    "flush_cache"])
def test_every_refusal_raises_with_sglangs_message(method):
    eng = _engine()
    eng._engine.fail_next[method] = f"{method} said no"
    with pytest.raises(RuntimeError, match=f"{method}.*{method} said no"):
        eng.update_weights(iter(_policy(1)))
    assert not eng._engine._session  # a failed load does not leave the session open
    eng.update_weights(iter(_policy(2)))  # and the engine is usable afterwards
    assert eng._engine.mismatches(_policy(2)) == []


def test_check_status_forms():
    assert check_status(None, "x") is None
    check_status((True, "ok"), "x")
    check_status(sglang_fake.FlushCacheReqOutput(True), "x")
    for bad in [(False, "m"), [False, "m"], {"success": False, "message": "m"},
                sglang_fake.FlushCacheReqOutput(False, "m")]:
        with pytest.raises(RuntimeError, match="SGLang x failed: m"):
            check_status(bad, "x")


def test_step_cycle_order_release_resume_weights_then_kv_and_graphs_then_flush():
    sizes = [40, 40, 40, 120, 16]
    eng = _engine(bucket_bytes=100, fake=dict(extra_params={f"w{i}": (s // 4,) for i, s in enumerate(sizes)}))
    fake = eng._engine
    eng.release_memory()
    eng.release_memory()  # idempotent: SGLang asserts on double release
    with pytest.raises(RuntimeError, match="resume_memory first"):
        eng.generate([RolloutRequest([5, 6])], SamplingParams())
    with pytest.raises(RuntimeError, match="resume_memory first"):
        eng.update_weights(_named([8]))
    sent = _named(sizes)
    eng.resume_memory(weights=iter(sent))
    assert fake.calls == [
        ("release", ["weights", "kv_cache", "cuda_graph"]),
        ("resume", ["weights"]),
        ("begin", "all"),
        ("update", [("w0", 40), ("w1", 40)], False),
        ("update", [("w2", 40)], False),
        ("update", [("w3", 120)], False),  # oversize tensor travels alone
        ("update", [("w4", 16)], False),
        ("end",),
        ("resume", ["kv_cache", "cuda_graph"]),  # CUDA graphs come back too, not only the KV cache
        ("flush",),
    ]
    assert fake.offload_tags == set() and fake.mismatches(sent) == []
    eng.generate([RolloutRequest([5, 6])], SamplingParams(max_new_tokens=4))  # allowed again


def test_update_weights_outside_the_cycle_flushes_once():
    eng = _engine(bucket_bytes=64, fake=dict(extra_params={f"w{i}": (8,) for i in range(3)}))
    assert eng.update_weights(iter(_named([32, 32, 32]))) == 3
    assert [c[0] for c in eng._engine.calls] == ["begin", "update", "update", "end", "flush"]
    assert all(c[2] is False for c in eng._engine.calls if c[0] == "update")
    assert eng.update_weights(iter([])) == 0
    assert [c[0] for c in eng._engine.calls[5:]] == ["flush"]  # no empty session


def test_request_building_shares_images_and_seeds_each_sample():
    img_ids = [1, VS] + [IMG] * 12 + [VE, 5, VS] + [IMG] * 4 + [VE, 6]
    reqs = [RolloutRequest([1, 7, 8], uid="b"), RolloutRequest(img_ids, uid="a", images=["img-a1", "img-a2"])]
    params = SamplingParams(n=2, temperature=0.9, top_p=0.95, top_k=0, max_new_tokens=32, stop=("</answer>",),
                            stop_token_ids=(151645,), seed=3)
    kw = build_generate_kwargs(reqs, params, IMG)  # unseeded: SGLang forks n samples per prompt
    assert kw["input_ids"] == [[1, 7, 8], [1, VS, IMG, VE, 5, VS, IMG, VE, 6]]
    assert kw["image_data"] == [[], ["img-a1", "img-a2"]]  # [] (not None) for the image-less prompt
    assert kw["sampling_params"] == dict(n=2, temperature=0.9, top_p=0.95, top_k=-1, max_new_tokens=32,
                                         skip_special_tokens=False, no_stop_trim=True, stop=["</answer>"],
                                         stop_token_ids=[151645])
    assert kw["return_logprob"] is True
    from dualrpo_mcore.rollout import seed_for

    kw = build_generate_kwargs(reqs, params, IMG, seed=3)  # seeded: one request per sample
    assert kw["input_ids"] == [[1, 7, 8]] * 2 + [[1, VS, IMG, VE, 5, VS, IMG, VE, 6]] * 2
    assert kw["image_data"] == [[], [], ["img-a1", "img-a2"], ["img-a1", "img-a2"]]
    assert [sp["n"] for sp in kw["sampling_params"]] == [1] * 4
    assert [sp["sampling_seed"] for sp in kw["sampling_params"]] == [
        seed_for(3, "b", 0), seed_for(3, "b", 1), seed_for(3, "a", 0), seed_for(3, "a", 1)]
    assert "image_data" not in build_generate_kwargs(reqs[:1], params, IMG)
    with pytest.raises(ValueError, match="'a'.*2 image placeholders but 1 raw"):
        build_generate_kwargs([RolloutRequest(img_ids, uid="a", images=["x"])], params, IMG)
    assert collapse_image_pads([IMG, IMG, 3, IMG], IMG) == [IMG, 3, IMG]


def test_mixed_batch_with_an_image_less_prompt_first():
    eng = _engine()
    reqs = [RolloutRequest([1, 7, 8], uid="text"), _image_request("pic", size=(112, 84))]  # no resize either side
    out = eng.generate(reqs, SamplingParams(n=2, max_new_tokens=5, seed=0))
    assert [len(row) for row in out] == [2, 2] and all(len(s.token_ids) == 5 for row in out for s in row)
    with pytest.raises(ValueError, match="Invalid image"):  # what SGLang answers to the None form
        eng._engine.generate(input_ids=[[1, 7], [1, IMG, 5]], image_data=[None, [reqs[1].images[0]]],
                             sampling_params={"max_new_tokens": 1})


def _draws(out):
    return [[s.token_ids for s in row] for row in out]


def test_seeded_rollouts_reproduce_per_sample_whatever_the_batch():
    a = RolloutRequest([1, 2, 3], uid="a")
    b = RolloutRequest([4, 5], uid="b")
    params = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, seed=11)
    one, two = _engine(random_seed=0), _engine(random_seed=1)
    for eng in (one, two):
        eng.update_weights(iter(_policy(3)))
    both = one.generate([a, b], params)
    assert _draws(both) == _draws(two.generate([a, b], params))  # same seed, same tokens
    assert _draws(one.generate([b], params))[0] == _draws(both)[1]  # batch-mates do not matter
    assert len({tuple(t) for t in _draws(both)[0]}) > 1  # the n samples of a prompt differ
    assert _draws(one.generate([a, b], SamplingParams(n=4, max_new_tokens=6, seed=12))) != _draws(both)
    unseeded = one.generate([a], SamplingParams(n=4, max_new_tokens=6))  # SGLang would seed all with 42
    assert len({tuple(t) for t in _draws(unseeded)[0]}) > 1
    greedy = one.generate([a], SamplingParams(n=2, temperature=0, max_new_tokens=6, seed=11))
    assert one._engine.calls[-1] == ("generate", 1, 2)  # nothing to seed: SGLang forks one prefill
    assert greedy[0][0].token_ids == greedy[0][1].token_ids


def test_without_deterministic_inference_seeds_are_ignored_and_said_so(caplog):
    eng = _engine(deterministic=False)
    a = RolloutRequest([1, 2, 3], uid="a")
    with caplog.at_level(logging.WARNING):
        first = eng.generate([a], SamplingParams(n=3, max_new_tokens=6, seed=5))
    assert "ignores sampling seeds" in caplog.text
    assert ("generate", 1, 3) in eng._engine.calls  # one prompt, SGLang's parallel sampling
    assert _draws(eng.generate([a], SamplingParams(n=3, max_new_tokens=6, seed=5))) != _draws(first)


def test_generate_maps_request_major_outputs():
    eng = _engine(fake=dict(eos_token_id=7))
    reqs = [RolloutRequest([1, 2, 3], uid="a"), RolloutRequest([4, 5], uid="b")]
    out = eng.generate(reqs, SamplingParams(n=3, max_new_tokens=30, seed=0))
    assert [len(row) for row in out] == [3, 3]
    for row in out:
        for s in row:
            assert len(s.token_ids) == len(s.logprobs) and all(lp <= 0 for lp in s.logprobs)
            assert (s.finish_reason == "stop") == (s.token_ids[-1] == 7)
    assert eng.score(reqs, [[], out[1][2].token_ids]) == [[], pytest.approx(out[1][2].logprobs, abs=1e-9)]


def test_parse_outputs_rejects_aborts_and_miscounts():
    fake = FakeSGLangEngine(model_path="/ckpt")
    good = fake.generate(input_ids=[[1]], sampling_params={"n": 2, "max_new_tokens": 3}, return_logprob=True)
    with pytest.raises(RuntimeError, match="2 outputs for 2 prompts"):
        parse_outputs(good, 2, 2)
    good[1]["meta_info"]["finish_reason"] = {"type": "abort", "message": "oom"}
    with pytest.raises(RuntimeError, match="abort"):
        parse_outputs(good, 1, 2)
    good[1]["meta_info"]["finish_reason"] = {"type": "stop"}
    good[1]["output_ids"] = [0]
    with pytest.raises(RuntimeError, match="disagree"):
        parse_outputs(good, 1, 2)


VIT = ("visual.blocks.0.attn.qkv.weight", torch.arange(12.0).reshape(3, 4))


def test_exporter_that_skips_frozen_tensors_is_refused_without_cpu_backup():
    from dualrpo_mcore.rollout.sync import BucketedExporter, check_exporter_engine

    eng = _engine(weights_cpu_backup=False)
    with pytest.raises(ValueError, match="skip_frozen=False"):
        check_exporter_engine(BucketedExporter(), eng)
    check_exporter_engine(BucketedExporter(skip_frozen=False), eng)
    check_exporter_engine(BucketedExporter(), _engine())  # the CPU backup keeps them
    check_exporter_engine(BucketedExporter(), None)  # ranks without an engine


def test_frozen_weights_lost_without_cpu_backup_are_refused():
    vit = VIT
    eng = _engine(weights_cpu_backup=False, fake=dict(extra_params={vit[0]: (3, 4)}))
    eng.update_weights(iter(_policy(1) + [vit]))  # first sync: everything
    eng.release_memory()
    eng.resume_memory(weights=iter(_policy(2)))  # a skip_frozen export: the ViT is not re-sent
    assert eng._engine.mismatches([vit]) == [vit[0]]  # SGLang holds garbage there now
    with pytest.raises(RuntimeError, match="lost on release_memory.*visual.blocks.0.attn.qkv.weight"):
        eng.generate([RolloutRequest([1, 2])], SamplingParams(max_new_tokens=2))
    eng.update_weights(iter([vit]))
    assert eng._engine.mismatches(_policy(2) + [vit]) == []
    eng.generate([RolloutRequest([1, 2])], SamplingParams(max_new_tokens=2))


def test_image_token_counts_must_agree_with_the_trainer(tmp_path):
    req = _image_request("pic-7", size=(900, 700))
    params = SamplingParams(n=2, max_new_tokens=3, seed=1)
    eng = _engine()  # SGLang keeps Qwen2.5-VL's own max_pixels: more tokens for this image
    want = len(req.input_ids)
    got = want - req.input_ids.count(IMG) + eng._engine.image_tokens(req.images[0])
    assert got != want
    with pytest.raises(RuntimeError, match=rf"'pic-7'.*SGLang counted {got} prompt tokens, the trainer {want}"):
        eng.generate([req], params)
    with pytest.raises(RuntimeError, match="'pic-7'.*counted"):
        eng.score([req], [[3, 4]])
    _engine(min_pixels=TRAINER_PIXELS[0], max_pixels=TRAINER_PIXELS[1]).generate([req], params)
    with open(os.path.join(tmp_path, "preprocessor_config.json"), "w") as f:  # or the model dir agrees
        json.dump({"min_pixels": TRAINER_PIXELS[0], "max_pixels": TRAINER_PIXELS[1]}, f)
    SGLangEngine(str(tmp_path), image_token_id=IMG,
                 engine_factory=sglang_fake.factory(image_token_id=IMG)).generate([req], params)


def test_score_is_teacher_forced_at_t1_with_images():
    eng = _engine(min_pixels=TRAINER_PIXELS[0], max_pixels=TRAINER_PIXELS[1])
    eng.update_weights(iter(_policy(4)))
    reqs = [_image_request("pic"), RolloutRequest([1, 2, 3, 4], uid="text")]
    out = eng.generate(reqs, SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=2))
    comps = [out[0][1].token_ids, out[1][0].token_ids]
    scored = eng.score(reqs, comps)
    assert scored[0] == pytest.approx(out[0][1].logprobs, abs=1e-9)
    assert scored[1] == pytest.approx(out[1][0].logprobs, abs=1e-9)
    eng.update_weights(iter(_policy(5)))  # new weights, new scores
    assert eng.score(reqs, comps)[0] != pytest.approx(scored[0], abs=1e-6)
    with pytest.raises(ValueError, match="2 requests but 1"):
        eng.score(reqs, comps[:1])


def test_sglang_extra_names_the_range_the_engine_was_read_against():
    from packaging.requirements import Requirement

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.py")) as f:
        req = Requirement(re.search(r'"sglang": \["([^"]+)"\]', f.read()).group(1))
    assert req.name == "sglang"
    assert not req.specifier.contains("0.5.9")  # pins transformers 4.57
    assert not req.specifier.contains("0.5.10")  # no mm_process_config for images
    assert req.specifier.contains("0.5.11") and req.specifier.contains("0.5.23")
    assert not req.specifier.contains("0.6.0")


def test_shutdown_and_registry():
    eng = build_engine("sglang", model_path="/ckpt", image_token_id=IMG, engine_factory=sglang_fake.factory())
    fake = eng._engine
    with eng:
        pass
    eng.shutdown()
    assert fake.calls == [("shutdown",)]
    with pytest.raises(RuntimeError, match="shut down"):
        eng.release_memory()


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None,
                    reason="sglang is installed: the missing-extra error cannot be provoked")
def test_missing_sglang_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install dualrpo-mcore\[sglang\]"):
        SGLangEngine("/ckpt", image_token_id=IMG)
