"""V-Triune's published rows (Orsta-Data-47k, "One RL to See Them All") in this package.

Their layout (paper fig. 3; the rows as published)::

    data_source  str
    images       Sequence(Image)                      -> images ({bytes, path} entries)
    prompt       [{"content": str, "role": str}]      -> messages ("<image>" placeholders kept)
    ability      str                                  -> task, one of our eight (``task_of``)
    reward_model {answer, ground_truth, accuracy_ratio, format_ratio, verifier, verifier_parm:
                  {det_verifier_normalized, det_reward_ratio: {...}}}
    extra_info   {id, image_path}                     -> id

Loading such rows as they are (``PromptLoader`` recognises them with ``is_vtriune_row``) and
converting them offline (``convert_row``/``convert_file``): docs/vtriune.md, "Loading Orsta".

How their rewards are reproduced (``DataConfig.reward_profile``; docs/vtriune.md, "The reward profile"):

* ``vtriune`` (default): a row naming ``mathverify`` gets the ``vtriune_math`` verifier and one
  naming ``detection`` gets ``vtriune_detection``, with the row's ground truth (kept as text and
  sanitised when scored), ratios and ``verifier_parm`` as they are.
* ``native``: this package's verifiers (``VERIFIER_MAP``; an unknown name falls back to the row's
  ability): ``answer`` is ``reward_model.answer`` when present, else ``ground_truth`` without one
  outer ``\\boxed{}`` or ``<answer>`` block; boxes go through their sanitation (malformed, x1 > x2
  and repeated boxes dropped), and degenerate ones, which our box verifiers cannot hold and which no
  threshold in use can match, are dropped too (a row left with none is refused in this profile);
  ``det_verifier_normalized`` becomes ``coords: abs, answer_coords: norm1000, image_size``;
  ``format_ratio`` > 0 adds a think/answer ``format`` component; ``det_reward_ratio`` has no
  counterpart there.

Rows in a verifier name neither profile knows keep the native mapping in both.
"""
from __future__ import annotations

import base64
import json
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from dualrpo_mcore.atomic import atomic_path
from dualrpo_mcore.data.config import REWARD_PROFILES
from dualrpo_mcore.data.schema import arrow_schema, make_row, validate_row

log = logging.getLogger("dualrpo.data")

OTHER_TASK = "other"
VTRIUNE_VERIFIERS = {"mathverify": "vtriune_math", "detection": "vtriune_detection"}
VERIFIER_MAP = {
    "mathverify": "math", "math_verify": "math", "math": "math",
    "choice": "choice", "multiple_choice": "choice", "mc": "choice",
    "numeric": "numeric", "number": "numeric", "chart": "numeric",
    "counting": "counting", "count": "counting",
    "ocr": "ocr", "edit_distance": "ocr",
    "detection": "detection", "det": "detection",
    "grounding": "grounding", "iou": "grounding", "rec": "grounding",
}
ABILITY_VERIFIER = {"math": "math", "puzzle": "choice", "science": "choice", "chart": "numeric",
                    "detection": "detection", "grounding": "grounding", "counting": "counting",
                    "ocr": "ocr"}
# words of an ``ability`` (``cv_detection``, ``visual_math``, ...) or of a file name that name a task
TASK_WORDS = {
    "math": "math", "mathematics": "math", "geometry": "math", "puzzle": "puzzle", "puzzles": "puzzle",
    "science": "science", "sci": "science", "chart": "chart", "charts": "chart", "table": "chart",
    "detection": "detection", "det": "detection", "grounding": "grounding", "ground": "grounding",
    "rec": "grounding", "refcoco": "grounding", "counting": "counting", "count": "counting",
    "ocr": "ocr",
}
_BOXED = re.compile(r"^\s*\\boxed\s*\{(.*)\}\s*$", re.S)
_WORD = re.compile(r"[a-z0-9]+")
_FILE = re.compile(r"^(?:train|test)_([a-z]+)_")


def is_vtriune_row(raw: Any) -> bool:
    """Whether a raw row is in V-Triune's layout rather than ours."""
    return isinstance(raw, Mapping) and "reward_model" in raw and "prompt" in raw and "messages" not in raw


def task_of(ability: Any, *, file_name: Optional[str] = None, verifier: Optional[str] = None) -> str:
    """One of our eight tasks for per-task metrics: from the ability's words, else from an Orsta
    file name (``train_{task}_{source}_{n}.parquet``), else from a detection verifier; "other"."""
    for word in _WORD.findall(str(ability or "").lower()):
        if word in TASK_WORDS:
            return TASK_WORDS[word]
    m = _FILE.match(os.path.basename(file_name or "").lower())
    if m and m.group(1) in TASK_WORDS:
        return TASK_WORDS[m.group(1)]
    if verifier in ("detection", "grounding"):
        return verifier
    return OTHER_TASK


# ---------------------------------------------------------------------------------------------
# reward specs

def _resized_hw(image: Mapping[str, Any], base_dir: str, min_pixels: int, max_pixels: int,
                resize: Optional[Sequence[int]]) -> Tuple[int, int]:
    """``(height, width)`` of the image as the model sees it (after ``resize`` and the processor)."""
    from dualrpo_mcore.data.images import PATCH_SIZE, ImageProcessor, open_image, resize_to_area

    img = open_image(image, base_dir=base_dir)
    if resize:
        img = resize_to_area(img, int(resize[0]), int(resize[1]))
    _, gh, gw = ImageProcessor(min_pixels, max_pixels).grid_for_size(img.height, img.width)
    return gh * PATCH_SIZE, gw * PATCH_SIZE


def _vtriune_spec(name: str, rm: Mapping[str, Any], image_hw) -> Dict[str, Any]:
    gt = rm.get("ground_truth")
    if not isinstance(gt, str) or not gt.strip():
        raise ValueError("reward_model.ground_truth: missing (their verifiers score against it)")
    params: Dict[str, Any] = {k: float(rm[k]) for k in ("accuracy_ratio", "format_ratio") if rm.get(k) is not None}
    if name == "vtriune_detection":
        vparm = rm.get("verifier_parm") or {}
        ratio = {k: v for k, v in dict(vparm.get("det_reward_ratio") or {}).items() if v is not None}
        params.update(det_reward_ratio=ratio, det_verifier_normalized=bool(vparm.get("det_verifier_normalized")),
                      iou_threshold="dynamic")
        if params["det_verifier_normalized"] and image_hw is not None:
            params["image_hw"] = list(image_hw())
    return {"verifier": name, "answer": gt, "params": params}


def _answer(rm: Mapping[str, Any]) -> Any:
    from dualrpo_mcore.verifiers.vtriune_common import answer_block

    ans = rm.get("answer")
    if ans is None or (isinstance(ans, str) and not ans.strip()):
        gt = rm.get("ground_truth")
        if isinstance(gt, str):
            m = _BOXED.match(gt)
            ans = m.group(1) if m else (answer_block(gt) or gt)
        else:
            ans = gt
    return ans


def native_boxes(ans: Any) -> List[Dict[str, Any]]:
    """Ground-truth boxes after their sanitation, degenerate ones dropped (see the module doc)."""
    from dualrpo_mcore.verifiers.tasks.vtriune_detection import boxes_from

    kept = boxes_from(ans if isinstance(ans, str) else json.dumps(ans))
    usable = [b for b in kept or [] if b["bbox_2d"][2] > b["bbox_2d"][0] and b["bbox_2d"][3] > b["bbox_2d"][1]]
    if not usable:
        raise ValueError(f"reward_model.answer: no usable box in {str(ans)[:80]!r}")
    if len(usable) < len(kept):
        log.info("dropped %d degenerate ground-truth box(es) (native profile)", len(kept) - len(usable))
    return usable


def _native_spec(rm, name: str, ability, images, image_size) -> Dict[str, Any]:
    verifier = VERIFIER_MAP.get(name) or ABILITY_VERIFIER.get(task_of(ability))
    if verifier is None:
        raise ValueError(f"reward_model.verifier: unknown verifier {name!r} and ability {ability!r}")
    ans = _answer(rm)
    if ans is None:
        raise ValueError("reward_model.answer/ground_truth: missing")
    params: Dict[str, Any] = {}
    if verifier in ("detection", "grounding"):
        ans = native_boxes(ans)
        if verifier == "grounding":  # our grounding scores one box against one box
            verifier, ans = ("grounding", ans[0]) if len(ans) == 1 else ("detection", ans)
        if (rm.get("verifier_parm") or {}).get("det_verifier_normalized"):
            if not images:
                raise ValueError("images: normalised boxes need the image to know its size")
            h, w = image_size()
            params.update(coords="abs", answer_coords="norm1000", image_size=[w, h])
    elif verifier == "counting" and isinstance(ans, str) and ans.strip().isdigit():
        ans = int(ans.strip())
    spec: Dict[str, Any] = {"verifier": verifier, "answer": ans}
    if params:
        spec["params"] = params
    fmt = float(rm.get("format_ratio") or 0.0)
    if fmt > 0:
        acc = rm.get("accuracy_ratio")
        acc = 1.0 - fmt if acc is None else float(acc)
        spec = {"components": [dict(spec, weight=acc),
                               {"verifier": "format", "weight": fmt, "params": {"mode": "think_answer"}}]}
    return spec


def convert_spec(rm: Mapping[str, Any], ability: Optional[str], images: List[Mapping[str, Any]], *,
                 profile: str = "vtriune", base_dir: str = "", min_pixels: int = 3136,
                 max_pixels: int = 1003520, image_resize: Optional[Sequence[int]] = None,
                 size_images: bool = True) -> Dict[str, Any]:
    """``reward_model`` (+ ability, images) -> our spec; raises ValueError naming the field.

    ``image_resize`` is the ``[min, max]`` area of V-Triune's image sizing when it is on: with the
    pixel bounds it decides the size the model sees, which normalised boxes are scaled by.
    ``size_images=False`` leaves that size out of ``vtriune_detection`` specs (the loader fills it
    from the processed image instead of decoding the image twice)."""
    if profile not in REWARD_PROFILES:
        raise ValueError(f"profile must be one of {REWARD_PROFILES}, got {profile!r}")
    name = str(rm.get("verifier") or "").strip().lower()

    def image_hw():
        return _resized_hw(images[0], base_dir, min_pixels, max_pixels, image_resize)

    if profile == "vtriune" and name in VTRIUNE_VERIFIERS:
        return _vtriune_spec(VTRIUNE_VERIFIERS[name], rm, image_hw if images and size_images else None)
    return _native_spec(rm, name, ability, images, image_hw)


# ---------------------------------------------------------------------------------------------
# rows and files

def _image_entry(im: Any, base_dir: str, where: str) -> Dict[str, Any]:
    if isinstance(im, (bytes, bytearray)):
        return {"bytes": bytes(im), "path": None}
    if isinstance(im, str):
        im = {"bytes": None, "path": im}
    if not isinstance(im, Mapping):
        raise ValueError(f"{where}: unsupported entry {type(im).__name__}")
    data, path = im.get("bytes"), im.get("path")
    if isinstance(data, str):  # jsonl cannot hold bytes: base64 text
        data = base64.b64decode(data)
    if not data and path and base_dir and not os.path.isabs(path):
        path = os.path.abspath(os.path.join(base_dir, path))  # resolves wherever the output goes
    return {"bytes": data or None, "path": path}


def row_images(raw: Mapping[str, Any], base_dir: str = "") -> List[Dict[str, Any]]:
    """The row's images as ``{bytes, path}`` entries; ``extra_info.image_path`` stands in for a
    missing ``images`` column (jsonl exports)."""
    images = raw.get("images")
    if images is None:
        paths = (raw.get("extra_info") or {}).get("image_path")
        images = [paths] if isinstance(paths, str) else list(paths or [])
    return [_image_entry(im, base_dir, f"images[{j}]") for j, im in enumerate(images)]


def convert_row(raw: Mapping[str, Any], *, base_dir: str = "", profile: str = "vtriune",
                file_name: Optional[str] = None, image_resize: Optional[Mapping[str, Sequence[int]]] = None,
                size_images: bool = True, **pix) -> Dict[str, Any]:
    """One V-Triune row -> one row of our schema (not yet validated); raises ValueError naming the
    field. ``base_dir`` is the source file's folder (relative image paths become absolute);
    ``file_name`` helps name the task; ``image_resize`` is ``DataConfig.image_resize``."""
    prompt = raw.get("prompt")
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError("prompt: missing or empty")
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in prompt]
    images = row_images(raw, base_dir)
    rm = raw.get("reward_model")
    if not isinstance(rm, Mapping):
        raise ValueError("reward_model: missing")
    ability = raw.get("ability")
    task = task_of(ability, file_name=file_name, verifier=str(rm.get("verifier") or "").lower())
    spec = convert_spec(rm, ability, images, profile=profile, base_dir=base_dir,
                        image_resize=(image_resize or {}).get(task), size_images=size_images, **pix)
    extra = raw.get("extra_info") or {}
    return make_row(messages=messages, images=images, reward=spec, task=task,
                    data_source=str(raw.get("data_source") or "vtriune"),
                    id=None if extra.get("id") is None else str(extra.get("id")))


def convert_file(src: str, out: str, *, profile: str = "vtriune", min_pixels: int = 3136,
                 max_pixels: int = 1003520, image_resize: Optional[Mapping[str, Sequence[int]]] = None,
                 fail_fast: bool = False) -> Tuple[int, List[str]]:
    """Convert a V-Triune parquet/jsonl file to ``out`` (parquet, or jsonl by its extension);
    returns (rows written, ["file:row: error", ...])."""
    from dualrpo_mcore.data.config import SourceConfig
    from dualrpo_mcore.data.loader import Source

    source = Source(SourceConfig(path=src))
    rows, errors = [], []
    for i in range(len(source)):
        path, r = src, i
        try:
            path, r, raw = source.raw(i)
            row = convert_row(raw, base_dir=os.path.dirname(os.path.abspath(path)), profile=profile,
                              file_name=os.path.basename(path), image_resize=image_resize,
                              min_pixels=min_pixels, max_pixels=max_pixels)
            validate_row(row, file=path, row=r)
            rows.append(row)
        except (ValueError, KeyError, TypeError) as e:
            msg = str(e) if str(e).startswith(f"{path}:") else f"{path}:{r}: {e}"
            if fail_fast:
                raise ValueError(msg) from None
            errors.append(msg)
            log.warning("skipped: %s", msg)
    _write(rows, out)
    return len(rows), errors


def _write(rows: List[Dict[str, Any]], out: str) -> None:
    with atomic_path(out) as tmp:  # a reader never sees half a file; a failed write keeps the old one
        if out.endswith((".jsonl", ".json")):
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    images = [{"bytes": base64.b64encode(im["bytes"]).decode("ascii") if im["bytes"] else None,
                               "path": im["path"]} for im in row["images"]]
                    f.write(json.dumps(dict(row, images=images), ensure_ascii=False) + "\n")
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), tmp)
