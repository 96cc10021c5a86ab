"""FP8 without a GPU: the token multiple of each recipe, micro-batch padding on awkward shapes, the
precision fields reaching the LM's / ViT's / merger's TransformerConfigs, the one backend rule and its
callers, and FP8 without Transformer Engine failing at start with the install hint.

Transformer Engine is not installable here: CUDA / TE availability is passed to the resolver as
arguments, and what needs TE modules is tested through the functions that configure them."""
import math

import pytest
import torch

from dualrpo_mcore.models.qwen2_5_vl import from_hf, testing
from dualrpo_mcore.models.qwen2_5_vl.precision import FP8_RECIPES, Precision, fp8_context, te_available
from dualrpo_mcore.models.qwen2_5_vl.specs import BACKENDS, RESOLVED_BACKENDS, resolve_backend
from dualrpo_mcore.actor.config import ActorConfig, ModelSourceConfig
from dualrpo_mcore.actor.microbatch import pad_tokens, padded_length

HINT = r"pip install dualrpo-mcore\[te\]"


def _fp8_src(**kw):
    kw = dict(dict(tiny=True, precision="bf16", fp8="hybrid", spec_backend="auto"), **kw)
    return ModelSourceConfig(**kw)


# ------------------------------------------------------------------------------ token multiple
@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_token_multiple_is_megatrons_fp8_alignment(recipe):
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    assert Precision(dtype="bf16", fp8="hybrid", fp8_recipe=recipe).token_multiple == \
        get_fp8_align_size(Fp8Recipe(recipe))
    assert _fp8_src(fp8_recipe=recipe).token_multiple == get_fp8_align_size(Fp8Recipe(recipe))


def test_no_fp8_no_padding():
    assert Precision(dtype="bf16").token_multiple == 1
    assert ModelSourceConfig(tiny=True).token_multiple == 1
    assert ModelSourceConfig(tiny=True, pad_tokens_to=16).token_multiple == 16  # the CPU test knob


def _batch(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, s + 1, (b,), generator=g)
    lengths[0] = s
    attn = (torch.arange(s)[None] < lengths[:, None]).long()
    resp = attn.clone()
    resp[:, 0] = 0
    return dict(input_ids=torch.randint(3, 198, (b, s), generator=g) * attn, attention_mask=attn,
                response_mask=resp, old_logprob=-torch.rand(b, s, generator=g) * resp,
                advantages=torch.randn(b, generator=g), pixel_values=torch.randn(8, 96, generator=g),
                image_grid_thw=torch.tensor([[1, 2, 4]]))


@pytest.mark.parametrize("recipe", ["delayed", "mxfp8"])
@pytest.mark.parametrize("b,s", [(3, 36), (1, 1), (5, 7), (4, 33), (7, 100), (16, 3), (6, 15)])
def test_fp8_micro_batches_are_padded_to_the_recipes_multiple(recipe, b, s):
    m = _fp8_src(fp8_recipe=recipe).token_multiple
    batch = _batch(b, s)
    out = pad_tokens(batch, m)
    b2, s2 = out["input_ids"].shape
    assert b2 == b and (b2 * s2) % m == 0
    assert all((b * t) % m for t in range(s, s2))  # the smallest such width
    assert s2 == padded_length(b, s, m) and s2 - s < m // math.gcd(b, m)
    for key in ("input_ids", "attention_mask", "response_mask", "old_logprob"):
        assert torch.equal(out[key][:, :s], batch[key]), key
        assert not out[key][:, s:].any(), key  # padding: masked out of attention, loss and statistics
    for key in ("advantages", "pixel_values", "image_grid_thw"):
        assert out[key] is batch[key]


def test_without_fp8_the_micro_batch_is_untouched():
    batch = _batch(3, 36)
    assert pad_tokens(batch, ModelSourceConfig(tiny=True).token_multiple) is batch


# ------------------------------------------------------------------------------ precision fields reach the model
def _configs(src, backend="te"):
    from dualrpo_mcore.models.qwen2_5_vl.model import transformer_configs
    from dualrpo_mcore.actor.megatron_setup import model_options

    return transformer_configs(from_hf(testing.tiny_hf_config()), model_options(src, backend))


@pytest.mark.parametrize("fp8_vision", [False, True])
def test_fp8_fields_reach_the_lm_vit_and_merger_configs(fp8_vision):
    lm, vit, merger = _configs(_fp8_src(fp8_recipe="tensorwise", fp8_vision=fp8_vision))
    assert (lm.fp8, lm.fp8_recipe, lm.bf16) == ("hybrid", "tensorwise", True)
    want = "hybrid" if fp8_vision else None
    assert vit.fp8 == want and merger.fp8 == want
    assert vit.bf16 and merger.bf16


def test_fp8_context_is_opened_exactly_for_configs_with_fp8(monkeypatch):
    import contextlib

    import megatron.core.fp8_utils as fu

    seen = []
    monkeypatch.setattr(fu, "get_fp8_context", lambda config, *a, **k: seen.append(config) or contextlib.nullcontext())
    for fp8_vision in (False, True):
        lm, vit, merger = _configs(_fp8_src(fp8_vision=fp8_vision))
        for config in (lm, vit, merger):
            with fp8_context(config):
                pass
    off = _configs(ModelSourceConfig(tiny=True, precision="bf16"), "local")
    for config in off:
        with fp8_context(config):
            pass
    # The LM (2 layers) in both rounds; the ViT (3 blocks) and the merger (1) only with fp8_vision;
    # nothing without FP8.
    assert [c.num_layers for c in seen] == [2, 2, 3, 1] and all(c.fp8 == "hybrid" for c in seen)


def test_fp8_is_settable_from_the_config_tree():
    from dualrpo_mcore.trainer.overrides import apply_overrides

    cfg = apply_overrides(ActorConfig(), ["model.spec_backend=auto", "model.precision=bf16", "model.fp8=hybrid",
                                          "model.fp8_recipe=blockwise", "model.fp8_vision=true"])
    src = cfg.model
    assert (src.fp8, src.fp8_recipe, src.fp8_vision) == ("hybrid", "blockwise", True)
    assert src.precision_config() == Precision(dtype="bf16", fp8="hybrid", fp8_recipe="blockwise", fp8_vision=True)
    src = apply_overrides(cfg, ["model.fp8_vision=false", "model.fp8=none"]).model
    assert src.fp8 is None and src.token_multiple == 1


@pytest.mark.parametrize("kw,message", [
    (dict(spec_backend="local"), r"actor.model.fp8='hybrid' needs the Transformer Engine spec"),
    (dict(precision="fp32"), r"actor.model.fp8='hybrid' needs dtype"),
    (dict(fp8="e5m2"), r"actor.model.fp8='e5m2'"),
    (dict(fp8_recipe="bogus"), r"actor.model.fp8_recipe='bogus'"),
    (dict(pad_tokens_to=8), r"actor.model.pad_tokens_to=8: FP8 recipe 'delayed' needs a multiple of 16"),
    (dict(fp8=None, fp8_vision=True), r"actor.model.fp8_vision=True does nothing without actor.model.fp8"),
])
def test_bad_fp8_fields_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        _fp8_src(**kw)


# ------------------------------------------------------------------------------ one backend rule
@pytest.mark.parametrize("requested,cuda,te,fp8,want", [
    ("auto", True, True, False, "te"),
    ("auto", True, False, False, "local"),
    ("auto", False, True, False, "local"),
    ("auto", False, False, False, "local"),
    ("te", True, True, False, "te"),
    ("te", False, True, False, "te"),
    ("local", True, True, False, "local"),
    ("auto", True, True, True, "te"),
    ("auto", False, True, True, "te"),
    ("te", True, True, True, "te"),
])
def test_resolve_backend_rule(requested, cuda, te, fp8, want):
    assert resolve_backend(requested, needs_te=fp8, cuda_available=cuda, te_available=te) == want
    assert want in RESOLVED_BACKENDS


def test_resolve_backend_errors():
    with pytest.raises(RuntimeError, match=HINT):
        resolve_backend("te", cuda_available=True, te_available=False)
    with pytest.raises(RuntimeError, match=HINT):
        resolve_backend("auto", needs_te=True, cuda_available=True, te_available=False)
    with pytest.raises(ValueError, match="FP8 needs the Transformer Engine spec"):
        resolve_backend("local", needs_te=True, cuda_available=True, te_available=True)
    with pytest.raises(ValueError, match="choose one of"):
        resolve_backend("tee", cuda_available=True, te_available=True)


def test_backend_names_and_model_options_are_defined_once():
    """One BACKENDS tuple, and the trainer's model section is the model layer's options plus a source."""
    import dataclasses

    from dualrpo_mcore.planner import memory
    from dualrpo_mcore.models.qwen2_5_vl import options
    from dualrpo_mcore.models.qwen2_5_vl.model import ModelOptions

    assert options.BACKENDS is BACKENDS and memory.BACKENDS is RESOLVED_BACKENDS
    assert issubclass(ModelSourceConfig, ModelOptions)
    src = ModelSourceConfig(tiny=True, recompute="selective", vocab_divisible_by=64, pad_tokens_to=8)
    built = src.with_backend("local")
    assert type(built) is ModelOptions and built.spec_backend == "local"
    assert {f.name: getattr(built, f.name) for f in dataclasses.fields(ModelOptions) if f.name != "spec_backend"} == \
        {f.name: getattr(src, f.name) for f in dataclasses.fields(ModelOptions) if f.name != "spec_backend"}
    with pytest.raises(ValueError, match=r"^model.recompute='x'"):
        ModelOptions(recompute="x")
    with pytest.raises(ValueError, match=r"^actor.model.recompute='x'"):
        ModelSourceConfig(tiny=True, recompute="x")


def test_callers_receive_the_resolved_backend():
    """'auto' on a CUDA machine with TE: the model options, the plan and the weight naming all say te."""
    from dualrpo_mcore.planner.plan import plan_backend
    from dualrpo_mcore.actor.megatron_setup import model_options

    src = ModelSourceConfig(tiny=True, spec_backend="auto")
    resolved = src.resolve_backend(cuda_available=True, te_available=True)
    assert resolved == "te"
    assert model_options(src, resolved).spec_backend == "te"
    assert plan_backend(src) == "te"
    assert plan_backend(ModelSourceConfig(tiny=True, spec_backend="local")) == "local"
    assert src.resolve_backend(cuda_available=False, te_available=False) == "local"
    with pytest.raises(ValueError, match="resolved backend"):
        model_options(src, "auto")  # an unresolved name never reaches the model


@pytest.mark.skipif(te_available(), reason="Transformer Engine is installed here; the no-TE error path cannot occur")
def test_fp8_without_te_fails_at_actor_start_naming_the_extra():
    import torch.distributed as dist

    from dualrpo_mcore.actor.actor import Actor

    with pytest.raises(RuntimeError, match=HINT):
        Actor(ActorConfig(model=_fp8_src()))
    assert not dist.is_initialized()  # it stopped before any process group or model was built
