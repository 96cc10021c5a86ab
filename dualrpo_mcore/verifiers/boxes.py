"""Boxes: parsing from model text, IoU, and optimal one-to-one matching.

Boxes are ``(x1, y1, x2, y2)`` with continuous coordinates: area ``(x2-x1)*(y2-y1)``, no ``+1``
pixel convention (the same as COCO's ``maskUtils.iou`` on ``[x, y, w, h]`` boxes).
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, List, Mapping, Optional, Sequence, Tuple

Box = Tuple[float, float, float, float]

MAX_BOXES = 100
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?"
_SEP = r"(?:\s?[,;]\s?|\s)"  # parse_boxes collapses whitespace runs first, so no backtracking blow-up
# [x1, y1, x2, y2] or (x1, y1, x2, y2)
_BRACKET4 = re.compile(r"[\[(] ?(%s)%s(%s)%s(%s)%s(%s) ?[\])]" % ((_NUM, _SEP) * 3 + (_NUM,)))
# (x1,y1),(x2,y2)
_TWO_POINTS = re.compile(r"\( ?(%s) ?, ?(%s) ?\) ?,? ?\( ?(%s) ?, ?(%s) ?\)" % ((_NUM,) * 4))
_BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d", "bounding_box")
_LABEL_KEYS = ("label", "category", "name", "class")


def valid_box(box: Any) -> Optional[Box]:
    """The box as a float 4-tuple if finite and non-degenerate (x2 > x1, y2 > y1), else None."""
    try:
        if len(box) != 4:
            return None
        b = tuple(float(v) for v in box)
    except (TypeError, ValueError, OverflowError):
        return None
    if not all(math.isfinite(v) for v in b) or b[2] <= b[0] or b[3] <= b[1]:
        return None
    return b  # type: ignore[return-value]


def xywh_to_xyxy(b: Sequence[float]) -> Tuple[float, float, float, float]:
    return (b[0], b[1], b[0] + b[2], b[1] + b[3])


def iou(a: Box, b: Box) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_and_label(item: Mapping) -> Tuple[Any, Optional[str]]:
    """``(raw box or None, label or None)`` of a dict such as ``{"bbox_2d": [...], "label": "dog"}``
    (``bbox``, ``box``, ... and ``category``, ``name``, ... are accepted too)."""
    box = next((item[k] for k in _BOX_KEYS if k in item), None)
    label = next((item[k] for k in _LABEL_KEYS if k in item), None)
    return box, None if label is None else str(label)


def _from_json(obj: Any, out: list, limit: int) -> None:
    """Collect ``(box, label)`` from parsed JSON: a box list, a dict with a box key, or lists."""
    if len(out) >= limit:
        return
    if isinstance(obj, dict):
        box, label = box_and_label(obj)
        if box is not None:
            out.append((box, label))
        return
    if isinstance(obj, list):
        if len(obj) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in obj):
            out.append((obj, None))
            return
        for item in obj[:limit]:
            _from_json(item, out, limit)


def parse_boxes(text: str, limit: int = MAX_BOXES) -> List[Tuple[Any, Optional[str]]]:
    """``[(raw_box, label_or_None)]`` found in ``text`` (JSON first, then bracketed numbers).

    Raw boxes are returned unvalidated so that callers can count malformed ones as wrong
    predictions rather than silently dropping them. At most ``limit`` boxes are returned.
    """
    out: list = []
    text = " ".join(text.split())
    s = text
    if s.startswith("```"):
        s = s.strip("`").strip()
        if s.startswith("json"):
            s = s[4:]
        s = s.strip()
    if s[:1] in "[{":
        try:
            _from_json(json.loads(s.replace("'", '"')), out, limit)
        except (ValueError, RecursionError):
            out = []
    if out:
        return out[:limit]
    for m in _BRACKET4.finditer(text):
        out.append(([float(g) for g in m.groups()], _label_before(text, m.start())))
        if len(out) >= limit:
            return out
    if not out:
        for m in _TWO_POINTS.finditer(text):
            out.append(([float(g) for g in m.groups()], None))
            if len(out) >= limit:
                break
    return out


_LABEL_RX = re.compile(r"[\"']?([A-Za-z][\w \-]{0,40}?)[\"']? ?[:=] ?$")


def _label_before(text: str, start: int) -> Optional[str]:
    """A ``label: [box]`` prefix just before a bracketed box, if any."""
    m = _LABEL_RX.search(text[max(0, start - 48):start])
    if m is None or m.group(1).strip().lower() in _BOX_KEYS:
        return None
    return m.group(1).strip()


# ---------------------------------------------------------------------------------------------
# optimal assignment (Hungarian / Kuhn-Munkres, O(n^2 m)); scipy is not a dependency

def max_weight_matching(weights: Sequence[Sequence[float]]) -> List[Tuple[int, int]]:
    """Row/column pairs of a one-to-one assignment maximising the total weight.

    ``weights`` is an n x m matrix of non-negative numbers; every pair of the result has a
    positive weight (zero-weight pairs are left out: they match nothing).
    """
    n = len(weights)
    m = len(weights[0]) if n else 0
    if n == 0 or m == 0:
        return []
    transpose = n > m
    w = [list(r) for r in zip(*weights)] if transpose else [list(r) for r in weights]
    if transpose:
        n, m = m, n
    big = max(max(r) for r in w)
    # minimise cost = big - weight on an n <= m rectangle (potentials method, 1-indexed)
    inf = float("inf")
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    p, way = [0] * (m + 1), [0] * (m + 1)
    for i in range(1, n + 1):
        p[0], j0 = i, 0
        minv, used = [inf] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = (big - w[i0 - 1][j - 1]) - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
    pairs = []
    for j in range(1, m + 1):
        if p[j] and w[p[j] - 1][j - 1] > 0:
            pairs.append((j - 1, p[j] - 1) if transpose else (p[j] - 1, j - 1))
    return sorted(pairs)
