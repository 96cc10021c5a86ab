#!/usr/bin/env python
"""(ground truth, response) pairs for the ``vtriune`` reward profile, and their expected rewards.

    python scripts/vtriune_cases.py build [--out tests/data/vtriune_reward_cases.json]
    python scripts/vtriune_cases.py expect --reward-server DIR [--out ...]

``build`` writes the pairs: rows in Orsta's layout (``reward_model`` with ``ground_truth``,
``verifier``, ``accuracy_ratio``, ``format_ratio``, ``verifier_parm``) over the eight tasks, with
plain, equivalent, wrong and adversarial responses, plus the training step and the IoU threshold
mode each is scored at. ``expect`` fills ``expected`` by running V-Triune's own reward server code
once: ``DIR`` is ``reward_server/`` of a checkout of github.com/MiniMax-AI/One-RL-to-See-Them-All
at commit 39bcf0d, imported from there (nothing of it is copied here). Run it in an environment
with their dependencies (math-verify, numpy, pycocotools, matplotlib, fastapi, pydantic); each
sample goes through their ``/judge`` handler (``reward_serving_fastapi.judge_reward``), so the
weighting and the exception handling are theirs as well.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

DEFAULT_OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                            "tests", "data", "vtriune_reward_cases.json"))
SOURCE = {"repo": "https://github.com/MiniMax-AI/One-RL-to-See-Them-All",
          "commit": "39bcf0d0537d7aa211d2f6ce73c8e51c396c1adb",
          "files": ["reward_server/verify.py", "reward_server/utils/det_helper.py",
                    "reward_server/reward_serving_fastapi.py"],
          "note": "'expected' is the final_reward their /judge handler returned for each case, computed "
                  "once by running that code (scripts/vtriune_cases.py expect); the code is not included.",
          "licence": "MIT License. Copyright (c) 2025 MiniMax. Permission is hereby granted, free of charge, "
                     "to any person obtaining a copy of this software and associated documentation files (the "
                     "\u201cSoftware\u201d), to deal in the Software without restriction, including without "
                     "limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or "
                     "sell copies of the Software, and to permit persons to whom the Software is furnished to do "
                     "so, subject to the following conditions: The above copyright notice and this permission "
                     "notice shall be included in all copies or substantial portions of the Software. THE "
                     "SOFTWARE IS PROVIDED \u201cAS IS\u201d, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, "
                     "INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR "
                     "PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE "
                     "FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR "
                     "OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER "
                     "DEALINGS IN THE SOFTWARE."}
MATH_TASKS = ("math", "puzzle", "science", "chart", "ocr", "counting")
THINK = "<think>\nLet me look at the image carefully.\n</think>\n"

# (task, ground truth, right answers, wrong answers): responses are built around these
MATH_GOLDS = [
    ("math", "\\boxed{12}", ["12", "12.0", "\\frac{24}{2}"], ["13", "1 2"]),
    ("math", "\\boxed{\\frac{3}{4}}", ["\\frac{3}{4}", "0.75", "3/4", "\\dfrac{3}{4}"], ["\\frac{4}{3}", "0.7"]),
    ("math", "\\boxed{2\\sqrt{3}}", ["2\\sqrt{3}", "\\sqrt{12}", "3.4641016"], ["3\\sqrt{2}"]),
    ("math", "\\boxed{30^\\circ}", ["30^\\circ", "30", "30^{\\circ}"], ["60^\\circ"]),
    ("math", "\\boxed{(1, 2)}", ["(1, 2)", "(1,2)"], ["(2, 1)", "1, 2"]),
    ("math", "\\boxed{[0, 1)}", ["[0, 1)", "[0,1)"], ["(0, 1)"]),
    ("math", "\\boxed{x=2}", ["x=2", "2"], ["x=3"]),
    ("math", "\\boxed{\\pi}", ["\\pi", "3.14159265"], ["3.14"]),
    ("math", "3/4", ["0.75", "\\frac{3}{4}"], ["4/3"]),
    ("math", "The answer is $\\frac{1}{2}$", ["\\frac{1}{2}", "0.5"], ["2"]),
    ("math", "\\boxed{-3}", ["-3", "- 3"], ["3"]),
    ("math", "\\boxed{1,000}", ["1000", "1,000", "1\\,000"], ["100"]),
    ("puzzle", "\\boxed{B}", ["B", "b", "\\text{B}", "(B)"], ["C", "B, C"]),
    ("puzzle", "\\boxed{A}", ["A", "a"], ["D", "AB"]),
    ("puzzle", "\\boxed{7}", ["7", "7.0"], ["8"]),
    ("puzzle", "A", ["A"], ["B"]),
    ("science", "\\boxed{C}", ["C", "c", "\\mathrm{C}"], ["A"]),
    ("science", "\\boxed{9.8}", ["9.8", "9.80"], ["9.81"]),
    ("science", "\\boxed{D}", ["D"], ["d e"]),
    ("chart", "\\boxed{45.2}", ["45.2", "45.20"], ["45.2\\%", "45"]),
    ("chart", "\\boxed{23\\%}", ["23\\%", "23"], ["0.23", "24\\%"]),
    ("chart", "45.2", ["45.2"], ["45.2\\%", "45.3"]),
    ("chart", "\\boxed{2019}", ["2019"], ["2018"]),
    ("chart", "\\boxed{1.5}", ["1.5", "\\frac{3}{2}", "1.50"], ["15"]),
    ("ocr", "\\boxed{STOP}", ["STOP", "stop", "Stop", "\\text{STOP}"], ["GO", "SPOT"]),
    ("ocr", "\\boxed{hello world}", ["hello world", "Hello World"], ["hello"]),
    ("ocr", "\\boxed{Coca-Cola}", ["Coca-Cola", "coca-cola"], ["Pepsi"]),
    ("ocr", "\\boxed{2024}", ["2024"], ["2025"]),
    ("ocr", "\\boxed{\\text{Main St}}", ["\\text{Main St}", "Main St"], ["Elm St"]),
    ("counting", "\\boxed{5}", ["5", "five"], ["4", "6"]),
    ("counting", "\\boxed{12}", ["12"], ["11"]),
    ("counting", "5", ["5"], ["6"]),
    ("counting", "\\boxed{0}", ["0"], ["1"]),
]

# responses, each a function of the answer text: (name, template)
MATH_FORMS = [
    ("tags_boxed", lambda a: f"{THINK}<answer>\n\\boxed{{{a}}}\n</answer>"),
    ("boxed_only", lambda a: f"The result is \\boxed{{{a}}}."),
    ("tags_plain", lambda a: f"{THINK}<answer>\n{a}\n</answer>"),
    ("tags_dollar", lambda a: f"{THINK}<answer>\n${a}$\n</answer>"),
    ("answer_is_dollar", lambda a: f"So the answer is ${a}$."),
    ("answer_colon_dollar", lambda a: f"Answer: ${a}$"),
    ("final_answer_is", lambda a: f"Thus the final answer is $ {a} $"),
    ("dollar_boxed", lambda a: f"Hence $\\boxed{{{a}}}$"),
    ("display_boxed", lambda a: f"We get\n\\[\n\\boxed{{{a}}}\n\\]\n"),
    ("unanchored_dollar", lambda a: f"We compute ${a}$ here."),
    ("tags_no_newline", lambda a: f"<think>ok</think><answer>\\boxed{{{a}}}</answer>"),
    ("paren_env", lambda a: f"the answer is \\({a}\\)"),
]


def _ratios(rng: random.Random):
    return rng.choice([(None, None), (1.0, 0.1), (0.9, 0.1), (1.0, 0.0), (1.0, 1.0), (0.8, 0.2)])


def _math_case(cid, task, gold, response, rng, note):
    ar, fr = _ratios(rng)
    return {"id": cid, "task": task, "verifier": "mathverify", "solution": gold, "response": response,
            "verifier_parm": {}, "accuracy_ratio": ar, "format_ratio": fr, "step": 1, "total_steps": 100,
            "iou_threshold": "dynamic", "note": note}


def math_cases(rng: random.Random):
    out = []
    for g, (task, gold, rights, wrongs) in enumerate(MATH_GOLDS):
        forms = rng.sample(MATH_FORMS, 6)
        for k, ans in enumerate(rights + wrongs):
            for j in range(2):  # each answer in two of the six forms
                name, form = forms[(2 * k + j) % len(forms)]
                note = ("right" if ans in rights else "wrong") + f" answer, {name}"
                out.append(_math_case(f"{task}-{g:02d}-{k}-{j}", task, gold, form(ans), rng, note))
    return out


def math_adversarial(rng: random.Random):
    gold = "\\boxed{12}"
    items = [
        ("two different boxes", f"{THINK}<answer>\n\\boxed{{12}} or \\boxed{{13}}\n</answer>"),
        ("same box twice", "\\boxed{12}, \\boxed{12}"),
        ("boxes far apart", "First \\boxed{13}. " + "Wait, let me recheck the sum carefully. " * 3 + "\\boxed{12}"),
        ("box then other box close", "\\boxed{12}\\boxed{14}"),
        ("empty box", f"{THINK}<answer>\n\\boxed{{}}\n</answer>"),
        ("unclosed box", "\\boxed{12"),
        ("nested braces", "\\boxed{{{12}}}"),
        ("box in text command", "\\boxed{\\text{12}}"),
        ("python code", "\\boxed{__import__('os').system('echo 12')}"),
        ("eval string", "answer: $eval('6*2')$"),
        ("exponent tower", "\\boxed{2^{2^{2^{2^{2^{2}}}}}}"),
        ("huge factorial", "\\boxed{100000!}"),
        ("long digits", "\\boxed{" + "9" * 300 + "}"),
        ("sum command", "\\boxed{\\sum_{i=1}^{3} 4}"),
        ("many boxes", " ".join("\\boxed{%d}" % i for i in range(20))),
        ("answer far before dollar", "answer " + "x" * 60 + " $12$"),
        ("answer word in tag", "<answer>$12$</answer>"),
        ("uppercase ANSWER", "ANSWER: $12$"),
        ("display dollars", "the answer is $$12$$"),
        ("inline bracket", "the answer is [12] "),
        ("frac without env", "answer: \\frac{24}{2}"),
        ("percent word", "\\boxed{12 percent}"),
        ("unit text", "\\boxed{12 \\text{ cm}}"),
        ("thousands with space", "\\boxed{12.000}"),
        ("leading zero", "\\boxed{012}"),
        ("unicode minus", "\\boxed{−12}"),
        ("null byte", "\\boxed{12}\x00"),
        ("only think", "<think>\n12\n</think>\n"),
        ("empty response", ""),
        ("whitespace", "   \n\t "),
        ("dollar inside box", "\\boxed{$12$}"),
        ("escaped dollar", "answer: \\$12\\$"),
        ("equation chain", "\\boxed{x = 6 + 6 = 12}"),
        ("set braces", "\\boxed{\\{12\\}}"),
        ("matrix", "\\boxed{\\begin{pmatrix} 12 \\end{pmatrix}}"),
        ("fbox", "\\fbox{12}"),
        ("boxed space brace", "\\boxed {12}"),
        ("answer then box", "answer: $13$ and finally \\boxed{12}"),
        ("box then answer", "\\boxed{12} so the answer is $13$"),
        ("newline in dollars", "answer: $1\n2$"),
        ("interval", "\\boxed{(11, 13)}"),
        ("approx", "\\boxed{\\approx 12}"),
        ("plus minus", "\\boxed{12 \\pm 0}"),
        ("scientific", "\\boxed{1.2 \\times 10^{1}}"),
        ("repeated tags", "<think>\n</think>\n<think>\n</think>\n<answer>\n\\boxed{12}\n</answer>\n<answer>\n"),
        ("deep nesting", "\\boxed{" + "{" * 200 + "12" + "}" * 200 + "}"),
        ("many dollars", "$" * 101 + "12"),
        ("latex frac box", "\\boxed{\\frac{36}{3}}"),
        ("log", "\\boxed{\\log_{2} 4096}"),
        ("decimal comma", "\\boxed{12,0}"),
        ("infinity", "\\boxed{\\infty}"),
        ("imaginary unit", "\\boxed{12 + 0i}"),
        ("sqrt of negative", "\\boxed{\\sqrt{-144}}"),
        ("anagram text", "\\boxed{21}"),
        ("text with braces", "\\boxed{\\text{twelve}}"),
        ("percent sign plain", "\\boxed{1200%}"),
        ("mixed number", "\\boxed{11\\frac{2}{2}}"),
        ("comma thousands", "\\boxed{0,012}"),
        ("boxed after think only", "<think>\n\\boxed{13}\n</think>\n<answer>\n\\boxed{12}\n</answer>"),
        ("box inside answer and text after", "<answer>\n\\boxed{12}\n</answer> but maybe \\boxed{13}"),
    ]
    out = [_math_case(f"adv-math-{i:02d}", MATH_TASKS[i % len(MATH_TASKS)], gold, r, rng, n)
           for i, (n, r) in enumerate(items)]
    pct = [  # a percentage gold, read by both sides' rules
        ("percent after env", "answer: $12$%"), ("percent word after env", "answer: $12$ percent"),
        ("two envs joined", "answer: $12$ and $13$"), ("plain box then env box", "\\boxed{13} and $\\boxed{12\\%}$"),
        ("display bracket", "the answer is \\[12\\%\\]"), ("fraction percent", "\\boxed{\\frac{12}{100}}"),
        ("decimal", "\\boxed{0.12}"), ("percent box", "\\boxed{12\\%}"),
    ]
    out += [_math_case(f"adv-pct-{i}", "chart", "\\boxed{12\\%}", r, rng, n) for i, (n, r) in enumerate(pct)]
    return out


def format_cases(rng: random.Random):
    bodies = [
        ("all four tags", "<think>\nx\n</think>\n<answer>\n\\boxed{5}\n</answer>"),
        ("no newline after think", "<think>x\n</think>\n<answer>\n\\boxed{5}\n</answer>"),
        ("no newline before answer close", "<think>\nx\n</think>\n<answer>\n\\boxed{5}</answer>"),
        ("two think blocks", "<think>\nx\n</think>\n<think>\ny\n</think>\n<answer>\n\\boxed{5}\n</answer>"),
        ("answer only", "<answer>\n\\boxed{5}\n</answer>"),
        ("crlf", "<think>\r\nx\r\n</think>\r\n<answer>\r\n\\boxed{5}\r\n</answer>"),
        ("trailing text", "<think>\nx\n</think>\n<answer>\n\\boxed{5}\n</answer> done"),
        ("spaces in tags", "< think>\nx\n</think >\n<answer>\n\\boxed{5}\n</answer>"),
    ]
    out = []
    for i, (n, r) in enumerate(bodies):
        for ar, fr in ((1.0, 0.1), (1.0, 1.0)):
            c = _math_case(f"fmt-{i}-{int(fr * 10)}", "counting", "\\boxed{5}", r, rng, "format: " + n)
            c["accuracy_ratio"], c["format_ratio"] = ar, fr
            out.append(c)
    return out


# ---------------------------------------------------------------------------------------------
# detection and grounding

LABELS = ("cat", "dog", "person", "car")
RATIO_SETS = [
    {"iou_max_label_first": 1.0, "iou_max_iou_first": 0.0, "iou_completeness": 0.3, "map": 0.0,
     "map50": 0.0, "map75": 0.0},
    {"iou_max_label_first": 0.0, "iou_max_iou_first": 1.0, "iou_completeness": 0.3, "map": 0.0,
     "map50": 0.0, "map75": 0.0},
    {"iou_max_label_first": 0.5, "iou_max_iou_first": 0.5, "iou_completeness": 0.5},
    {"map": 1.0},
    {"map50": 0.5, "iou_max_label_first": 0.5, "iou_completeness": 0.0},
    {"map75": 1.0, "map": 0.5},
    {"iou_max_label_first": 1.0, "iou_completeness": 1.0},
]


def _box(rng, size=1000):
    x1, y1 = rng.randint(0, size - 200), rng.randint(0, size - 200)
    return [x1, y1, x1 + rng.randint(40, 199), y1 + rng.randint(40, 199)]


def _jitter(box, rng, amount):
    return [v + rng.randint(-amount, amount) for v in box]


def _fmt_boxes(items, quote="'"):
    parts = [f"{{{quote}bbox_2d{quote}: {b}, {quote}label{quote}: {quote}{lab}{quote}}}" for b, lab in items]
    return "[" + ", ".join(parts) + "]"


def _det_response(items, rng, quote="'"):
    style = rng.random()
    body = _fmt_boxes(items, quote)
    if style < 0.7:
        return f"{THINK}<answer>\n{body}\n</answer>"
    if style < 0.85:
        return f"<answer>{body}</answer>"
    return f"<think>x</think>\n<answer>\n{body}\n</answer>"


def _det_case(cid, task, gt_items, response, rng, note, **kw):
    gt = kw.pop("solution", None) or f"<answer>{_fmt_boxes(gt_items)}</answer>"
    ar, fr = kw.pop("ratios", None) or rng.choice([(None, None), (1.0, 0.1), (0.9, 0.1), (1.0, 0.0)])
    parm = {"det_verifier_normalized": False, "det_reward_ratio": kw.pop("ratio", rng.choice(RATIO_SETS))}
    parm.update(kw.pop("parm", {}))
    step = kw.pop("step", rng.choice([0, 5, 10, 11, 20, 25, 26, 60, 100]))
    case = {"id": cid, "task": task, "verifier": "detection", "solution": gt, "response": response,
            "verifier_parm": parm, "accuracy_ratio": ar, "format_ratio": fr, "step": step,
            "total_steps": 100, "iou_threshold": kw.pop("iou_threshold", "dynamic"), "note": note}
    if "image_hw" in kw:  # [height, width] the model saw; theirs receives it as image_grid_thw
        case["image_hw"] = kw.pop("image_hw")
    return case


def det_cases(rng: random.Random):
    out = []
    for i in range(110):
        task = "grounding" if i % 3 == 0 else "detection"
        n = 1 if task == "grounding" else rng.randint(1, 5)
        gt = [(_box(rng), rng.choice(LABELS[:2] if i % 2 else LABELS)) for _ in range(n)]
        kind = i % 11
        if kind == 0:
            pred, note = list(gt), "exact"
        elif kind in (1, 2, 3):
            amount = (2, 6, 15)[kind - 1]
            pred, note = [(_jitter(b, rng, amount), lab) for b, lab in gt], f"jitter {amount}px"
        elif kind == 4:
            pred, note = gt[:-1] if n > 1 else [], "one box missing"
        elif kind == 5:
            pred, note = gt + [(_box(rng), rng.choice(LABELS))], "one extra box"
        elif kind == 6:
            pred, note = [(b, lab.upper()) for b, lab in gt], "labels upper-cased"
        elif kind == 7:
            pred, note = [(b, "truck") for b, _ in gt], "wrong labels"
        elif kind == 8:
            pred, note = list(reversed(gt)) + gt[:1], "reversed plus a duplicate"
        elif kind == 9:
            pred, note = [([b[2], b[1], b[0], b[3]], lab) for b, lab in gt[:1]] + gt[1:], "first box x1 > x2"
        else:
            pred, note = [([v + 0.4 for v in b], lab) for b, lab in gt], "float coordinates"
        resp = _det_response(pred, rng, quote=rng.choice(["'", '"']))
        kw = {}
        if i % 13 == 0:
            kw["iou_threshold"] = rng.choice(["average", "0.5", "0.75"])
        out.append(_det_case(f"{task}-{i:03d}", task, gt, resp, rng, note, **kw))
    return out


def det_normalized(rng: random.Random):
    out = []
    for i in range(16):
        h, w = rng.choice([(448, 588), (616, 420), (1092, 1456), (280, 280)])
        gt = [(_box(rng), "dog") for _ in range(1 + i % 3)]
        pred = [([round(b[0] * w / 1000), round(b[1] * h / 1000), round(b[2] * w / 1000), round(b[3] * h / 1000)], lab)
                for b, lab in gt]
        if i % 4 == 3:
            pred = [([v + 3 for v in b], lab) for b, lab in pred]
        out.append(_det_case(f"norm-{i:02d}", "detection", gt, _det_response(pred, rng), rng,
                             "pixel answer mapped to the 0..1000 grid",
                             parm={"det_verifier_normalized": True}, image_hw=[h, w]))
    return out


def det_adversarial(rng: random.Random):
    gt = [([100, 100, 300, 300], "cat"), ([400, 400, 600, 650], "dog")]
    good = _fmt_boxes(gt)
    items = [
        ("degenerate gt box", [([100, 100, 100, 300], "cat")], None,
         f"{THINK}<answer>\n[{{'bbox_2d': [100, 100, 100, 300], 'label': 'cat'}}]\n</answer>"),
        ("gt without answer tags", gt, good, f"{THINK}<answer>\n{good}\n</answer>"),
        ("gt with x1 > x2 box", gt, "<answer>[{'bbox_2d': [300, 100, 100, 300], 'label': 'cat'}, "
                                    "{'bbox_2d': [400, 400, 600, 650], 'label': 'dog'}]</answer>",
         f"{THINK}<answer>\n{good}\n</answer>"),
        ("double brackets", gt, None, f"{THINK}<answer>\n[[{{'bbox_2d': [100, 100, 300, 300], 'label': 'cat'}}]]\n</answer>"),
        ("truncated list", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': [100, 100, 300, 300], 'label': 'cat'}}, "
                                     "{'bbox_2d': [400, 400, 600\n</answer>"),
        ("not json", gt, None, f"{THINK}<answer>\nthe cat is at (100, 100)\n</answer>"),
        ("empty list", gt, None, f"{THINK}<answer>\n[]\n</answer>"),
        ("dict not list", gt, None, f"{THINK}<answer>\n{{'bbox_2d': [100, 100, 300, 300], 'label': 'cat'}}\n</answer>"),
        ("confidence field", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': [100, 100, 300, 300], 'label': 'cat', "
                                       "'confidence': 0.9}]\n</answer>"),
        ("boolean coordinates", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': [true, true, 300, 300], 'label': 'cat'}}]\n</answer>"),
        ("huge coordinates", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': [1, 1, {10 ** 400}, {10 ** 400}], 'label': 'cat'}}]\n</answer>"),
        ("infinity", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': [100, 100, Infinity, 300], 'label': 'cat'}}]\n</answer>"),
        ("nan", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': [NaN, 100, 300, 300], 'label': 'cat'}}]\n</answer>"),
        ("numeric label", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': [100, 100, 300, 300], 'label': 5}}]\n</answer>"),
        ("three coordinates", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': [100, 100, 300], 'label': 'cat'}}]\n</answer>"),
        ("string coordinates", gt, None, f"{THINK}<answer>\n[{{'bbox_2d': ['100', 100, 300, 300], 'label': 'cat'}}]\n</answer>"),
        ("two answer blocks", gt, None, f"{THINK}<answer>\n{good}\n</answer>\n<answer>\n{good}\n</answer>"),
        ("answer tag without newlines", gt, None, f"<answer>{good}</answer>"),
        ("backslashes", gt, None, f"{THINK}<answer>\n[{{\\'bbox_2d\\': [100, 100, 300, 300], \\'label\\': \\'cat\\'}}]\n</answer>"),
        ("deep nesting", gt, None, f"{THINK}<answer>\n" + "[" * 3000 + "]" * 3000 + "\n</answer>"),
        ("many boxes", gt, None, f"{THINK}<answer>\n" + _fmt_boxes([([i, i, i + 50, i + 50], "cat") for i in range(120)])
         + "\n</answer>"),
        ("same box many times", gt, None, f"{THINK}<answer>\n" + _fmt_boxes([([100, 100, 300, 300], "cat")] * 6) + "\n</answer>"),
        ("one pixel boxes", gt, None, f"{THINK}<answer>\n" + _fmt_boxes([([100, 100, 101, 101], "cat")]) + "\n</answer>"),
        ("zero area prediction", gt, None, f"{THINK}<answer>\n" + _fmt_boxes([([100, 100, 100, 100], "cat")]) + "\n</answer>"),
        ("huge gt boxes", [([0, 0, 200000, 200000], "cat")], None,
         f"{THINK}<answer>\n" + _fmt_boxes([([0, 0, 200000, 200000], "cat")]) + "\n</answer>"),
        ("mixed case gt label", [([100, 100, 300, 300], "Cat")], None, f"{THINK}<answer>\n" + _fmt_boxes([([100, 100, 300, 300], "CAT")]) + "\n</answer>"),
        ("unicode label", [([100, 100, 300, 300], "猫")], None, f"{THINK}<answer>\n" + _fmt_boxes([([100, 100, 300, 300], "猫")]) + "\n</answer>"),
        ("negative coordinates", gt, None, f"{THINK}<answer>\n" + _fmt_boxes([([-50, -50, 300, 300], "cat")]) + "\n</answer>"),
    ]
    out = []
    for i, (note, gt_items, solution, resp) in enumerate(items):
        for j, ratio in enumerate((RATIO_SETS[0], RATIO_SETS[3])):
            out.append(_det_case(f"adv-det-{i:02d}-{j}", "detection" if i % 2 else "grounding", gt_items, resp, rng,
                                 note, solution=solution, ratio=ratio, step=rng.choice([5, 20, 60])))
    empty = {"iou_max_label_first": 0.0}
    out.append(_det_case("adv-det-zero-weights", "detection", gt, f"{THINK}<answer>\n{good}\n</answer>", rng,
                         "all five weights zero", ratio=empty))
    out.append(_det_case("adv-det-over-one", "detection", gt, f"{THINK}<answer>\n{good}\n</answer>", rng,
                         "weight above 1 counts as 0", ratio={"iou_max_label_first": 1.5, "map": 0.5}))
    out.append(_det_case("adv-det-issue-example", "detection", [([0, 0, 100, 100], "a"), ([200, 200, 300, 300], "a"),
                                                                ([400, 400, 500, 500], "a"), ([600, 600, 700, 700], "a")],
                         f"{THINK}<answer>\n" + _fmt_boxes([([0, 0, 100, 100], "a"), ([200, 200, 300, 300], "a"),
                                                           ([400, 400, 500, 500], "a")]) + "\n</answer>",
                         rng, "3 of 4 boxes found", ratio=RATIO_SETS[0], ratios=(None, None), step=60))
    return out


def build(seed: int = 31) -> list:
    rng = random.Random(seed)
    cases = (math_cases(rng) + math_adversarial(rng) + format_cases(rng) + det_cases(rng)
             + det_normalized(rng) + det_adversarial(rng))
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return cases


# ---------------------------------------------------------------------------------------------
# their code, run once

def expect(cases: list, server_dir: str) -> list:
    import asyncio
    import contextlib
    import io
    import logging

    sys.path.insert(0, os.path.abspath(server_dir))
    logging.disable(logging.CRITICAL)
    import reward_serving_fastapi as srv  # their module, from their checkout

    for c in cases:
        os.environ["DET_IOU_THRESHOLD"] = str(c["iou_threshold"])
        hw = c.get("image_hw")
        parm = dict(c["verifier_parm"], is_training=True, step=c["step"], total_steps=c["total_steps"],
                    image_path=None, image_grid_thw=[[1, hw[0], hw[1]]] if hw else None)
        payload = srv.Payload(response=c["response"], prompt="", answer="", solution=c["solution"],
                              data_source=c["task"], reward_verifier=c["verifier"],
                              reward_verifier_parm=json.dumps(parm), format_ratio=c["format_ratio"],
                              accuracy_ratio=c["accuracy_ratio"])
        with contextlib.redirect_stdout(io.StringIO()):
            result = asyncio.run(srv.judge_reward(payload))
        c["expected"] = float(result["rewards"]["final_reward"])
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("build", "expect"))
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--reward-server", help="reward_server/ of their checkout at commit 39bcf0d (expect)")
    args = p.parse_args(argv)
    if args.command == "build":
        doc = {"source": SOURCE, "cases": build()}
    else:
        if not args.reward_server:
            p.error("expect needs --reward-server")
        with open(args.out, encoding="utf-8") as f:
            doc = json.load(f)
        doc["cases"] = expect(doc["cases"], args.reward_server)
        from importlib.metadata import version

        doc["source"]["run_with"] = {k: version(k) for k in ("math-verify", "latex2sympy2_extended", "sympy",
                                                            "numpy", "pycocotools")}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"{args.out}: {len(doc['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
