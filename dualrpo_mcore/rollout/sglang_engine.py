"""SGLang rollout engine, colocated with the Megatron trainer on the same GPUs.

Written against the offline ``sglang.Engine`` Python API of SGLang >= 0.5.3 (the ``sglang`` extra;
``enable_weights_cpu_backup`` and the ``sampling_seed`` sampling parameter need 0.5.3):
``Engine(model_path=..., enable_memory_saver=True, ...)``, ``release_memory_occupation(tags=None)``,
``resume_memory_occupation(tags=[...])`` with tags ``"weights"`` / ``"kv_cache"``,
``update_weights_from_tensor(named_tensors, load_format=None, flush_cache=...)``, ``flush_cache()``,
``generate(input_ids=..., image_data=..., sampling_params=..., return_logprob=True)``, ``shutdown()``.

Per RL step (see :meth:`SGLangEngine.resume_memory`): after training, the weights region is resumed
first and the new weights are copied in bucket by bucket (the trainer's exporter bounds the extra
memory), and only then is the KV cache re-allocated, so weights + KV cache + trainer never peak
together; the prefix cache is flushed because it holds KV computed with the old weights. Before
training, :meth:`release_memory` hands everything back.

Every call to SGLang goes through ``self._engine``, built by an ``engine_factory`` (default: import
sglang and construct ``sglang.Engine``). The request building, output parsing, bucket planning and
call order are therefore exercised on CPU by passing a recording engine as the factory's product.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .engine import ENGINES, RolloutEngine, RolloutRequest, Sample, SamplingParams
from .sync import bucketize

INSTALL_HINT = "pip install dualrpo-mcore[sglang]"


def _sglang_factory(**kwargs):
    try:
        import sglang
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the SGLang rollout engine needs sglang (CUDA only): {INSTALL_HINT}") from e
    return sglang.Engine(**kwargs)


def collapse_image_pads(ids: Sequence[int], image_token_id: int) -> List[int]:
    """Expanded ``<|image_pad|>`` runs -> one pad per image: SGLang's Qwen2.5-VL processor expands
    them itself from the raw images (it decides the grid). Runs are separated by vision start/end
    tokens, so adjacent images never merge."""
    out: List[int] = []
    for t in ids:
        if t == image_token_id and out and out[-1] == image_token_id:
            continue
        out.append(int(t))
    return out


def sampling_dict(params: SamplingParams) -> Dict[str, Any]:
    """Our parameters in SGLang's names. ``n`` makes SGLang fork the n samples after one shared
    prefill (the images go through the ViT once). Stop strings are kept in the output ids
    (``no_stop_trim``) so the returned tokens are exactly those sampled."""
    d = dict(n=params.n, temperature=params.temperature, top_p=params.top_p,
             top_k=params.top_k if params.top_k > 0 else -1, max_new_tokens=params.max_new_tokens,
             skip_special_tokens=False, no_stop_trim=True)
    if params.stop:
        d["stop"] = list(params.stop)
    if params.stop_token_ids:
        d["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        d["sampling_seed"] = params.seed  # honoured by SGLang builds with deterministic sampling
    return d


def build_generate_kwargs(requests: Sequence[RolloutRequest], params: SamplingParams,
                          image_token_id: int) -> Dict[str, Any]:
    """One batched ``Engine.generate`` call: each prompt once (with its images once)."""
    if not requests:
        raise ValueError("generate needs at least one request")
    ids = [collapse_image_pads(r.input_ids, image_token_id) for r in requests]
    for r, x in zip(requests, ids):
        if x.count(image_token_id) != len(r.images):
            raise ValueError(f"rollout request {r.uid!r}: {x.count(image_token_id)} image placeholders but "
                             f"{len(r.images)} raw images (SGLang processes the raw images itself)")
    kwargs: Dict[str, Any] = dict(input_ids=ids, sampling_params=sampling_dict(params), return_logprob=True)
    if any(r.images for r in requests):
        kwargs["image_data"] = [list(r.images) if r.images else None for r in requests]
    return kwargs


def _finish_reason(meta: Dict[str, Any], where: str) -> str:
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind in ("stop", "length"):
        return kind
    raise RuntimeError(f"SGLang {where}: finish_reason {reason!r} (aborted or failed request)")


def parse_outputs(outputs: Sequence[Dict[str, Any]], num_requests: int, n: int) -> List[List[Sample]]:
    """SGLang returns ``num_requests * n`` dicts, request-major (all samples of prompt 0, then 1...).
    Tokens and log-probs come from ``meta_info.output_token_logprobs`` = ``[(logprob, id, text)]``."""
    if len(outputs) != num_requests * n:
        raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {num_requests} prompts x n={n}")
    result: List[List[Sample]] = []
    for i in range(num_requests):
        row = []
        for j in range(n):
            out = outputs[i * n + j]
            meta = out["meta_info"]
            triples = meta["output_token_logprobs"]
            tokens = [int(t[1]) for t in triples]
            if "output_ids" in out and list(out["output_ids"]) != tokens:
                raise RuntimeError(f"SGLang output {i * n + j}: output_ids disagree with output_token_logprobs")
            row.append(Sample(tokens, [float(t[0]) for t in triples], _finish_reason(meta, f"output {i * n + j}")))
        result.append(row)
    return result


@ENGINES.register("sglang")
class SGLangEngine(RolloutEngine):
    """``model_path``: an HF checkpoint directory (architecture, tokenizer, processor; its weights
    are replaced by the first sync). ``bucket_bytes``: most bytes per ``update_weights_from_tensor``
    call. ``weights_cpu_backup``: keep a host copy of the weights while released (SGLang's
    ``enable_weights_cpu_backup``), so frozen tensors need not be re-sent each step. Extra keyword
    arguments go to ``sglang.Engine``."""

    def __init__(self, model_path: str, *, image_token_id: int, tp_size: int = 1,
                 mem_fraction_static: float = 0.5, dtype: str = "bfloat16", bucket_bytes: int = 512 << 20,
                 random_seed: int = 0, weights_cpu_backup: bool = True,
                 engine_factory: Optional[Callable[..., Any]] = None, **engine_kwargs):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes}: must be > 0")
        self.image_token_id = image_token_id
        self.bucket_bytes = bucket_bytes
        factory = engine_factory or _sglang_factory
        self._engine = factory(model_path=model_path, tp_size=tp_size, mem_fraction_static=mem_fraction_static,
                               dtype=dtype, random_seed=random_seed, enable_memory_saver=True,
                               enable_weights_cpu_backup=weights_cpu_backup, **engine_kwargs)
        # Without the host backup, released weights come back uninitialised: every tensor,
        # frozen ones included, must then be re-sent after each release.
        self.retains_weights_on_release = weights_cpu_backup
        self._held = {"weights": True, "kv_cache": True}  # what SGLang currently occupies

    # ------------------------------------------------------------ memory
    def release_memory(self) -> None:
        """Before training: give weights and KV cache back (SGLang must be idle)."""
        self._check_alive()
        if any(self._held.values()):
            self._engine.release_memory_occupation()
            self._held = {"weights": False, "kv_cache": False}

    def resume_memory(self, weights: Optional[Iterable[Tuple[str, torch.Tensor]]] = None) -> None:
        """Before rollout: weights region, then (if given) the new weights, then the KV cache,
        then a cache flush (the prefix cache was computed with the old weights)."""
        self._check_alive()
        if not self._held["weights"]:
            self._engine.resume_memory_occupation(tags=["weights"])
            self._held["weights"] = True
        if weights is not None:
            self._load(weights)
        if not self._held["kv_cache"]:
            self._engine.resume_memory_occupation(tags=["kv_cache"])
            self._held["kv_cache"] = True
        self._engine.flush_cache()

    # ------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        count = self._load(named_tensors)
        if self._held["kv_cache"]:
            self._engine.flush_cache()
        return count

    def _load(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        self._check_alive()
        if not self._held["weights"]:
            raise RuntimeError("update_weights while SGLang's weights are released: resume_memory first")
        count = 0
        for bucket in bucketize(named_tensors, self.bucket_bytes):
            # One flush at the end instead of one per bucket.
            self._engine.update_weights_from_tensor(named_tensors=bucket, load_format=None, flush_cache=False)
            count += len(bucket)
        return count

    # ------------------------------------------------------------ generation
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> List[List[Sample]]:
        self._check_alive()
        if not all(self._held.values()):
            raise RuntimeError("generate while SGLang's memory is released: resume_memory first")
        outputs = self._engine.generate(**build_generate_kwargs(requests, params, self.image_token_id))
        return parse_outputs(outputs, len(requests), params.n)

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def _check_alive(self) -> None:
        if self._engine is None:
            raise RuntimeError("SGLangEngine was shut down")
