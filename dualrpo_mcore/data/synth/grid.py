"""The eight tasks laid out on the tiny policy's token grid (``dualrpo data synth --layout grid``).

The tiny demo policy (2 ViT blocks, 32 wide) sees an image as one token per 28 x 28 pixels (patch 14,
2 x 2 merge). In the free layout objects sit anywhere and straddle token borders, and such a policy
learns nothing of them in minutes on 2 cores: after 3,000 SFT steps on 2,000 counting rows its answer
still does not depend on the image. Here every object, glyph, bar and beaker fills one cell of that
grid (or whole cells), so what a question needs is readable from single tokens, and the tasks stay
what they are: the same questions, the same verifiers and answer formats. Quantities are counted in
cells; the free layout is the one for real models.

Boxes are ``[x1, y1, x2, y2]`` inclusive pixels of the stored image (``coords: abs``); every side is a
multiple of 28, so the processor keeps the image as it is.
"""
from __future__ import annotations

import random
from typing import List, Sequence, Tuple

from dualrpo_mcore.data.synth.common import (
    ANSWER_FORMAT, COLOURS, SHAPES, Box, Sample, box_text, canvas, distinct, draw_shape, font, pick,
)
from dualrpo_mcore.data.synth.perception import BOX_FORMAT, WORDS
from dualrpo_mcore.data.synth.reasoning import LETTERS, beaker_sample, pattern_sample

CELL = 28  # pixels per LM image token of the tiny processor (patch 14 x merge 2)
INSET = 3  # an object's box is its cell shrunk by this much on every side
SIDE = 4   # scenes are SIDE x SIDE cells
GRID_LINE = (225, 225, 225)
WATER = (90, 150, 230)


def cell_box(row: int, col: int) -> Box:
    """The box an object drawn in cell (row, col) fills exactly."""
    return (col * CELL + INSET, row * CELL + INSET, col * CELL + CELL - 1 - INSET, row * CELL + CELL - 1 - INSET)


def _cells(rng: random.Random, n: int) -> List[Tuple[int, int]]:
    return rng.sample([(r, c) for r in range(SIDE) for c in range(SIDE)], n)


def _scene(rng: random.Random, n_target: int, others: Sequence[Tuple[str, str]], target: Tuple[str, str]):
    """``n_target`` copies of ``target`` and the ``others``, one per random cell; the targets' boxes."""
    img, draw = canvas(SIDE * CELL, SIDE * CELL)
    objs = [target] * n_target + list(others)
    boxes = []
    for i, ((shape, colour), (r, c)) in enumerate(zip(objs, _cells(rng, len(objs)))):
        draw_shape(draw, shape, cell_box(r, c), COLOURS[colour])
        if i < n_target:
            boxes.append(cell_box(r, c))
    return img, sorted(boxes)


def counting_task(rng: random.Random, d: int) -> Sample:
    target = (pick(rng, SHAPES), pick(rng, COLOURS))
    n_t = rng.randint(0 if d > 1 else 1, {1: 4, 2: 6, 3: 8}[d])
    n_o = {1: 0, 2: rng.randint(1, 3), 3: rng.randint(2, 5)}[d]
    img, _ = _scene(rng, n_t, [distinct(rng, target) for _ in range(n_o)], target)
    what = f"{target[1]} {target[0]}s" if d > 1 else f"{target[0]}s"
    return Sample("counting", img, f"How many {what} are in the image? {ANSWER_FORMAT}",
                  {"verifier": "counting", "answer": n_t}, str(n_t), d, reasoning=f"I count {n_t}.", kind="grid")


def grounding_task(rng: random.Random, d: int) -> Sample:
    target = (pick(rng, SHAPES), pick(rng, COLOURS))
    n_o = {1: rng.randint(1, 2), 2: rng.randint(2, 4), 3: rng.randint(4, 6)}[d]
    img, boxes = _scene(rng, 1, [distinct(rng, target, same_shape_ok=d > 1) for _ in range(n_o)], target)
    b, desc = boxes[0], f"the {target[1]} {target[0]}"
    q = f"Find {desc} in the image. Give its box as [x1, y1, x2, y2] in pixels. {ANSWER_FORMAT}"
    # Hit or miss at IoU 0.5 (Acc@0.5), not the IoU itself: under a graded IoU a box over the whole
    # image earns a little on every prompt, and the tiny policy's RL learnt exactly that (mean IoU 0.002).
    params = {"coords": "abs", "threshold": 0.5}
    return Sample("grounding", img, q, {"verifier": "grounding", "answer": list(b), "params": params},
                  f"[{b[0]}, {b[1]}, {b[2]}, {b[3]}]", d, reasoning=f"{desc.capitalize()} is there.", kind="grid")


def detection_task(rng: random.Random, d: int) -> Sample:
    shape = pick(rng, SHAPES)
    n_t = rng.randint(1, {1: 2, 2: 3, 3: 4}[d])
    n_o = rng.randint(0 if d == 1 else 1, {1: 1, 2: 3, 3: 4}[d])
    others = [(pick(rng, [s for s in SHAPES if s != shape]), pick(rng, COLOURS)) for _ in range(n_o)]
    img, boxes = _scene(rng, n_t, others, (shape, pick(rng, COLOURS)))
    q = f"Detect every {shape} in the image. {BOX_FORMAT} {ANSWER_FORMAT}"
    spec = {"verifier": "detection", "answer": [list(b) for b in boxes], "params": {"coords": "abs"}}
    return Sample("detection", img, q, spec, box_text(boxes), d, reasoning=f"I see {len(boxes)} {shape}(s).",
                  kind="grid")


def _glyph_row(draw, row: int, glyphs: Sequence[str], colour=(0, 0, 0), size: int = 22) -> None:
    """One glyph centred in each cell of ``row``, from the left."""
    for c, g in enumerate(glyphs):
        draw.text((c * CELL + CELL // 2, row * CELL + CELL // 2), g, fill=colour, font=font(size), anchor="mm")


def ocr_task(rng: random.Random, d: int) -> Sample:
    """Words spelled one letter per cell: d1 a 3-letter word, d2 4-5 letters, d3 two short words on two rows."""
    short = [w for w in WORDS if len(w) == 3]
    words = {1: lambda: [pick(rng, short)], 2: lambda: [pick(rng, [w for w in WORDS if len(w) in (4, 5)])],
             3: lambda: [pick(rng, short), pick(rng, short)]}[d]()
    img, draw = canvas(5 * CELL, CELL * len(words))
    for row, w in enumerate(words):
        _glyph_row(draw, row, w)
    text = " ".join(words)
    return Sample("ocr", img, f"Read the text in the image exactly. {ANSWER_FORMAT}", {"verifier": "ocr", "answer": text},
                  text, d, reasoning="The image shows some letters.", kind="grid")


def _arithmetic(rng: random.Random, d: int) -> Sample:
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    op = {1: "+", 2: pick(rng, "+-"), 3: "x"}[d]
    value = {"+": a + b, "-": a - b, "x": a * b}[op]
    img, draw = canvas(5 * CELL, CELL)
    _glyph_row(draw, 0, [str(a), op, str(b), "=", "?"])
    q = "What is the value of the expression in the image? (x means multiply) " + ANSWER_FORMAT
    return Sample("math", img, q, {"verifier": "math", "answer": str(value)}, str(value), d,
                  reasoning=f"{a} {op} {b} = {value}.", kind="grid-arithmetic")


def _cell_figure(rng: random.Random, d: int) -> Sample:
    """A rectangle of whole cells (d1 area, d2 area or perimeter) or a right triangle (d3 area), one
    unit per cell; the grid lines are drawn so the units can be counted."""
    img, draw = canvas(SIDE * CELL, SIDE * CELL)
    for k in range(1, SIDE):
        draw.line((k * CELL, 0, k * CELL, SIDE * CELL - 1), fill=GRID_LINE)
        draw.line((0, k * CELL, SIDE * CELL - 1, k * CELL), fill=GRID_LINE)
    w, h = rng.randint(1, SIDE), rng.randint(1, SIDE)
    x0, y0 = CELL * rng.randint(0, SIDE - w), CELL * rng.randint(0, SIDE - h)
    x1, y1 = x0 + w * CELL - 1, y0 + h * CELL - 1
    if d < 3:
        draw.rectangle((x0, y0, x1, y1), fill=(250, 210, 120), outline=(0, 0, 0), width=2)
        what = pick(rng, ("area", "perimeter")) if d == 2 else "area"
        value = w * h if what == "area" else 2 * (w + h)
        q = f"Each grid square is 1 unit. What is the {what} of the rectangle? "
        why = f"{w} x {h} = {value}" if what == "area" else f"2 x ({w} + {h}) = {value}"
    else:
        draw.polygon([(x0, y1), (x0, y0), (x1, y1)], fill=(250, 210, 120), outline=(0, 0, 0))
        value2 = w * h  # twice the area: keep the answer exact
        value = value2 // 2 if value2 % 2 == 0 else value2 / 2
        q = "Each grid square is 1 unit. What is the area of the right triangle? "
        why = f"{w} x {h} / 2 = {value}"
    return Sample("math", img, q + ANSWER_FORMAT, {"verifier": "math", "answer": str(value)}, str(value), d,
                  reasoning=why + ".", kind="grid-geometry")


def math_task(rng: random.Random, d: int) -> Sample:
    return _arithmetic(rng, d) if rng.random() < 0.5 else _cell_figure(rng, d)


def _columns(draw, heights: Sequence[float], fill, outline: bool) -> None:
    """Column i filled ``heights[i]`` cells up from the bottom of the SIDE-row plot; letters below."""
    for i, hgt in enumerate(heights):
        x0 = i * CELL
        if outline:
            draw.rectangle((x0 + INSET, 0, x0 + CELL - 1 - INSET, SIDE * CELL - 1), outline=(0, 0, 0), width=1)
        top = round(SIDE * CELL - hgt * CELL)
        draw.rectangle((x0 + INSET + 1, top, x0 + CELL - 2 - INSET, SIDE * CELL - 2), fill=fill)
    _glyph_row(draw, SIDE, LETTERS[: len(heights)], size=18)


def chart_task(rng: random.Random, d: int) -> Sample:
    """Bars a whole number of cells high; each cell is worth ``unit`` (stated in the question)."""
    n = 3 if d == 1 else 4
    unit = {1: 10, 2: 20, 3: 25}[d]
    heights = [rng.randint(1, SIDE) for _ in range(n)]
    img, draw = canvas(SIDE * CELL, (SIDE + 1) * CELL)
    for k in range(SIDE + 1):
        draw.line((0, k * CELL, SIDE * CELL - 1, k * CELL), fill=GRID_LINE)
    _columns(draw, heights, (60, 110, 200), outline=False)
    k = rng.randrange(n)
    value = heights[k] * unit
    q = (f"Each grid row of the bar chart is worth {unit}. What is the value of bar {LETTERS[k]}? "
         f"{ANSWER_FORMAT}")
    return Sample("chart", img, q, {"verifier": "numeric", "answer": value, "params": {"rel_tol": 0.02}},
                  str(value), d, reasoning=f"Bar {LETTERS[k]} is {heights[k]} rows high.", kind="grid-bar",
                  meta={"values": [h * unit for h in heights]})


def science_task(rng: random.Random, d: int) -> Sample:
    """Beakers of equal size, one per column; d1/d2 distinct whole-cell levels, d3 half cells."""
    n = 3 if d == 1 else 4
    step = 0.5 if d == 3 else 1.0
    levels = [step * k for k in rng.sample(range(1, int(SIDE / step) + 1), n)]
    img, draw = canvas(SIDE * CELL, (SIDE + 1) * CELL)
    _columns(draw, levels, WATER, outline=True)
    return beaker_sample(rng, img, levels, d, kind="grid-beakers")


def puzzle_task(rng: random.Random, d: int) -> Sample:
    """Five shapes in a periodic pattern, one per cell, then '?' in the sixth."""
    if d == 3:
        shapes, colours = pick(rng, SHAPES, 2), pick(rng, COLOURS, 3)
    else:
        shapes, colours = pick(rng, SHAPES, d + 1), [pick(rng, COLOURS)]
    seq = [(shapes[i % len(shapes)], colours[i % len(colours)]) for i in range(6)]
    img, draw = canvas(6 * CELL, CELL)
    for i, (shape, colour) in enumerate(seq[:5]):
        draw_shape(draw, shape, cell_box(0, i), COLOURS[colour])
    _glyph_row(draw, 0, [""] * 5 + ["?"])
    return pattern_sample(rng, img, seq, colours, d, kind="grid-pattern")


TASK_FNS = dict(math=math_task, puzzle=puzzle_task, science=science_task, chart=chart_task,
                detection=detection_task, grounding=grounding_task, counting=counting_task, ocr=ocr_task)
