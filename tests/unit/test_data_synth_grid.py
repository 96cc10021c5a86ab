"""Grid layout of the synthetic set: answers checked against an independent reading of the pixels."""
import hashlib
import json
import re

import numpy as np
import pytest

from dualrpo_mcore.data import synth
from dualrpo_mcore.data.schema import TASKS
from dualrpo_mcore.data.synth.common import COLOURS, SHAPES, canvas, font
from dualrpo_mcore.verifiers.scoring import score

CELL, INSET, SIDE = 28, 3, 4
N = 60  # indices 0..59: difficulty cycles 1, 2, 3
FILL, BLACK = (250, 210, 120), (0, 0, 0)
BAR, WATER = (60, 110, 200), (90, 150, 230)


def _gen(task, i):
    return synth.generate(task, i, seed=11, layout="grid")


def _px(s):
    return np.asarray(s.image.convert("RGB")).astype(int)


def _mask(a, rgb):
    return (a == np.array(rgb)).all(-1)


def _nonwhite(a):
    return (a != 255).any(-1)


def _bbox(m, dx=0, dy=0):
    ys, xs = np.nonzero(m)
    return [int(xs.min()) + dx, int(ys.min()) + dy, int(xs.max()) + dx, int(ys.max()) + dy]


def _colour(cell):
    """The colour name of a cell's object: its pixels must all be exactly one COLOURS entry."""
    px = {tuple(p) for p in cell[_nonwhite(cell)]}
    names = [n for n, rgb in COLOURS.items() if tuple(rgb) in px]
    return names[0] if len(names) == 1 and len(px) == 1 else f"?{sorted(px)[:3]}"


def _shape(m):
    """Classify a filled 22x22 box by its fill pattern (not by re-drawing it)."""
    rows = m.sum(1)
    frac = m.sum() / m.size
    if frac > 0.95:
        return "square"
    if rows[-1] >= 20 and rows[0] <= 4:
        return "triangle"
    if 0.65 < frac < 0.9 and rows[0] >= 4 and rows[len(rows) // 2] == m.shape[1]:
        return "circle"
    if 0.4 < frac < 0.6 and rows[0] <= 4 and rows[-1] <= 4 and rows[len(rows) // 2 - 1:len(rows) // 2 + 1].max() >= 20:
        return "diamond"
    return f"?(frac {frac:.2f}, rows {rows.tolist()})"


def _objects(task, i, a, rows=SIDE, cols=SIDE):
    """{(r, c): (shape, colour, tight box)} of the non-empty cells; no object may leave its inset box."""
    out = {}
    nw = _nonwhite(a)
    for r in range(rows):
        for c in range(cols):
            cell = nw[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            if not cell.any():
                continue
            inner = cell[INSET:CELL - INSET, INSET:CELL - INSET]
            assert inner.sum() == cell.sum(), f"{task}[{i}]: cell ({r},{c}) has pixels in its {INSET}-px border"
            rgb = a[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL]
            out[(r, c)] = (_shape(inner), _colour(rgb), _bbox(cell, c * CELL, r * CELL))
            assert not out[(r, c)][0].startswith("?"), f"{task}[{i}]: cell ({r},{c}) shape {out[(r, c)][0]}"
            assert not out[(r, c)][1].startswith("?"), f"{task}[{i}]: cell ({r},{c}) colour {out[(r, c)][1]}"
    return out


@pytest.mark.parametrize("task", TASKS)
def test_sides_multiple_of_cell_and_canonical_response_scores_one(task):
    for i in range(N):
        s = _gen(task, i)
        w, h = s.image.size
        assert w % CELL == 0 and h % CELL == 0, f"{task}[{i}]: image {w}x{h} not a multiple of {CELL}"
        assert s.difficulty == 1 + i % 3, f"{task}[{i}]: difficulty {s.difficulty}"
        assert score(s.reward, s.response()) == pytest.approx(1.0), f"{task}[{i}]: canonical response < 1"


def test_counting_matches_pixels():
    for i in range(N):
        s, d = _gen("counting", i), 1 + i % 3
        objs = _objects("counting", i, _px(s))
        m = re.search(r"How many (?:(\w+) )?(\w+)s are", s.question)
        colour, shape = (m.group(1), m.group(2)) if d > 1 else (None, m.group(2))
        assert shape in SHAPES, f"counting[{i}]: question shape {shape!r}"
        if d == 1:
            assert len(objs) == s.reward["answer"], f"counting[{i}]: {len(objs)} cells vs answer {s.reward['answer']}"
            assert {o[0] for o in objs.values()} == {shape}, f"counting[{i}]: d1 shapes {objs} vs {shape}"
        else:
            n = sum(o[0] == shape and o[1] == colour for o in objs.values())
            assert n == s.reward["answer"], f"counting[{i}]: {n} {colour} {shape}s in pixels vs {s.reward['answer']}"


def test_grounding_box_is_the_described_object():
    for i in range(N):
        s = _gen("grounding", i)
        colour, shape = re.search(r"Find the (\w+) (\w+) in", s.question).groups()
        objs = _objects("grounding", i, _px(s))
        hits = [o[2] for o in objs.values() if o[0] == shape and o[1] == colour]
        assert len(hits) == 1, f"grounding[{i}]: {len(hits)} cells hold the {colour} {shape}: {objs}"
        assert s.reward["answer"] == hits[0], f"grounding[{i}]: answer {s.reward['answer']} vs pixels {hits[0]}"


def test_grounding_scores_hits_not_overlap():
    """The right cell scores 1; a box over the whole scene, or the right cell shifted half a cell,
    scores 0 (IoU 0.004 and 0.33 against the 22-px cell); a 2-px shift still hits (IoU 0.70)."""
    s = _gen("grounding", 0)
    x1, y1, x2, y2 = s.reward["answer"]
    assert score(s.reward, f"<answer>[{x1}, {y1}, {x2}, {y2}]</answer>") == 1.0
    assert score(s.reward, f"<answer>[0, 0, {SIDE * CELL * 3}, {SIDE * CELL * 3}]</answer>") == 0.0
    assert score(s.reward, f"<answer>[{x1 + 11}, {y1}, {x2 + 11}, {y2}]</answer>") == 0.0
    assert score(s.reward, f"<answer>[{x1 + 2}, {y1 + 2}, {x2 + 2}, {y2 + 2}]</answer>") == 1.0


def test_detection_boxes_are_the_asked_shape():
    for i in range(N):
        s = _gen("detection", i)
        shape = re.search(r"Detect every (\w+) in", s.question).group(1)
        objs = _objects("detection", i, _px(s))
        want = sorted(o[2] for o in objs.values() if o[0] == shape)
        assert sorted(s.reward["answer"]) == want, f"detection[{i}]: answer {s.reward['answer']} vs pixels {want}"


def test_chart_bar_height_times_unit():
    for i in range(N):
        s = _gen("chart", i)
        unit = int(re.search(r"worth (\d+)\.", s.question).group(1))
        k = ord(re.search(r"value of bar ([A-D])\?", s.question).group(1)) - 65
        bar = _mask(_px(s), BAR)[:SIDE * CELL, k * CELL:(k + 1) * CELL]
        assert bar.any(), f"chart[{i}]: no bar pixels in column {k}"
        assert not _mask(_px(s), BAR)[SIDE * CELL:].any(), f"chart[{i}]: bar pixels below the plot"
        cells = bar.any(1).sum() / CELL
        assert round(cells) * unit == s.reward["answer"], \
            f"chart[{i}]: bar {'ABCD'[k]} is {cells:.2f} cells x {unit} vs answer {s.reward['answer']}"
        assert abs(cells - round(cells)) < 0.1, f"chart[{i}]: bar height {cells:.2f} cells not whole"


def test_science_answer_beaker_has_most_or_least_water():
    for i in range(N):
        s = _gen("science", i)
        most = re.search(r"holds the (most|least) water", s.question).group(1)
        n = len(s.reward["params"]["options"])
        water = _mask(_px(s), WATER)
        amounts = [int(water[:, c * CELL:(c + 1) * CELL].sum()) for c in range(n)]
        assert all(amounts), f"science[{i}]: an empty beaker: {amounts}"
        best = (max if most == "most" else min)(amounts)
        assert amounts.count(best) == 1, f"science[{i}]: tie in water {amounts}"
        got = "ABCD"[amounts.index(best)]
        assert s.reward["answer"] == got, f"science[{i}]: {most} water is {got} {amounts}, answer {s.reward['answer']}"


_GLYPHS = "123456789+-x=?"


def _glyph_templates():
    out = {}
    for g in _GLYPHS:
        img, draw = canvas(CELL, CELL)
        draw.text((CELL // 2, CELL // 2), g, fill=(0, 0, 0), font=font(22), anchor="mm")
        out[g] = np.asarray(img).astype(int)
    return out


def test_math_geometry_and_arithmetic_from_pixels():
    kinds, tpl = set(), _glyph_templates()
    for i in range(2 * N):
        s = _gen("math", i)
        a, ans = _px(s), float(s.reward["answer"])
        kinds.add(s.kind)
        if s.kind == "grid-geometry":
            assert a.shape[:2] == (SIDE * CELL, SIDE * CELL), f"math[{i}]: geometry image {a.shape}"
            fig = _mask(a, FILL) | _mask(a, BLACK)
            x1, y1, x2, y2 = _bbox(fig)
            w, h = (x2 - x1 + 1) / CELL, (y2 - y1 + 1) / CELL
            assert w == int(w) and h == int(h), f"math[{i}]: figure {x2 - x1 + 1}x{y2 - y1 + 1} px not whole cells"
            assert x1 % CELL == 0 and y1 % CELL == 0, f"math[{i}]: figure at ({x1},{y1}) off the grid"
            if "rectangle" in s.question:
                assert fig.sum() == w * h * CELL * CELL, f"math[{i}]: rectangle not solid ({fig.sum()} px)"
                want = w * h if "area of the rectangle" in s.question else 2 * (w + h)
                assert "perimeter" in s.question or "area" in s.question, f"math[{i}]: {s.question}"
            else:
                assert "right triangle" in s.question, f"math[{i}]: {s.question}"
                assert abs(fig.sum() / (w * h * CELL * CELL) - 0.5) < 0.05, f"math[{i}]: triangle {fig.sum()} px"
                want = w * h / 2
            assert ans == want, f"math[{i}]: pixels give {w:g}x{h:g} -> {want:g}, answer {ans:g}"
        else:
            assert s.kind == "grid-arithmetic", f"math[{i}]: kind {s.kind}"
            assert a.shape[:2] == (CELL, 5 * CELL), f"math[{i}]: arithmetic image {a.shape}"
            read = ""
            for c in range(5):
                cell = a[:, c * CELL:(c + 1) * CELL]
                match = [g for g, t in tpl.items() if np.abs(t - cell).max() < 40]
                assert len(match) == 1, f"math[{i}]: cell {c} matches glyphs {match}"
                read += match[0]
            assert read[3:] == "=?", f"math[{i}]: read {read!r}"
            x, op, y = int(read[0]), read[1], int(read[2])
            want = {"+": x + y, "-": x - y, "x": x * y}[op]
            assert ans == want, f"math[{i}]: image reads {read!r} = {want}, answer {ans:g}"
    assert kinds == {"grid-geometry", "grid-arithmetic"}, kinds


def test_puzzle_right_option_continues_the_pattern():
    for i in range(N):
        s = _gen("puzzle", i)
        a = _px(s)
        assert a.shape[:2] == (CELL, 6 * CELL), f"puzzle[{i}]: image {a.shape}"
        objs = _objects("puzzle", i, a[:, :5 * CELL], rows=1, cols=5)
        assert sorted(objs) == [(0, c) for c in range(5)], f"puzzle[{i}]: shape cells {sorted(objs)}"
        assert _nonwhite(a[:, 5 * CELL:]).any(), f"puzzle[{i}]: '?' cell is empty"
        seq = [objs[(0, c)] for c in range(5)]

        def period(j):
            return next(p for p in range(1, 5) if all(seq[t][j] == seq[t + p][j] for t in range(5 - p)))

        nxt = f"{seq[5 - period(1)][1]} {seq[5 - period(0)][0]}"
        opts = dict(re.findall(r"\(([A-D])\) (\w+ \w+)", s.question))
        assert list(opts.values()) == s.reward["params"]["options"], f"puzzle[{i}]: options {opts}"
        right = [k for k, v in opts.items() if v == nxt]
        assert right == [s.reward["answer"]], f"puzzle[{i}]: pixels predict {nxt!r} {right}, answer {s.reward['answer']}"


def test_ocr_one_letter_per_cell():
    for i in range(N):
        s = _gen("ocr", i)
        a = _px(s)
        words = s.reward["answer"].split()
        assert a.shape[:2] == (CELL * len(words), 5 * CELL), f"ocr[{i}]: image {a.shape} for {words}"
        dark = (a < 160).any(-1)
        for r, w in enumerate(words):
            cells = [bool(dark[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL].any()) for c in range(5)]
            assert cells == [True] * len(w) + [False] * (5 - len(w)), f"ocr[{i}]: row {r} cells {cells} vs {w!r}"


def _digest(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_write_split_grid_deterministic_and_differs_from_free(tmp_path):
    a, b, c = (str(tmp_path / f"{n}.parquet") for n in "abc")
    synth.write_split(a, 2, seed=3, split="train", layout="grid")
    synth.write_split(b, 2, seed=3, split="train", layout="grid")
    synth.write_split(c, 2, seed=3, split="train", layout="free")
    assert _digest(a) == _digest(b), "grid layout: same seed gave different bytes"
    assert _digest(a) != _digest(c), "grid and free layouts wrote identical files"
    with pytest.raises(ValueError, match="bogus"):
        synth.generate("counting", 0, layout="bogus")
    with pytest.raises(ValueError, match="bogus"):
        synth.write_split(str(tmp_path / "d.parquet"), 1, seed=0, split="train", layout="bogus")


def test_cli_layout_grid_manifest(tmp_path):
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from dualrpo_mcore.cli import main

    out = tmp_path / "g"
    assert main(["data", "synth", "--out", str(out), "--num-per-task", "2", "--seed", "1",
                 "--layout", "grid", "--no-tokenizer"]) == 0
    assert json.loads((out / "manifest.json").read_text())["layout"] == "grid"
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert len(rows) == 2 * len(TASKS)
    for row in rows:
        w, h = Image.open(io.BytesIO(row["images"][0]["bytes"])).size
        assert w % CELL == 0 and h % CELL == 0, f"{row['id']}: stored image {w}x{h}"
