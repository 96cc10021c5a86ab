"""The SGLang engine's own logic on CPU, with a recording stand-in for ``sglang.Engine`` passed
through the constructor's ``engine_factory`` (sglang itself is not installed here and needs CUDA):
constructor arguments, request building (pads collapsed, images once per prompt), output parsing,
bucketed weight updates, and the order of release / resume / update / flush."""
import importlib.util

import pytest
import torch

from dualrpo_mcore.rollout import RolloutRequest, SamplingParams, build_engine
from dualrpo_mcore.rollout.sglang_engine import (SGLangEngine, build_generate_kwargs, collapse_image_pads,
                                                 parse_outputs)

IMG = 200


class RecordingEngine:
    """Implements the slice of ``sglang.Engine`` we call; records every call in order."""

    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.calls = []

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release", tags))

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume", tags))

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update", [(n, t.numel() * t.element_size()) for n, t in named_tensors], flush_cache))

    def flush_cache(self):
        self.calls.append(("flush",))

    def shutdown(self):
        self.calls.append(("shutdown",))

    def generate(self, input_ids, sampling_params, return_logprob, image_data=None):
        self.calls.append(("generate", input_ids, sampling_params, image_data, return_logprob))
        n = sampling_params["n"]
        outs = []
        for i in range(len(input_ids)):  # request-major, as SGLang orders parallel samples
            for j in range(n):
                toks = [10 + i, 20 + j] + ([2] if j % 2 == 0 else [7])
                outs.append(dict(output_ids=toks, text="", meta_info=dict(
                    output_token_logprobs=[(-0.5 * (k + 1) - i - j / 10, t, None) for k, t in enumerate(toks)],
                    finish_reason={"type": "stop", "matched": 2} if j % 2 == 0 else {"type": "length", "length": 3})))
        return outs


def _engine(**kw):
    return SGLangEngine("/ckpt/qwen", image_token_id=IMG, engine_factory=RecordingEngine, **kw)


def _named(sizes):
    return [(f"w{i}", torch.zeros(s // 4)) for i, s in enumerate(sizes)]


def test_constructor_colocates_with_memory_saver():
    eng = _engine(tp_size=2, mem_fraction_static=0.4, dtype="float32", attention_backend="fa3")
    kw = eng._engine.init_kwargs
    assert kw["enable_memory_saver"] is True and kw["model_path"] == "/ckpt/qwen"
    assert kw["enable_weights_cpu_backup"] is True and eng.retains_weights_on_release
    assert not _engine(weights_cpu_backup=False).retains_weights_on_release
    assert (kw["tp_size"], kw["mem_fraction_static"], kw["dtype"], kw["attention_backend"]) == (2, 0.4, "float32", "fa3")


def test_step_cycle_order_release_resume_weights_then_kv_then_flush():
    eng = _engine(bucket_bytes=100)
    rec = eng._engine
    eng.release_memory()
    eng.release_memory()  # idempotent: SGLang asserts on double release
    with pytest.raises(RuntimeError, match="resume_memory first"):
        eng.generate([RolloutRequest([5, 6])], SamplingParams())
    with pytest.raises(RuntimeError, match="resume_memory first"):
        eng.update_weights(_named([8]))
    eng.resume_memory(weights=iter(_named([40, 40, 40, 120, 16])))
    assert rec.calls == [
        ("release", None),
        ("resume", ["weights"]),
        ("update", [("w0", 40), ("w1", 40)], False),
        ("update", [("w2", 40)], False),
        ("update", [("w3", 120)], False),  # oversize tensor travels alone
        ("update", [("w4", 16)], False),
        ("resume", ["kv_cache"]),
        ("flush",),
    ]
    eng.generate([RolloutRequest([5, 6])], SamplingParams())  # allowed again


def test_update_weights_outside_the_cycle_flushes_once():
    eng = _engine(bucket_bytes=64)
    assert eng.update_weights(iter(_named([32, 32, 32]))) == 3
    assert [c[0] for c in eng._engine.calls] == ["update", "update", "flush"]
    assert all(c[2] is False for c in eng._engine.calls if c[0] == "update")


def test_request_building_shares_images_across_samples():
    img_ids = [1, 198] + [IMG] * 12 + [199, 5, 198] + [IMG] * 4 + [199, 6]
    reqs = [RolloutRequest(img_ids, uid="a", images=["img-a1", "img-a2"]),
            RolloutRequest([1, 7, 8], uid="b")]
    params = SamplingParams(n=4, temperature=0.9, top_p=0.95, top_k=0, max_new_tokens=32, stop=("</answer>",),
                            stop_token_ids=(151645,), seed=3)
    kw = build_generate_kwargs(reqs, params, IMG)
    assert kw["input_ids"] == [[1, 198, IMG, 199, 5, 198, IMG, 199, 6], [1, 7, 8]]
    assert kw["image_data"] == [["img-a1", "img-a2"], None]  # once per prompt, not per sample
    sp = kw["sampling_params"]
    assert sp == dict(n=4, temperature=0.9, top_p=0.95, top_k=-1, max_new_tokens=32, skip_special_tokens=False,
                      no_stop_trim=True, stop=["</answer>"], stop_token_ids=[151645], sampling_seed=3)
    assert kw["return_logprob"] is True
    assert "image_data" not in build_generate_kwargs(reqs[1:], params, IMG)
    with pytest.raises(ValueError, match="'a'.*2 image placeholders but 1 raw"):
        build_generate_kwargs([RolloutRequest(img_ids, uid="a", images=["x"])], params, IMG)
    assert collapse_image_pads([IMG, IMG, 3, IMG], IMG) == [IMG, 3, IMG]


def test_generate_maps_request_major_outputs():
    eng = _engine()
    reqs = [RolloutRequest([1, 2, 3], uid="a"), RolloutRequest([4, 5], uid="b")]
    out = eng.generate(reqs, SamplingParams(n=3))
    call = eng._engine.calls[-1]
    assert call[0] == "generate" and len(call[1]) == 2  # one entry per prompt
    assert [[s.token_ids for s in row] for row in out] == [
        [[10, 20, 2], [10, 21, 7], [10, 22, 2]], [[11, 20, 2], [11, 21, 7], [11, 22, 2]]]
    assert [s.finish_reason for s in out[1]] == ["stop", "length", "stop"]
    assert out[1][1].logprobs == pytest.approx([-1.6, -2.1, -2.6])


def test_parse_outputs_rejects_aborts_and_miscounts():
    good = RecordingEngine().generate([[1]], {"n": 2}, True)
    with pytest.raises(RuntimeError, match="2 outputs for 2 prompts"):
        parse_outputs(good, 2, 2)
    good[1]["meta_info"]["finish_reason"] = {"type": "abort", "message": "oom"}
    with pytest.raises(RuntimeError, match="abort"):
        parse_outputs(good, 1, 2)
    good[1]["meta_info"]["finish_reason"] = {"type": "stop"}
    good[1]["output_ids"] = [0]
    with pytest.raises(RuntimeError, match="disagree"):
        parse_outputs(good, 1, 2)


def test_shutdown_and_registry():
    eng = build_engine("sglang", model_path="/ckpt", image_token_id=IMG, engine_factory=RecordingEngine)
    rec = eng._engine
    with eng:
        pass
    eng.shutdown()
    assert rec.calls == [("shutdown",)]
    with pytest.raises(RuntimeError, match="shut down"):
        eng.release_memory()


@pytest.mark.skipif(importlib.util.find_spec("sglang") is not None,
                    reason="sglang is installed: the missing-extra error cannot be provoked")
def test_missing_sglang_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install dualrpo-mcore\[sglang\]"):
        SGLangEngine("/ckpt", image_token_id=IMG)
