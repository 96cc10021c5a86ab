"""Actor config checks name the offending field."""
import pytest

from dualrpo_mcore.actor.config import ActorConfig, BadStepConfig, KLConfig, MicroBatchConfig, ModelSourceConfig, OptimConfig, ParallelConfig


def test_defaults_are_the_paper_settings():
    cfg = ActorConfig()
    assert cfg.optim.lr == 1e-6 and cfg.optim.warmup_fraction == 0.05
    assert cfg.kl.beta0 == 0.0 and not cfg.kl.enabled and cfg.kl.beta_min == 0.05
    assert cfg.optim.distributed_optimizer
    assert cfg.loss.agg == "token-mean"


@pytest.mark.parametrize("make, field", [
    (lambda: ModelSourceConfig(), "exactly one"),
    (lambda: ModelSourceConfig(tiny=True, hf_dir="x"), "exactly one"),
    (lambda: ModelSourceConfig(tiny=True, precision="fp64"), "precision"),
    (lambda: ParallelConfig(tp=0), "tp"),
    (lambda: ParallelConfig(backend="mpi"), "backend"),
    (lambda: OptimConfig(lr=0), "lr"),
    (lambda: OptimConfig(adam_beta2=1.0), "adam_beta2"),
    (lambda: OptimConfig(warmup_fraction=1.0), "warmup_fraction"),
    (lambda: OptimConfig(grad_clip=-1), "grad_clip"),
    (lambda: OptimConfig(total_steps=0), "total_steps"),
    (lambda: MicroBatchConfig(max_tokens=0), "max_tokens"),
    (lambda: KLConfig(beta0=-1), "beta0"),
    (lambda: KLConfig(beta_min=2), "beta_min"),
    (lambda: KLConfig(normalizer="nope"), "normalizer"),
    (lambda: BadStepConfig(max_consecutive=0), "max_consecutive"),
    (lambda: ActorConfig(temperature=0), "temperature"),
])
def test_bad_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_training_dict_is_coerced():
    cfg = ModelSourceConfig(tiny=True, training={"freeze_vision": True})
    assert cfg.training.freeze_vision


def test_dr_grpo_without_its_constant_fails_before_any_process_group():
    """An actor built without the RL config (SFT, bench) has no response budget: Dr. GRPO names the fields."""
    from dualrpo_mcore.algo import PolicyLossConfig
    from dualrpo_mcore.actor.actor import Actor

    cfg = ActorConfig(loss=PolicyLossConfig(agg="seq-mean-token-sum-norm"))
    with pytest.raises(ValueError, match=r"actor\.loss\.max_response_length"):
        Actor(cfg)
