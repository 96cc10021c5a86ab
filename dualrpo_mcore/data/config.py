"""Typed configuration of the data pipeline (part of the trainer's config tree)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

FORMATS = ("auto", "parquet", "jsonl", "arrow", "saved")
BAD_ROW_POLICIES = ("fail", "skip")
REWARD_PROFILES = ("vtriune", "native")
INSTRUCTION_POOLS = ("vtriune_cot",)


@dataclass
class SourceConfig:
    """One data source: a file, a glob, a directory of files, or a saved ``datasets`` dir."""

    path: str
    """Parquet / jsonl / arrow file, glob (``data/*.parquet``), directory of such files, or a
    directory written by ``Dataset.save_to_disk``."""
    weight: float = 1.0
    """Relative mixing weight; draws pick this source with probability weight / sum(weights)."""
    name: Optional[str] = None
    """Name used in sample ids and logs; defaults to the path's base name."""
    format: str = "auto"
    """One of auto | parquet | jsonl | arrow | saved; auto decides by extension / directory."""
    split: str = "train"
    """Split to take when a saved directory holds a ``DatasetDict``."""

    def __post_init__(self):
        if not self.path:
            raise ValueError("SourceConfig.path must be set")
        if not (self.weight > 0):
            raise ValueError(f"SourceConfig.weight must be > 0, got {self.weight!r} ({self.path})")
        if self.format not in FORMATS:
            raise ValueError(f"SourceConfig.format must be one of {FORMATS}, got {self.format!r}")


@dataclass
class DataConfig:
    """Where prompts come from and how they are filtered, mixed and processed."""

    sources: List[SourceConfig] = field(default_factory=list)
    """Data sources mixed by weight (dicts are accepted and converted)."""
    seed: int = 0
    """Seeds the per-source shuffles and the mixing draws; same seed -> same order."""
    shuffle: bool = True
    """Shuffle each source anew every epoch (a seeded permutation per (source, epoch))."""
    min_pixels: int = 56 * 56
    """Lower bound on an image's area after Qwen2.5-VL's smart resize."""
    max_pixels: int = 28 * 28 * 1280
    """Upper bound on an image's area after resize (bounds vision tokens: max_pixels / 784)."""
    max_image_pixels: int = 8192 * 8192
    """Raw decoded size above which an image is rejected as oversized (a bad row); 0 = off."""
    max_prompt_tokens: Optional[int] = None
    """Prompts longer than this (text + image tokens) are filtered out (counted, not bad);
    needs a tokenizer. None = no limit."""
    processor_dir: Optional[str] = None
    """Model directory holding tokenizer + preprocessor config; None = default Qwen2-VL image
    processor and no tokenization in the loader."""
    bad_rows: str = "skip"
    """``fail``: the first bad row raises, naming file, row and field. ``skip``: bad rows are
    logged with file:row, counted and skipped, until a threshold below is crossed."""
    max_bad_rows: Optional[int] = 1000
    """Under ``skip``, abort once more distinct bad rows than this were met (None = no limit)."""
    max_bad_fraction: float = 0.05
    """Under ``skip``, abort once bad rows exceed this fraction of rows read (checked after
    ``min_rows_for_fraction`` rows)."""
    min_rows_for_fraction: int = 200
    """Rows to read before ``max_bad_fraction`` is enforced (a few bad rows early are noise)."""
    validate_specs: bool = True
    """Check each reward spec with the verifiers' ``validate_spec`` (unknown verifier, bad params)."""
    reward_profile: str = "vtriune"
    """How rows in V-Triune's published layout (Orsta-Data-47k: ``prompt``, ``reward_model``, ...)
    are scored. ``vtriune``: rows naming their ``mathverify``/``detection`` verifiers get
    ``vtriune_math``/``vtriune_detection``, which reproduce their reward server. ``native``: this
    package's verifiers (math, choice, detection, ... plus a ``format`` component). Rows in our own
    schema name their verifier in ``reward`` and are not affected (one may name ``vtriune_math``)."""
    instructions: Dict[str, str] = field(default_factory=dict)
    """Task -> instruction pool appended to the last prompt message, per row and epoch. The one pool,
    ``vtriune_cot``, is V-Triune's "think step by step / answer in \\boxed{}" pair, applied to rows
    scored by math-verify-style verifiers (``data.vtriune_prompts.VTRIUNE_INSTRUCTIONS`` lists
    their six tasks). Empty = prompts as written."""
    image_resize: Dict[str, List[int]] = field(default_factory=dict)
    """Task -> ``[min_area, max_area]`` in pixels: images of that task are shrunk above max and
    enlarged below min before the processor (V-Triune: ``[512*512, 2048*2048]`` for every task,
    ``data.vtriune_prompts.VTRIUNE_IMAGE_RESIZE``); the resized image is what the rollout engine
    receives too. A task absent here keeps its images as they are."""

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceConfig) else SourceConfig(**s) for s in self.sources]
        if self.bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"DataConfig.bad_rows must be one of {BAD_ROW_POLICIES}, got {self.bad_rows!r}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"DataConfig needs 0 < min_pixels <= max_pixels, got "
                             f"{self.min_pixels}, {self.max_pixels}")
        if self.max_pixels < 28 * 28:
            raise ValueError("DataConfig.max_pixels must be >= 784 (one 28x28 merged patch)")
        if self.max_image_pixels < 0:
            raise ValueError("DataConfig.max_image_pixels must be >= 0 (0 disables the check)")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ValueError("DataConfig.max_prompt_tokens must be > 0 or None")
        if self.max_bad_rows is not None and self.max_bad_rows < 0:
            raise ValueError("DataConfig.max_bad_rows must be >= 0 or None")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError("DataConfig.max_bad_fraction must be in [0, 1]")
        if self.min_rows_for_fraction < 1:
            raise ValueError("DataConfig.min_rows_for_fraction must be >= 1")
        self._check_per_task()
        names = [s.name for s in self.sources if s.name]
        if len(names) != len(set(names)):
            raise ValueError(f"DataConfig.sources: duplicate source names {names}")

    def _check_per_task(self) -> None:
        from dualrpo_mcore.data.schema import TASKS

        if self.reward_profile not in REWARD_PROFILES:
            raise ValueError(f"DataConfig.reward_profile must be one of {REWARD_PROFILES}, got {self.reward_profile!r}")
        for name, table in (("instructions", self.instructions), ("image_resize", self.image_resize)):
            unknown = sorted(set(table) - set(TASKS) - {"other"})
            if unknown:
                raise ValueError(f"DataConfig.{name}: unknown task {unknown[0]!r}; tasks: {TASKS + ('other',)}")
        for task, pool in self.instructions.items():
            if pool not in INSTRUCTION_POOLS:
                raise ValueError(f"DataConfig.instructions[{task!r}] must be one of {INSTRUCTION_POOLS}, got {pool!r}")
        for task, bounds in self.image_resize.items():
            ok = (isinstance(bounds, (list, tuple)) and len(bounds) == 2
                  and all(isinstance(v, int) and not isinstance(v, bool) for v in bounds)
                  and 0 <= bounds[0] <= bounds[1])
            if not ok:
                raise ValueError(f"DataConfig.image_resize[{task!r}] must be [min_area, max_area] ints with "
                                 f"0 <= min <= max, got {bounds!r}")
