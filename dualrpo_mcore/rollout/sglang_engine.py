"""SGLang rollout engine, colocated with the Megatron trainer on the same GPUs.

Written against the offline ``sglang.Engine`` Python API, read in the sources of SGLang 0.5.10 to
0.5.23 (the ``sglang`` extra's range and why: docs/compatibility.md): ``Engine(model_path=...,
enable_memory_saver=True, enable_weights_cpu_backup=..., enable_deterministic_inference=...,
mm_process_config=...)``, ``release_memory_occupation(tags)`` / ``resume_memory_occupation(tags)``
with tags ``"weights"``, ``"kv_cache"``, ``"cuda_graph"``, ``begin_weight_update()`` /
``end_weight_update()`` (0.5.21 on: outside such a session ``update_weights_from_tensor`` loads
nothing and answers ``(False, message)``), ``update_weights_from_tensor(named_tensors,
load_format=None, flush_cache=...)``, ``flush_cache()``, ``generate(input_ids=..., image_data=...,
sampling_params=..., return_logprob=True, logprob_start_len=...)``, ``shutdown()``; every status
is checked (:func:`check_status`).

Per RL step: :meth:`SGLangEngine.release_memory` before training, :meth:`SGLangEngine.resume_memory`
after it (why in that order: docs/design.md §2.2, "Colocation").

Seeds: SGLang honours ``sampling_seed`` only under ``enable_deterministic_inference`` (its seeded
sampler draws from a hash of (seed, position); without the mode the seed is ignored), and the
``n`` parallel samples of one request share its sampling parameters, so one seed would give n
identical responses. With ``deterministic=True`` each prompt therefore goes out as n requests with
``n=1`` and ``sampling_seed = seed_for(seed, uid, j)``; once one copy's prompt is in the radix cache
the others reuse its KV (how much prefill is shared depends on SGLang's scheduling, not on us).
Greedy sampling (T = 0) and ``deterministic=False`` keep one request per prompt with ``n``.

Every call to SGLang goes through ``self._engine``, built by an ``engine_factory`` (default: import
sglang and construct ``sglang.Engine``); the CPU tests pass a fake that copies SGLang's contract.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import torch

from .engine import ENGINES, RolloutEngine, RolloutRequest, Sample, SamplingParams, seed_for
from .sync import bucketize

INSTALL_HINT = "pip install dualrpo-mcore[sglang]"
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
"""SGLang's memory-saver regions (``srt/constants.py``); ``tags=None`` means all three."""

log = logging.getLogger(__name__)


def _sglang_factory(**kwargs):
    try:
        import sglang
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"the SGLang rollout engine needs sglang (CUDA only): {INSTALL_HINT}") from e
    return sglang.Engine(**kwargs)


def check_status(result: Any, what: str) -> Any:
    """Raise ``RuntimeError`` naming ``what`` and SGLang's message when ``result`` reports failure.
    SGLang answers ``(success, message)`` tuples (weight updates, sessions), ``*ReqOutput`` objects
    with ``success`` / ``message`` (``flush_cache``), or ``None`` (memory release / resume)."""
    if result is None:
        return result
    if isinstance(result, bool):
        ok, msg = result, ""
    elif isinstance(result, (tuple, list)) and result and isinstance(result[0], bool):
        ok, msg = result[0], (result[1] if len(result) > 1 else "")
    elif isinstance(result, dict) and "success" in result:
        ok, msg = bool(result["success"]), result.get("message", "")
    elif hasattr(result, "success"):
        ok, msg = bool(result.success), getattr(result, "message", "")
    else:
        return result
    if not ok:
        raise RuntimeError(f"SGLang {what} failed: {msg or '(no message)'}")
    return result


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


def sampling_dict(params: SamplingParams, *, n: Optional[int] = None,
                  sampling_seed: Optional[int] = None) -> Dict[str, Any]:
    """Our parameters in SGLang's names. Stop strings are kept in the output ids (``no_stop_trim``)
    so the returned tokens are exactly those sampled."""
    d = dict(n=params.n if n is None else n, temperature=params.temperature, top_p=params.top_p,
             top_k=params.top_k if params.top_k > 0 else -1, max_new_tokens=params.max_new_tokens,
             skip_special_tokens=False, no_stop_trim=True)
    if params.stop:
        d["stop"] = list(params.stop)
    if params.stop_token_ids:
        d["stop_token_ids"] = list(params.stop_token_ids)
    if sampling_seed is not None:
        d["sampling_seed"] = int(sampling_seed)
    return d


def _prompt_ids(r: RolloutRequest, image_token_id: int) -> List[int]:
    ids = collapse_image_pads(r.input_ids, image_token_id)
    if ids.count(image_token_id) != len(r.images):
        raise ValueError(f"rollout request {r.uid!r}: {ids.count(image_token_id)} image placeholders but "
                         f"{len(r.images)} raw images (SGLang processes the raw images itself)")
    return ids


def _add_image_data(kwargs: Dict[str, Any], requests: Sequence[RolloutRequest]) -> None:
    # An image-less prompt gets [] and never None: SGLang keeps a list of lists only when the
    # first entry is a list, otherwise it wraps every entry once more and then fails on the
    # nested lists / None with "Invalid image" (io_struct._normalize_image_data, load_image).
    if any(r.images for r in requests):
        kwargs["image_data"] = [list(r.images) for r in requests]


def build_generate_kwargs(requests: Sequence[RolloutRequest], params: SamplingParams, image_token_id: int,
                          seed: Optional[int] = None) -> Dict[str, Any]:
    """One batched ``Engine.generate`` call. ``seed`` None: each prompt once with ``n`` (SGLang forks
    the samples after one prefill). ``seed`` given: n requests per prompt, request-major, sample j
    seeded ``seed_for(seed, uid, j)`` (only honoured under deterministic inference)."""
    if not requests:
        raise ValueError("generate needs at least one request")
    ids = [_prompt_ids(r, image_token_id) for r in requests]
    if seed is None:
        kwargs: Dict[str, Any] = dict(input_ids=ids, sampling_params=sampling_dict(params), return_logprob=True)
        _add_image_data(kwargs, requests)
    else:
        kwargs = dict(input_ids=[x for x in ids for _ in range(params.n)], return_logprob=True,
                      sampling_params=[sampling_dict(params, n=1, sampling_seed=seed_for(seed, r.uid or str(i), j))
                                       for i, r in enumerate(requests) for j in range(params.n)])
        _add_image_data(kwargs, [r for r in requests for _ in range(params.n)])
    return kwargs


def _finish_reason(meta: Dict[str, Any], where: str) -> str:
    reason = meta.get("finish_reason")
    kind = reason.get("type") if isinstance(reason, dict) else reason
    if kind in ("stop", "length"):
        return kind
    raise RuntimeError(f"SGLang {where}: finish_reason {reason!r} (aborted or failed request)")


def parse_outputs(outputs: Sequence[Dict[str, Any]], num_requests: int, n: int) -> List[List[Sample]]:
    """SGLang returns ``num_requests * n`` dicts, request-major (all samples of prompt 0, then 1...),
    both for parallel sampling and for our n seeded copies. Tokens and log-probs come from
    ``meta_info.output_token_logprobs`` = ``[(logprob, id, text)]``."""
    if len(outputs) != num_requests * n:
        raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {num_requests} prompts x n={n}")
    result: List[List[Sample]] = []
    for i in range(num_requests):
        row = []
        for j in range(n):
            out = outputs[i * n + j]
            meta = out["meta_info"]
            reason = _finish_reason(meta, f"output {i * n + j}")
            triples = meta["output_token_logprobs"]
            tokens = [int(t[1]) for t in triples]
            if "output_ids" in out and list(out["output_ids"]) != tokens:
                raise RuntimeError(f"SGLang output {i * n + j}: output_ids disagree with output_token_logprobs")
            row.append(Sample(tokens, [float(t[0]) for t in triples], reason))
        result.append(row)
    return result


def check_prompt_tokens(outputs: Sequence[Dict[str, Any]], requests: Sequence[RolloutRequest],
                        expected: Sequence[int]) -> None:
    """SGLang re-derives each image's token count with its own processor (and, for a prompt with
    images, re-tokenizes the decoded text); a count other than the trainer's means the two built
    different prompts, and the trainer would compute log-probs of another sequence than the one
    sampled. ``outputs[k]`` answers ``requests[k]``, whose expanded prompt has ``expected[k]`` tokens."""
    for out, r, want in zip(outputs, requests, expected):
        got = out.get("meta_info", {}).get("prompt_tokens")
        if got is not None and int(got) != want:
            raise RuntimeError(
                f"rollout request {r.uid!r}: SGLang counted {int(got)} prompt tokens, the trainer {want} "
                f"({len(r.images)} image(s)): the image processors disagree on the image token count (or the "
                "text re-tokenized differently). Pass the trainer's data.min_pixels / data.max_pixels to "
                "SGLangEngine(min_pixels=, max_pixels=) and keep the model directory's processor files the trainer's")


@ENGINES.register("sglang")
class SGLangEngine(RolloutEngine):
    """``model_path``: an HF checkpoint directory (architecture, tokenizer, processor; its weights
    are replaced by the first sync). ``bucket_bytes``: most bytes per ``update_weights_from_tensor``
    call. ``weights_cpu_backup``: keep a host copy of the weights while released (SGLang's
    ``enable_weights_cpu_backup``), so frozen tensors need not be re-sent each step; without it every
    tensor must be re-sent after each release (``BucketedExporter(skip_frozen=False)``), which the
    engine enforces before it generates. ``deterministic``: start SGLang with
    ``enable_deterministic_inference`` (batch-invariant kernels, slower) so that seeded rollouts
    are reproducible, sample by sample; False trades that for throughput and SGLang then ignores
    ``SamplingParams.seed``. ``min_pixels`` / ``max_pixels``: the trainer's image processor bounds,
    handed to SGLang's processor (``mm_process_config``); None keeps the model directory's. Extra
    keyword arguments go to ``sglang.Engine``."""

    def __init__(self, model_path: str, *, image_token_id: int, tp_size: int = 1,
                 mem_fraction_static: float = 0.5, dtype: str = "bfloat16", bucket_bytes: int = 512 << 20,
                 random_seed: int = 0, weights_cpu_backup: bool = True, deterministic: bool = True,
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 engine_factory: Optional[Callable[..., Any]] = None, **engine_kwargs):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes={bucket_bytes}: must be > 0")
        if (min_pixels is None) != (max_pixels is None):
            raise ValueError("SGLangEngine: give min_pixels and max_pixels together (the trainer's data.* pair)")
        if min_pixels is not None and not 0 < min_pixels <= max_pixels:
            raise ValueError(f"SGLangEngine: need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
        self.image_token_id = image_token_id
        self.bucket_bytes = bucket_bytes
        self.deterministic = deterministic
        if min_pixels is not None:
            mm = dict(engine_kwargs.pop("mm_process_config", None) or {})
            image = {k: v for k, v in dict(mm.get("image") or {}).items() if k not in ("min_pixels", "max_pixels")}
            # ``size`` rather than min/max_pixels: transformers 5 deprecates the latter as call kwargs.
            image["size"] = {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}
            engine_kwargs["mm_process_config"] = {**mm, "image": image}
        factory = engine_factory or _sglang_factory
        self._engine = factory(model_path=model_path, tp_size=tp_size, mem_fraction_static=mem_fraction_static,
                               dtype=dtype, random_seed=random_seed, enable_memory_saver=True,
                               enable_weights_cpu_backup=weights_cpu_backup,
                               enable_deterministic_inference=deterministic, **engine_kwargs)
        self.retains_weights_on_release = weights_cpu_backup
        self._held = {tag: True for tag in MEMORY_TAGS}  # what SGLang currently occupies
        self._known: Set[str] = set()  # every name ever loaded
        self._lost: Set[str] = set()  # names whose values a release without backup destroyed
        self._warned_seed = False

    # ------------------------------------------------------------ memory
    def release_memory(self) -> None:
        """Before training: give weights, KV cache and CUDA graphs back (SGLang must be idle)."""
        self._check_alive()
        tags = [t for t in MEMORY_TAGS if self._held[t]]
        if not tags:
            return  # SGLang refuses a second release of a region
        check_status(self._engine.release_memory_occupation(tags=tags), "release_memory_occupation")
        for t in tags:
            self._held[t] = False
        if "weights" in tags and not self.retains_weights_on_release:
            self._lost = set(self._known)

    def resume_memory(self, weights: Optional[Iterable[Tuple[str, torch.Tensor]]] = None) -> None:
        """Before rollout: weights region, then (if given) the new weights, then KV cache and CUDA
        graphs, then a cache flush (the prefix cache was computed with the old weights)."""
        self._check_alive()
        if not self._held["weights"]:
            check_status(self._engine.resume_memory_occupation(tags=["weights"]), "resume_memory_occupation")
            self._held["weights"] = True
        if weights is not None:
            self._load(weights)
        rest = [t for t in MEMORY_TAGS if not self._held[t]]
        if rest:
            check_status(self._engine.resume_memory_occupation(tags=rest), "resume_memory_occupation")
            for t in rest:
                self._held[t] = True
        check_status(self._engine.flush_cache(), "flush_cache")

    # ------------------------------------------------------------ weights
    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        count = self._load(named_tensors)
        if self._held["kv_cache"]:
            check_status(self._engine.flush_cache(), "flush_cache")
        return count

    def _load(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> int:
        self._check_alive()
        if not self._held["weights"]:
            raise RuntimeError("update_weights while SGLang's weights are released: resume_memory first")
        # 0.5.21 on, tensors load only inside a begin/end session; older versions have no session.
        # Opened at the first bucket: a session that loads nothing makes SGLang re-run post-load steps.
        needs_session = callable(getattr(self._engine, "begin_weight_update", None))
        session = False
        count = 0
        try:
            for bucket in bucketize(named_tensors, self.bucket_bytes):
                if needs_session and not session:
                    check_status(self._engine.begin_weight_update(), "begin_weight_update")
                    session = True
                # One flush at the end instead of one per bucket.
                check_status(self._engine.update_weights_from_tensor(named_tensors=bucket, load_format=None,
                                                                     flush_cache=False),
                             f"update_weights_from_tensor ({bucket[0][0]} ... {bucket[-1][0]})")
                names = {n for n, _ in bucket}
                self._known |= names
                self._lost -= names
                count += len(bucket)
        except BaseException:
            if session:
                try:  # leave no session open behind the real error
                    self._engine.end_weight_update()
                except Exception:  # noqa: BLE001 - the load error is the one to report
                    log.exception("end_weight_update after a failed weight load")
            raise
        if session:
            check_status(self._engine.end_weight_update(), "end_weight_update")
        return count

    # ------------------------------------------------------------ generation
    def generate(self, requests: Sequence[RolloutRequest], params: SamplingParams) -> List[List[Sample]]:
        self._check_ready("generate")
        seed = self._seed(params)
        kwargs = build_generate_kwargs(requests, params, self.image_token_id, seed=seed)
        outputs = self._engine.generate(**kwargs)
        samples = parse_outputs(outputs, len(requests), params.n)
        each = [r for r in requests for _ in range(params.n)]  # outputs are request-major either way
        check_prompt_tokens(outputs, each, [len(r.input_ids) for r in each])
        return samples

    def _seed(self, params: SamplingParams) -> Optional[int]:
        if params.temperature == 0:
            return None  # greedy: every sample is the argmax path, no seed to honour
        if not self.deterministic:
            if params.seed is not None and not self._warned_seed:
                log.warning("SGLangEngine(deterministic=False): SGLang ignores sampling seeds, so rollouts are "
                            "not reproducible; pass deterministic=True for seeded per-sample draws")
                self._warned_seed = True
            return None
        # Deterministic SGLang seeds unseeded requests with one constant: n identical samples.
        return params.seed if params.seed is not None else int(torch.randint(0, 2 ** 62, (1,)))

    def score(self, requests: Sequence[RolloutRequest], completions: Sequence[Sequence[int]]) -> List[List[float]]:
        """Teacher-forced log-probs (T = 1) from SGLang's prompt log-probs: prompt + completion go in
        as input, ``logprob_start_len`` at the last prompt token, and the completion's entries are
        the last ``len(completion)`` of ``input_token_logprobs`` (SGLang's first entry is always
        None; it counts positions in its own image-expanded ids, which the prompt-token check ties
        to ours)."""
        self._check_ready("score")
        if len(requests) != len(completions):
            raise ValueError(f"score: {len(requests)} requests but {len(completions)} completions")
        comps = [[int(t) for t in c] for c in completions]
        todo = [i for i, c in enumerate(comps) if c]
        out: List[List[float]] = [[] for _ in requests]
        if not todo:
            return out
        reqs = [requests[i] for i in todo]
        kwargs: Dict[str, Any] = dict(
            input_ids=[_prompt_ids(r, self.image_token_id) + comps[i] for r, i in zip(reqs, todo)],
            sampling_params=dict(max_new_tokens=1, temperature=1.0, skip_special_tokens=False),
            return_logprob=True, logprob_start_len=[len(r.input_ids) - 1 for r in reqs])
        _add_image_data(kwargs, reqs)
        outputs = self._engine.generate(**kwargs)
        if len(outputs) != len(reqs):
            raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {len(reqs)} scored prompts")
        check_prompt_tokens(outputs, reqs, [len(r.input_ids) + len(comps[i]) for r, i in zip(reqs, todo)])
        for k, (r, i) in enumerate(zip(reqs, todo)):
            meta = outputs[k]["meta_info"]
            _finish_reason(meta, f"score of request {r.uid!r}")
            entries = list(meta.get("input_token_logprobs") or [])[-len(comps[i]):]
            if [int(e[1]) for e in entries] != comps[i] or any(e[0] is None for e in entries):
                raise RuntimeError(f"score of request {r.uid!r}: SGLang's input_token_logprobs do not line up "
                                   f"with the completion ({[int(e[1]) for e in entries][:8]} vs {comps[i][:8]})")
            out[i] = [float(e[0]) for e in entries]
        return out

    def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def _check_alive(self) -> None:
        if self._engine is None:
            raise RuntimeError("SGLangEngine was shut down")

    def _check_ready(self, what: str) -> None:
        self._check_alive()
        if not all(self._held.values()):
            raise RuntimeError(f"{what} while SGLang's memory is released: resume_memory first")
        if self._lost:
            missing = sorted(self._lost)
            raise RuntimeError(
                f"{what}: {len(missing)} weight tensor(s) were lost on release_memory (weights_cpu_backup=False) "
                f"and not sent again, e.g. {missing[:3]}; export every tensor each sync "
                "(BucketedExporter(skip_frozen=False)) or keep weights_cpu_backup=True")
