"""The Megatron actor: per-token statistics of the policy (and reference) and the policy update.

* :meth:`Actor.compute_token_stats` — log-prob, entropy and self-certainty of every response token,
  from the vocab-parallel logits through ``ops.token_stats`` (TP merge inside), under Megatron's
  pipeline schedule (forward only), on token-balanced micro-batches.
* :meth:`Actor.compute_ref_logprobs` — the same log-probs under the frozen reference policy
  (only when the KL weight is on); its weights live on CPU between uses.
* :meth:`Actor.update` — one optimizer update with the DualRPO policy loss (``algo.policy_loss``),
  exact over micro-batches and data-parallel ranks (docs/design.md (5d)), Megatron's DDP +
  (distributed) optimizer, gradient clipping and the warm-up-then-constant schedule.
  A non-finite loss or gradient skips the update (nothing reaches the weights) and is counted.
* :meth:`Actor.sft_step` — the same machinery with cross-entropy on the response tokens (warm start).

Batch and outputs: docs/design.md §3.2; packed micro-batches: §5, "In the actor".
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from dualrpo_mcore.algo import aggregation_count, kl_coefficient, make_normalizer, masked_mean, policy_loss
from dualrpo_mcore.ops import IGNORE_INDEX, fused_head, fused_head_loss, token_stats

from dualrpo_mcore.actor import batching, megatron_setup, packed
from dualrpo_mcore.actor.badsteps import BadStepGuard
from dualrpo_mcore.actor.config import ActorConfig
from dualrpo_mcore.actor.microbatch import pad_tokens, partition
from dualrpo_mcore.actor.reduction import reduce_metric
from dualrpo_mcore.actor.schedule import lr_factor

log = logging.getLogger(__name__)
STATS = ("logprob", "entropy", "self_certainty")


def with_sequence_certainty(stats: Dict[str, torch.Tensor], batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    """Adds ``seq_self_certainty [B]`` (u of eq. 1: the mean over each row's response tokens)."""
    stats["seq_self_certainty"] = masked_mean(stats["self_certainty"], batch["response_mask"].bool(), dim=-1)
    return stats
SUMMED = ("loss", "pg_loss", "kl_loss", "tokens")
# A micro-batch's loss function: (per-token stats [b, s], micro-batch, denominator) -> (loss, metrics).
LossFn = Callable[[Dict[str, torch.Tensor], Dict[str, Any], torch.Tensor], Tuple[torch.Tensor, Dict[str, torch.Tensor]]]


class Actor:
    """The policy (and optional reference) on Megatron-Core for one rank of the TP x PP x DP grid."""

    def __init__(self, config: ActorConfig, hf_state_dict: Optional[Dict[str, torch.Tensor]] = None):
        """Initialise the parallel state, build and load the model, wrap it, build the optimizer.

        ``hf_state_dict``: weights in HF naming (e.g. a transformers model's ``state_dict()``) to load
        instead of the config's source (tests, the SFT warm start from a fresh tiny model).
        """
        from dualrpo_mcore.parallel import initialize

        self.config = config
        # Both are derived by the run's config (RLConfig.resolved_actor, SFTConfig); an actor built alone
        # (tests, benchmarks) samples the model's own distribution and has a one-update schedule.
        self.temperature = 1.0 if config.temperature is None else config.temperature
        self.total_updates = 1 if config.optim.total_steps is None else config.optim.total_steps
        # Dr. GRPO's divisor must be a constant of the run, known before the first micro-batch.
        config.loss.check_complete("actor.loss")
        # Before any process group: FP8 without Transformer Engine stops here, naming the extra.
        self.backend = config.model.resolve_backend()
        self.token_multiple = config.model.token_multiple
        # An attribute read at every split, so one actor can run both layouts on the same weights (tests).
        self.packing = config.model.packing
        self.info = initialize(config.parallel.tp, config.parallel.pp, config.parallel.backend, seed=config.seed)
        # The model's architecture (shapes, token ids), resolved from its source; ``config`` is the actor's.
        self.arch = megatron_setup.resolve_model_config(config.model)
        self.module = megatron_setup.build_and_load(self.arch, config.model, self.info, hf_state_dict,
                                                    backend=self.backend)
        self.model, self.optimizer, self.distributed_optimizer = megatron_setup.wrap_and_optimizer(
            self.module, config)
        self.reference = None
        if config.kl.enabled:
            self.reference = megatron_setup.ReferencePolicy(self.arch, config.model, self.module,
                                                            offload=config.kl.offload_reference)
        self.normalizer = make_normalizer(config.kl.normalizer, **config.kl.normalizer_options)
        self.guard = BadStepGuard(config.bad_steps.max_consecutive)
        self.steps_taken = 0  # successful optimizer updates: the LR schedule's clock
        self.updates_tried = 0

    @property
    def te_spec(self) -> bool:
        """Weights are named as the Transformer Engine spec names them (the resolved backend, never 'auto')."""
        return self.backend == "te"

    # ------------------------------------------------------------------ micro-batches and schedule
    def _groups(self) -> Dict[str, Any]:
        from megatron.core import parallel_state as ps

        return dict(tp=ps.get_tensor_model_parallel_group(), dp=ps.get_data_parallel_group(),
                    pp=ps.get_pipeline_model_parallel_group(), pp_last=ps.get_pipeline_model_parallel_last_rank())

    def _split(self, batch: Dict[str, Any]) -> Tuple[List[List[int]], List[Dict[str, Any]]]:
        """Token-balanced micro-batches; the same count on every data-parallel rank (docs/design.md
        §2.2, "Micro-batches"; packed: §5, "In the actor").

        A rank's filler micro-batch is its shortest row with the response mask cleared (results dropped).
        Padded, a micro-batch is widened to ``token_multiple`` tokens (``microbatch.pad_tokens``); packed,
        it carries its stream under ``packed.KEY``. Returns the row groups of the real micro-batches
        (first) and all micro-batches."""
        batching.check_batch(batch)
        lengths = batch["attention_mask"].sum(-1).tolist()
        spans = batching.image_spans(batch, self.arch.image_token_id, self.arch.spatial_merge_size)
        # Rows showing one image stay together, so the micro-batch encodes it once.
        units = batching.shared_image_units(batch, spans) if self.config.model.dedup_images else None
        groups = partition(lengths, self.config.micro.max_tokens, units=units)
        k = len(groups)
        if self.info.dp_size > 1:
            k_t = torch.tensor([k], dtype=torch.long)
            dist.all_reduce(k_t, op=dist.ReduceOp.MAX, group=self._groups()["dp"])
            k = int(k_t)
            groups = partition(lengths, self.config.micro.max_tokens, min_microbatches=min(k, len(lengths)),
                               units=units)
        micro = [batching.select_rows(batch, g, spans) for g in groups]
        if len(micro) < k:
            filler = batching.select_rows(batch, [min(range(len(lengths)), key=lengths.__getitem__)], spans)
            filler["response_mask"] = torch.zeros_like(filler["response_mask"])
            micro += [filler] * (k - len(micro))
        if self.packing:
            # Sequence parallelism cuts the stream into TP equal parts.
            sp = getattr(_stage_module(self.model).config, "sequence_parallel", False)
            multiple = math.lcm(self.token_multiple, self.info.tp_size if sp else 1)
            packs = {id(mb): packed.pack_micro(mb, self.arch.image_token_id, self.arch.spatial_merge_size, multiple)
                     for mb in micro}  # the filler repeats one dict: packed once
            return groups, [dict(mb, **{packed.KEY: packs[id(mb)]}) for mb in micro]
        return groups, [pad_tokens(mb, self.token_multiple) for mb in micro]

    @staticmethod
    def _targets(mb: Dict[str, Any]):
        """The next-token targets of the model's prediction positions, flattened as the head sees them
        (padded: row by row, ``s - 1`` each; packed: the stream's ``T - 1``): labels, the mask of
        positions predicting a response token, and the map of a statistic over them back to ``[b, s]``
        (column 0 has no prediction; off-response positions are zeroed so they can never leak)."""
        resp = mb["response_mask"].to(torch.float32)
        pm = mb.get(packed.KEY)
        if pm is not None:
            return pm.labels, pm.keep, lambda x: pm.to_rows(x) * resp
        b, s = mb["input_ids"].shape
        keep = mb["response_mask"][:, 1:].bool().reshape(-1)
        return (mb["input_ids"][:, 1:].reshape(-1), keep,
                lambda x: torch.cat([x.new_zeros(b, 1), x.reshape(b, s - 1)], 1) * resp)

    @staticmethod
    def _prediction_rows(out: torch.Tensor, batch_first: bool) -> torch.Tensor:
        """Outputs at every position that predicts a next token, flattened in :meth:`_targets`' order:
        logits [b, s, V] (batch first) or hidden states [s, b, H]; packed, b = 1 and s = T."""
        out = out if batch_first else out.transpose(0, 1)
        return out[:, :-1].reshape(-1, out.shape[-1])

    def _stats(self, logits: torch.Tensor, mb: Dict[str, Any],
               temperature: Optional[float] = None, head=None) -> Dict[str, torch.Tensor]:
        """Per-token stats ``[b, s]`` of the micro-batch from this rank's vocab shard of the logits
        (at the actor's temperature unless ``temperature`` is given). With ``head`` (the model stage,
        ``actor.model.fused_head``) ``logits`` are the final hidden states [s, b, H] instead. Packed
        micro-batches (``packed.KEY``) give [1, T, V/TP] logits or [T, 1, H] hidden states."""
        temperature = self.temperature if temperature is None else temperature
        if head is not None:
            # Only response tokens are projected onto the vocabulary, chunk by chunk; no logits are kept.
            rows, weight, labels, kw, to_bs = self._head_rows(logits, mb, head)
            return to_bs(fused_head(rows, weight, labels, temperature=temperature, **kw))
        labels, keep, to_bs = self._targets(mb)
        ts = token_stats(self._prediction_rows(logits, True), labels.masked_fill(~keep, IGNORE_INDEX),
                         vocab_start=self.info.tp_rank * logits.shape[-1], vocab_size=self.arch.vocab_size,
                         group=self._groups()["tp"] if self.info.tp_size > 1 else None, temperature=temperature)
        return {k: to_bs(getattr(ts, k)) for k in STATS}

    def _head_rows(self, hidden: torch.Tensor, mb: Dict[str, Any], head):
        """The fused head's inputs from the last stage's hidden states [s, b, H] (packed: [T, 1, H]): the
        rows predicting each next token, their labels, the response mask over them (only those rows are
        projected onto the vocabulary), the weight, and the map of the statistics back to [b, s]."""
        weight = head.output_weight()
        labels, keep, to_rows = self._targets(mb)
        rows = self._prediction_rows(hidden, False).to(weight.dtype)

        def to_bs(ts) -> Dict[str, torch.Tensor]:
            return {k: to_rows(getattr(ts, k)) for k in STATS}

        kw = dict(mask=keep, vocab_start=self.info.tp_rank * weight.shape[0], vocab_size=self.arch.vocab_size,
                  group=self._groups()["tp"] if self.info.tp_size > 1 else None)
        return rows, weight, labels, kw, to_bs

    def _fused_loss(self, hidden: torch.Tensor, mb: Dict[str, Any], head, loss_fn: LossFn,
                    denominator: Optional[torch.Tensor]):
        """The loss through ``ops.fused_head_loss``: its gradients are formed chunk by chunk in the
        forward (three GEMMs, as the unfused head; ``fused_head`` would recompute the logits). Both of
        the actor's losses (clipped surrogate + KL, and cross-entropy) are sums of per-token terms with
        fixed weights, the op's contract."""
        rows, weight, labels, kw, to_bs = self._head_rows(hidden, mb, head)
        loss, _, metrics = fused_head_loss(rows, weight, labels, lambda ts: loss_fn(to_bs(ts), mb, denominator),
                                           temperature=self.temperature, **kw)
        return loss, metrics

    def _run(self, model, micro: List[Dict[str, Any]], loss_fn: Optional[LossFn], forward_only: bool,
             denominator: Optional[torch.Tensor] = None,
             temperature: Optional[float] = None) -> List[Dict[str, torch.Tensor]]:
        """Megatron's schedule over the micro-batches; returns the last stage's per-micro outputs."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n = len(micro)
        # Undo the schedule's 1/n and DDP's DP average (docs/design.md §2.2, "Micro-batches").
        scale = float(n * self.info.dp_size)
        # Fused head: the last stage hands over hidden states, and the stage module supplies the weight.
        head = _stage_module(model) if self.config.model.fused_head and self.info.is_last_stage else None

        def loss_func(mb, logits):
            if forward_only:
                stats = self._stats(logits, mb, temperature, head)
                return logits.new_zeros(()), {k: v.detach() for k, v in stats.items()}
            if head is not None:
                loss, metrics = self._fused_loss(logits, mb, head, loss_fn, denominator)
            else:
                loss, metrics = loss_fn(self._stats(logits, mb, temperature), mb, denominator)
            return loss * scale, dict(metrics, loss=loss.detach(), tokens=mb["response_mask"][:, 1:].sum())

        def forward_step(data_iterator, m):
            mb = next(data_iterator)
            common = dict(pixel_values=mb.get("pixel_values"), image_grid_thw=mb.get("image_grid_thw"),
                          return_hidden=head is not None)
            pm = mb.get(packed.KEY)
            if pm is None:
                out = m(mb["input_ids"], mb["attention_mask"], **common)
            else:
                out = m(pm.input_ids, position_ids=pm.position_ids, packed=pm.packing, **common)
            return out, partial(loss_func, mb)

        # megatron_setup sets ``variable_seq_lengths`` (docs/design.md §5, "In the actor"): each send is
        # preceded by its shape, so these are placeholders (Megatron requires one).
        inputs = [x[packed.KEY].input_ids if packed.KEY in x else x["input_ids"] for x in micro]
        bsz = max(x.shape[0] for x in inputs)
        seq = max(x.shape[1] for x in inputs)
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro), model=[model], num_microbatches=n,
            seq_length=seq, micro_batch_size=bsz, forward_only=forward_only)

    def _broadcast_from_last_stage(self, tensor: Optional[torch.Tensor], shape, dtype=torch.float32) -> torch.Tensor:
        """Pipeline stages other than the last get the last stage's result (same on every rank)."""
        if self.info.pp_size == 1:
            return tensor
        g = self._groups()
        buf = tensor.contiguous() if self.info.is_last_stage else torch.empty(shape, dtype=dtype)
        dist.broadcast(buf, src=g["pp_last"], group=g["pp"])
        return buf

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def compute_token_stats(self, batch: Dict[str, Any],
                            temperature: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """``logprob``, ``entropy``, ``self_certainty`` ``[B, S]`` of the current policy, and
        ``seq_self_certainty [B]`` (u of eq. 1: mean over each row's response tokens). ``temperature``
        overrides the actor's (the weight-sync probe scores at 1, as engines do)."""
        return self._forward_stats(self.model, batch, temperature)

    @torch.no_grad()
    def compute_ref_logprobs(self, batch: Dict[str, Any]) -> torch.Tensor:
        """Reference-policy log-probs ``[B, S]`` (the KL weight must be on)."""
        if self.reference is None:
            raise RuntimeError("compute_ref_logprobs: actor.kl.beta0 is 0, so there is no reference model")
        with self.reference.on_device() as ref:
            return self._forward_stats(ref, batch)["logprob"]

    def _forward_stats(self, model, batch: Dict[str, Any],
                       temperature: Optional[float] = None) -> Dict[str, torch.Tensor]:
        b, s = batch["input_ids"].shape
        groups, micro = self._split(batch)
        was_training = model.training
        model.eval()
        try:
            outs = self._run(model, micro, None, forward_only=True, temperature=temperature)
        finally:
            model.train(was_training)
        stacked = None
        if self.info.is_last_stage:
            outs = outs[: len(groups)]  # filler micro-batches come last
            # Columns past S are FP8 padding (zero stats): cut before scattering into [B, S].
            stacked = torch.stack([batching.scatter_rows([o[k][:, :s] for o in outs], groups, b, s) for k in STATS])
        stacked = self._broadcast_from_last_stage(stacked, (len(STATS), b, s))
        return with_sequence_certainty(dict(zip(STATS, stacked.unbind(0))), batch)

    # ------------------------------------------------------------------ updates
    def update(self, batch: Dict[str, Any]) -> Dict[str, float]:
        """One policy update on ``batch`` (needs ``old_logprob`` and ``advantages``; with the KL on,
        ``ref_logprob`` (computed here if absent) and ``self_certainty [B]`` (u of the old policy,
        from :meth:`compute_token_stats`) or a ready ``kl_coef``). Returns metrics (floats)."""
        for key in ("old_logprob", "advantages"):
            if key not in batch:
                raise KeyError(f"Actor.update: batch is missing {key!r}")
        batch = dict(batch)
        if self.reference is not None:
            if "ref_logprob" not in batch:
                batch["ref_logprob"] = self.compute_ref_logprobs(batch)
            if "kl_coef" not in batch:
                batch["kl_coef"] = self._kl_coef(batch)
        cfg = self.config.loss

        def loss_fn(stats, mb, den):
            kl = dict(ref_logp=mb["ref_logprob"], kl_coef=mb["kl_coef"]) if self.reference is not None else {}
            loss, metrics = policy_loss(stats["logprob"], mb["old_logprob"], mb["advantages"], mb["response_mask"],
                                        rollout_logp=mb.get("rollout_logprob"), denominator=den, config=cfg, **kl)
            keep = mb["response_mask"].bool()
            metrics.update(entropy=masked_mean(stats["entropy"].detach(), keep),
                           self_certainty=masked_mean(stats["self_certainty"].detach(), keep))
            return loss, metrics

        return self._train_step(batch, loss_fn, self._denominator(batch, cfg.agg))

    def sft_step(self, batch: Dict[str, Any]) -> Dict[str, float]:
        """Supervised step: token-mean cross-entropy on the response tokens (global over micro-batches)."""
        def loss_fn(stats, mb, den):
            return -(stats["logprob"] * mb["response_mask"]).sum() / den, {}

        return self._train_step(batch, loss_fn, self._denominator(batch, "token-mean"))

    def _denominator(self, batch: Dict[str, Any], agg: str) -> torch.Tensor:
        """The aggregation's count over the whole batch and all data-parallel ranks, by the rule each
        micro-batch would apply locally (``aggregation_count``: empty rows never count)."""
        count = aggregation_count(batch["response_mask"], agg).reshape(1)
        if self.info.dp_size > 1:
            dist.all_reduce(count, group=self._groups()["dp"])
        return count[0].to(torch.float32)

    def global_loss(self, metrics: Dict[str, float]) -> float:
        """The update's loss: each data-parallel rank's ``metrics['loss']`` is its share of the global
        aggregate (divided by the all-rank count), so the loss is their sum. Collective over DP."""
        loss = torch.tensor([metrics.get("loss", float("nan"))], dtype=torch.float64)
        if self.info.dp_size > 1:
            dist.all_reduce(loss, group=self._groups()["dp"])
        return float(loss[0])

    def _kl_coef(self, batch: Dict[str, Any]) -> torch.Tensor:
        """beta(c) per row (eq. 4), c = the normaliser applied to the old policy's u over all DP ranks."""
        if "self_certainty" not in batch:
            raise KeyError("Actor.update with the KL on needs batch['self_certainty'] (u per row) or 'kl_coef'")
        u_all = batch["self_certainty"].to(torch.float32).reshape(-1)
        # A filler share (batching.dp_slice) is a copy of rows another rank trains on: its u must not
        # count twice in the normaliser (whose running statistics persist across steps).
        real = ~batch["filler"].bool() if "filler" in batch else torch.ones_like(u_all, dtype=torch.bool)
        u = u_all[real]
        if self.info.dp_size > 1:
            parts: List[Any] = [None] * self.info.dp_size
            dist.all_gather_object(parts, u, group=self._groups()["dp"])
            c_all = self.normalizer(torch.cat(parts))
            start = sum(p.numel() for p in parts[: self.info.dp_rank])
            c = c_all[start:start + u.numel()]
        else:
            c = self.normalizer(u)
        full = torch.zeros_like(u_all)
        full[real] = c.to(full.dtype)
        return kl_coefficient(full, self.config.kl.beta0, self.config.kl.beta_min)

    def _train_step(self, batch: Dict[str, Any], loss_fn: LossFn, denominator: torch.Tensor) -> Dict[str, float]:
        step = self.updates_tried
        self.updates_tried += 1
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        groups, micro = self._split(batch)
        outs = self._run(self.model, micro, loss_fn, forward_only=False, denominator=denominator)
        metrics = _reduce_metrics(outs) if self.info.is_last_stage else {}
        loss = metrics.get("loss", torch.zeros(()))
        finite = torch.tensor([float(bool(torch.isfinite(loss))), float(megatron_setup.grads_finite(self.model))])
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank of every group takes the same decision
        ok = bool(finite.min() > 0)
        lr = self._set_lr()
        grad_norm = float("nan")
        if self.guard.record(ok, step, f"loss={float(loss):.4g}" if not finite[0] else "gradient"):
            _, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            self.steps_taken += 1
        else:
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
        out = self._broadcast_metrics({k: float(v) for k, v in metrics.items()})
        out.update(lr=lr, grad_norm=grad_norm, skipped=float(not ok), bad_steps_in_a_row=float(self.guard.consecutive),
                   num_microbatches=float(len(micro)))
        return out

    def _set_lr(self) -> float:
        """Schedule factor on every parameter group's peak (per-module multipliers kept via ``max_lr``)."""
        o = self.config.optim
        factor = lr_factor(self.steps_taken, self.total_updates, o.warmup_fraction, o.decay_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = factor * group.get("max_lr", o.lr)
        return factor * o.lr

    def _broadcast_metrics(self, metrics: Dict[str, float]) -> Dict[str, float]:
        if self.info.pp_size == 1:
            return metrics
        g = self._groups()
        box = [metrics]
        dist.broadcast_object_list(box, src=g["pp_last"], group=g["pp"])
        return box[0]

    # ------------------------------------------------------------------ weights and state
    def export_hf(self):
        """``(hf_name, tensor)`` of this pipeline stage's weights, TP-gathered (weight sync, saving)."""
        from dualrpo_mcore.models.qwen2_5_vl.weights import export_hf

        return export_hf(self.module, te_spec=self.te_spec)

    def state_dict(self) -> Dict[str, Any]:
        """Actor-side state the loop checkpoints next to the weights and optimizer."""
        return dict(steps_taken=self.steps_taken, updates_tried=self.updates_tried,
                    guard=self.guard.state_dict(), normalizer=self.normalizer.state_dict())

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.steps_taken, self.updates_tried = int(state["steps_taken"]), int(state["updates_tried"])
        self.guard.load_state_dict(state["guard"])
        self.normalizer.load_state_dict(state["normalizer"])


def _stage_module(model):
    """The model stage (``QwenVLModel``) inside Megatron's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def _reduce_metrics(outs: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Micro-batch metrics -> batch metrics: losses summed (each is already over the global count), the
    rest by :func:`.reduction.reduce_metric` weighted by response tokens."""
    sums = {key: torch.stack([o[key].to(torch.float64) for o in outs]).sum() for key in outs[0] if key in SUMMED}
    # Micro-batches without response tokens (fillers) report 0 for means and extremes: leave them out.
    outs = [o for o in outs if o["tokens"] > 0] or outs[:1]
    tokens = [float(o["tokens"]) for o in outs]
    return {key: sums[key] if key in SUMMED else
            torch.tensor(reduce_metric(key, [float(o[key]) for o in outs], tokens), dtype=torch.float64)
            for key in outs[0]}
