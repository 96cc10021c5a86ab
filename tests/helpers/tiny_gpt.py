"""A two-layer Megatron-Core GPTModel with DDP and a Megatron optimizer, and one training step: the
smallest real model the checkpoint tests (save/load bitwise, failure agreement) can train on gloo.
Megatron is imported inside, so the spawned ranks pay for it, not test collection."""

VOCAB, SEQ = 64, 8


def build(tp, distopt):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=4, use_cpu_initialization=True,
                            tensor_model_parallel_size=tp, hidden_dropout=0.1, attention_dropout=0.1)
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=distopt), model)
    # clip_grad=0: Megatron's grad clipping asserts CUDA tensors; the RL loop clips on GPU only.
    opt_cfg = OptimizerConfig(optimizer="adam", lr=1e-2, use_distributed_optimizer=distopt, bf16=False,
                              fp16=False, clip_grad=0.0)
    opt = get_megatron_optimizer(opt_cfg, [ddp], use_gloo_process_groups=False)
    return model, ddp, opt


def step(ddp, opt):
    """One training step on data drawn from the global torch RNG (so resuming must restore it)."""
    import torch

    ddp.zero_grad_buffer()
    opt.zero_grad()
    ids = torch.randint(0, VOCAB, (2, SEQ))
    pos = torch.arange(SEQ)[None].expand(2, SEQ)
    loss = ddp(ids, pos, None, labels=ids).float().mean()
    loss.backward()
    ddp.finish_grad_sync()
    ok, _, _ = opt.step()
    assert ok
    return loss.detach().clone()
