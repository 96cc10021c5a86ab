#!/usr/bin/env python
"""Extract math-verify's own regression cases into a JSON data file for our math verifier.

Usage::

    python scripts/extract_math_verify_cases.py GIT_DIR [--out tests/data/math_verify_cases.json]

``GIT_DIR`` is a clone (bare is fine) of https://github.com/huggingface/Math-Verify. The cases are
the ``(gold, pred, expected)`` rows of every ``pytest.mark.parametrize`` in the test files named
below, read with ``ast`` so that commented-out rows stay out and nothing in the files is run.
The one row that is not a literal (an f-string formatting ``math.sqrt(17)``) is rebuilt by a
whitelist that only knows ``math.<function>(<numbers>)`` with a format spec.

CI has no network, which is why the result is committed instead of fetched at test time.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys

REPO_URL = "https://github.com/huggingface/Math-Verify"
TEST_FILES = ("tests/test_all.py", "tests/test_boxed.py", "tests/test_numina_cases.py",
              "tests/test_open_thoughts.py")
DEFAULT_OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                            "tests", "data", "math_verify_cases.json"))


def _git(git_dir: str, *args: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, *args], check=True, capture_output=True,
                          text=True).stdout


def _value(node: ast.AST):
    """A literal, or an f-string whose only fields are ``math.f(numbers)`` with a format spec."""
    if isinstance(node, ast.JoinedStr):
        parts = []
        for part in node.values:
            if isinstance(part, ast.Constant):
                parts.append(str(part.value))
                continue
            call = part.value
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id == "math"):
                raise ValueError(f"unsupported f-string field at line {node.lineno}")
            fn = getattr(math, call.func.attr)
            spec = _value(part.format_spec) if part.format_spec is not None else ""
            parts.append(format(fn(*[ast.literal_eval(a) for a in call.args]), spec))
        return "".join(parts)
    return ast.literal_eval(node)


def _parametrize_rows(func: ast.FunctionDef):
    """``(argnames, rows)`` of the function's ``pytest.mark.parametrize`` decorators."""
    for dec in func.decorator_list:
        if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                and dec.func.attr == "parametrize" and len(dec.args) >= 2):
            continue
        names = [n.strip() for n in ast.literal_eval(dec.args[0]).split(",")]
        rows = dec.args[1]
        if not isinstance(rows, (ast.List, ast.Tuple)):
            raise ValueError(f"{func.name}: parametrize values are not a literal list")
        yield names, rows.elts


def cases_from_source(source: str, path: str):
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.FunctionDef):
            continue
        for names, rows in _parametrize_rows(node):
            if not {"gold", "pred", "expected"} <= set(names):
                continue
            for row in rows:
                values = dict(zip(names, (_value(e) for e in row.elts)))
                case = {"gold": values.pop("gold"), "pred": values.pop("pred"),
                        "expected": bool(values.pop("expected")),
                        "source": f"{path}::{node.name}", "line": row.lineno}
                if values:  # per-test settings (precision, ...): kept for the record only
                    case["settings"] = values
                yield case


def _licence_header(source: str) -> str:
    """The comment block a file opens with, without the ``#`` marks."""
    lines = []
    for line in source.splitlines():
        if line.strip() and not line.startswith("#"):
            break
        lines.append(line[1:].strip() if line.startswith("#") else "")
    return "\n".join(lines).strip()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("git_dir", help="a clone of huggingface/Math-Verify (bare is fine)")
    ap.add_argument("--rev", default="HEAD")
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    commit = _git(args.git_dir, "rev-parse", args.rev).strip()
    cases = []
    for path in TEST_FILES:
        cases.extend(cases_from_source(_git(args.git_dir, "show", f"{commit}:{path}"), path))
    header = _licence_header(_git(args.git_dir, "show", f"{commit}:{TEST_FILES[0]}"))
    out = {
        "source": {"repository": REPO_URL, "commit": commit, "files": list(TEST_FILES),
                   "extracted_by": "scripts/extract_math_verify_cases.py"},
        "licence": {
            "test_files": "MIT (header of the test files, reproduced below)",
            "notice": header,
            "repository_licence_file": "LICENCE in the same commit is Apache-2.0",
        },
        "scoring": "expected is the test's truth value (a 0/1 score or a bool); the per-test "
                   "settings math-verify's tests pass are recorded but not used",
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=True)
        f.write("\n")
    print(f"{len(cases)} cases from {commit[:12]} -> {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
