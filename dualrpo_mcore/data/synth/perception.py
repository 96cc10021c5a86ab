"""Perception tasks: detection (boxes of every shape of a kind), grounding (the box of one
described object), counting, OCR (read rendered words).

Boxes are ``[x1, y1, x2, y2]`` in pixels of the image as stored (``coords: abs``); the images'
sides are multiples of 28 inside the default pixel bounds, so Qwen2.5-VL's resize keeps them as
they are and the model sees the same pixel frame.
"""
from __future__ import annotations

import random

from dualrpo_mcore.data.synth.common import (
    ANSWER_FORMAT, COLOURS, SHAPES, Sample, box_text, canvas, distinct, draw_shape, font, pick, place_boxes,
)

_SIZE = 112
BOX_FORMAT = "Give boxes as [x1, y1, x2, y2] in pixels."


def _scene(rng: random.Random, d: int, n_target: int, n_other: int, target, other_fn):
    """Draw ``n_target`` objects ``target`` = (shape, colour) and ``n_other`` from ``other_fn``."""
    smin, smax = {1: (16, 24), 2: (12, 20), 3: (9, 16)}[d]
    boxes = place_boxes(rng, n_target + n_other, _SIZE, _SIZE, smin, smax)
    img, draw = canvas(_SIZE, _SIZE)
    objs = [target] * n_target + [other_fn() for _ in range(n_other)]
    order = list(range(len(objs)))
    rng.shuffle(order)
    targets = []
    for i, b in zip(order, boxes):
        shape, colour = objs[i]
        draw_shape(draw, shape, b, COLOURS[colour])
        if i < n_target:
            targets.append(b)
    return img, sorted(targets)


def detection_task(rng: random.Random, d: int) -> Sample:
    shape = pick(rng, SHAPES)
    others = [s for s in SHAPES if s != shape]
    n_t = rng.randint(1, {1: 2, 2: 3, 3: 4}[d])
    n_o = rng.randint(0 if d == 1 else 1, {1: 1, 2: 3, 3: 4}[d])
    img, boxes = _scene(rng, d, n_t, n_o, (shape, pick(rng, COLOURS)),
                        lambda: (pick(rng, others), pick(rng, COLOURS)))
    q = f"Detect every {shape} in the image. {BOX_FORMAT} {ANSWER_FORMAT}"
    spec = {"verifier": "detection", "answer": [list(b) for b in boxes],
            "params": {"coords": "abs"}}
    return Sample("detection", img, q, spec, box_text(boxes), d,
                  reasoning=f"I see {len(boxes)} {shape}(s).", kind="shapes")


def grounding_task(rng: random.Random, d: int) -> Sample:
    target = (pick(rng, SHAPES), pick(rng, COLOURS))
    n_o = {1: rng.randint(1, 2), 2: rng.randint(2, 4), 3: rng.randint(4, 6)}[d]

    def other():
        # harder levels share the shape or the colour with the target
        if d == 1:
            return pick(rng, [s for s in SHAPES if s != target[0]]), pick(rng, COLOURS)
        return distinct(rng, target)

    img, boxes = _scene(rng, d, 1, n_o, target, other)
    desc = f"the {target[1]} {target[0]}"
    q = f"Find {desc} in the image. Give its box as [x1, y1, x2, y2] in pixels. {ANSWER_FORMAT}"
    b = boxes[0]
    spec = {"verifier": "grounding", "answer": list(b), "params": {"coords": "abs"}}
    return Sample("grounding", img, q, spec, f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]", d,
                  reasoning=f"{desc.capitalize()} is there.", kind="shapes")


def counting_task(rng: random.Random, d: int) -> Sample:
    target = (pick(rng, SHAPES), pick(rng, COLOURS))
    n_t = rng.randint(0 if d > 1 else 1, {1: 4, 2: 6, 3: 9}[d])
    n_o = {1: 0, 2: rng.randint(1, 3), 3: rng.randint(2, 5)}[d]
    img, boxes = _scene(rng, d, n_t, n_o, target, lambda: distinct(rng, target))
    what = f"{target[1]} {target[0]}s" if d > 1 else f"{target[0]}s"
    q = f"How many {what} are in the image? {ANSWER_FORMAT}"
    return Sample("counting", img, q, {"verifier": "counting", "answer": n_t}, str(n_t), d,
                  reasoning=f"I count {n_t}.", kind="shapes")


WORDS = (
    "apple river stone cloud green light music paper table water happy quick small house "
    "bread chair dream earth field grape heart juice lemon money night ocean piano queen "
    "robot sugar tiger union voice whale youth zebra amber brick candy delta eagle flame "
    "globe honey ivory jelly kite lunar maple nest olive pearl quilt rain salt tree urban "
    "vivid wheat yard zone bird cat dog fish frog lion bear wolf star moon sun rose leaf "
    "blue red gold pink gray snow wind fire sand road map key box cup pen ink hat bag"
).split()


def ocr_task(rng: random.Random, d: int) -> Sample:
    n = {1: 1, 2: 2, 3: 3}[d]
    words = [pick(rng, WORDS) for _ in range(n)]
    text = " ".join(words)
    w = 112 if d < 3 else 168
    img, draw = canvas(w, 56, bg=(255, 255, 255) if d == 1 else (245, 240, 225))
    fill = (0, 0, 0) if d < 3 else pick(rng, [(20, 20, 120), (90, 20, 20), (20, 80, 20)])
    size = {1: 16, 2: 13, 3: 13}[d]
    jitter = (rng.randint(-3, 3), rng.randint(-4, 4)) if d > 1 else (0, 0)
    draw.text((w // 2 + jitter[0], 28 + jitter[1]), text, fill=fill, font=font(size), anchor="mm")
    if d == 3:  # speckle noise that a reader must look through
        for _ in range(60):
            x, y = rng.randrange(w), rng.randrange(56)
            draw.point((x, y), fill=(150, 150, 150))
    q = f"Read the text in the image exactly. {ANSWER_FORMAT}"
    return Sample("ocr", img, q, {"verifier": "ocr", "answer": text}, text, d,
                  reasoning="The image shows some words.", kind="words")
