"""Hugging Face transformers rollout engine (CPU, tests, small demos).

Own sampling loop rather than ``model.generate`` so the semantics are exactly the contract's
(docs/design.md §3.3): temperature, then top-k, then top-p on the probabilities, a multinomial draw
from a per-(prompt, sample) ``torch.Generator``; deterministic on CPU. Batching: :meth:`HFEngine._prefill`,
:meth:`HFEngine._decode` (up to ``max_batch_rows`` rows at a time).

3D rope positions are computed here (the same ``geometry.rope_index`` as the Megatron actor) and
passed explicitly, instead of relying on transformers' cached ``rope_deltas`` state.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from dualrpo_mcore.models.qwen2_5_vl import geometry, mapping

from .engine import ENGINES, RolloutEngine, RolloutRequest, Sample, SamplingParams, seed_for


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the tokens outside top-k, then outside the smallest set whose mass reaches ``top_p``
    (the most likely token always survives). ``probs`` is 1-D; returns unnormalised weights."""
    out = probs.clone()
    if 0 < top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = 0
    if top_p < 1.0:
        sorted_p, order = torch.sort(out, descending=True)
        mass_before = torch.cumsum(sorted_p, 0) - sorted_p
        drop = mass_before > top_p * sorted_p.sum()
        out[order[drop]] = 0
    return out


def choose_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> Tuple[int, float]:
    """One draw from 1-D ``logits``; returns ``(token, logprob)`` per the module convention."""
    logits = logits.float()
    if params.temperature == 0:
        tok = int(torch.argmax(logits))
        return tok, float(torch.log_softmax(logits, -1)[tok])
    logp = torch.log_softmax(logits / params.temperature, -1)
    weights = filter_probs(logp.exp(), params.top_k, params.top_p)
    tok = int(torch.multinomial(weights, 1, generator=gen))
    return tok, float(logp[tok])


def cache_argument(model) -> str:
    """The forward's KV-cache argument: ``cache`` where transformers has renamed it (5.25 warns that
    ``past_key_values`` goes in 5.40), ``past_key_values`` in the 5.x releases before the rename."""
    try:
        params = inspect.signature(model.forward).parameters  # follows the deprecation decorator's __wrapped__
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output):
    """The KV cache a forward returned, by the field name this transformers uses: reading the old
    ``past_key_values`` property of a renamed output logs a deprecation, and goes in 5.40 too."""
    names = {f.name for f in dataclasses.fields(output)}
    return getattr(output, "cache" if "cache" in names else "past_key_values")


@ENGINES.register("hf")
class HFEngine(RolloutEngine):
    """``model``: a ``Qwen2_5_VLForConditionalGeneration`` (or build one from ``hf_config``)."""

    def __init__(self, model=None, *, hf_config=None, tokenizer=None, eos_token_ids: Optional[Sequence[int]] = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", max_batch_rows: int = 64):
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows={max_batch_rows}: must be >= 1")
        self.max_batch_rows = max_batch_rows
        if model is None:
            if hf_config is None:
                raise ValueError("HFEngine needs a model or an hf_config")
            from transformers import Qwen2_5_VLForConditionalGeneration

            model = Qwen2_5_VLForConditionalGeneration(hf_config)
        self.model = model.to(device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer
        self.device = device
        cfg = self.model.config
        if eos_token_ids is None:
            eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
            eos = eos if eos is not None else cfg.get_text_config().eos_token_id
            eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        # Left padding is masked out, so its id only has to be a valid row of the embedding.
        pad = getattr(cfg.get_text_config(), "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)
        # Published checkpoint names (what the exporter sends) -> live tensors; tied weights
        # appear under both names and share storage, so copying one updates both.
        self._params: Dict[str, torch.Tensor] = {
            mapping.normalize_hf_name(n): t for n, t in self.model.state_dict(keep_vars=True).items()}
        self._cache_arg = cache_argument(self.model)

    # ------------------------------------------------------------ weights
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        count = 0
        for name, tensor in named_tensors:
            key = mapping.normalize_hf_name(name)
            dst = self._params.get(key)
            if dst is None:
                raise KeyError(f"update_weights: unknown parameter {name!r} for {type(self.model).__name__}")
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"model expects {tuple(dst.shape)}")
            dst.data.copy_(tensor)
            count += 1
        return count

    @torch.no_grad()
    def score(self, requests: Sequence[RolloutRequest], completions: Sequence[Sequence[int]]) -> List[List[float]]:
        if self.model is None:
            raise RuntimeError("HFEngine was shut down")
        if len(requests) != len(completions):
            raise ValueError(f"score: {len(requests)} requests but {len(completions)} completions")
        cfg = self.model.config
        out: List[List[float]] = []
        for req, comp in zip(requests, completions):
            # One row at a time: the probe is a handful of short rows, and no padding means no
            # question of how padding is masked.
            ids = torch.tensor([list(req.input_ids) + [int(t) for t in comp]])
            pv = None if req.pixel_values is None else req.pixel_values.to(self.device, self.model.dtype)
            grid = req.image_grid_thw
            pos, _ = geometry.rope_index(ids, grid, cfg.image_token_id, cfg.vision_config.spatial_merge_size)
            logits = self.model(input_ids=ids.to(self.device), pixel_values=pv,
                                image_grid_thw=None if grid is None else grid.to(self.device),
                                position_ids=pos.to(self.device), use_cache=False).logits[0].float()
            start = len(req.input_ids)
            logp = torch.log_softmax(logits[start - 1:start - 1 + len(comp)], -1)
            out.append(logp.gather(-1, ids[0, start:, None].to(logp.device))[:, 0].tolist())
        return out

    def shutdown(self) -> None:
        self.model = None
        self._params = {}

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> List[List[Sample]]:
        if self.model is None:
            raise RuntimeError("HFEngine was shut down")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer: HFEngine(tokenizer=...)")
        base = params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, (1,)))
        per_chunk = max(1, self.max_batch_rows // params.n)
        out: List[List[Sample]] = []
        for c in range(0, len(requests), per_chunk):
            chunk = requests[c:c + per_chunk]
            gens = [torch.Generator().manual_seed(seed_for(base, req.uid or str(c + i), j))
                    for i, req in enumerate(chunk) for j in range(params.n)]
            logits, cache, mask, pos = self._prefill(chunk, params.n)
            flat = self._decode(logits, cache, mask, pos, params, gens)
            out.extend(flat[i * params.n:(i + 1) * params.n] for i in range(len(chunk)))
        return out

    def _prefill(self, reqs: Sequence[RolloutRequest], n: int):
        """One forward over the chunk's prompts, left-padded to a common length (images go through
        the ViT once per prompt); the cache is then repeated for each prompt's n samples."""
        cfg = self.model.config
        width = max(len(r.input_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, width - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[i, width - len(r.input_ids):] = 1
        with_images = [r for r in reqs if r.image_grid_thw is not None]
        grid = torch.cat([r.image_grid_thw for r in with_images]) if with_images else None
        pv = torch.cat([r.pixel_values for r in with_images]).to(self.device, self.model.dtype) if with_images else None
        pos, _ = geometry.rope_index(ids, grid, cfg.image_token_id, cfg.vision_config.spatial_merge_size,
                                     attention_mask=mask)
        res = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), pixel_values=pv,
                         image_grid_thw=None if grid is None else grid.to(self.device),
                         position_ids=pos.to(self.device), use_cache=True)
        cache = returned_cache(res)
        if n > 1:
            cache.batch_repeat_interleave(n)
        next_pos = pos.amax(dim=(0, 2)) + 1  # per prompt: one past its largest position on any axis
        return (res.logits[:, -1].repeat_interleave(n, 0), cache, mask.repeat_interleave(n, 0),
                next_pos.repeat_interleave(n, 0))

    def _decode(self, logits, cache, mask, pos, params: SamplingParams, gens: List[torch.Generator]) -> List[Sample]:
        """All rows of a chunk decoded together, one batched forward per token. Each row draws from its
        own generator, so what it samples does not depend on which rows share the batch (up to float
        rounding of the batched forward)."""
        rows = len(gens)
        stops = set(self.eos_token_ids) | set(params.stop_token_ids)
        tokens: List[List[int]] = [[] for _ in range(rows)]
        logprobs: List[List[float]] = [[] for _ in range(rows)]
        done: List[Optional[str]] = [None] * rows
        while True:
            step_tokens = []
            for j in range(rows):
                if done[j] is None:
                    tok, lp = choose_token(logits[j], params, gens[j])
                    tokens[j].append(tok)
                    logprobs[j].append(lp)
                    if tok in stops or self._hit_stop_string(tokens[j], params.stop):
                        done[j] = "stop"
                    elif len(tokens[j]) >= params.max_new_tokens:
                        done[j] = "length"
                # A finished row keeps feeding its last token: rows never attend to each other.
                step_tokens.append(tokens[j][-1])
            if all(d is not None for d in done):
                return [Sample(t, lp, d) for t, lp, d in zip(tokens, logprobs, done)]
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=mask.dtype)], dim=1)
            step_pos = pos.view(1, rows, 1).expand(3, rows, 1)
            res = self.model(input_ids=torch.tensor(step_tokens, device=self.device)[:, None],
                             attention_mask=mask.to(self.device), position_ids=step_pos.to(self.device),
                             use_cache=True, **{self._cache_arg: cache})
            logits, cache, pos = res.logits[:, -1], returned_cache(res), pos + 1

    def _hit_stop_string(self, tokens: List[int], stop: Tuple[str, ...]) -> bool:
        if not stop:
            return False
        # Only the tail can complete a new match; decode a few tokens more than the longest string.
        tail = self.tokenizer.decode(tokens[-(max(len(s) for s in stop) + 4):], skip_special_tokens=False)
        return any(s in tail for s in stop)
