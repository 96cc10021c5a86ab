"""Reasoning tasks: math (arithmetic, geometry off a figure), puzzle (shape/colour patterns),
science (diagram multiple choice), chart (read a bar or line chart).

Difficulty 1..3 widens value ranges, lengthens patterns, removes value labels and adds distractors.
"""
from __future__ import annotations

import random
import string
from fractions import Fraction

from dualrpo_mcore.data.synth.common import (
    ANSWER_FORMAT, COLOURS, SHAPES, Sample, canvas, draw_shape, font, pick,
)

LETTERS = string.ascii_uppercase


def _num(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{float(x):g}"


# ---- math -------------------------------------------------------------------------------------

def _arithmetic(rng: random.Random, d: int) -> Sample:
    if d == 1:
        a, b, op = rng.randint(1, 9), rng.randint(1, 9), "+"
    elif d == 2:
        a, b, op = rng.randint(10, 50), rng.randint(1, 30), pick(rng, "+-")
    else:
        a, b, op = rng.randint(2, 12), rng.randint(2, 12), "*"
    c = rng.randint(1, 20) if d == 3 else None
    expr = f"{a} {op} {b}" + (f" + {c}" if c else "")
    value = {"+": a + b, "-": a - b, "*": a * b}[op] + (c or 0)
    img, draw = canvas(112, 56)
    draw.text((56, 28), expr.replace("*", "x") + " = ?", fill=(0, 0, 0), font=font(14), anchor="mm")
    q = "What is the value of the expression in the image? (x means multiply) " + ANSWER_FORMAT
    return Sample("math", img, q, {"verifier": "math", "answer": str(value)}, str(value), d,
                  reasoning=f"{expr.replace('*', 'x')} = {value}.", kind="arithmetic")


def _geometry(rng: random.Random, d: int) -> Sample:
    img, draw = canvas(112, 112)
    f = font(12)
    if d < 3:
        w, h = rng.randint(2, 9 if d == 1 else 15), rng.randint(2, 9 if d == 1 else 15)
        pw, ph = min(20 + 4 * w, 80), min(20 + 4 * h, 80)
        x0, y0 = (112 - pw) // 2, (112 - ph) // 2
        draw.rectangle((x0, y0, x0 + pw, y0 + ph), outline=(0, 0, 0), width=2)
        draw.text((x0 + pw // 2, y0 - 2), str(w), fill=(200, 0, 0), font=f, anchor="md")
        draw.text((x0 + pw + 3, y0 + ph // 2), str(h), fill=(200, 0, 0), font=f, anchor="lm")
        what = pick(rng, ("area", "perimeter")) if d == 2 else "area"
        value = Fraction(w * h) if what == "area" else Fraction(2 * (w + h))
        why = f"{w} x {h} = {w * h}" if what == "area" else f"2 x ({w} + {h}) = {2 * (w + h)}"
        q = f"What is the {what} of the rectangle? Side lengths are written next to the sides. "
    else:
        a, b = rng.randint(2, 15), rng.randint(2, 15)
        pa, pb = min(20 + 4 * a, 80), min(20 + 4 * b, 80)
        x0, y0 = (112 - pb) // 2, (112 + pa) // 2
        draw.polygon([(x0, y0), (x0, y0 - pa), (x0 + pb, y0)], outline=(0, 0, 0), width=2)
        draw.rectangle((x0, y0 - 6, x0 + 6, y0), outline=(0, 0, 0))
        draw.text((x0 - 3, y0 - pa // 2), str(a), fill=(200, 0, 0), font=f, anchor="rm")
        draw.text((x0 + pb // 2, y0 + 2), str(b), fill=(200, 0, 0), font=f, anchor="ma")
        value = Fraction(a * b, 2)
        why = f"{a} x {b} / 2 = {_num(value)}"
        q = "What is the area of the right triangle? The legs' lengths are written next to them. "
    ans = _num(value)
    return Sample("math", img, q + ANSWER_FORMAT, {"verifier": "math", "answer": ans}, ans, d,
                  reasoning=why + ".", kind="geometry")


def math_task(rng: random.Random, d: int) -> Sample:
    return _arithmetic(rng, d) if rng.random() < 0.5 else _geometry(rng, d)


# ---- puzzle -----------------------------------------------------------------------------------

def choice_sample(task: str, img, stem: str, options, letter: str, d: int, reasoning: str, kind: str,
                  ask: str = "") -> Sample:
    """A multiple-choice question: ``stem``, the lettered ``options``, ``ask``, the answer format."""
    q = f"{stem} " + " ".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options)) + f". {ask}{ANSWER_FORMAT}"
    return Sample(task, img, q, {"verifier": "choice", "answer": letter, "params": {"options": options}}, letter, d,
                  reasoning=reasoning, kind=kind)


def pattern_sample(rng: random.Random, img, seq, colours, d: int, kind: str) -> Sample:
    """The puzzle question on a drawn pattern ``seq`` of ``(shape, colour)`` whose last item is the '?':
    four "colour shape" options, the right one among three wrong ones drawn from the puzzle's colours
    (plus one more)."""
    right = f"{seq[-1][1]} {seq[-1][0]}"
    wrong = set()
    while len(wrong) < 3:
        # sorted: set order depends on PYTHONHASHSEED and would break determinism
        cand = f"{pick(rng, sorted(set(colours) | {pick(rng, COLOURS)}))} {pick(rng, SHAPES)}"
        if cand != right:
            wrong.add(cand)
    options = sorted(wrong | {right})
    rng.shuffle(options)
    return choice_sample("puzzle", img, "The shapes follow a pattern. Which one replaces the question mark?", options,
                         LETTERS[options.index(right)], d, f"The pattern repeats; next is {right}.", kind,
                         ask="Answer with the letter. ")


def puzzle_task(rng: random.Random, d: int) -> Sample:
    """A row of shapes following a periodic pattern; which item replaces the '?'."""
    n_shown = 5
    if d == 1:
        shapes, colours = pick(rng, SHAPES, 2), [pick(rng, COLOURS)] * 1
    elif d == 2:
        shapes, colours = pick(rng, SHAPES, 3), [pick(rng, COLOURS)]
    else:
        shapes, colours = pick(rng, SHAPES, 2), pick(rng, COLOURS, 3)
    seq = [(shapes[i % len(shapes)], colours[i % len(colours)]) for i in range(n_shown + 1)]
    img, draw = canvas(168, 56)
    for i, (shape, colour) in enumerate(seq[:n_shown]):
        draw_shape(draw, shape, (4 + 28 * i, 18, 24 + 28 * i, 38), COLOURS[colour])
    draw.text((4 + 28 * n_shown + 10, 28), "?", fill=(0, 0, 0), font=font(18), anchor="mm")
    return pattern_sample(rng, img, seq, colours, d, kind="pattern")


# ---- science ----------------------------------------------------------------------------------

_CHAINS = [("grass", "rabbit", "fox", "wolf"), ("algae", "shrimp", "fish", "seal"),
           ("leaf", "caterpillar", "bird", "cat"), ("seeds", "mouse", "snake", "hawk")]


def _beakers(rng: random.Random, d: int) -> Sample:
    n = 3 if d == 1 else 4
    levels = rng.sample(range(10, 70, 4 if d < 3 else 2), n)
    img, draw = canvas(168, 112)
    for i, lv in enumerate(levels):
        x = 10 + 40 * i
        draw.rectangle((x, 20, x + 26, 92), outline=(0, 0, 0), width=2)
        draw.rectangle((x + 2, 91 - lv, x + 24, 90), fill=(90, 150, 230))
        draw.text((x + 13, 96), LETTERS[i], fill=(0, 0, 0), font=font(12), anchor="ma")
    return beaker_sample(rng, img, levels, d, kind="beakers")


def beaker_sample(rng: random.Random, img, levels, d: int, kind: str) -> Sample:
    """The science question on drawn beakers of water ``levels`` (one per letter): which holds the most
    (from d2 also: the least) water."""
    most = pick(rng, ("most", "least")) if d > 1 else "most"
    letter = LETTERS[levels.index(max(levels) if most == "most" else min(levels))]
    return choice_sample("science", img, f"The diagram shows beakers of the same size. Which beaker holds the {most} "
                         "water?", [f"beaker {LETTERS[i]}" for i in range(len(levels))], letter, d,
                         f"Beaker {letter} has the {most} water.", kind)


def _food_chain(rng: random.Random, d: int) -> Sample:
    chain = list(pick(rng, _CHAINS))[: 3 if d == 1 else 4]
    img, draw = canvas(168, 112)
    f = font(11)
    ys = [8 + i * (96 // (len(chain) - 1) - 2) for i in range(len(chain))][::-1]
    for i, name in enumerate(chain):
        draw.text((84, ys[i]), name, fill=(0, 0, 0), font=f, anchor="mt")
        if i:
            draw.line((84, ys[i - 1] - 2, 84, ys[i] + 14), fill=(0, 0, 0), width=1)
            draw.polygon([(80, ys[i] + 16), (88, ys[i] + 16), (84, ys[i] + 12)], fill=(0, 0, 0))
    kind = pick(rng, ("eats", "producer", "top")) if d > 1 else "eats"
    if kind == "eats":
        k = rng.randint(1, len(chain) - 1)
        right, q0 = chain[k - 1], f"What does the {chain[k]} eat?"
    elif kind == "producer":
        right, q0 = chain[0], "Which organism is the producer?"
    else:
        right, q0 = chain[-1], "Which organism is the top predator?"
    others = [o for c in _CHAINS for o in c if o not in chain]
    options = sorted(set(chain[: 3]) | {right})
    while len(options) < 4:
        options.append(pick(rng, others))
        options = sorted(set(options))
    rng.shuffle(options)
    return choice_sample("science", img, f"In the food chain diagram an arrow points from food to eater. {q0}", options,
                         LETTERS[options.index(right)], d, f"The answer is the {right}.", "food_chain")


def science_task(rng: random.Random, d: int) -> Sample:
    return _beakers(rng, d) if rng.random() < 0.5 else _food_chain(rng, d)


# ---- chart ------------------------------------------------------------------------------------

def chart_task(rng: random.Random, d: int) -> Sample:
    """Bar chart (d1 labelled values, d2 read off the 10-grid) or line chart (d3, 5-grid)."""
    n = 3 if d == 1 else rng.randint(4, 5)
    step = 10 if d < 3 else 5
    values = [rng.randint(1, 100 // step) * step for _ in range(n)]
    cats = LETTERS[:n]
    img, draw = canvas(112, 112)
    f = font(9)
    x0, y0, x1, y1 = 22, 8, 108, 96  # plot area; y = 0 at y1, 100 at y0
    ys = lambda v: y1 - (y1 - y0) * v / 100.0  # noqa: E731
    for t in range(0, 101, 20 if step == 10 else 10):
        draw.line((x0, ys(t), x1, ys(t)), fill=(210, 210, 210))
        draw.text((x0 - 2, ys(t)), str(t), fill=(0, 0, 0), font=f, anchor="rm")
    draw.line((x0, y0, x0, y1), fill=(0, 0, 0))
    draw.line((x0, y1, x1, y1), fill=(0, 0, 0))
    bw = (x1 - x0) // n
    centres = [x0 + bw * i + bw // 2 for i in range(n)]
    if d < 3:
        for c, v in zip(centres, values):
            draw.rectangle((c - bw // 3, ys(v), c + bw // 3, y1), fill=(60, 110, 200))
            if d == 1:
                draw.text((c, ys(v) - 1), str(v), fill=(0, 0, 0), font=f, anchor="md")
    else:
        pts = [(c, ys(v)) for c, v in zip(centres, values)]
        draw.line(pts, fill=(200, 40, 40), width=2)
        for p in pts:
            draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=(200, 40, 40))
    for c, name in zip(centres, cats):
        draw.text((c, y1 + 2), name, fill=(0, 0, 0), font=f, anchor="ma")
    k = rng.randrange(n)
    what = "bar" if d < 3 else "point"
    q = (f"What is the value of {what} {cats[k]} in the chart? Read it off the y-axis. "
         f"{ANSWER_FORMAT}")
    spec = {"verifier": "numeric", "answer": values[k], "params": {"rel_tol": 0.02}}
    return Sample("chart", img, q, spec, str(values[k]), d,
                  reasoning=f"{what.capitalize()} {cats[k]} reaches {values[k]}.",
                  kind="bar" if d < 3 else "line", meta={"values": values})
