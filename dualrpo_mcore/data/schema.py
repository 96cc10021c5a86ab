"""The sample schema: one row = one prompt with its images and its own reward spec.

Columns (parquet / jsonl / arrow / saved ``datasets`` directories all carry the same names)::

    messages     list of {"role": str, "content": str}; "<image>" in a content string marks where
                 an image goes (images are consumed in order across all messages)
    images       list of {"bytes": binary | null, "path": str | null}  (the layout of the
                 ``datasets.Image`` feature, so HF-written image columns load as-is; in jsonl,
                 bytes are base64 text); a relative path is resolved against the data file's
                 directory
    reward       the verifier spec, a JSON string (or a dict in jsonl):
                 {"verifier": NAME, "answer": ..., "params": {...}} or {"components": [...]}
    task         one of TASKS (free-form names are accepted; TASKS are the paper's eight)
    data_source  where the row comes from (used for per-source metrics)
    id           optional stable row id; difficulty optional int; solution optional string (a
                 canonical response, for SFT warm-start and tests)

``reward`` is a JSON string rather than a struct because the answer's type depends on the
verifier (a string, a number, a list of boxes) and a parquet column has one type.
"""
from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

# The paper's eight tasks in its two groups (V-Triune section 5.1.1); every other task list in the
# package is derived from these.
REASONING_TASKS = ("math", "puzzle", "science", "chart")
PERCEPTION_TASKS = ("detection", "grounding", "counting", "ocr")
TASKS = REASONING_TASKS + PERCEPTION_TASKS
IMAGE_PLACEHOLDER = "<image>"
REQUIRED_FIELDS = ("messages", "images", "reward", "task", "data_source")
ROLES = ("system", "user", "assistant")


class BadRow(ValueError):
    """A row that cannot be used; the message names file, row and field."""

    def __init__(self, file: str, row: int, field_name: str, reason: str):
        self.file, self.row, self.field, self.reason = file, row, field_name, reason
        super().__init__(f"{file}:{row}: field {field_name!r}: {reason}")


@dataclass
class Row:
    """A validated row; images are still undecoded ({"bytes"} or {"path"} entries)."""

    messages: List[Dict[str, str]]
    images: List[Dict[str, Any]]
    reward: Dict[str, Any]
    task: str
    data_source: str
    id: Optional[str] = None
    difficulty: Optional[int] = None
    solution: Optional[str] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def arrow_schema():
    """The pyarrow schema our writers use (synthetic set, V-Triune converter)."""
    import pyarrow as pa

    return pa.schema([
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("reward", pa.string()),
        ("task", pa.string()),
        ("data_source", pa.string()),
        ("id", pa.string()),
        ("difficulty", pa.int32()),
        ("solution", pa.string()),
    ])


def _spec_check(spec: Any) -> None:
    """Validate a spec with the verifiers' own checker (names the offending field)."""
    try:
        from dualrpo_mcore.verifiers.scoring import validate_spec
    except ImportError:  # verifiers absent from a partial build: at least check the shape
        if not isinstance(spec, Mapping) or not ("verifier" in spec or "components" in spec):
            raise ValueError("spec must be a dict with 'verifier' or 'components'") from None
        return
    validate_spec(spec)


def parse_reward(value: Any) -> Dict[str, Any]:
    """A spec from a JSON string or a (possibly null-padded) struct; raises ValueError."""
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a dict or a JSON object, got {type(value).__name__}")
    # struct columns pad absent keys with null; a null params means "no params"
    spec = {k: v for k, v in value.items() if v is not None}
    if "components" in spec:
        spec["components"] = [{k: v for k, v in c.items() if v is not None} if isinstance(c, Mapping)
                              else c for c in spec["components"]]
    return spec


def _check_messages(msgs: Any, fail) -> List[Dict[str, str]]:
    if not isinstance(msgs, (list, tuple)) or not msgs:
        fail("messages", "must be a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping):
            fail(f"messages[{i}]", "must be a dict with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            fail(f"messages[{i}].role", f"must be one of {ROLES}, got {role!r}")
        if not isinstance(content, str):
            fail(f"messages[{i}].content", f"must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _check_images(imgs: Any, fail) -> List[Dict[str, Any]]:
    if imgs is None:
        return []
    if not isinstance(imgs, (list, tuple)):
        fail("images", f"must be a list, got {type(imgs).__name__}")
    out = []
    for i, im in enumerate(imgs):
        if isinstance(im, (bytes, bytearray)):
            im = {"bytes": bytes(im), "path": None}
        elif isinstance(im, str):
            im = {"bytes": None, "path": im}
        elif not isinstance(im, Mapping) or not (im.get("bytes") or im.get("path")):
            fail(f"images[{i}]", "needs non-empty 'bytes' or 'path'")
        data = im.get("bytes")
        if isinstance(data, str):  # jsonl holds bytes as base64 text
            try:
                data = base64.b64decode(data, validate=True)
            except ValueError:
                fail(f"images[{i}].bytes", "a string here must be base64")
        out.append({"bytes": data, "path": im.get("path")})
    return out


def validate_row(raw: Mapping[str, Any], *, file: str, row: int, check_spec: bool = True) -> Row:
    """Check one raw row and return it normalised; raises :class:`BadRow` naming the field."""

    def fail(name: str, reason: str):
        raise BadRow(file, row, name, reason)

    if not isinstance(raw, Mapping):
        fail("<row>", f"must be a JSON object, got {type(raw).__name__}")
    for name in REQUIRED_FIELDS:
        if raw.get(name) is None:
            fail(name, "missing")
    messages = _check_messages(raw["messages"], fail)
    images = _check_images(raw["images"], fail)
    n_ph = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages)
    if n_ph != len(images):
        fail("messages", f"{n_ph} '{IMAGE_PLACEHOLDER}' placeholders but {len(images)} images")
    try:
        spec = parse_reward(raw["reward"])
        if check_spec:
            _spec_check(spec)
    except ValueError as e:
        fail("reward", str(e))
    for name in ("task", "data_source"):
        if not isinstance(raw[name], str) or not raw[name]:
            fail(name, f"must be a non-empty string, got {raw[name]!r}")
    diff = raw.get("difficulty")
    known = set(REQUIRED_FIELDS) | {"id", "difficulty", "solution"}
    return Row(messages=messages, images=images, reward=spec, task=raw["task"],
               data_source=raw["data_source"], id=None if raw.get("id") is None else str(raw["id"]),
               difficulty=None if diff is None else int(diff), solution=raw.get("solution"),
               extra={k: v for k, v in raw.items() if k not in known})


def to_chat(messages: List[Dict[str, str]]) -> List[Dict[str, Any]]:
    """Our placeholder strings -> HF content lists ([{"type": "image"}, {"type": "text"}, ...])."""
    out = []
    for m in messages:
        parts: List[Dict[str, Any]] = []
        for j, chunk in enumerate(m["content"].split(IMAGE_PLACEHOLDER)):
            if j:
                parts.append({"type": "image"})
            if chunk:
                parts.append({"type": "text", "text": chunk})
        out.append({"role": m["role"], "content": parts})
    return out


def make_row(*, messages, images, reward, task, data_source, id=None, difficulty=None,
             solution=None) -> Dict[str, Any]:
    """A row dict ready for :func:`arrow_schema` (reward serialised to canonical JSON)."""
    return {"messages": messages, "images": images,
            "reward": json.dumps(reward, sort_keys=True, separators=(",", ":")),
            "task": task, "data_source": data_source, "id": id, "difficulty": difficulty,
            "solution": solution}
