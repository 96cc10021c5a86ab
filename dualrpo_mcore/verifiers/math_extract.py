"""Where a final answer sits in a span of text, as strings for :mod:`math_parse` to read.

A span is a model's ``<answer>`` block, the tail of a response, or a gold answer, which may be a
bare answer or a whole worked solution; its last ``MAX_TEXT_CHARS`` are read. :func:`find_answers` lists the places an answer may be, in
the order they are trusted; the verifier parses them in that order and keeps the first that
parses. The order follows what math-verify's extraction finds on its own test suite, written
here as plain scans (math-verify's regexes nest lazy quantifiers, which is fine for its data and
not for a policy that searches for slow inputs):

1. ``\\boxed``/``\\fbox``: the last group of boxes. Boxes close together (under 10 characters
   apart, or under 70 with ``and``/``or``/``,``/``;`` between) are one multi-answer; a box far
   before the last is a draft the model revised. When boxes exist, nothing else is read (the
   model marked its answer, and a box that does not parse must not hand the reward to a number
   found elsewhere in its text), except a "final answer is X" stated after the last box.
2. ``final answer ... is X`` and then ``answer: X`` / ``answer ... X``, X being a math
   environment (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``) or a number/arithmetic.
3. The whole span, when it is short and reads as math rather than prose.
4. The rightmost math environment or plain number/arithmetic in the text.

Items joined by ``,``/``and``/``or`` are one multi-answer, so "1/2 or 3" is never read as 3.
Plain numbers and arithmetic are never taken from text that looks like code (an answer that
evaluates something to the right number must not score), nor from inside ``$..$`` or ``\\(..\\)``
pairs that are not valid math (an inline environment does not span lines).

Everything is a bounded scan of a capped string: no regex here nests quantifiers.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from dualrpo_mcore.verifiers.extract import box_at, last_box_command

MAX_TEXT_CHARS = 4096
MAX_PARTS = 6
_MAX_BOXES = 32
_MAX_ANCHORS = 16

_SEP_IN_GAP = re.compile(r"\b(?:and|or)\b|[,;]")
_CHAIN_GAP = re.compile(r"\s*(?:,\s*and|,\s*or|and|or|,)\s*")
_PERCENT = re.compile(r"\s*(?:\\?%|[Pp]ercent(?:age)?\b|[Pp]ct\b)")
_FINAL = re.compile(r"final\s+answer", re.I)
_IS = re.compile(r"\sis\b:?\s*", re.I)
_ANSWER_COLON = re.compile(r"answer\s*:", re.I)
_ANSWER = re.compile(r"answer", re.I)
_NEGATION = re.compile(r"\bnot\b|n't\b|\bno\b|\bnever\b", re.I)
_ENV_OPEN = re.compile(r"\$\$|\$|\\\(|\\\[")

# Plain numbers: thousands groups (``1,000``, ``1 000``, ``32,\! 349``, ``14{,}916``), decimals with
# a point or (followed by 2+ digits) a comma, a leading-point decimal, and an optional percent.
_THOUSANDS_SEP = r"(?:,|\s|,\\!\s?|\{,\}|\\,)"
_NUMBER = re.compile(
    r"(?P<sign>-?)(?P<body>(?P<grouped>[1-9]\d{0,2}(?:" + _THOUSANDS_SEP + r"\d{3})+(?!\d))"
    r"(?:\.\d+)?|\d+(?:\.\d+|,\d{2,}(?!\d))?|\.\d+)"
)
_NUMBER_PREFIX = re.compile(r"(?:^|[\s=(*:])(?:\\?[$€£¥₹])?$")
# Arithmetic written in plain text ("2/3", "(1/2) * (4/3)"): a run of these characters.
_ARITH_RUN = re.compile(r"[-(]?[\d.(][\d.\s+\-*×/^()÷]*")
_ARITH_OP = re.compile(r"\d\s*(?:\)\s*)?[+\-*×/^÷]\s*(?:\(\s*)?[\d.]")
_CODE = re.compile(
    r"__|`|\$\(\s*[a-z]{2,}\s|\bimport\b|\blambda\b|\bdef\b|\bos\.|\bsys\.|\bsubprocess\b"
    r"|\b(?:eval|exec|compile|system|popen|open|getattr|globals|print|input)\s*\("
    r"|(?<!\w)[A-Za-z_]\w*\s*\(\s*['\"]"
)


@dataclass(frozen=True)
class Found:
    """One place an answer may be: its parts (several = a multi-answer) and how it was found."""

    parts: Tuple[str, ...]
    how: str
    plain: bool = False  # written as plain text, not LaTeX: a decimal comma is a decimal point
    joined: bool = False  # parse the parts as one comma-joined answer first (boxes, as math-verify)


# ---------------------------------------------------------------------------------------------
# boxes

def box_group(text: str) -> Optional[List[str]]:
    """Contents of the last group of boxes, left to right; None when the text has no closed box."""
    got = _box_group(text)
    return None if got is None else got[0]


def _box_group(text: str) -> Optional[Tuple[List[str], int]]:
    """``(contents, end of the group)`` of the last group of boxes, or None."""
    group: List[Tuple[int, int, str]] = []  # (start, end, content), right to left
    end = len(text)
    for _ in range(_MAX_BOXES):
        i = last_box_command(text, end)
        if i < 0:
            break
        end = i
        got = box_at(text, i)
        content = got[0].strip() if got else ""
        if not content:
            if group:
                break
            continue
        stop = got[1]
        if group and stop > group[-1][0]:  # a box around the one already taken
            continue
        if group:
            gap = text[stop:group[-1][0]]
            near = len(gap) < 10 or (content != group[-1][2] and len(gap) < 70
                                     and _SEP_IN_GAP.search(gap) is not None)
            if not near:
                break
            if content == group[-1][2]:
                group[-1] = (i, group[-1][1], content)
                continue
            if len(group) >= MAX_PARTS * 4:
                break
        group.append((i, stop, content))
    return ([c for _, _, c in reversed(group)], group[0][1]) if group else None


# ---------------------------------------------------------------------------------------------
# math environments

@dataclass(frozen=True)
class _Item:
    start: int
    end: int
    text: str


def _with_percent(text: str, start: int, end: int, body: str) -> _Item:
    """The item ``text[start:end]`` read as ``body``, with a percent sign that follows it."""
    pct = _PERCENT.match(text, end)
    return _Item(start, pct.end(), body + "\\%") if pct else _Item(start, end, body)


def _env_at(text: str, j: int, opener: str) -> Optional[Tuple[int, int]]:
    """``(content_start, close_idx)`` of an environment opened at ``j``, else None."""
    if opener == "$$":
        k = text.find("$$", j + 2)
    elif opener == "$":
        if j > 0 and (text[j - 1] == "\\" or text[j - 1].isdigit()):
            return None
        k = j + 1
        while True:
            k = text.find("$", k)
            if k < 0 or text[k - 1] != "\\":
                break
            k += 1
        if k >= 0 and "\n" in text[j + 1:k]:
            return None
    elif opener == "\\(":
        k = text.find("\\)", j + 2)
        if k >= 0 and "\n" in text[j + 2:k]:
            return None
    else:
        k = text.find("\\]", j + 2)
    if k < 0:
        return None
    content_start = j + len(opener)
    return (content_start, k) if text[content_start:k].strip() else None


def _env_item_at(text: str, j: int) -> Optional[_Item]:
    """The environment opened at ``j`` (with a percent sign that follows it), else None."""
    m = _ENV_OPEN.match(text, j)
    if m is None or (j > 0 and text[j - 1] == "\\" and m.group(0).startswith("$")):
        return None
    got = _env_at(text, j, m.group(0))
    if got is None:
        return None
    cstart, k = got
    end = k + (1 if m.group(0) == "$" else 2)
    return _with_percent(text, j, end, text[cstart:k])


def environments(text: str) -> List[_Item]:
    """Math environments, left to right, as a left-to-right reader pairs their delimiters."""
    out, i = [], 0
    while len(out) < 512:
        m = _ENV_OPEN.search(text, i)
        if m is None:
            break
        item = _env_item_at(text, m.start())
        if item is None:
            i = m.start() + 1
            continue
        out.append(item)
        i = item.end
    return out


def env_chain_near(text: str, lo: int, hi: int) -> Optional[List[_Item]]:
    """The first environment opening in ``[lo, hi]``, paired from there (an anchor says where
    the answer starts, so a currency ``$`` earlier in the text must not shift the pairing), and
    the environments chained to it by ``,``/``and``/``or``."""
    j = lo
    while True:
        m = _ENV_OPEN.search(text, j, hi + 2)
        if m is None or m.start() > hi or _NEGATION.search(text, lo, m.start()):
            return None
        first = _env_item_at(text, m.start())
        if first is not None:
            break
        j = m.start() + 1
    chain = [first]
    while len(chain) < MAX_PARTS:
        gap = _CHAIN_GAP.match(text, chain[-1].end)
        nxt = _env_item_at(text, gap.end()) if gap and gap.group(0).strip() else None
        if nxt is None:
            break
        chain.append(nxt)
    return chain


def _masked_ranges(text: str) -> List[Tuple[int, int]]:
    """Stretches between paired ``$`` / ``\\(..\\)`` / ``\\[..\\]``, valid math or not, merged
    and sorted."""
    ranges = []
    dollars = [m.start() for m in re.finditer(r"(?<!\\)\$", text)]
    ranges += [(dollars[i], dollars[i + 1]) for i in range(0, len(dollars) - 1, 2)]
    for op, cl in (("\\(", "\\)"), ("\\[", "\\]")):
        i = text.find(op)
        while i >= 0:
            k = text.find(cl, i + 2)
            if k < 0:
                break
            ranges.append((i, k))
            i = text.find(op, k + 2)
    merged: List[Tuple[int, int]] = []
    for a, b in sorted(ranges):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(b, merged[-1][1]))
        else:
            merged.append((a, b))
    return merged


# ---------------------------------------------------------------------------------------------
# plain numbers and arithmetic

def _number_text(m: re.Match) -> str:
    body = m.group("body")
    if m.group("grouped"):
        body = re.sub(r"\{,\}|\\!|\\,|[,\s]", "", body)
    else:  # "2,74", "0,111": the only comma left is a decimal comma
        body = body.replace(",", ".")
    return m.group("sign") + body


def _covered(ranges: List[Tuple[int, int]], starts: List[int], pos: int, strict: bool) -> bool:
    """Whether ``pos`` lies in one of the sorted, disjoint ``ranges`` (inside only, if strict)."""
    k = bisect.bisect_right(starts, pos - 1 if strict else pos) - 1
    return k >= 0 and pos < ranges[k][1]


def _arithmetic(text: str) -> List[_Item]:
    items = []
    for m in _ARITH_RUN.finditer(text):
        run = m.group(0).rstrip(" .+-*×/^÷(")
        excess = run.count(")") - run.count("(")
        while excess > 0 and run.endswith(")"):  # "(so 1/2)": the bracket closes the prose
            run, excess = run[:-1], excess - 1
        if (excess == 0 and _ARITH_OP.search(run)
                and _NUMBER_PREFIX.search(text, max(0, m.start() - 3), m.start())):
            items.append(_Item(m.start(), m.start() + len(run), run.strip()))
    return items


def plain_numbers(text: str) -> List[_Item]:
    """Numbers and arithmetic outside math pairs, left to right; [] for code-like text."""
    if _CODE.search(text):
        return []
    masked = _masked_ranges(text)
    masked_starts = [a for a, _ in masked]
    items = [it for it in _arithmetic(text)
             if not _covered(masked, masked_starts, it.start, strict=True)]
    taken = [(it.start, it.end) for it in items]
    taken_starts = [a for a, _ in taken]
    for m in _NUMBER.finditer(text):
        if (_covered(taken, taken_starts, m.start(), strict=False)
                or _covered(masked, masked_starts, m.start(), strict=True)
                or not _NUMBER_PREFIX.search(text, max(0, m.start() - 3), m.start())):
            continue
        items.append(_with_percent(text, m.start(), m.end(), _number_text(m)))
    items.sort(key=lambda it: it.start)
    return items


# ---------------------------------------------------------------------------------------------
# chains, anchors, the whole order

def _chains(text: str, items: List[_Item]) -> List[List[_Item]]:
    """Consecutive items joined by ``,``/``and``/``or`` grouped (at most MAX_PARTS each)."""
    chains: List[List[_Item]] = []
    for it in items:
        if chains and len(chains[-1]) < MAX_PARTS and it.start >= chains[-1][-1].end:
            gap = text[chains[-1][-1].end:it.start]
            if _CHAIN_GAP.fullmatch(gap):
                chains[-1].append(it)
                continue
        chains.append([it])
    return chains


def _found(chain: List[_Item], how: str, plain: bool) -> Found:
    return Found(tuple(it.text for it in chain), how, plain)


def _first_chain_from(text: str, chains: List[List[_Item]], lo: int, hi: int):
    """The first chain whose first item starts in ``[lo, hi]`` and is not negated ("the answer
    is not 7, it is 8"); a chain that began before ``lo`` is cut to the items from ``lo`` on."""
    for chain in chains:
        tail = [it for it in chain if it.start >= lo]
        if tail and tail[0].start <= hi and not _NEGATION.search(text, lo, tail[0].start):
            return tail
    return None


def _final_answers(text: str, num_chains, after: int = 0) -> Iterator[Found]:
    """What follows "final answer ... is", last statement first, for statements past ``after``."""
    for m in reversed(list(_FINAL.finditer(text, after))[-_MAX_ANCHORS:]):
        is_ = _IS.search(text, m.end(), min(len(text), m.end() + 104))
        if is_ is None:
            continue
        env = env_chain_near(text, is_.end(), is_.end())
        if env:
            yield _found(env, "final answer", False)
        num = _first_chain_from(text, num_chains, is_.end(), is_.end())
        if num:
            yield _found(num, "final answer", True)


def _anchored(text: str, nums) -> Iterator[Found]:
    num_chains = _chains(text, nums)
    yield from _final_answers(text, num_chains)
    for rx in (_ANSWER_COLON, _ANSWER):
        for m in reversed(list(rx.finditer(text))[-_MAX_ANCHORS:]):
            picks = []
            env = env_chain_near(text, m.end(), m.end() + 50)
            if env:
                picks.append((env[-1].end, env, False))
            eq = text.rfind("=", m.end(), m.end() + 100)
            num = _first_chain_from(text, num_chains, eq + 1, eq + 8) if eq >= 0 else None
            num = num or _first_chain_from(text, num_chains, m.end(), m.end() + 50)
            if num:
                picks.append((num[-1].end, num, True))
            for _, chain, plain in sorted(picks, key=lambda p: -p[0]):
                yield _found(chain, "answer", plain)


_MATH_DELIM = re.compile(r"(?<!\\)\$|\\\(|\\\[")
_TEXT_BLOCK = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox|operatorname)\s*\{[^{}]*\}")
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}(?![A-Za-z])")
_MATH_WORDS = frozenset(
    "and or pi ln sin cos tan sec csc cot sinh cosh tanh arcsin arccos arctan log exp sqrt "
    "infty inf infinity mod pmod gcd lcm max min deg degree degrees frac dfrac tfrac cdot "
    "times pmatrix bmatrix matrix".split())


def reads_as_math(text: str) -> bool:
    """Short, no math delimiters, and at most one word that is not a math name."""
    if len(text) > 400 or _MATH_DELIM.search(text):
        return False
    words = [w for w in _WORD.findall(_TEXT_BLOCK.sub(" ", text)) if w.lower() not in _MATH_WORDS]
    return len(words) <= 1 and not _CODE.search(text)


def find_answers(text: str) -> Iterator[Found]:
    """The places an answer may be in ``text``, most trusted first (see the module docstring)."""
    text = text[-MAX_TEXT_CHARS:]
    boxes = _box_group(text)
    if boxes is not None:
        # a "final answer is X" stated after the last box is the model's last word
        if _FINAL.search(text, boxes[1]):
            yield from _final_answers(text, _chains(text, plain_numbers(text)), boxes[1])
        yield Found(tuple(boxes[0][-MAX_PARTS * 4:]), "boxed", joined=True)
        return
    envs, nums = environments(text), plain_numbers(text)
    yield from _anchored(text, nums)
    stripped = text.strip()
    if stripped and reads_as_math(stripped):
        yield Found((stripped,), "whole", True)
    chains = [(c, False) for c in _chains(text, envs)] + [(c, True) for c in _chains(text, nums)]
    chains.sort(key=lambda c: (c[0][-1].end, -c[0][0].start), reverse=True)
    for chain, plain in chains[:_MAX_ANCHORS]:
        yield _found(chain, "last", plain)
