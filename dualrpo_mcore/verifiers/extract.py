"""Reading the answer span out of a model response, with hard length caps.

Everything here is linear in the (capped) input: plain ``str.rfind`` scans and regexes without
nested quantifiers, so a 1 MB adversarial response costs milliseconds, not minutes.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

from dualrpo_mcore.verifiers.base import Unparsable

# Final answers live at the end of a response; looking further back only costs time.
TAIL_CHARS = 4096
MAX_SPAN_CHARS = 2048
_MAX_BOXED_TRIES = 16

FALLBACKS = ("none", "last_line", "full")


def tail(text: str, n: int = TAIL_CHARS) -> str:
    return text[-n:] if len(text) > n else text


def closing_brace(text: str, open_idx: int, limit: Optional[int] = None, pair: str = "{}") -> Optional[int]:
    """Index of the ``}`` closing the group that opens at ``text[open_idx] == '{'`` (nested braces
    counted), searched within ``limit`` characters; None if unclosed. ``pair="()"`` does the same
    for parentheses."""
    opener, closer = pair
    depth = 0
    for j in range(open_idx, len(text) if limit is None else min(len(text), open_idx + limit)):
        c = text[j]
        if c == opener:
            depth += 1
        elif c == closer:
            depth -= 1
            if depth == 0:
                return j
    return None


def last_box_command(text: str, end: int) -> int:
    """Start of the last ``\\boxed`` / ``\\fbox`` before ``end``, or -1."""
    return max(text.rfind("\\boxed", 0, end), text.rfind("\\fbox", 0, end))


def box_at(text: str, i: int, limit: Optional[int] = None, token: bool = True) -> Optional[Tuple[str, int]]:
    """``(content, end)`` of the box command starting at ``i``: its ``{...}`` group (closed within
    ``limit`` characters) or, with ``token``, the single token after a space (``\\boxed 5``: TeX takes
    one token as the argument); None otherwise. The content is not stripped."""
    cmd_end = i + (6 if text.startswith("\\boxed", i) else 5)
    j = cmd_end
    while j < len(text) and text[j] == " ":
        j += 1
    if j < len(text) and text[j] == "{":
        k = closing_brace(text, j, limit)
        return None if k is None else (text[j + 1:k], k + 1)
    if token and j > cmd_end:
        m = re.match(r"[^\s$]+", text[j:j + 64])
        if m:
            return m.group(0), j + m.end()
    return None


def last_boxed(text: str) -> Optional[str]:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces allowed), or
    of a ``\\boxed 5``."""
    end = len(text)
    for _ in range(_MAX_BOXED_TRIES):
        i = last_box_command(text, end)
        if i < 0:
            return None
        got = box_at(text, i, MAX_SPAN_CHARS + 2, token=text.startswith("\\boxed", i))
        if got is not None:
            return got[0]
        end = i
    return None


def last_answer_tag(text: str) -> Optional[str]:
    """Content of the last ``<answer>...</answer>`` pair (case-insensitive tags)."""
    low = text.lower()
    close = low.rfind("</answer>")
    if close < 0:
        return None
    open_ = low.rfind("<answer>", 0, close)
    if open_ < 0:
        return None
    return text[open_ + len("<answer>"):close]


def answer_span(response: str, fallback: str = "none", *, prefer_boxed: bool = True,
                tail_chars: int = TAIL_CHARS, span_chars: int = MAX_SPAN_CHARS) -> str:
    """The text holding the final answer.

    Order: the last ``<answer>`` block (and inside it a ``\\boxed`` if present), else the last
    ``\\boxed``, else ``fallback``: ``none`` (raise :class:`Unparsable`), ``last_line`` (the last
    non-empty line) or ``full`` (the whole capped tail).
    """
    text = tail(response, tail_chars)
    tagged = last_answer_tag(text)
    if tagged is not None:
        if prefer_boxed:
            boxed = last_boxed(tagged)
            if boxed is not None:
                return boxed.strip()
        return tagged.strip()[-span_chars:]
    if prefer_boxed:
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed.strip()
    return fallback_span(text, fallback).strip()[-span_chars:]


def fallback_span(text: str, fallback: str) -> str:
    """What ``fallback`` reads when ``text`` has no box or ``<answer>`` block: the last non-empty
    line (``last_line``) or the whole text (``full``), as is; :class:`Unparsable` for ``none`` or when
    there is nothing to read."""
    if fallback == "last_line":
        for line in reversed(text.splitlines()):
            if line.strip():
                return line
        raise Unparsable("empty response")
    if fallback == "full":
        if text.strip():
            return text
        raise Unparsable("empty response")
    raise Unparsable("no \\boxed{} or <answer> block")


_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf|textit|mbox)\s*\{([^{}]{0,200})\}")


def strip_latex_text(s: str) -> str:
    """``\\text{B}`` -> ``B``; removes ``$`` math delimiters (one level of text commands)."""
    s = _TEXT_CMD.sub(r"\1", s)
    return s.replace("$", "").replace("\\(", "").replace("\\)", "").strip()


# ---------------------------------------------------------------------------------------------
# numbers

_NUM_RE = re.compile(
    r"(?<![\w.])([-+\u2212]?)"
    r"(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:[eE]([-+]?\d{1,4}))?"
    r"(\s*(?:\\?%|percent\b))?"
)


def find_numbers(s: str, limit: int = 256):
    """``[(value: float, is_percent: bool, start, end)]`` for plain-text numbers in ``s``.

    Handles signs (including U+2212), thousands separators ``1,234.5``, scientific ``1.5e3``
    and percent (``45%``, ``45\\%``, ``45 percent``). At most ``limit`` numbers are returned,
    the last ones when there are more.
    """
    out = []
    for m in _NUM_RE.finditer(s):
        sign, digits, exp, pct = m.groups()
        if len(digits) > 64:
            continue
        try:
            val = float(digits.replace(",", "") + (f"e{exp}" if exp else ""))
        except (ValueError, OverflowError):
            continue
        if sign in ("-", "\u2212"):
            val = -val
        out.append((val, bool(pct), m.start(), m.end()))
        if len(out) > 2 * limit:
            out = out[-limit:]
    return out[-limit:]
