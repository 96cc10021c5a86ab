"""Live Megatron weights -> HF-named tensors (rollout weight sync), through the same mapping table
as checkpoint conversion. One tensor at a time: each is gathered over the tensor-parallel group,
converted, and handed to the caller (who may bucket them for SGLang/HF engines)."""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from . import mapping


def export_hf(model, te_spec: Optional[bool] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` for the parameters of this pipeline stage, on every TP rank.

    ``model`` is a :class:`~.model.QwenVLModel` stage; Megatron's parallel state must be initialised.
    ``te_spec`` (the weights' naming) defaults to the model's own resolved backend.
    With tied embeddings the last stage's output-layer copy is skipped (HF has no ``lm_head`` then).
    """
    from megatron.core import parallel_state as ps

    cfg = model.cfg
    te_spec = model.backend == "te" if te_spec is None else te_spec
    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    pp_rank, group = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_group()
    conv = mapping.Converter(cfg, model.padded_vocab_size)
    params = dict(model.state_dict(keep_vars=True))
    for rule in mapping.rules(cfg, pp):
        if mapping.owner_stage(rule, cfg, pp) != pp_rank:
            continue
        if cfg.tie_word_embeddings and rule.mcore.endswith("output_layer.weight"):
            continue
        local = params[mapping.from_canonical(mapping.local_name(rule, cfg, pp), te_spec)].detach()
        if tp > 1 and rule.split != "none":
            pieces = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(pieces, local.contiguous(), group=group)
            glob = mapping.tp_merge(pieces, rule.split)
        else:
            glob = local
        yield from zip(rule.hf, conv.to_hf(rule, glob))
