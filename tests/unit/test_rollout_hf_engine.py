"""The HF rollout engine on tiny random Qwen2.5-VL models (CPU, fp32): rollout log-probs against the
transformers model's own teacher-forced forward in float64, sampling semantics against independent
references, determinism, finish reasons, and weight loading by name."""
import collections

import pytest
import torch

from dualrpo_mcore.models.qwen2_5_vl import testing
from dualrpo_mcore.rollout import RolloutRequest, Sample, SamplingParams, build_engine
from dualrpo_mcore.rollout.hf_engine import HFEngine, choose_token, filter_probs


@pytest.fixture(scope="module")
def hf():
    return testing.tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def engine(hf):
    return HFEngine(hf, eos_token_ids=[2])


def _requests():
    img = testing.make_batch(seed=4, rows=(((6, 8),),), patch_dim=96)
    two = testing.make_batch(seed=4, rows=(((4, 10), (6, 6)),), patch_dim=96)
    text = testing.make_batch(seed=9, rows=((),))
    return [RolloutRequest(img["input_ids"][0], img["pixel_values"], img["image_grid_thw"], uid="img"),
            RolloutRequest(two["input_ids"][0], two["pixel_values"], two["image_grid_thw"], uid="two"),
            RolloutRequest(text["input_ids"][0], uid="text")]


def _reference_logprobs(model, req, tokens, temperature):
    """Teacher-forced log softmax(logits / T) of ``tokens`` in float64, transformers' own positions."""
    ids = torch.tensor([req.input_ids + tokens])
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if req.pixel_values is not None:
        batch.update(pixel_values=req.pixel_values, image_grid_thw=req.image_grid_thw)
    with torch.no_grad():
        logits = testing.hf_forward(model, batch)[0].double()
    lp = torch.log_softmax(logits[len(req.input_ids) - 1:-1] / (temperature or 1.0), -1)
    return lp.gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_logprobs_match_teacher_forced_forward(hf, engine, temperature):
    reqs = _requests()
    params = SamplingParams(n=2, temperature=temperature, top_p=0.9, top_k=50, max_new_tokens=7, seed=1)
    out = engine.generate(reqs, params)
    assert [len(o) for o in out] == [2, 2, 2]
    for req, samples in zip(reqs, out):
        for s in samples:
            ref = _reference_logprobs(hf, req, s.token_ids, temperature)
            assert (ref - torch.tensor(s.logprobs, dtype=torch.float64)).abs().max() < 1e-5


def _assert_same_samples(got, want):
    assert [(g.token_ids, g.finish_reason) for g in got] == [(w.token_ids, w.finish_reason) for w in want]
    for g, w in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)


def test_seeded_and_independent_of_batch_composition(engine):
    reqs = _requests()
    params = SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=123)
    full = engine.generate(reqs, params)
    alone = engine.generate([reqs[2]], params)
    again = engine.generate(reqs[::-1], params)[::-1]
    # Same draws whatever shares the batch; log-probs only up to the batched forward's rounding.
    _assert_same_samples(alone[0], full[2])
    for a, f in zip(again, full):
        _assert_same_samples(a, f)
    assert engine.generate(reqs, params) == full  # the same call again: bitwise
    one_prompt_per_chunk = HFEngine(engine.model, eos_token_ids=[2], max_batch_rows=3).generate(reqs, params)
    for c, f in zip(one_prompt_per_chunk, full):
        _assert_same_samples(c, f)
    assert len({tuple(s.token_ids) for s in full[0]}) > 1  # the n samples differ
    other = engine.generate(reqs, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=124))
    assert other != full


def test_top_k_one_is_greedy(engine):
    reqs = _requests()
    greedy = engine.generate(reqs, SamplingParams(temperature=0.0, max_new_tokens=6))
    topk1 = engine.generate(reqs, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=6, seed=5))
    assert [[s.token_ids for s in o] for o in greedy] == [[s.token_ids for s in o] for o in topk1]


def _reference_filter(p, top_k, top_p):
    """Float64, by explicit ranking: keep rank < k, then the shortest prefix with mass >= top_p."""
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = order[:top_k] if top_k > 0 else order
    kept, mass, total = [], 0.0, sum(p[i] for i in keep)
    for i in keep:
        kept.append(i)
        mass += p[i]
        if mass >= top_p * total:
            break
    return [p[i] if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.5), (4, 0.8), (1, 0.3), (0, 0.999)])
def test_filter_probs_matches_reference(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 10 + int(top_p * 100))
    for _ in range(20):
        p = torch.softmax(torch.randn(9, generator=g, dtype=torch.float64) * 2, -1)
        got = filter_probs(p, top_k, top_p)
        assert torch.equal(got > 0, torch.tensor(_reference_filter(p.tolist(), top_k, top_p)) > 0)


def test_sampling_frequencies_follow_truncated_distribution():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -3.0])
    params = SamplingParams(temperature=0.8, top_k=4, top_p=0.9)
    p = torch.softmax(logits.double() / 0.8, -1)
    want = torch.tensor(_reference_filter(p.tolist(), 4, 0.9))
    want = want / want.sum()
    gen = torch.Generator().manual_seed(0)
    draws = 20000
    counts = collections.Counter(choose_token(logits, params, gen)[0] for _ in range(draws))
    freq = torch.tensor([counts.get(i, 0) / draws for i in range(6)], dtype=torch.float64)
    assert ((freq - want).abs() <= 4 * torch.sqrt(want * (1 - want) / draws) + 1e-12).all(), (freq, want)
    tok, lp = choose_token(logits, params, torch.Generator().manual_seed(1))
    assert abs(lp - float(torch.log(p[tok]))) < 1e-6  # before truncation, at temperature


class _CharTokenizer:
    """A test tokenizer: token id -> one letter."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + i % 26) for i in ids)


def test_finish_reasons_and_stops(hf):
    reqs = _requests()
    eng = HFEngine(hf, tokenizer=_CharTokenizer(), eos_token_ids=[])
    base = eng.generate(reqs[:1], SamplingParams(temperature=0.0, max_new_tokens=8))[0][0]
    assert base.finish_reason == "length" and len(base.token_ids) == 8
    stop_tok = eng.generate(reqs[:1], SamplingParams(temperature=0.0, max_new_tokens=8,
                                                     stop_token_ids=(base.token_ids[3],)))[0][0]
    first = base.token_ids.index(base.token_ids[3])
    assert stop_tok.finish_reason == "stop" and stop_tok.token_ids == base.token_ids[: first + 1]
    text = _CharTokenizer().decode(base.token_ids)
    stop = text[4:6]
    stop_str = eng.generate(reqs[:1], SamplingParams(temperature=0.0, max_new_tokens=8, stop=stop))[0][0]
    want = next(k for k in range(1, 9) if stop in text[:k])
    assert stop_str.finish_reason == "stop" and stop_str.token_ids == base.token_ids[:want]
    assert stop_str.logprobs == base.logprobs[:want]
    with pytest.raises(ValueError, match="tokenizer"):
        HFEngine(hf, eos_token_ids=[2]).generate(reqs[:1], SamplingParams(stop=("x",)))


def test_update_weights_by_name():
    src, dst = testing.tiny_hf_model(seed=0), HFEngine(testing.tiny_hf_model(seed=3), eos_token_ids=[2])
    from dualrpo_mcore.models.qwen2_5_vl import mapping

    published = [(mapping.normalize_hf_name(n), t) for n, t in src.state_dict().items()]
    half = len(published) // 2
    # Published names and transformers-5 in-memory names are both accepted.
    assert dst.update_weights(published[:half]) + dst.update_weights(list(src.state_dict().items())[half:]) \
        == len(published)
    for (name, want), got in zip(src.state_dict().items(), dst.model.state_dict().values()):
        assert torch.equal(want, got), name
    with pytest.raises(KeyError, match="visual.blocks.9.attn.qkv.weight"):
        dst.update_weights([("visual.blocks.9.attn.qkv.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight"):
        dst.update_weights([("model.norm.weight", torch.zeros(5))])


def test_request_from_loader_prompt():
    from dualrpo_mcore.data.loader import Prompt

    p = Prompt(uid="s:f:3", source="s", file="f", row=3, messages=[], images=["im"], pixel_values=torch.zeros(16, 96),
               image_grid_thw=torch.tensor([[1, 4, 4]]), reward={}, task="count", data_source="synth",
               input_ids=torch.tensor([1, 198, 200, 200, 200, 200, 199]))
    r = RolloutRequest.from_prompt(p)
    assert (r.uid, r.input_ids, r.images) == ("s:f:3", [1, 198, 200, 200, 200, 200, 199], ["im"])
    assert r.pixel_values is p.pixel_values and r.image_grid_thw is p.image_grid_thw
    p.input_ids = None
    with pytest.raises(ValueError, match="'s:f:3' has no input_ids"):
        RolloutRequest.from_prompt(p)


def test_dataclass_checks_and_registry(hf):
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="n="):
        SamplingParams(n=0)
    with pytest.raises(ValueError, match="'u1'.*pixel_values"):
        RolloutRequest([1, 2], pixel_values=torch.zeros(4, 96), uid="u1")
    with pytest.raises(ValueError, match="finish_reason"):
        Sample([1], [0.0], "eos")
    with pytest.raises(KeyError, match="known: hf, sglang"):
        build_engine("vllm")
    eng = build_engine("hf", model=hf, eos_token_ids=[2])
    assert isinstance(eng, HFEngine)
    with eng:
        pass
    with pytest.raises(RuntimeError, match="shut down"):
        eng.generate([RolloutRequest([5, 6])], SamplingParams())
