"""Convert V-Triune's published sample-level rows to our schema.

Their layout (paper "One RL to See Them All", appendix H, fig. 8; also the MiniMax-AI repo's
data notes)::

    data_source  str
    images       Sequence(Image)                      -> images ({bytes, path} entries)
    prompt       [{"content": str, "role": str}]      -> messages ("<image>" placeholders kept)
    ability      str                                  -> task
    reward_model {answer, ground_truth, accuracy_ratio, format_ratio, verifier, verifier_parm:
                  {det_verifier_normalized, det_reward_ratio: {...}}, style?, length_ratio?}
    extra_info   {id, image_path, ...}                -> id

Assumptions (their code for every verifier is not public, so these are documented choices):

* verifier names map through :data:`VERIFIER_MAP` (``mathverify`` -> ``math``, ...); an
  unrecognised name falls back to the default verifier of the row's ``ability``; a row with
  neither is an error naming the row.
* ``answer`` is ``reward_model.answer`` when present, else ``ground_truth`` with one outer
  ``\\boxed{}`` removed. Box answers (detection / grounding) are parsed from their JSON or Python
  literal text (``[{'bbox_2d': [...], 'label': ...}]``).
* ``det_verifier_normalized: true`` means the ground-truth boxes are on a 0..1000 grid while the
  model answers in pixels of the resized image: we emit ``coords: abs``, ``answer_coords:
  norm1000`` and ``image_size`` = the image's size after Qwen2.5-VL's resize under the given
  pixel bounds.
* ``format_ratio`` > 0 becomes a two-component spec: the task verifier weighted
  ``accuracy_ratio`` (default ``1 - format_ratio``) plus ``format`` (think/answer) weighted
  ``format_ratio``. ``det_reward_ratio`` and ``length_ratio`` have no counterpart and are dropped.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

from dualrpo_mcore.data.schema import TASKS, arrow_schema, make_row, validate_row

log = logging.getLogger("dualrpo.data")

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
_BOXED = re.compile(r"^\s*\\boxed\s*\{(.*)\}\s*$", re.S)


def _answer(rm: Mapping[str, Any]) -> Any:
    ans = rm.get("answer")
    if ans is None or (isinstance(ans, str) and not ans.strip()):
        gt = rm.get("ground_truth")
        if isinstance(gt, str):
            m = _BOXED.match(gt)
            ans = m.group(1) if m else gt
        else:
            ans = gt
    return ans


def _parse_boxes(ans: Any) -> Any:
    if not isinstance(ans, str):
        return ans
    for parse in (json.loads, ast.literal_eval):  # literal_eval only builds literals: safe
        try:
            return parse(ans)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    raise ValueError(f"cannot parse boxes from {ans[:80]!r}")


def _resized_size(image: Mapping[str, Any], base_dir: str, min_pixels: int, max_pixels: int) -> List[int]:
    from dualrpo_mcore.data.images import ImageProcessor, open_image

    img = open_image(image, base_dir=base_dir)
    _, gh, gw = ImageProcessor(min_pixels, max_pixels).grid_for_size(img.height, img.width)
    return [gw * 14, gh * 14]


def convert_spec(rm: Mapping[str, Any], ability: Optional[str], images: List[Mapping[str, Any]], *,
                 base_dir: str = "", min_pixels: int = 3136, max_pixels: int = 1003520) -> Dict[str, Any]:
    """``reward_model`` (+ ability, images) -> our spec; raises ValueError naming the field."""
    name = str(rm.get("verifier") or "").strip().lower()
    verifier = VERIFIER_MAP.get(name) or ABILITY_VERIFIER.get(str(ability or "").lower())
    if verifier is None:
        raise ValueError(f"reward_model.verifier: unknown verifier {name!r} and ability {ability!r}")
    ans = _answer(rm)
    if ans is None:
        raise ValueError("reward_model.answer/ground_truth: missing")
    params: Dict[str, Any] = {}
    if verifier in ("detection", "grounding"):
        ans = _parse_boxes(ans)
        vparm = rm.get("verifier_parm") or {}
        if vparm.get("det_verifier_normalized"):
            if not images:
                raise ValueError("images: normalised boxes need the image to know its size")
            params.update(coords="abs", answer_coords="norm1000",
                          image_size=_resized_size(images[0], base_dir, min_pixels, max_pixels))
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


def convert_row(raw: Mapping[str, Any], *, base_dir: str = "", **pix) -> Dict[str, Any]:
    """One V-Triune row -> one row of our schema (not yet validated)."""
    prompt = raw.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("prompt: missing or empty")
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in prompt]
    images = []
    for j, im in enumerate(raw.get("images") or []):
        if isinstance(im, Mapping):
            images.append({"bytes": im.get("bytes"), "path": im.get("path")})
        elif isinstance(im, (bytes, str)):
            images.append({"bytes": im, "path": None} if isinstance(im, bytes) else {"bytes": None, "path": im})
        else:
            raise ValueError(f"images[{j}]: unsupported entry {type(im).__name__}")
    rm = raw.get("reward_model")
    if not isinstance(rm, Mapping):
        raise ValueError("reward_model: missing")
    ability = raw.get("ability")
    spec = convert_spec(rm, ability, images, base_dir=base_dir, **pix)
    task = str(ability).lower() if ability and str(ability).lower() in TASKS else (ability or spec.get("verifier", "unknown"))
    extra = raw.get("extra_info") or {}
    return make_row(messages=messages, images=images, reward=spec, task=str(task),
                    data_source=str(raw.get("data_source") or "vtriune"),
                    id=None if extra.get("id") is None else str(extra.get("id")))


def convert_file(src: str, out: str, *, min_pixels: int = 3136, max_pixels: int = 1003520,
                 fail_fast: bool = False) -> Tuple[int, List[str]]:
    """Convert a V-Triune parquet/jsonl file; returns (rows written, ["file:row: error", ...])."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dualrpo_mcore.data.loader import Source
    from dualrpo_mcore.data.config import SourceConfig

    source = Source(SourceConfig(path=src))
    rows, errors = [], []
    for i in range(len(source)):
        path, r, raw = None, i, None
        try:
            path, r, raw = source.raw(i)
            row = convert_row(raw, base_dir=os.path.dirname(os.path.abspath(path)),
                              min_pixels=min_pixels, max_pixels=max_pixels)
            validate_row(row, file=path, row=r)
            rows.append(row)
        except (ValueError, KeyError, TypeError) as e:
            msg = str(e) if str(e).startswith(f"{path}:") else f"{path or src}:{r}: {e}"
            if fail_fast:
                raise ValueError(msg) from None
            errors.append(msg)
            log.warning("skipped: %s", msg)
    tmp = out + ".tmp"
    pq.write_table(pa.Table.from_pylist(rows, schema=arrow_schema()), tmp)
    os.replace(tmp, out)
    return len(rows), errors
