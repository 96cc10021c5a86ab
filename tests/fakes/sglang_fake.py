"""A CPU stand-in for ``sglang.Engine`` that copies the offline-engine contract of **sglang 0.5.23**
(read in the 0.5.23 wheel, ``sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl``), plus
:class:`FakeSGLangEngine0520` for the 0.5.20 contract (no weight-update sessions). What it copies,
and where it was read (paths under ``python/sglang/``):

* Weight-update sessions, ``srt/entrypoints/engine.py`` (``begin_weight_update(selector="all")``,
  ``end_weight_update()``) and ``srt/managers/scheduler_components/weight_updater.py``: outside a
  session ``update_weights_from_tensor`` loads nothing and answers ``(False, "update_weights_from_tensor
  must run between begin_weight_update() and end_weight_update()")``; a second ``begin`` and an ``end``
  without ``begin`` are refused with ``(False, message)``. ``srt/managers/tokenizer_control_mixin.py``:
  those calls return ``(success, message)`` tuples, ``flush_cache`` a ``FlushCacheReqOutput(success,
  message)``, ``release/resume_memory_occupation`` ``None``.
* Memory tags, ``srt/constants.py`` and the weight updater: ``tags=None`` means ``kv_cache``,
  ``weights`` and ``cuda_graph``; releasing adds to ``offload_tags``, resuming ``remove``s from it (a
  tag not released raises ``KeyError``). Released weights come back undefined unless the engine runs
  with ``enable_weights_cpu_backup`` (torch_memory_saver's CPU backup): the fake fills them with garbage.
* Images, ``srt/managers/io_struct.py`` (``GenerateReqInput._normalize_image_data``) and
  ``srt/utils/common.py`` (``load_image``): ``image_data`` stays a list of per-prompt lists only when
  its first entry is a list; otherwise every entry is wrapped once more, and a ``None`` or a nested
  list then fails with ``ValueError("Invalid image: ...")``; a prompt whose entry holds no image
  (``[]`` or ``None``) is text-only (``has_valid_data``).
* Image tokens, ``srt/multimodal/processors/base_processor.py`` / ``qwen_vl.py``: each image pad run
  is re-expanded to the processor's count, the processor taking ``mm_process_config["image"]`` as
  kwargs (``size={"shortest_edge", "longest_edge"}``, or the deprecated ``min_pixels`` / ``max_pixels``)
  over the model directory's ``preprocessor_config.json``; ``meta_info["prompt_tokens"]`` is the
  expanded length (``srt/managers/scheduler_components/output_streamer.py``).
* Seeds, ``srt/sampling/sampling_batch_info.py`` and ``srt/layers/sampler.py``: ``sampling_seed`` is
  used only under ``enable_deterministic_inference`` (unseeded requests then get 42) and the draw at a
  position is a function of (seed, position) only; without the mode the seed is ignored.
* Parallel sampling, ``io_struct.py`` and ``srt/managers/tokenizer_manager.py``: ``n`` comes from the
  (first) sampling params and must agree across a list; outputs are request-major, and the n copies
  share the request's sampling params (so its seed).
* Log-probs, ``srt/managers/scheduler.py`` and ``scheduler_components/logprob_result_processor.py``:
  ``logprob_start_len`` indexes the expanded ids; ``input_token_logprobs`` covers ``ids[start:]`` as
  ``(logprob, id, None)`` with the first value None; a start past the prompt aborts the request;
  input log-probs are plain ``log_softmax`` while output log-probs are temperature-scaled (greedy:
  unscaled) and taken before top-k / top-p.

The "model" is a toy recurrent LM over ``model.embed_tokens.weight`` and ``lm_head.weight`` (plus any
extra named tensors the test declares), so what was loaded decides what is sampled; tests read
``weights`` directly or call :meth:`mismatches`. ``calls`` records what the engine received, in order.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

ALL_TAGS = ("kv_cache", "weights", "cuda_graph")
QWEN25_VL_PIXELS = (3136, 12845056)  # min/max_pixels of the Qwen2.5-VL-*-Instruct preprocessor_config.json
SERVER_ARGS = frozenset({
    "model_path", "tp_size", "mem_fraction_static", "dtype", "random_seed", "enable_memory_saver",
    "enable_weights_cpu_backup", "enable_deterministic_inference", "mm_process_config", "attention_backend",
    "log_level", "disable_radix_cache", "disable_cuda_graph", "context_length", "sampling_backend", "base_gpu_id"})
SAMPLING_KEYS = frozenset({
    "n", "temperature", "top_p", "top_k", "min_p", "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids",
    "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "sampling_seed",
    "frequency_penalty", "presence_penalty", "repetition_penalty"})
SESSION_REFUSAL = "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"


@dataclass
class FlushCacheReqOutput:
    success: bool
    message: str = ""


@dataclass
class FakeOptions:
    image_token_id: int = 151655
    vocab_size: int = 48
    hidden: int = 8
    eos_token_id: Optional[int] = None
    extra_params: Dict[str, Tuple[int, ...]] = field(default_factory=dict)
    """More named tensors the "checkpoint" holds (e.g. frozen ViT weights), shape per name."""
    init_seed: int = 0


def factory(cls=None, **options):
    """An ``engine_factory`` for ``SGLangEngine``: ``factory(image_token_id=200, extra_params=...)``."""
    return functools.partial(cls or FakeSGLangEngine, FakeOptions(**options))


def _seeded(seed: int, position: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}|{position}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _load_image(item: Any):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    if isinstance(item, bytes):
        return Image.open(io.BytesIO(item))
    if isinstance(item, str) and os.path.exists(item):
        return Image.open(item)
    raise ValueError(f"Invalid image: {item}")


def _has_valid(data) -> bool:
    if data is None:
        return False
    if isinstance(data, list):
        return any(_has_valid(x) for x in data)
    return True


def normalize_image_data(image_data, batch_size: int) -> List[Optional[list]]:
    """Per-prompt image lists as SGLang 0.5.23's ``_normalize_image_data`` leaves them."""
    if image_data is None:
        return [None] * batch_size
    if not isinstance(image_data, list):
        return [[image_data]] * batch_size
    if not image_data:
        return [None] * batch_size
    if len(image_data) != batch_size:
        raise ValueError("The length of image_data should be equal to the batch size.")
    if isinstance(image_data[0], list):
        return list(image_data)
    return [[x] for x in image_data]


class FakeSGLangEngine0520:
    """sglang 0.5.20's contract: weight updates load at any time (no session methods)."""

    version = "0.5.20"

    def __init__(self, options: Optional[FakeOptions] = None, **server_args):
        unknown = sorted(set(server_args) - SERVER_ARGS)
        if unknown:
            raise TypeError(f"ServerArgs got unexpected keyword arguments {unknown}")
        if "model_path" not in server_args:
            raise TypeError("ServerArgs needs model_path")
        self.server_args, self.opt = server_args, options or FakeOptions()
        self.deterministic = bool(server_args.get("enable_deterministic_inference", False))
        self.cpu_backup = bool(server_args.get("enable_weights_cpu_backup", False))
        self.memory_saver = bool(server_args.get("enable_memory_saver", False))
        self.min_pixels, self.max_pixels = self._processor_bounds()
        g = torch.Generator().manual_seed(self.opt.init_seed)
        v, d = self.opt.vocab_size, self.opt.hidden
        shapes = {"model.embed_tokens.weight": (v, d), "lm_head.weight": (v, d), **self.opt.extra_params}
        self.weights: Dict[str, torch.Tensor] = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
        self.offload_tags: set = set()
        self.calls: List[tuple] = []
        self.fail_next: Dict[str, str] = {}
        """Method name -> message: the next call of that method reports failure with it."""
        self._rng = torch.Generator().manual_seed(int(server_args.get("random_seed") or 0))
        self._garbage = torch.Generator().manual_seed(987654321)
        self._session = False
        self.alive = True

    # ------------------------------------------------------------ processor
    def _processor_bounds(self) -> Tuple[int, int]:
        lo, hi = QWEN25_VL_PIXELS
        path = os.path.join(str(self.server_args["model_path"]), "preprocessor_config.json")
        if os.path.exists(path):
            with open(path) as f:
                cfg = json.load(f)
            size = cfg.get("size") or {}
            lo = cfg.get("min_pixels", size.get("shortest_edge", lo))
            hi = cfg.get("max_pixels", size.get("longest_edge", hi))
        image = (self.server_args.get("mm_process_config") or {}).get("image") or {}
        size = image.get("size") or {}
        lo = size.get("shortest_edge", image.get("min_pixels", lo))
        hi = size.get("longest_edge", image.get("max_pixels", hi))
        return int(lo), int(hi)

    def image_tokens(self, image) -> int:
        """Tokens one image takes after Qwen2-VL's smart resize (28-pixel cells, 2x2 merge)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(image.height, image.width, factor=28, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return (h // 28) * (w // 28)

    def _expand(self, ids: Sequence[int], images: Optional[list]) -> Tuple[List[int], set]:
        pad = self.opt.image_token_id
        loaded = [_load_image(x) for x in images] if _has_valid(images) else []
        runs = sum(1 for k, t in enumerate(ids) if t == pad and (k == 0 or ids[k - 1] != pad))
        if runs != len(loaded):
            raise ValueError(f"fake processor: {runs} image token runs but {len(loaded)} images")
        out, pads, it = [], set(), iter(loaded)
        for k, t in enumerate(ids):
            if t == pad and k and ids[k - 1] == pad:
                continue
            if t == pad:
                count = self.image_tokens(next(it))
                pads.update(range(len(out), len(out) + count))
                out += [pad] * count
            else:
                out.append(int(t))
        return out, pads

    # ------------------------------------------------------------ toy model
    def _state(self, h: torch.Tensor, tok: int) -> torch.Tensor:
        return 0.5 * h + self.weights["model.embed_tokens.weight"][tok % self.opt.vocab_size]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.weights["lm_head.weight"].double() @ torch.tanh(h.double())

    # ------------------------------------------------------------ API
    def generate(self, prompt=None, sampling_params=None, input_ids=None, image_data=None, return_logprob=False,
                 logprob_start_len=None, **other):
        self._check_alive()
        if other:
            raise TypeError(f"generate() got unexpected keyword arguments {sorted(other)}")
        if prompt is not None or input_ids is None:
            raise NotImplementedError("fake: input_ids only (it has no tokenizer)")
        if self.offload_tags:
            raise RuntimeError(f"fake: generate while {sorted(self.offload_tags)} are released")
        single = bool(input_ids) and isinstance(input_ids[0], int)
        batch = [input_ids] if single else list(input_ids)
        sps = sampling_params if isinstance(sampling_params, list) else [dict(sampling_params or {})] * len(batch)
        n = sps[0].get("n", 1)
        if any(sp.get("n", 1) != n for sp in sps):
            raise ValueError("The parallel_sample_num should be the same for all samples in sample params.")
        if len(sps) != len(batch):
            raise ValueError("fake: one sampling_params dict per prompt")
        images = normalize_image_data(image_data, len(batch))
        starts = self._per_request(logprob_start_len, -1, len(batch), n, "logprob_start_len")
        want_lp = self._per_request(return_logprob, False, len(batch), n, "return_logprob")
        self.calls.append(("generate", len(batch), n))
        outs = []
        for i, ids in enumerate(batch):
            expanded, pads = self._expand(ids, images[i])
            for _ in range(n):
                outs.append(self._run(expanded, pads, sps[i], want_lp[i], starts[i]))
        return outs[0] if single and n == 1 else outs

    @staticmethod
    def _per_request(value, default, size, n, name):
        if value is None:
            return [default] * size
        if not isinstance(value, list):
            return [value] * size
        if n > 1:
            raise ValueError(f"Cannot use list {name} with parallel_sample_num > 1")
        return list(value)

    def _run(self, ids: List[int], pads: set, sp: Dict[str, Any], want_lp: bool, start: int) -> Dict[str, Any]:
        bad = sorted(set(sp) - SAMPLING_KEYS)
        if bad:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {bad}")
        if sp.get("stop"):
            raise NotImplementedError("fake: stop strings need a tokenizer")
        seed = sp.get("sampling_seed")
        if seed is not None and (not isinstance(seed, int) or not -(2 ** 63) <= seed <= 2 ** 63 - 1):
            raise ValueError(f"sampling_seed must be an integer in [-2**63, 2**63 - 1], got {seed!r}")
        seed = (42 if seed is None else seed) if self.deterministic else None
        meta: Dict[str, Any] = dict(id=os.urandom(8).hex(), prompt_tokens=len(ids), completion_tokens=0)
        start = len(ids) if start == -1 else start
        if want_lp and start > len(ids):
            meta["finish_reason"] = {"type": "abort", "message": f"req.logprob_start_len={start} is higher than "
                                     f"the number of input tokens len(req.origin_input_ids)={len(ids)}."}
            return dict(text="", output_ids=[], meta_info=dict(meta, output_token_logprobs=[], input_token_logprobs=[]))
        h = torch.zeros(self.opt.hidden)
        inputs = []
        for p, tok in enumerate(ids):
            if want_lp and p >= start:
                lp = None if p == start else float(torch.log_softmax(self._logits(h), -1)[tok % self.opt.vocab_size])
                inputs.append((lp, 0 if p in pads else tok, None))
            h = self._state(h, tok)
        out, lps, reason = self._decode(h, len(ids), sp, seed)
        meta.update(completion_tokens=len(out), finish_reason=reason)
        if want_lp:
            meta.update(output_token_logprobs=[(lp, t, None) for lp, t in zip(lps, out)], input_token_logprobs=inputs)
        return dict(text="", output_ids=out, meta_info=meta)

    def _decode(self, h, position, sp, seed):
        temp, top_p, top_k = float(sp.get("temperature", 1.0)), float(sp.get("top_p", 1.0)), int(sp.get("top_k", -1))
        stops = set(sp.get("stop_token_ids") or ())
        if self.opt.eos_token_id is not None and not sp.get("ignore_eos"):
            stops.add(self.opt.eos_token_id)
        limit = int(sp.get("max_new_tokens", 128))
        out, lps = [], []
        for k in range(limit):
            logits = self._logits(h)
            if temp == 0:
                tok = int(logits.argmax())
                lp = torch.log_softmax(logits, -1)
            else:
                lp = torch.log_softmax(logits / temp, -1)
                probs = lp.exp()
                order = probs.argsort(descending=True)
                ranked = probs[order]
                keep = (ranked.cumsum(0) - ranked) <= top_p
                if top_k > 0:
                    keep[top_k:] = False
                ranked = torch.where(keep, ranked, torch.zeros_like(ranked))
                g = self._rng if seed is None else _seeded(seed, position + k)
                tok = int(order[torch.multinomial(ranked, 1, generator=g)])
            out.append(tok)
            lps.append(float(lp[tok]))
            h = self._state(h, tok)
            if tok in stops:
                return out, lps, {"type": "stop", "matched": tok}
        return out, lps, {"type": "length", "length": limit}

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self._check_alive()
        self.calls.append(("update", [(n, t.numel() * t.element_size()) for n, t in named_tensors], flush_cache))
        if "update_weights_from_tensor" in self.fail_next:
            return False, self.fail_next.pop("update_weights_from_tensor")
        refusal = self._session_refusal()
        if refusal:
            return False, refusal
        if "weights" in self.offload_tags:
            raise RuntimeError("fake: weights written while their region is released")
        if load_format is not None:
            raise NotImplementedError(f"Unknown load_format={load_format}")
        for name, t in named_tensors:
            param = self.weights[name]  # an unknown name is a KeyError in the model's load_weights
            assert tuple(param.shape) == tuple(t.shape), (name, tuple(param.shape), tuple(t.shape))
            param.copy_(t.detach().to(param.dtype))
        return True, "Success"

    def _session_refusal(self) -> Optional[str]:
        return None

    def flush_cache(self):
        self._check_alive()
        self.calls.append(("flush",))
        if "flush_cache" in self.fail_next:
            return FlushCacheReqOutput(False, self.fail_next.pop("flush_cache"))
        return FlushCacheReqOutput(True, "")

    def release_memory_occupation(self, tags=None):
        self._check_alive()
        self.calls.append(("release", tags))
        tags = list(tags) if tags else list(ALL_TAGS)
        for t in tags:
            if t not in ALL_TAGS:
                raise ValueError(f"fake: unknown memory tag {t!r}")
            assert t not in self.offload_tags, f"fake: {t} released twice"
        self.offload_tags.update(tags)
        return None

    def resume_memory_occupation(self, tags=None):
        self._check_alive()
        self.calls.append(("resume", tags))
        tags = list(tags) if tags else list(ALL_TAGS)
        for t in tags:
            self.offload_tags.remove(t)
        if "weights" in tags and self.memory_saver and not self.cpu_backup:
            for p in self.weights.values():
                p.copy_(torch.randn(p.shape, generator=self._garbage) * 1e3)
        return None

    def shutdown(self):
        self.calls.append(("shutdown",))
        self.alive = False

    def _check_alive(self):
        if not self.alive:
            raise RuntimeError("fake: engine was shut down")

    # ------------------------------------------------------------ for the tests
    def mismatches(self, named: Sequence[Tuple[str, torch.Tensor]]) -> List[str]:
        """Names whose loaded tensor differs from the given one (empty: all loaded as sent)."""
        return [n for n, t in named if not torch.equal(self.weights[n], t.detach().to(self.weights[n].dtype))]


class FakeSGLangEngine(FakeSGLangEngine0520):
    """sglang 0.5.23's contract: weights load only inside a begin/end weight-update session."""

    version = "0.5.23"

    def begin_weight_update(self, selector: str = "all"):
        self._check_alive()
        self.calls.append(("begin", selector))
        if "begin_weight_update" in self.fail_next:
            return False, self.fail_next.pop("begin_weight_update")
        if self._session:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self._session = True
        return True, "Success"

    def end_weight_update(self):
        self._check_alive()
        self.calls.append(("end",))
        if "end_weight_update" in self.fail_next:  # SGLang refuses an end only when no session is open
            self._session = False
            return False, self.fail_next.pop("end_weight_update")
        if not self._session:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self._session = False
        return True, "Success"

    def _session_refusal(self) -> Optional[str]:
        return None if self._session else SESSION_REFUSAL
