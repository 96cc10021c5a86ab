"""Answer text -> sympy object, without ever evaluating the text as Python.

Model output is untrusted. ``sympy.sympify``/``parse_expr`` run ``eval`` on the string, and
math-verify's plain-expression path (``ExprExtractionConfig``) calls ``parse_expr``, so neither is
used here. Instead:

1. plain text is rewritten into LaTeX (``sqrt(2)`` -> ``\\sqrt{2}``, ``pi`` -> ``\\pi``,
   ``1.5e3`` -> ``1.5\\times10^{3}``, ``{1,2}`` -> ``\\{1,2\\}``, ...),
2. a cheap guard rejects inputs that would make sympy do unbounded work (exponent towers,
   huge literals, big factorials, sums/integrals),
3. the LaTeX is parsed by latex2sympy2_extended's ANTLR grammar, which builds sympy objects
   node by node. Its only string->sympy conversion of *input* text is ``sympy.Number(token)``
   for number tokens, and ``Number(str)`` calls ``sympify`` (eval) -- so the converter below
   overrides ``parse_number`` to build ``Integer``/``Float`` directly, and the one other call
   site (``convert_number`` for ``1,234``-style input in ``_Latex2Sympy.parse``) is never
   reached because such inputs are converted here first.
"""
from __future__ import annotations

import functools
import re
from typing import Optional

from dualrpo_mcore.verifiers.base import Unparsable
from dualrpo_mcore.verifiers.extract import closing_brace

MAX_ANSWER_CHARS = 400
_MAX_DIGIT_RUN = 100
_MAX_EXPONENT_PRODUCT = 10 ** 5
_MAX_FACTORIAL = 500
_MAX_CARETS = 8
# Symbolic powers are expanded by simplification: (x+1)^{100000} hangs where 2^{100000} is cheap.
_MAX_SYMBOLIC_EXPONENT = 64
_MAX_BINOM_ARG = 500
_BINOM = re.compile(r"\\[dt]?binom\s*\{([^{}]*)\}\s*\{([^{}]*)\}|\\[dt]?binom|\\choose")
# A free variable: a letter that is not part of a \command name.
_FREE_SYMBOL = re.compile(r"(?<![\\A-Za-z])[A-Za-z](?![A-Za-z])")

_FORBIDDEN_CMDS = re.compile(r"\\(?:sum|prod|int|iint|iiint|oint|lim|limsup|liminf|det)(?![A-Za-z])"
                             r"|\\begin(?!\s*\{(?:[pbvBV]?matrix|smallmatrix|array)\})")
_EXP_OK_CMDS = {"frac", "dfrac", "tfrac", "pi", "circ", "prime", "cdot", "times", "left",
                "right", "sqrt", "infty", "{", "}"}
# "1,234", "1 234", "14{,}916" ("32,\\! 349" becomes "32,349" in ``clean``)
_COMMA_NUMBER = re.compile(r"^-?\d{1,3}(?:(?:,| |\{,\})\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER = re.compile(r"^-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d{1,3})?$")


@functools.lru_cache(maxsize=1)
def _lazy_converter():
    # imported lazily: the ANTLR runtime costs ~0.5 s to import and most workers never need it
    from latex2sympy2_extended.latex2sympy2 import ConversionConfig, _Latex2Sympy
    import sympy

    class SafeLatex2Sympy(_Latex2Sympy):
        """latex2sympy with number tokens converted without ``sympify``."""

        def parse_number(self, text):  # noqa: D401  (overrides the library method)
            return number_to_sympy(text, sympy)

    return SafeLatex2Sympy, ConversionConfig


def number_to_sympy(text: str, sympy=None):
    """``"1,234"``, ``"0.5"``, ``"1.5e3"`` -> sympy Integer/Float, no eval."""
    if sympy is None:
        import sympy
    t = re.sub(r"[,\s{}]", "", text)
    if not _PLAIN_NUMBER.match(t) or len(t) > _MAX_DIGIT_RUN + 8:
        raise Unparsable(f"not a number: {text[:40]!r}")
    if "." in t or "e" in t or "E" in t:
        return sympy.Float(t, 30)
    return sympy.Integer(int(t))


# ---------------------------------------------------------------------------------------------
# plain text -> LaTeX

_SCI = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)\s*[eE]\s*([-+]?\d{1,3})(?![\w.])")
_TIMES_TEN = re.compile(r"(?:\*|x|×|\\times|\\cdot)\s*10\s*(?:\^|\*\*)\s*\(?\s*([-+]?\d{1,3})\s*\)?")
_WORDS = [
    (re.compile(r"(?<![\\A-Za-z])pi(?![A-Za-z])"), r"\\pi"),
    (re.compile(r"(?<![\\A-Za-z])(?:infinity|inf)(?![A-Za-z])"), r"\\infty"),
    (re.compile(r"\s*(?:degrees?|deg)(?![A-Za-z])"), ""),
]
_UNICODE = {"π": "\\pi", "∞": "\\infty", "×": "\\times", "·": "\\cdot", "⋅": "\\cdot",
            "−": "-", "–": "-", "÷": "/", "°": "", "√": "\\sqrt", "≤": "\\le", "≥": "\\ge",
            "∪": "\\cup", "∩": "\\cap", "\u00a0": " "}


def _sqrt_calls(s: str) -> str:
    """``sqrt(x)`` -> ``\\sqrt{x}`` with balanced parentheses (and ``\\sqrt(x)`` likewise)."""
    out, i = [], 0
    while True:
        j = s.find("sqrt(", i)
        if j < 0:
            out.append(s[i:])
            return "".join(out)
        start = j - 1 if j > 0 and s[j - 1] == "\\" else j
        k = closing_brace(s, j + 4, pair="()")
        if k is None:  # unbalanced: leave the rest as is
            out.append(s[i:])
            return "".join(out)
        out.append(s[i:start] + "\\sqrt{" + s[j + 5:k] + "}")
        i = k + 1


def plain_to_latex(s: str) -> str:
    for k, v in _UNICODE.items():
        if k in s:
            s = s.replace(k, v)
    s = s.replace("**", "^")
    s = _TIMES_TEN.sub(r"\\times10^{\1}", s)
    s = _SCI.sub(r"\1\\times10^{\2}", s)
    if "sqrt(" in s:
        s = _sqrt_calls(s)
    for rx, rep in _WORDS:
        s = rx.sub(rep, s)
    st = s.strip()
    # a bare brace pair is a set in plain text, a group in LaTeX: "{1, 2}" means {1, 2}
    if st.startswith("{") and st.endswith("}") and "," in st:
        s = "\\{" + st[1:-1] + "\\}"
    return s


_DELIMS = re.compile(r"^\s*(?:\$\$?|\\\(|\\\[)|(?:\$\$?|\\\)|\\\])\s*$")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\degree")
_NEG_SPACE = re.compile(r"\\!\s*")


def clean(text: str) -> str:
    """Strip math delimiters, display commands, degree marks and a trailing full stop."""
    s = _DELIMS.sub("", text.strip())
    s = _NEG_SPACE.sub("", s.replace("\\displaystyle", "")).replace("\\,", "").replace("\\;", " ")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s)
    return s if s.endswith("\\.") else _rstrip_stops(s)


def _rstrip_stops(s: str) -> str:
    # a scan, not re.sub(r"[.\s]+$"): that regex is quadratic on a long run of spaces
    i = len(s)
    while i and (s[i - 1] == "." or s[i - 1].isspace()):
        i -= 1
    return s[:i]


# ---------------------------------------------------------------------------------------------
# bomb guard

def _exponent_spans(s: str):
    """``(numeric_base, text)`` of each exponent (``^{...}`` group, ``\\command`` or digit/letter
    run); ``numeric_base`` when a digit precedes the caret."""
    i = s.find("^")
    while i >= 0:
        numeric_base = s[:i].rstrip()[-1:].isdigit()
        j = i + 1
        while j < len(s) and s[j] == " ":
            j += 1
        if j < len(s) and s[j] == "{":
            k = closing_brace(s, j)
            k = len(s) if k is None else k  # unclosed: the rest
            yield numeric_base, s[j + 1:k]
            j = k
        else:
            m = re.match(r"\\[A-Za-z]+|[-+]?[\w.]+|\(", s[j:j + 64])
            if m and m.group(0) == "(":  # ^(...) in plain text: take the parenthesised group
                k = s.find(")", j)
                yield numeric_base, s[j:k + 1 if k >= 0 else len(s)]
            else:
                yield numeric_base, m.group(0) if m else ""
        i = s.find("^", j if j > i else i + 1)


def guard(s: str) -> None:
    """Raise :class:`Unparsable` for inputs whose evaluation could blow up in time or memory."""
    if len(s) > MAX_ANSWER_CHARS:
        raise Unparsable(f"answer longer than {MAX_ANSWER_CHARS} chars")
    if re.search(r"\d{%d,}" % (_MAX_DIGIT_RUN + 1), s):
        raise Unparsable("numeric literal too long")
    if _FORBIDDEN_CMDS.search(s):
        raise Unparsable("sums, products, integrals, limits and environments are not evaluated")
    if s.count("^") > _MAX_CARETS:
        raise Unparsable("too many exponents")
    product = symbolic = 1.0
    for numeric_base, span in _exponent_spans(s):
        if "^" in span or "!" in span:
            raise Unparsable("nested exponent")
        cmds = set(re.findall(r"\\([A-Za-z]+|.)", span))
        if cmds - _EXP_OK_CMDS:
            raise Unparsable("unsupported command in an exponent")
        lits = [float(x) for x in re.findall(r"\d+(?:\.\d+)?", span)] or [1.0]
        size = max(1.0, max(lits) if not re.search(r"\*|\\times|\\cdot", span) else
                   functools.reduce(lambda a, b: a * max(b, 1.0), lits, 1.0))
        product *= size
        # only a power of a symbolic base expands into many terms; 10^{x/6} stays one term
        symbolic *= 1.0 if numeric_base else size
        if product > _MAX_EXPONENT_PRODUCT:
            raise Unparsable("exponent too large")
    # a matrix power multiplies whole matrices of growing numbers: bounded like a symbolic one
    if product > _MAX_SYMBOLIC_EXPONENT and "\\begin" in s:
        raise Unparsable("matrix power too large")
    if symbolic > _MAX_SYMBOLIC_EXPONENT and _FREE_SYMBOL.search(s):
        raise Unparsable("symbolic power too large")
    _guard_binomials(s)
    for m in re.finditer(r"(\d+)\s*!", s):
        if int(m.group(1)) > _MAX_FACTORIAL:
            raise Unparsable("factorial too large")
    if s.count("!") > 1 and re.search(r"[)}\]]\s*!", s):
        raise Unparsable("nested factorial")


def _guard_binomials(s: str) -> None:
    """Binomials are evaluated exactly: only small literal integer arguments are allowed."""
    for m in _BINOM.finditer(s):
        args = m.groups()
        if args[0] is None or not all(re.fullmatch(r"\s*\d{1,3}\s*", a) for a in args) \
                or max(int(a) for a in args) > _MAX_BINOM_ARG:
            raise Unparsable("binomial with large or non-literal arguments")


# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def to_sympy(text: str):
    """Parse an answer (LaTeX or plain text) into a sympy object; :class:`Unparsable` if not."""
    s = clean(text)
    if len(s) > MAX_ANSWER_CHARS:
        raise Unparsable(f"answer longer than {MAX_ANSWER_CHARS} chars")
    if not s:
        raise Unparsable("empty answer")
    s = plain_to_latex(s)
    if _COMMA_NUMBER.match(s.strip()):
        return number_to_sympy(s)
    guard(s)
    from latex2sympy2_extended.math_normalization import NormalizationConfig, normalize_latex
    s = normalize_latex(s, NormalizationConfig(basic_latex=True, units=True,
                                               malformed_operators=True, nits=False,
                                               boxed="none", equations=False))
    guard(s)
    if not s:
        raise Unparsable("empty answer after normalisation")
    if _COMMA_NUMBER.match(s.strip()):
        return number_to_sympy(s)
    try:
        return _convert(s)
    except Unparsable:
        last = _last_of_chain(s)
        if last is None:
            raise
        return _convert(last)


_EQ_SPLIT = re.compile(r"(?<![\\<>!])=")


def _last_of_chain(s: str) -> Optional[str]:
    """``a = b = c`` -> ``c``: a chain of equalities that does not parse is read by its end (its
    middle may hold a command the grammar lacks); lists (``a=1, b=2``) are never cut, which also
    keeps ``1,234``-style numbers away from the grammar's own number conversion."""
    if "," in s or ";" in s:
        return None
    parts = _EQ_SPLIT.split(s)
    if len(parts) <= 2:
        return None
    return parts[-1].strip() or None


def _convert(s: str):
    conv_cls, conv_cfg = _lazy_converter()
    try:
        return conv_cls(is_real=not _looks_complex(s), convert_degrees=False,
                        config=conv_cfg()).parse(s)
    except Unparsable:
        raise
    except Exception as e:
        raise Unparsable(f"latex parse failed: {type(e).__name__}") from None


def _looks_complex(s: str) -> bool:
    return bool(re.search(r"(?<![A-Za-z\\])i(?![A-Za-z])|\\mathbb\{C\}|\\imath", s))
