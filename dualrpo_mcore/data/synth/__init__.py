"""The built-in synthetic eight-task set, generated on the spot (no download).

Every sample is a pure function of ``(seed, split, task, index)``: its generator gets a
``random.Random`` seeded from that string (sha512-based, independent of PYTHONHASHSEED), so any
slice can be regenerated alone and the same seed always writes byte-identical parquet files.
Difficulty cycles 1, 2, 3 over the index so every level is equally represented.

Two layouts: ``free`` (objects anywhere, sizes in pixels: the set for real models) and ``grid``
(:mod:`.grid`: everything on the tiny demo policy's 28-pixel token grid).
"""
from __future__ import annotations

import random
from typing import Callable, Dict, Iterator, List

from dualrpo_mcore.atomic import atomic_path
from dualrpo_mcore.data.schema import IMAGE_PLACEHOLDER, TASKS, arrow_schema, make_row
from dualrpo_mcore.data.synth import grid
from dualrpo_mcore.data.synth.common import Sample, png_bytes
from dualrpo_mcore.data.synth.perception import counting_task, detection_task, grounding_task, ocr_task
from dualrpo_mcore.data.synth.reasoning import chart_task, math_task, puzzle_task, science_task
from dualrpo_mcore.registry import Registry

GENERATORS: Registry[Callable[[random.Random, int], Sample]] = Registry("synthetic task")
for _name, _fn in (("math", math_task), ("puzzle", puzzle_task), ("science", science_task),
                   ("chart", chart_task), ("detection", detection_task),
                   ("grounding", grounding_task), ("counting", counting_task), ("ocr", ocr_task)):
    GENERATORS.register(_name, _fn)
GRID_GENERATORS: Registry[Callable[[random.Random, int], Sample]] = Registry("grid-layout synthetic task")
for _name, _fn in grid.TASK_FNS.items():
    GRID_GENERATORS.register(_name, _fn)
assert set(GENERATORS.names()) == set(TASKS) == set(GRID_GENERATORS.names())
LAYOUTS = {"free": GENERATORS, "grid": GRID_GENERATORS}

DATA_SOURCE_PREFIX = "synth"


def sample_rng(seed: int, split: str, task: str, index: int) -> random.Random:
    return random.Random(f"dualrpo-synth:{seed}:{split}:{task}:{index}")


def generate(task: str, index: int, *, seed: int = 0, split: str = "train",
             difficulty: int | None = None, layout: str = "free") -> Sample:
    """Sample ``index`` of ``task``; difficulty defaults to ``1 + index % 3``."""
    d = 1 + index % 3 if difficulty is None else int(difficulty)
    if d not in (1, 2, 3):
        raise ValueError(f"difficulty must be 1, 2 or 3, got {difficulty!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    return LAYOUTS[layout].get(task)(sample_rng(seed, split, task, index), d)


def iter_samples(num_per_task: int, *, seed: int = 0, split: str = "train",
                 tasks=TASKS, layout: str = "free") -> Iterator[tuple]:
    """``(task, index, Sample)`` task by task."""
    for task in tasks:
        for i in range(num_per_task):
            yield task, i, generate(task, i, seed=seed, split=split, layout=layout)


def to_row(sample: Sample, *, index: int, seed: int, split: str) -> Dict:
    """A schema row (image embedded as PNG bytes)."""
    return make_row(
        messages=[{"role": "user", "content": IMAGE_PLACEHOLDER + sample.question}],
        images=[{"bytes": png_bytes(sample.image), "path": None}],
        reward=sample.reward, task=sample.task,
        data_source=f"{DATA_SOURCE_PREFIX}/{sample.task}/{sample.kind}" if sample.kind
        else f"{DATA_SOURCE_PREFIX}/{sample.task}",
        id=f"{split}-{sample.task}-{seed}-{index}", difficulty=sample.difficulty,
        solution=sample.response())


def write_split(path: str, num_per_task: int, *, seed: int, split: str, progress=None,
                layout: str = "free") -> int:
    """Write one split as parquet; rows are interleaved task by task (i-th of every task, ...)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: List[Dict] = []
    for i in range(num_per_task):
        for task in TASKS:
            rows.append(to_row(generate(task, i, seed=seed, split=split, layout=layout), index=i, seed=seed,
                               split=split))
        if progress is not None:
            progress(len(rows))
    table = pa.Table.from_pylist(rows, schema=arrow_schema())
    with atomic_path(path) as tmp:  # a reader never sees half a file
        pq.write_table(table, tmp, compression="zstd", row_group_size=512)
    return len(rows)


def corpus_texts(num_per_task: int = 60, seed: int = 0) -> Iterator[str]:
    """Text a tokenizer for the synthetic set should know: prompts, responses and templates.

    Its own split ("corpus") and a fixed default seed: the tokenizer - hence the demo model's
    vocabulary - does not change with the seed of the data set it is shipped with."""
    from dualrpo_mcore.data.tokenizer import DEFAULT_SYSTEM, corpus_words

    yield DEFAULT_SYSTEM
    yield " ".join(corpus_words())
    for layout in LAYOUTS:
        for _task, _i, s in iter_samples(num_per_task, seed=seed, split="corpus", layout=layout):
            yield s.question
            yield s.response()
            yield f"The answer is {s.answer_text}."
