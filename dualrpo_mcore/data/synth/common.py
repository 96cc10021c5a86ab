"""Shared pieces of the synthetic generators: samples, colours, shapes, placement, fonts."""
from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 220),
    "yellow": (235, 200, 0), "purple": (140, 40, 170), "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
ANSWER_FORMAT = ("Think briefly inside <think> </think>, then give only the final answer "
                 "inside <answer> </answer>.")

Box = Tuple[int, int, int, int]


@dataclass
class Sample:
    """One generated prompt: an image, a question, the verifier spec and a canonical answer."""

    task: str
    image: Any  # PIL.Image
    question: str
    reward: Dict[str, Any]
    answer_text: str  # what goes inside <answer></answer> in a correct response
    difficulty: int
    reasoning: str = ""
    kind: str = ""  # sub-type (e.g. "arithmetic" / "geometry"), used as data_source suffix
    meta: Dict[str, Any] = field(default_factory=dict)

    def response(self) -> str:
        """A correct response in the format the prompt asks for."""
        return f"<think>{self.reasoning or 'I read the image.'}</think><answer>{self.answer_text}</answer>"


def font(size: int):
    """Pillow's bundled scalable font: identical glyphs on every machine, no system fonts."""
    from PIL import ImageFont

    return _FONTS.setdefault(size, ImageFont.load_default(size=size))


_FONTS: Dict[int, Any] = {}


def canvas(w: int, h: int, bg=(255, 255, 255)):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (w, h), bg)
    return img, ImageDraw.Draw(img)


def draw_shape(draw, shape: str, box: Box, colour: Tuple[int, int, int]) -> None:
    """Fill ``shape`` so that its bounding box is exactly ``box`` (inclusive pixel corners)."""
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(x1, y2), ((x1 + x2) / 2, y1), (x2, y2)], fill=colour)
    elif shape == "diamond":
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.polygon([(cx, y1), (x2, cy), (cx, y2), (x1, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def place_boxes(rng: random.Random, n: int, w: int, h: int, smin: int, smax: int,
                gap: int = 2) -> List[Box]:
    """``n`` non-overlapping square boxes (side in [smin, smax]) inside a w x h canvas.

    Rejection sampling; after many misses the side shrinks, so it always terminates for the
    small counts the generators ask for."""
    boxes: List[Box] = []
    tries = 0
    while len(boxes) < n:
        side = rng.randint(smin, smax)
        x, y = rng.randint(1, w - side - 2), rng.randint(1, h - side - 2)
        cand = (x, y, x + side - 1, y + side - 1)
        if all(cand[2] + gap < b[0] or b[2] + gap < cand[0] or cand[3] + gap < b[1]
               or b[3] + gap < cand[1] for b in boxes):
            boxes.append(cand)
            tries = 0
        else:
            tries += 1
            if tries > 200:
                smax, smin, tries = max(6, smax - 2), max(6, smin - 2), 0
    return boxes


def png_bytes(img) -> bytes:
    """PNG without timestamps or metadata, so same pixels -> same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def pick(rng: random.Random, seq, k: Optional[int] = None):
    return rng.choice(list(seq)) if k is None else rng.sample(list(seq), k)


def distinct(rng: random.Random, target: Tuple[str, str], same_shape_ok: bool = True) -> Tuple[str, str]:
    """A random (shape, colour) other than ``target`` (and of another shape unless ``same_shape_ok``)."""
    while True:
        cand = (pick(rng, SHAPES), pick(rng, COLOURS))
        if cand != target and (same_shape_ok or cand[0] != target[0]):
            return cand


def box_text(boxes: List[Box]) -> str:
    return "[" + ", ".join(f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]" for b in boxes) + "]"
