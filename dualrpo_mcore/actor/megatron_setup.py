"""Building the actor's Megatron pieces: model stage, weights, DDP wrapper, optimizer, reference.

On CPU (gloo) Megatron's distributed optimizer runs as on GPU once ``parallel.cpu_compat`` is on
(it reports CPU tensors under their CUDA type names, which the optimizer checks); only its optional
extra gloo process groups are switched off (``use_gloo_process_groups=False``), because on CPU the
main groups already are gloo groups and ``parallel.initialize`` does not create the extra ones.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

import torch

from dualrpo_mcore.actor.config import ActorConfig, ModelSourceConfig

log = logging.getLogger(__name__)
# Megatron's buffers call the torch collectives under their pre-2.10 names; torch warns on every
# call, which would bury the training log. Only these two messages are silenced.
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                        r"is deprecated", category=FutureWarning)


def resolve_model_config(src: ModelSourceConfig):
    """The :class:`QwenVLConfig` of the configured source (:mod:`.model_source` resolves every kind)."""
    from dualrpo_mcore.models.qwen2_5_vl import from_hf

    from dualrpo_mcore.actor.model_source import hf_config_source

    return from_hf(hf_config_source(src))


def model_options(src: ModelSourceConfig, backend: str):
    """The model's build options (``src``'s own ModelOptions fields); ``backend`` is the run's resolved one."""
    return src.with_backend(backend)


def build_and_load(cfg, src: ModelSourceConfig, info, hf_state_dict: Optional[Dict[str, torch.Tensor]] = None, *,
                   backend: str):
    """This rank's model stage with the source's weights (random init for a tiny model), frozen parts set.
    ``backend`` is the resolved one: it picks the modules and the weight naming alike."""
    from dualrpo_mcore.models.qwen2_5_vl import convert, mapping
    from dualrpo_mcore.models.qwen2_5_vl.model import build_model
    from dualrpo_mcore.models.qwen2_5_vl.training import apply_freeze

    model = build_model(cfg, model_options(src, backend))
    te = model.backend == "te"
    shard = dict(tp_rank=info.tp_rank, tp=info.tp_size, pp_rank=info.pp_rank, pp=info.pp_size, te_spec=te)
    conv = mapping.Converter(cfg, model.padded_vocab_size)
    if hf_state_dict is not None:
        named = {mapping.normalize_hf_name(k): v for k, v in hf_state_dict.items()}
        _load(model, mapping.shard_for_rank(cfg, named.__getitem__, converter=conv, **shard), "hf_state_dict")
    elif src.hf_dir:
        reader = convert.HFReader(src.hf_dir)
        try:
            _load(model, mapping.shard_for_rank(cfg, reader.__getitem__, converter=conv, **shard), src.hf_dir)
        finally:
            reader.close()
    elif src.megatron_ckpt:
        convert.load_into(model, src.megatron_ckpt, info.tp_rank, info.tp_size, info.pp_rank, info.pp_size, te_spec=te)
    apply_freeze(model, src.training)
    return model


def _load(model, items: Iterator[Tuple[str, torch.Tensor]], where: str) -> None:
    missing, unexpected = model.load_state_dict(dict(items), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{where}: weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def wrap_and_optimizer(module, config: ActorConfig):
    """Megatron DDP around the stage and ``get_megatron_optimizer``; returns (ddp, optimizer, distributed?)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from dualrpo_mcore.models.qwen2_5_vl.training import megatron_overrides

    o = config.optim
    use_dist = o.distributed_optimizer
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                            use_distributed_optimizer=use_dist, check_for_nan_in_grad=False)
    ddp = DistributedDataParallel(config=module.config, ddp_config=ddp_cfg, module=module)
    _skip_identity_param_gather(ddp)
    mc = module.config
    # Rows and lengths differ between micro-batches (token-balanced): stages exchange shapes first.
    mc.variable_seq_lengths = True
    mc.no_sync_func = ddp.no_sync
    mc.finalize_model_grads_func = _finalize_grads(module)
    dtype = module.config.params_dtype
    ocfg = OptimizerConfig(optimizer="adam", lr=o.lr, min_lr=0.0, weight_decay=o.weight_decay,
                           adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
                           clip_grad=o.grad_clip, use_distributed_optimizer=use_dist,
                           bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, params_dtype=dtype)
    on_cpu = not torch.cuda.is_available()
    optimizer = get_megatron_optimizer(ocfg, [ddp], config_overrides=megatron_overrides(config.model.training, o.lr)
                                       or None, use_gloo_process_groups=not on_cpu)
    if on_cpu:
        _foreach_steps(optimizer)
    return ddp, optimizer, use_dist


def _foreach_steps(optimizer) -> None:
    """Without TE or Apex Megatron falls back to ``torch.optim.AdamW``, whose default on CPU tensors is one
    Python loop over the parameters; its multi-tensor (``foreach``) form does the same arithmetic, in the
    same order, in a few batched calls."""
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            for group in inner.param_groups:
                if group.get("foreach", False) is None:
                    group["foreach"] = True


def _finalize_grads(module):
    """What Megatron's ``finalize_model_grads`` does, for our wrapper model (whose GPTModel sits one
    level down, where Megatron's helper does not look): the data-parallel gradient reduction, then,
    with tied embeddings split over pipeline stages, the sum of the first stage's input-embedding
    gradient and the last stage's output-layer gradient (they are one parameter in HF)."""
    def finalize(model_chunks, *_args, **_kwargs):
        from megatron.core import parallel_state as ps

        for chunk in model_chunks:
            if _reduction_is_identity(chunk):
                _skip_grad_sync(chunk)
            else:
                chunk.finish_grad_sync()
        lm = module.language_model
        if ps.get_pipeline_model_parallel_world_size() == 1 or not module.cfg.tie_word_embeddings:
            return
        weight = lm.embedding.word_embeddings.weight if lm.pre_process else lm.output_layer.weight
        if ps.is_rank_in_embedding_group(ignore_virtual=True) and weight.requires_grad:
            torch.distributed.all_reduce(weight.main_grad, group=ps.get_embedding_group())

    return finalize


def _reduction_is_identity(ddp) -> bool:
    """True when ``finish_grad_sync`` would change nothing: a one-rank collective group in every bucket
    group and no gradient scaling. The collective on a one-rank group still copies the whole gradient
    buffer (gloo: measured 3 x 31M floats, ~90 ms of a 1.5 s CPU step at ``small``), so it is skipped."""
    cfg = ddp.ddp_config
    if cfg.overlap_grad_reduce or getattr(cfg, "num_distributed_optimizer_instances", 1) != 1:
        return False  # per-step bucket state (overlap), a second reduction across optimizer instances
    for group in list(ddp.bucket_groups) + list(getattr(ddp, "expert_parallel_bucket_groups", [])):
        comm = group.intra_distributed_optimizer_instance_group if cfg.use_distributed_optimizer \
            else group.data_parallel_group
        if comm.size() != 1 or any(bucket.gradient_scaling_factor != 1.0 for bucket in group.buckets):
            return False
    return True


def _skip_grad_sync(ddp) -> None:
    """What a skipped ``finish_grad_sync`` leaves behind besides its collective (megatron-core 0.16 and
    0.19: it marks the next parameter all-gather as not yet dispatched)."""
    for group in list(ddp.bucket_groups) + list(getattr(ddp, "expert_parallel_bucket_groups", [])):
        group.param_gather_dispatched = False


def _skip_identity_param_gather(ddp) -> None:
    """The distributed optimizer's parameter all-gather after each step, on a one-rank group, gathers each
    buffer onto itself: a copy of every parameter (gloo: ~70 ms of a 0.78 s CPU step at ``small``). Where
    that is all it would do (synchronous gather, one optimizer instance, no MXFP8 buffer reuse; megatron-core
    0.16 and 0.19), each bucket group's ``start_param_sync`` only records what the gather records."""
    cfg = ddp.ddp_config
    if (not cfg.use_distributed_optimizer or cfg.overlap_param_gather
            or getattr(cfg, "num_distributed_optimizer_instances", 1) != 1
            or getattr(cfg, "reuse_grad_buf_for_mxfp8_param_ag", False)):
        return
    for group in list(ddp.bucket_groups) + list(getattr(ddp, "expert_parallel_bucket_groups", [])):
        if group.intra_distributed_optimizer_instance_size == 1:
            group.start_param_sync = functools.partial(_record_param_sync, group)


def _record_param_sync(group, force_sync: bool = False) -> None:
    group.param_gather_handle = None
    group.param_gather_dispatched = True


def grads_finite(ddp) -> bool:
    """All of this rank's gradient buffers are finite (after the data-parallel reduction).

    Read from each buffer's L2 norm, a single reduction (``isfinite().all()`` makes three passes and two
    temporaries: ~118 ms against ~5 ms on the 31M gradients of ``small``): a NaN or an Inf anywhere makes
    the norm NaN or Inf. A norm beyond float32's range also counts as not finite; the optimizer's own
    clipping would compute that same infinite norm."""
    for buffers in (getattr(ddp, "buffers", []), getattr(ddp, "expert_parallel_buffers", [])):
        for buf in buffers:
            if not bool(torch.isfinite(torch.linalg.vector_norm(buf.grad_data))):
                return False
    return True


class ReferencePolicy:
    """A frozen copy of the initial policy stage for the reference KL.

    With ``offload`` its weights sit in CPU memory and move to the accelerator only inside
    :meth:`on_device` (one forward pass per step), so the reference costs no GPU memory during the
    update. On a CPU-only machine the moves are no-ops, but the same code path runs.
    """

    def __init__(self, cfg, src: ModelSourceConfig, policy_module, offload: bool = True):
        from dualrpo_mcore.models.qwen2_5_vl.model import build_model

        # The policy's resolved backend: the copied state dict then has the same names.
        self.module = build_model(cfg, model_options(src, policy_module.backend))
        self.module.load_state_dict(copy.deepcopy(policy_module.state_dict()))
        self.module.requires_grad_(False).eval()
        self.module.config.variable_seq_lengths = True
        self.offload = offload
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
        if offload:
            self._move(torch.device("cpu"))

    def _move(self, device) -> None:
        if device is None:
            return
        for t in list(self.module.parameters()) + list(self.module.buffers()):
            t.data = t.data.to(device, non_blocking=True)

    @contextlib.contextmanager
    def on_device(self) -> Iterator[Any]:
        if self.offload:
            self._move(self.device)
        try:
            yield self.module
        finally:
            if self.offload:
                self._move(torch.device("cpu"))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
