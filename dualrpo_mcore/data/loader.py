"""Prompt loader over the ``datasets`` library: several sources mixed by weight, seeded
shuffling, an exactly restorable position, token / pixel budgets and a bad-row policy.

Order. Source ``s`` in epoch ``e`` is read in the order ``default_rng([seed, s, e]).permutation``;
draw ``k`` picks its source from a block of categorical draws seeded by ``[seed, MIX, k // BLOCK]``.
Both are pure functions of counters, so the position is just those counters
(:meth:`PromptLoader.state_dict`) and a restored loader yields exactly the next prompt, across
epochs and with mixing. A bad or filtered row is skipped *within its source*, so it never changes
which source a draw belongs to and the mixing weights hold.

Each file is opened as its own ``datasets.Dataset`` so every row keeps its file and row number
for ids and error messages.
"""
from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dualrpo_mcore.data.config import DataConfig, SourceConfig
from dualrpo_mcore.data.images import PATCH_SIZE, ImageError, ImageProcessor, open_image, resize_to_area
from dualrpo_mcore.data.schema import TASKS, BadRow, Row, to_chat, validate_row
from dualrpo_mcore.data.vtriune import is_vtriune_row, task_of
from dualrpo_mcore.data.vtriune_prompts import instruction, with_instruction

log = logging.getLogger("dualrpo.data")

_MIX_STREAM = 0x6D6978  # separates the mixing stream from the per-source shuffles
_BLOCK = 4096
_EXT = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".arrow": "arrow"}
STATE_VERSION = 1


class TooManyBadRows(RuntimeError):
    """Raised under the ``skip`` policy when bad rows pass ``max_bad_rows``/``max_bad_fraction``."""


# --------------------------------------------------------------------------------------------
# files -> datasets

def _resolve(src: SourceConfig) -> List[Tuple[str, str]]:
    """``[(path, format)]`` for a source, sorted so the order never depends on the file system."""
    p = src.path
    if src.format == "saved" or (os.path.isdir(p) and (
            os.path.exists(os.path.join(p, "dataset_info.json"))
            or os.path.exists(os.path.join(p, "dataset_dict.json")))):
        return [(p, "saved")]
    if os.path.isdir(p):
        paths = sorted(f for f in glob.glob(os.path.join(p, "*")) if os.path.splitext(f)[1] in _EXT)
    else:
        paths = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
    out = []
    for f in paths:
        if not os.path.exists(f):
            raise FileNotFoundError(f"data source {src.path!r}: no such file {f}")
        fmt = src.format if src.format != "auto" else _EXT.get(os.path.splitext(f)[1])
        if fmt is None:
            raise ValueError(f"data source {src.path!r}: cannot tell the format of {f}; set format")
        out.append((f, fmt))
    if not out:
        raise FileNotFoundError(f"data source {src.path!r}: no parquet/jsonl/arrow files found")
    return out


def _read_jsonl(path: str):
    """jsonl as a one-column Dataset of raw lines: no type inference, so rows whose answers have
    different types (a string here, a box list there) and even malformed lines load; each line is
    parsed when read, and a broken one becomes a bad row with its line number."""
    import datasets

    with open(path, "r", encoding="utf-8", errors="replace") as f:
        lines = [ln for ln in f.read().split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return datasets.Dataset.from_dict({"_json": lines})


def _undecoded_images(ds):
    """Cast an HF ``Image`` column to decode=False so corrupt bytes fail one row, not the read."""
    import datasets

    feat = ds.features.get("images")
    inner = getattr(feat, "feature", None)
    if isinstance(inner, datasets.Image) and inner.decode:
        ds = ds.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))
    return ds


def open_file(path: str, fmt: str, split: str = "train"):
    import datasets

    if fmt == "parquet":
        ds = datasets.Dataset.from_parquet(path)
    elif fmt == "jsonl":
        return _read_jsonl(path)
    elif fmt == "arrow":
        ds = datasets.Dataset.from_file(path)
    elif fmt == "saved":
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise KeyError(f"{path}: no split {split!r}; has {list(ds)}")
            ds = ds[split]
    else:
        raise ValueError(f"unknown format {fmt!r} for {path}")
    return _undecoded_images(ds)


class Source:
    """The files of one source seen as a single indexable sequence of raw rows."""

    def __init__(self, cfg: SourceConfig):
        self.cfg = cfg
        self.name = cfg.name or os.path.basename(cfg.path.rstrip("/")) or cfg.path
        self.files = _resolve(cfg)
        self.datasets = [open_file(p, fmt, cfg.split) for p, fmt in self.files]
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        if self.offsets[-1] == 0:
            raise ValueError(f"data source {cfg.path!r} has no rows")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def locate(self, i: int) -> Tuple[int, int]:
        f = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return f, int(i - self.offsets[f])

    def raw(self, i: int) -> Tuple[str, int, Any]:
        f, r = self.locate(i)
        path = self.files[f][0]
        row = self.datasets[f][r]
        if "_json" in row and len(row) == 1:
            try:
                row = json.loads(row["_json"])
            except json.JSONDecodeError as e:
                raise BadRow(path, r, "<line>", f"invalid JSON ({e.msg} at char {e.pos})") from None
        return path, r, row


# --------------------------------------------------------------------------------------------
# the loader

@dataclass
class Prompt:
    """One prompt, processed once; the rollout samples its G responses from this object."""

    uid: str  # stable id "source:file:row" (or the row's own id when it has one)
    source: str
    file: str
    row: int
    messages: List[Dict[str, Any]]  # HF content-list chat (images as {"type": "image"})
    images: List[Any]  # decoded PIL images
    pixel_values: Any  # torch.FloatTensor [patches, 1176] or None (text-only)
    image_grid_thw: Any  # torch.LongTensor [num_images, 3] or None
    reward: Dict[str, Any]  # the verifier spec
    task: str
    data_source: str
    difficulty: Optional[int] = None
    solution: Optional[str] = None
    prompt_text: Optional[str] = None  # chat template applied, one <|image_pad|> per image
    input_ids: Any = None  # torch.LongTensor [L] with image pads expanded (needs a tokenizer)
    extra: Dict[str, Any] = field(default_factory=dict)


class PromptLoader:
    """Iterate prompts forever (epochs roll over per source); see the module docstring."""

    def __init__(self, cfg: DataConfig, *, image_processor: Optional[ImageProcessor] = None,
                 tokenizer: Any = None):
        if not cfg.sources:
            raise ValueError("DataConfig.sources is empty")
        self.cfg = cfg
        self.sources = [Source(s) for s in cfg.sources]
        self.weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
        self.weights /= self.weights.sum()
        self.images = image_processor or ImageProcessor(cfg.min_pixels, cfg.max_pixels, cfg.processor_dir)
        if tokenizer is None and cfg.processor_dir:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(cfg.processor_dir)
        self.tokenizer = tokenizer
        if cfg.max_prompt_tokens is not None and tokenizer is None:
            raise ValueError("DataConfig.max_prompt_tokens needs a tokenizer (set processor_dir)")
        self.draws = 0
        self.cursors = [[0, 0] for _ in self.sources]  # per source: [epoch, position in epoch]
        self.attempts = 0
        self.bad: Dict[str, str] = {}  # "file:row" -> reason (distinct bad rows)
        self.bad_attempts = 0
        self.filtered: Dict[str, int] = {}
        self._perm_cache: Dict[Tuple[int, int], np.ndarray] = {}
        self._mix_cache: Tuple[int, Optional[np.ndarray]] = (-1, None)

    # ---- order -------------------------------------------------------------------------------
    def _perm(self, s: int, epoch: int) -> np.ndarray:
        key = (s, epoch)
        if key not in self._perm_cache:
            n = len(self.sources[s])
            perm = (np.random.default_rng([self.cfg.seed, s, epoch]).permutation(n)
                    if self.cfg.shuffle else np.arange(n))
            self._perm_cache = {k: v for k, v in self._perm_cache.items() if k[0] != s}
            self._perm_cache[key] = perm
        return self._perm_cache[key]

    def source_of_draw(self, k: int) -> int:
        if len(self.sources) == 1:
            return 0
        block = k // _BLOCK
        if self._mix_cache[0] != block:
            rng = np.random.default_rng([self.cfg.seed, _MIX_STREAM, block])
            self._mix_cache = (block, rng.choice(len(self.sources), size=_BLOCK, p=self.weights))
        return int(self._mix_cache[1][k % _BLOCK])

    def _advance(self, s: int) -> int:
        epoch, pos = self.cursors[s]
        self._row_epoch = epoch
        idx = int(self._perm(s, epoch)[pos])
        pos += 1
        if pos == len(self.sources[s]):
            epoch, pos = epoch + 1, 0
        self.cursors[s] = [epoch, pos]
        return idx

    # ---- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        return self

    def __next__(self) -> Prompt:
        s = self.source_of_draw(self.draws)
        n = len(self.sources[s])
        for _ in range(n):
            idx = self._advance(s)
            self.attempts += 1
            prompt = self._try_build(s, idx)
            if prompt is not None:
                self.draws += 1
                return prompt
        raise TooManyBadRows(f"source {self.sources[s].name!r}: none of its {n} rows is usable "
                             f"(bad: {len(self.bad)}, filtered: {self.filtered})")

    def next_prompts(self, n: int) -> List[Prompt]:
        return [next(self) for _ in range(n)]

    def _try_build(self, s: int, idx: int) -> Optional[Prompt]:
        try:
            return self.build(s, idx)
        except BadRow as e:
            self._on_bad(e, self.sources[s])
        except _Filtered as f:
            self.filtered[f.reason] = self.filtered.get(f.reason, 0) + 1
            log.debug("%s:%d filtered (%s)", f.file, f.row, f.reason)
        return None

    def _on_bad(self, e: BadRow, src: Source) -> None:
        if self.cfg.bad_rows == "fail":
            raise e
        self.bad_attempts += 1
        key = f"{e.file}:{e.row}"
        if key not in self.bad:
            self.bad[key] = f"{e.field}: {e.reason}"
            log.warning("bad row skipped: %s (source %s; %d bad so far)", e, src.name, len(self.bad))
        limit = self.cfg.max_bad_rows
        frac = self.bad_attempts / max(self.attempts, 1)
        if limit is not None and len(self.bad) > limit:
            raise TooManyBadRows(f"{len(self.bad)} bad rows > max_bad_rows={limit}; "
                                 f"first: {list(self.bad.items())[:5]}")
        if self.attempts >= self.cfg.min_rows_for_fraction and frac > self.cfg.max_bad_fraction:
            raise TooManyBadRows(f"bad-row fraction {frac:.3f} > max_bad_fraction="
                                 f"{self.cfg.max_bad_fraction} after {self.attempts} rows; "
                                 f"first: {list(self.bad.items())[:5]}")

    def build(self, s: int, idx: int) -> Prompt:
        """Read, validate, decode and process one row; raises BadRow or _Filtered."""
        src = self.sources[s]
        path, r, raw = src.raw(idx)
        base = os.path.dirname(os.path.abspath(path))
        if is_vtriune_row(raw):
            raw = self._from_vtriune(raw, path, r, base)
        row: Row = validate_row(raw, file=path, row=r, check_spec=self.cfg.validate_specs)
        task = row.task if row.task in TASKS else task_or_own(row.task)
        imgs = []
        for j, entry in enumerate(row.images):
            try:
                imgs.append(open_image(entry, base_dir=base, max_image_pixels=self.cfg.max_image_pixels))
            except ImageError as e:
                raise BadRow(path, r, f"images[{j}]", str(e)) from None
        bounds = self.cfg.image_resize.get(task)
        if bounds:  # before processing, so the engine gets these very pixels and counts alike
            imgs = [resize_to_area(im, bounds[0], bounds[1]) for im in imgs]
        processed = self.images(imgs)
        reward = with_image_hw(row.reward, processed)
        uid = f"{src.name}:{os.path.basename(path)}:{r}" if row.id is None else f"{src.name}:{row.id}"
        messages = row.messages
        pool = self.cfg.instructions.get(task)
        if pool:
            text = instruction(pool, reward, seed=self.cfg.seed, uid=uid, epoch=getattr(self, "_row_epoch", 0))
            messages = with_instruction(messages, text)
        chat = to_chat(messages)
        text, ids = self._tokenize(chat, processed)
        if self.cfg.max_prompt_tokens is not None and len(ids) > self.cfg.max_prompt_tokens:
            raise _Filtered(path, r, "max_prompt_tokens")
        return Prompt(uid=uid, source=src.name, file=path, row=r, messages=chat, images=imgs,
                      pixel_values=None if processed is None else processed.pixel_values,
                      image_grid_thw=None if processed is None else processed.image_grid_thw,
                      reward=reward, task=task, data_source=row.data_source,
                      difficulty=row.difficulty, solution=row.solution, prompt_text=text,
                      input_ids=ids, extra=row.extra)

    def _from_vtriune(self, raw, path: str, r: int, base: str) -> Dict[str, Any]:
        """A row in V-Triune's layout, converted as read (``data.vtriune``)."""
        from dualrpo_mcore.data.vtriune import convert_row

        try:
            return convert_row(raw, base_dir=base, profile=self.cfg.reward_profile,
                               file_name=os.path.basename(path), image_resize=self.cfg.image_resize,
                               size_images=False, min_pixels=self.cfg.min_pixels,
                               max_pixels=self.cfg.max_pixels)
        except (ValueError, KeyError, TypeError) as e:
            field_name = str(e).split(":", 1)[0] if ":" in str(e) else "reward_model"
            raise BadRow(path, r, field_name, str(e)) from None

    def _tokenize(self, chat, processed):
        if self.tokenizer is None:
            return None, None
        import torch

        from dualrpo_mcore.data.tokenizer import expand_image_pads

        text = self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        counts = processed.num_tokens if processed is not None else []
        ids = self.tokenizer(expand_image_pads(text, counts), add_special_tokens=False)["input_ids"]
        return text, torch.tensor(ids, dtype=torch.long)

    # ---- position ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {"version": STATE_VERSION, "seed": self.cfg.seed, "draws": self.draws,
                "cursors": [list(c) for c in self.cursors],
                "sizes": [len(s) for s in self.sources], "names": [s.name for s in self.sources],
                "attempts": self.attempts, "bad_attempts": self.bad_attempts,
                "bad": dict(self.bad), "filtered": dict(self.filtered)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} != {STATE_VERSION}")
        sizes = [len(s) for s in self.sources]
        if state["sizes"] != sizes or state["seed"] != self.cfg.seed:
            raise ValueError(f"data loader state is for sources of sizes {state['sizes']} and seed "
                             f"{state['seed']}, this loader has {sizes} and seed {self.cfg.seed}")
        self.draws = int(state["draws"])
        self.cursors = [[int(e), int(p)] for e, p in state["cursors"]]
        self.attempts, self.bad_attempts = int(state["attempts"]), int(state["bad_attempts"])
        self.bad, self.filtered = dict(state["bad"]), dict(state["filtered"])

    def stats(self) -> Dict[str, Any]:
        return {"draws": self.draws, "attempts": self.attempts, "bad_rows": len(self.bad),
                "filtered": dict(self.filtered), "epochs": [c[0] for c in self.cursors]}


def task_or_own(task: str) -> str:
    """A free-form task name that names one of ours (``cv_detection``) becomes it; others stay."""
    mapped = task_of(task)
    return task if mapped == "other" else mapped


def with_image_hw(spec: Dict[str, Any], processed) -> Dict[str, Any]:
    """A ``vtriune_detection`` spec that maps pixels to the 0..1000 grid needs the size the model
    saw; it comes from the processed grid (theirs: ``image_grid_thw`` * 14), whatever was computed
    when the row was converted."""
    params = spec.get("params") or {}
    if spec.get("verifier") != "vtriune_detection" or not params.get("det_verifier_normalized") or processed is None:
        return spec
    _, gh, gw = (int(v) for v in processed.image_grid_thw[0].tolist())
    return dict(spec, params=dict(params, image_hw=[gh * PATCH_SIZE, gw * PATCH_SIZE]))


class _Filtered(Exception):
    def __init__(self, file: str, row: int, reason: str):
        super().__init__(f"{file}:{row} filtered: {reason}")
        self.file, self.row, self.reason = file, row, reason
