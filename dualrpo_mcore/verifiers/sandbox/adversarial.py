"""Hostile model outputs, shared by the verifier-pool tests and ``dualrpo bench verifiers``.

A policy under RL pressure will find whatever makes a verifier hang, crash, eat memory or (if a
parser ever eval()s) run code. This module writes those responses down on purpose, in families:

* ``sympy``: expressions that are tiny to write and astronomically expensive to evaluate
  (power towers, huge factorials, heavy integrals, 100k-digit literals);
* ``huge``: 1 MB and bigger strings (the pool keeps the last 1 Mi characters);
* ``nesting``: 10k-deep ``\\frac``/braces/brackets/``\\sqrt`` (recursive parsers, the C stack);
* ``nan_inf``: NaN/inf/overflowing literals where numbers and boxes are read;
* ``boxes``: malformed boxes (3 numbers, NaN, 1e308, inverted, 100k boxes, wrong types);
* ``unicode``: random code points, lone surrogates, RTL/zero-width marks, look-alike digits;
* ``code``: code-execution attempts (Python, shell, LaTeX ``\\write18``, sympy parser payloads,
  pickle/YAML gadgets), each of which would create a unique marker file under /tmp if it ran;
* ``regex``: backtracking bait (long runs, unclosed tags, thousands of ``\\boxed{``).

Everything is deterministic given ``seed``; ``token`` makes marker paths unique per run so
:func:`markers_left` can prove that no payload executed.
"""
from __future__ import annotations

import glob
import random
from dataclasses import dataclass
from typing import Callable, Dict, List

MB = 1 << 20
MARKER_PREFIX = "/tmp/dualrpo_pwned_"

# One realistic spec per built-in verifier (the same tasks the benchmark's mixed batch uses),
# plus a combined spec and a dataset regex that backtracks catastrophically on the wrong input.
TARGET_SPECS: List[dict] = [
    {"verifier": "math", "answer": "\\frac{1}{2}"},
    {"verifier": "choice", "answer": "B", "params": {"options": ["3", "4", "5", "6"]}},
    {"verifier": "numeric", "answer": 12.5, "params": {"rel_tol": 0.01}},
    {"verifier": "counting", "answer": 7},
    {"verifier": "ocr", "answer": "STOP AHEAD"},
    {"verifier": "grounding", "answer": [10, 20, 110, 220]},
    {"verifier": "detection", "answer": [{"bbox_2d": [0, 0, 50, 50], "label": "cat"},
                                         {"bbox_2d": [60, 60, 120, 140], "label": "dog"}],
     "params": {"iou_threshold": 0.5}},
    {"verifier": "format", "params": {"mode": "think_answer"}},
    {"components": [{"verifier": "math", "answer": "3", "weight": 0.9},
                    {"verifier": "format", "weight": 0.1, "params": {"mode": "think_answer"}}]},
]
# Trusted dataset content can still be a bad regex; the pool's budget is the backstop.
BACKTRACKING_SPEC = {"verifier": "format", "params": {"mode": "regex", "pattern": r"(\w+\s?)*$"}}


@dataclass(frozen=True)
class Case:
    family: str
    spec: dict
    response: str


def marker(token: str, k: int) -> str:
    return f"{MARKER_PREFIX}{token}_{k}"


def markers_left(token: str) -> List[str]:
    """Marker files of this token that exist (must be empty: no payload ever ran)."""
    return sorted(glob.glob(f"{MARKER_PREFIX}{token}_*"))


def _sympy() -> List[str]:
    return [
        r"\boxed{9^{9^{9^9}}}", r"\boxed{10^{10^{10^{10}}}}!", r"\boxed{(10^{10^{10^{10}}})!}",
        r"\boxed{2^{2^{2^{2^{2^{2^{2}}}}}}}", r"\boxed{10^{999999999}}", r"\boxed{99999999!}",
        r"\boxed{\int_0^1 e^{x^{x^{x^{x}}}}\,dx}", r"\boxed{\int \frac{\sin(x^{x})}{\log(\log x)}\,dx}",
        r"\boxed{\sum_{n=1}^{10^{100}} n^{n}}", r"\boxed{\prod_{k=1}^{10^{9}} k}",
        r"\boxed{(x+1)^{100000}}", r"\boxed{\lim_{x\to\infty} x^{x^{x}}}",
        r"\boxed{\sqrt[10^{10}]{2}}", r"\boxed{\frac{10^{10^{10}}}{10^{10^{10}}+1}}",
        r"\boxed{x^{10^{10}} = 1}", r"\boxed{\binom{10^{10}}{5 \cdot 10^{9}}}",
        r"\boxed{\begin{pmatrix}1&1\\1&0\end{pmatrix}^{10^{9}}}", r"\boxed{1e999999999}",
        r"\boxed{" + "9" * 100_000 + "}", r"\boxed{0." + "3" * 50_000 + "}",
        r"\boxed{" + "+".join(["x^{%d}" % i for i in range(3000)]) + "}",
        "<answer>" + "*".join(["(x+%d)" % i for i in range(2000)]) + "</answer>",
    ]


def _huge() -> List[str]:
    return [
        "A" * MB, "\\boxed{" + "1" * MB + "}", "\\boxed{1}" * (MB // 9),
        "<think>" + "x" * (2 * MB) + "</think><answer>1/2</answer>",  # over the pool's cap
        "7 " * (MB // 2),
    ]


def _nesting(depth: int = 10_000) -> List[str]:
    return [
        "\\boxed{" + "\\frac{" * depth + "1}{2}" * depth + "}",
        "\\boxed{" + "{" * depth + "1" + "}" * depth + "}",
        "\\boxed{" + "(" * depth + "1" + ")" * depth + "}",
        "\\boxed{" + "\\sqrt{" * (depth // 2) + "2" + "}" * (depth // 2) + "}",
        "\\boxed{" * depth + "1" + "}" * depth,
        "<answer>" + "[" * depth + "1" + "]" * depth + "</answer>",
        "<answer>" + '{"bbox_2d": ' * depth + "1" + "}" * depth + "</answer>",
        "\\boxed{" + "\\left(" * (depth // 2) + "1" + "\\right)" * (depth // 2) + "}",
        "\\boxed{" + "-" * depth + "1}", "\\boxed{" + "2^" * (depth // 2) + "2}",
        "<answer>" + "<answer>" * depth + "1" + "</answer>" * depth,
        "{" * depth,
    ]


def _nan_inf() -> List[str]:
    return [
        "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1e309", "1e-400",
        "\\boxed{nan}", "\\boxed{\\infty}", "\\boxed{-\\infty}", "\\boxed{0/0}", "\\boxed{\\frac{1}{0}}",
        "\\boxed{\\text{NaN}}", "<answer>1e309</answer>", "<answer>nan</answer>", "<answer>-0</answer>",
        "<answer>[nan, nan, nan, nan]</answer>", "<answer>[inf, 0, inf, 10]</answer>",
        "<answer>1e309 objects</answer>", "\\boxed{10^{400}\\%}",
    ]


def _boxes() -> List[str]:
    many = "[" + ",".join(["[0,0,1,1]"] * 100_000) + "]"
    return [
        "[1,2,3]", "[nan, 1, 2, 3]", "[1e308, 1e308, 1e308, 1e308]", "[-1e308, -1e308, 1e308, 1e308]",
        "[0,0,0,0]", "[10,10,5,5]", "[[1,2,3,4]", "[1,2,3,4,5,6,7,8]", '["a","b","c","d"]',
        '{"bbox_2d": "x"}', '{"bbox_2d": [1,2,3,4], "label": {"__class__": 1}}', "[1e309,0,1,1]",
        "[0x10, 0b1, 1_000, 4]", "[4.9e-324, 0, 1, 1]", "[true, false, null, 1]", "[[[[[[1]]]]]]",
        "<answer>" + many + "</answer>", many,
        '<answer>[{"bbox_2d": [1,2,3,4], "label": "' + "a" * 100_000 + '"}]</answer>',
        "<answer>" + "[1,2,3,4]," * 50_000 + "</answer>",
        "<answer>[" + ",".join(["[%d,%d,%d,%d]" % (i, i, i + 9, i + 9) for i in range(5000)]) + "]</answer>",
    ]


def _unicode(rng: random.Random) -> List[str]:
    def garbage(n: int) -> str:
        # Any code point, lone surrogates included: model output decoded with errors='surrogateescape'.
        return "".join(chr(rng.randrange(0x110000)) for _ in range(n))

    return [
        garbage(200), garbage(5000), garbage(50_000), "\\boxed{" + garbage(100) + "}",
        "\ud800\udfff\udc80" * 1000, "\\boxed{\u202e7\u202c}", "\\boxed{\u200b7\u200d}", "\ufeff" * 1000 + "7",
        "\uff3c\uff42\uff4f\uff58\uff45\uff44\uff5b\uff17\uff5d", "\\boxed{\u0667}", "7" + "\u0301" * 10_000,
        "\x00" * 1000, "\\boxed{\x00}", "".join(chr(c) for c in range(32)) * 100,
        "\U0001F600" * 10_000, "\\b\u03bfxed{1/2}", "<answer>\u0412</answer>", "\udcff" * 50_000,
        "<answer>" + "\u202e" * 10_000 + "B</answer>",
    ]


def _code(token: str, first: int) -> List[str]:
    payloads = [
        "__import__('os').system('touch {m}')", '\\boxed{{__import__("os").system("touch {m}")}}',
        "<answer>__import__('os').system('touch {m}')</answer>", "$(touch {m})", "`touch {m}`",
        "\\boxed{{$(touch {m})}}", "\\boxed{{exec(\"open('{m}','w').write('x')\")}}",
        "\\boxed{{eval(\"__import__('os').system('touch {m}')\")}}",
        "\\boxed{{Lambda(x, __import__('os').system('touch {m}'))}}",
        "<answer>(lambda: __import__('subprocess').call(['touch', '{m}']))()</answer>",
        "\\boxed{{().__class__.__base__.__subclasses__()[0]('touch {m}')}}",
        "<answer>\";touch {m};\"</answer>", "\\boxed{{\\text{{__import__('os').system('touch {m}')}}}}",
        "\\immediate\\write18{{touch {m}}}", "\\boxed{{\\input{{/etc/passwd}}}}",
        "\\boxed{{open('{m}', 'w')}}", "cos\nsystem\n(S'touch {m}'\ntR.",
        "!!python/object/apply:os.system ['touch {m}']",
        "\\boxed{{Symbol('x').__class__.__init__.__globals__['os'].system('touch {m}')}}",
        "<answer>{{0.__class__.__mro__}}; import os; os.system('touch {m}')</answer>",
        "<answer>[__import__('os').system('touch {m}'), 0, 1, 1]</answer>",
        "\\boxed{{sympify(\"__import__('os').system('touch {m}')\")}}",
        "<answer>$(touch {m}) 7</answer>", "\\boxed{{x}}; import os; os.system('touch {m}') #",
    ]
    return [p.format(m=marker(token, first + i)) for i, p in enumerate(payloads)]


def _regex() -> List[str]:
    return [
        "a" * 50_000 + "!", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!", "<think>" * 20_000,
        "<think>" + "x" * 100_000, "<answer>" * 10_000 + "</answer>", "\\boxed{" * 20_000,
        " " * 200_000 + "1", "1" + ".0" * 50_000, "0." + "0" * 100_000 + "1", "(" * 50_000,
        "1," * 100_000, "one " * 50_000, "twenty " * 30_000, "A) B) C) " * 10_000,
        "the answer is " * 20_000, "</answer><answer>" * 20_000, "\\\\" * 100_000, "$" * 100_000,
        "\\text{" * 20_000, "<think></think><answer></answer>" * 10_000,
    ]


FAMILIES: Dict[str, Callable[..., List[str]]] = {
    "sympy": _sympy, "huge": _huge, "nesting": _nesting, "nan_inf": _nan_inf, "boxes": _boxes,
    "unicode": _unicode, "code": _code, "regex": _regex,
}
# Wrappers vary where the payload sits: raw, as the marked answer, or after a reasoning block.
_WRAPS = ("{}", "<answer>{}</answer>", "<think>let me see</think> <answer>{}</answer>",
          "Step 1... so the final answer is \\boxed{{{}}}")


def payloads(token: str, seed: int = 0) -> List[tuple]:
    """``[(family, response)]``, every hostile response once, in a fixed order."""
    rng = random.Random(seed)
    out = []
    for family, make in FAMILIES.items():
        if family == "unicode":
            items = make(rng)
        elif family == "code":
            items = make(token, 0)
        else:
            items = make()
        out.extend((family, text) for text in items)
    return out


def adversarial_corpus(n: int = 1000, *, token: str, seed: int = 0) -> List[Case]:
    """``n`` hostile samples: each payload meets several verifiers, in varying wrappers.

    Payload ``i % P`` is paired with spec ``(i + i // P) % S``, so a corpus of at least ``P * S``
    samples pairs every payload with every spec; the round number picks the wrapper. A few
    samples use :data:`BACKTRACKING_SPEC` with the backtracking bait.
    """
    base = payloads(token, seed)
    specs = TARGET_SPECS
    cases = []
    for i in range(n):
        family, text = base[i % len(base)]
        rnd = i // len(base)
        wrap = _WRAPS[rnd % len(_WRAPS)]
        if rnd and len(text) < 200_000 and family != "code":  # keep the big ones raw (cheap)
            text = wrap.format(text)
        cases.append(Case(family, specs[(i + rnd) % len(specs)], text))
    bait = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!"
    for i in range(min(2, n)):  # two catastrophic-regex samples, placed deterministically
        cases[(i * 7919) % n] = Case("regex", BACKTRACKING_SPEC, bait)
    return cases
