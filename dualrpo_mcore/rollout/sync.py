"""Weight sync: live Megatron shards -> full HF-named tensors, handed over in bounded buckets.

Contract (mapping, bucket bound ``max(B, L) + L``, PP, frozen parameters): docs/design.md §3.4.
How the bound holds (the exporter's own accounting, cross-checked by the allocator in the tests):
before a rule of global size G is gathered, the bucket is flushed if ``bucket + G`` would exceed B,
and the gather buffer is freed before the HF copies are made. One transient exception: the ViT's
fused qkv is unfused and re-packed (``Converter.to_hf``), 3 x its size for a moment -- far below L
(the embedding) in Qwen2.5-VL. Gloo (CPU) stages the gathered bytes once more inside the collective;
NCCL does not. Tensors that are the model's own parameters (no TP split, no conversion) are handed
over as views and cost nothing.

The exporter remembers frozen parameters, so later syncs skip them without any communication.
Under PP every rank sees the same buckets; the caller feeds its engine from the rank(s) it lives on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist

from dualrpo_mcore.models.qwen2_5_vl import mapping

Named = Tuple[str, torch.Tensor]


@dataclass
class ExportStats:
    tensors: int = 0
    """HF tensors handed over."""
    bytes: int = 0
    """Their total bytes."""
    buckets: int = 0
    skipped_frozen: int = 0
    """Rules skipped because their frozen weights were already sent."""
    peak_held_bytes: int = 0
    """Most bytes the exporter held at once (bucket + gather/convert workspace), excluding views
    of the model's own parameters."""
    largest_bytes: int = 0
    """Largest global (gathered) tensor in this export."""


def bucketize(named: Iterable[Named], bucket_bytes: int) -> Iterator[List[Named]]:
    """Stream ``(name, tensor)`` pairs as lists, greedily and in order: a bucket closes before a tensor
    that would push it past ``bucket_bytes``; an oversize tensor travels alone (holds one bucket)."""
    cur: List[Named] = []
    used = 0
    for name, t in named:
        size = t.numel() * t.element_size()
        if cur and used + size > bucket_bytes:
            yield cur
            cur, used = [], 0
        cur.append((name, t))
        used += size
    if cur:
        yield cur


class _Held:
    """Bytes of storages the exporter allocated and still references (by storage pointer)."""

    def __init__(self, model_ptrs: Set[int]):
        self.model_ptrs = model_ptrs
        self.owned: Dict[int, int] = {}
        self.peak = 0

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st.data_ptr() not in self.model_ptrs:
            self.owned[st.data_ptr()] = st.nbytes()
            self.peak = max(self.peak, sum(self.owned.values()))

    def drop(self, t: torch.Tensor) -> None:
        self.owned.pop(t.untyped_storage().data_ptr(), None)


class BucketedExporter:
    """Stateful (remembers frozen tensors already sent); one per (model, engine) pair."""

    def __init__(self, bucket_bytes: int = 512 << 20, te_spec: bool = False, skip_frozen: bool = True):
        """``skip_frozen``: send frozen tensors only once. Must be the same on every rank, and only
        true when the engine keeps its weights across ``release_memory`` (the HF engine does;
        SGLang does with ``weights_cpu_backup``, otherwise released weights come back as garbage)."""
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes}: must be > 0")
        self.bucket_bytes = bucket_bytes
        self.te_spec = te_spec
        self.skip_frozen = skip_frozen
        self.frozen_sent: Set[str] = set()
        self.last_stats = ExportStats()

    def buckets(self, model) -> Iterator[List[Named]]:
        """Yield buckets of ``(hf_name, full tensor)``; identical on every rank. Consume each bucket
        before asking for the next (the exporter forgets it then). ``model`` is this rank's
        :class:`QwenVLModel` stage, possibly inside Megatron's DDP wrapper. Tensors are in the
        model's parameter dtype (bf16 models export bf16, not the optimizer's fp32 main copy)."""
        from megatron.core import parallel_state as ps

        while not hasattr(model, "cfg") and hasattr(model, "module"):  # Megatron DDP / Float16Module
            model = model.module
        cfg = model.cfg
        tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
        pp_rank = ps.get_pipeline_model_parallel_rank()
        conv = mapping.Converter(cfg, model.padded_vocab_size)
        params = dict(model.state_dict(keep_vars=True))
        held = _Held({p.untyped_storage().data_ptr() for p in params.values() if isinstance(p, torch.Tensor)})
        stats = self.last_stats = ExportStats()
        bucket: List[Named] = []
        for rule in mapping.rules(cfg, pp):
            owner = mapping.owner_stage(rule, cfg, pp)
            if cfg.tie_word_embeddings and rule.mcore.endswith("output_layer.weight"):
                continue  # HF has no lm_head; the embedding carries it
            local = params[mapping.from_canonical(mapping.local_name(rule, cfg, pp), self.te_spec)] \
                if owner == pp_rank else None
            size = self._global_bytes(local, rule, tp, owner, pp_rank, pp)
            if size is None:  # frozen and already sent (decided by the owner stage)
                stats.skipped_frozen += 1
                continue
            stats.largest_bytes = max(stats.largest_bytes, size)
            if bucket and _nbytes(bucket) + size > self.bucket_bytes:
                yield from self._flush(bucket, held, stats)
                bucket = []
            hf = self._convert(local, rule, conv, tp, held) if owner == pp_rank else None
            if pp > 1:
                hf = _broadcast_named(hf, owner, held)
            bucket += hf
            if local is not None and not local.requires_grad:
                self.frozen_sent.add(rule.mcore)
            if _nbytes(bucket) >= self.bucket_bytes:
                yield from self._flush(bucket, held, stats)
                bucket = []
        if bucket:
            yield from self._flush(bucket, held, stats)
        stats.peak_held_bytes = held.peak

    def _global_bytes(self, local, rule, tp, owner, pp_rank, pp) -> Optional[int]:
        """Bytes of the gathered tensor, or None to skip (same answer on every rank)."""
        from megatron.core import parallel_state as ps

        if owner == pp_rank:
            skip = self.skip_frozen and not local.requires_grad and rule.mcore in self.frozen_sent
            size = local.numel() * local.element_size() * (tp if rule.split != "none" else 1)
        if pp > 1:
            box = [(skip, size) if owner == pp_rank else None]
            dist.broadcast_object_list(box, src=_stage_global_rank(owner), group=ps.get_pipeline_model_parallel_group())
            skip, size = box[0]
        return None if skip else size

    def _convert(self, local, rule, conv, tp, held: _Held) -> List[Named]:
        local = local.detach()
        if tp > 1 and rule.split != "none":
            from megatron.core import parallel_state as ps

            # Straight into one buffer (rank pieces stacked along dim 0): a list-output all_gather
            # would make gloo stage a flat copy first, a third G in flight.
            buf = torch.empty((tp * local.shape[0],) + tuple(local.shape[1:]), dtype=local.dtype,
                              device=local.device)
            held.add(buf)
            _gather_into(buf, local.contiguous(), ps.get_tensor_model_parallel_group())
            glob = mapping.tp_merge(list(buf.chunk(tp, 0)), rule.split)
            held.add(glob)
            held.drop(buf)
            del buf  # freed before the HF copies are made: at most 2 x G in flight
        else:
            glob = local
        return self._to_hf(rule, conv, glob, held)

    @staticmethod
    def _to_hf(rule, conv, glob, held: _Held) -> List[Named]:
        out = list(zip(rule.hf, conv.to_hf(rule, glob)))
        for _, t in out:
            held.add(t)
        if all(t.untyped_storage().data_ptr() != glob.untyped_storage().data_ptr() for _, t in out):
            held.drop(glob)
        return out

    def _flush(self, bucket: List[Named], held: _Held, stats: ExportStats) -> Iterator[List[Named]]:
        stats.buckets += 1
        stats.tensors += len(bucket)
        stats.bytes += _nbytes(bucket)
        yield bucket
        for _, t in bucket:
            held.drop(t)
        bucket.clear()


def _gather_into(out: torch.Tensor, local: torch.Tensor, group) -> None:
    # torch >= 2.13 renames all_gather_into_tensor (kept as a deprecated alias) to all_gather_single.
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, local, group=group)


def _nbytes(named: List[Named]) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)


def _stage_global_rank(stage: int) -> int:
    from megatron.core import parallel_state as ps

    return dist.get_global_rank(ps.get_pipeline_model_parallel_group(), stage)


def _buffer_device(backend: str) -> torch.device:
    """Where a collective of this backend wants its tensors: NCCL only moves CUDA memory (on the
    rank's current device), gloo only host memory. A mixed backend (``"cpu:gloo,cuda:nccl"``)
    takes CUDA, where the owner stage's converted tensors live on a GPU run."""
    if "nccl" in str(backend).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_named(named: Optional[List[Named]], owner: int, held: _Held) -> List[Named]:
    """The owner stage's converted tensors, on every stage of this pipeline."""
    from megatron.core import parallel_state as ps

    group, src = ps.get_pipeline_model_parallel_group(), _stage_global_rank(owner)
    meta = [[(n, tuple(t.shape), t.dtype) for n, t in named] if named is not None else None]
    dist.broadcast_object_list(meta, src=src, group=group)
    if named is None:
        device = _buffer_device(dist.get_backend(group))
        named = [(n, torch.empty(shape, dtype=dtype, device=device)) for n, shape, dtype in meta[0]]
        for _, t in named:
            held.add(t)
    for _, t in named:
        dist.broadcast(t, src=src, group=group)
    return named


def check_exporter_engine(exporter: BucketedExporter, engine) -> None:
    """Refuse an exporter that sends frozen tensors once to an engine that loses its weights on
    ``release_memory`` (SGLang without ``weights_cpu_backup``): from the second step on the frozen
    ViT would serve whatever the released memory came back holding. Call it where the two meet,
    on the rank(s) that host an engine (``engine=None`` passes)."""
    if engine is None or not exporter.skip_frozen or getattr(engine, "retains_weights_on_release", True):
        return
    raise ValueError(
        f"BucketedExporter(skip_frozen=True) cannot feed {type(engine).__name__}: it does not keep its "
        "weights across release_memory, so frozen tensors sent once would come back as garbage. Build "
        "the exporter with skip_frozen=False (on every rank), or keep the engine's weights_cpu_backup=True")

