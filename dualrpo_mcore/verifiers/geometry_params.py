"""Coordinate conventions shared by ``grounding`` and ``detection``.

``coords`` says how the *prediction* is written: ``abs`` (pixels of the image) or ``norm1000``
(each axis scaled to 0..1000, Qwen2-VL style). ``answer_coords`` says the same for the ground
truth (default: equal to ``coords``). ``image_size`` ``[width, height]`` is required when the two
differ. ``box_format`` is ``xyxy`` (default) or ``xywh`` (COCO), for both sides.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from dualrpo_mcore.verifiers.base import param_choice, param_pair
from dualrpo_mcore.verifiers.boxes import Box, valid_box, xywh_to_xyxy

COORDS = ("abs", "norm1000")
GEOMETRY_PARAMS = ("coords", "answer_coords", "image_size", "box_format")


def check_geometry(params: Mapping[str, Any]) -> None:
    coords = param_choice(params, "coords", COORDS, "abs")
    answer_coords = param_choice(params, "answer_coords", COORDS, coords)
    param_choice(params, "box_format", ("xyxy", "xywh"), "xyxy")
    if param_pair(params, "image_size", "[width, height]") is None and coords != answer_coords:
        raise ValueError("params.image_size is required when params.coords != params.answer_coords")


def to_abs(raw: Any, params: Mapping[str, Any], *, is_answer: bool) -> Optional[Box]:
    """A raw box in the spec's convention as a valid ``xyxy`` box in a common frame, or None.

    When prediction and answer share a convention the box is left in it (IoU does not change
    under per-axis scaling); otherwise ``norm1000`` boxes are scaled to pixels by ``image_size``.
    """
    box = valid_box(raw) if params.get("box_format", "xyxy") == "xyxy" else None
    if params.get("box_format", "xyxy") == "xywh":
        try:
            box = valid_box(xywh_to_xyxy([float(v) for v in raw]))
        except (TypeError, ValueError, IndexError, OverflowError):
            box = None
    if box is None:
        return None
    coords = params.get("coords", "abs")
    answer_coords = params.get("answer_coords", coords)
    mine = answer_coords if is_answer else coords
    if coords == answer_coords or mine == "abs":
        return box
    w, h = params["image_size"]
    return (box[0] * w / 1000.0, box[1] * h / 1000.0, box[2] * w / 1000.0, box[3] * h / 1000.0)
