"""Training metrics: per-task aggregation, phase timing, and the JSONL / TensorBoard / console sinks.

One record per optimizer step goes to every sink: ``metrics.jsonl`` (one flushed line each, so a
crash loses at most the step being written), TensorBoard, a tqdm progress bar, and W&B
(:mod:`.sink_wandb`) when ``logging.wandb.mode`` turns it on; each keeps :class:`MetricSink`'s
contract. Only the global rank 0 writes anything; other ranks hold a logger that silently drops
records, so the loop calls it unconditionally. ``log(..., durable=True)`` also fsyncs every file
sink, which the loop asks for before each checkpoint (docs/design.md §3.6, :mod:`.recovery`).

Resuming: ``resume_step=k`` keeps the JSONL lines with ``step <= k`` (``k = -1`` drops all);
TensorBoard hides the dropped steps' events through ``purge_step=k + 1``.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np

JSONL_NAME = "metrics.jsonl"
# Held-out eval keys: "<HELDOUT><field>/<task>" and "<HELDOUT_LEVELS><field>/<task>/d<k>".
HELDOUT, HELDOUT_LEVELS = "eval/", "eval/by_difficulty/"
# Shown on the progress bar when present (short label, record key).
_BAR_KEYS = (("accuracy", "accuracy/all"), ("rew", "reward/all"), ("self_cert", "self_certainty/all"), ("kl", "kl"))


def to_float(value: Any) -> Optional[float]:
    """A plain Python float for JSON, or None for NaN/inf (JSON has no spelling for them)."""
    if hasattr(value, "item"):
        value = value.item()
    value = float(value)
    return value if math.isfinite(value) else None


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def per_task_means(tasks: Sequence[str], **fields: Any) -> Dict[str, float]:
    """Means per task and overall of per-sample arrays.

    ``tasks[i]`` names sample i's task; each keyword is a length-N array or tensor, and its name is
    the metric prefix (``accuracy=v`` gives ``accuracy/<task>``); step-level scalars go to ``log``.
    Returns ``{"<field>/<task>": mean, "<field>/all": mean, "count/<task>": n}``. Non-finite
    samples are left out of the mean they would poison (and counted under ``nonfinite/<field>``)
    so one bad sample never blanks a whole curve.
    """
    tasks = list(tasks)
    n = len(tasks)
    out: Dict[str, float] = {}
    by_task: Dict[str, list] = defaultdict(list)
    for i, t in enumerate(tasks):
        by_task[str(t)].append(i)
    for name, values in fields.items():
        if values is None:
            continue
        arr = _as_array(values)
        if arr.shape[0] != n:
            raise ValueError(f"metric {name!r} has {arr.shape[0]} values for {n} samples")
        ok = np.isfinite(arr)
        if not ok.all():
            out[f"nonfinite/{name}"] = float((~ok).sum())
        out[f"{name}/all"] = float(arr[ok].mean()) if ok.any() else float("nan")
        for task, idx in sorted(by_task.items()):
            sel = arr[idx][ok[idx]]
            out[f"{name}/{task}"] = float(sel.mean()) if sel.size else float("nan")
    for task, idx in sorted(by_task.items()):
        out[f"count/{task}"] = float(len(idx))
    return out


class PhaseTimer:
    """Wall-clock seconds per phase of one step: ``with timer("rollout"): ...``.

    Re-entering a phase in the same step adds to it (e.g. several update micro-steps). ``pop()``
    returns ``{"time/<phase>": s, "time/step": total}`` and starts the next step afresh.
    """

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._acc: Dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = self._clock()
        try:
            yield
        finally:
            self._acc[phase] += self._clock() - start

    def pop(self) -> Dict[str, float]:
        out = {f"time/{k}": v for k, v in self._acc.items()}
        out["time/step"] = sum(self._acc.values())
        self._acc = defaultdict(float)
        return out


def truncate_jsonl(path: str, keep_through_step: int) -> int:
    """Drop records with ``step > keep_through_step`` (and a torn last line) from ``path``, atomically.

    Returns the number of lines kept. The rewrite goes through a temp file + rename (both fsynced), so
    a crash here leaves either the old file or the new one."""
    from dualrpo_mcore.atomic import atomic_write

    if not os.path.exists(path):
        return 0
    kept = [json.dumps(rec, allow_nan=False) + "\n" for rec in read_jsonl(path)
            if isinstance(rec, dict) and rec.get("step", -1) <= keep_through_step]
    atomic_write(path, "".join(kept))
    return len(kept)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the inode's dirty pages, whichever descriptor wrote them
    finally:
        os.close(fd)


class MetricSink:
    """One backend of :class:`MetricsLogger`. A new backend is one subclass in one file; a backend that
    the run's config turns on also gets a line in :data:`CONFIG_SINKS`.

    The contract every sink keeps (the loop's crash guarantees rest on it): ``write`` has the record
    on its way before returning (flushed, for a file); ``sync`` makes what was written survive a power
    loss, when the backend can (the logger calls it before each checkpoint); a sink opened with
    ``resume_step=k`` hides every record of a step after ``k`` that an earlier run wrote, so a curve
    never holds two points for one step."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The resolved run config, once per start (default: not kept)."""

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Durable, where the backend allows (default: nothing more to do)."""

    def close(self) -> None:
        """Release the backend (default: nothing held)."""


def _scalars(record: Mapping[str, Any]) -> Dict[str, float]:
    """The numeric metrics of a record: what TensorBoard and W&B plot (strings and None are left out)."""
    return {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, float)}


class JsonlSink(MetricSink):
    """``metrics.jsonl``: one flushed line per step, the run's authoritative record."""

    def __init__(self, run_dir: str, resume_step: Optional[int] = None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, JSONL_NAME)
        if resume_step is not None:
            truncate_jsonl(self.path, resume_step)
        elif os.path.exists(self.path):
            # A fresh run in a used directory starts a fresh file rather than interleaving curves.
            os.replace(self.path, self.path + f".old-{int(time.time())}")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def sync(self) -> None:
        os.fsync(self._file.fileno())
        _fsync_path(self.run_dir)  # the file's own name, for a run whose file was just created

    def close(self) -> None:
        self._file.close()


class TensorBoardSink(MetricSink):
    """TensorBoard events under ``<run_dir>/tb``, one scalar per numeric metric."""

    def __init__(self, run_dir: str, resume_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events past the resume point the same way the JSONL is truncated.
        self._tb = SummaryWriter(os.path.join(run_dir, "tb"),
                                 purge_step=None if resume_step is None else resume_step + 1)

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        for k, v in _scalars(record).items():
            self._tb.add_scalar(k, v, step)
        self._tb.flush()

    def sync(self) -> None:
        for writer in self._tb.all_writers.values():
            name = getattr(writer.event_writer, "_file_name", None)  # tensorboard's EventFileWriter
            logdir = writer.get_logdir()
            files = [name] if name else [os.path.join(logdir, n) for n in os.listdir(logdir)
                                         if n.startswith("events.")]
            for path in files + [logdir]:
                _fsync_path(path)

    def close(self) -> None:
        self._tb.close()


class ProgressSink(MetricSink):
    """The console: a tqdm bar at the step, with a few headline metrics."""

    def __init__(self, total_steps: Optional[int], resume_step: Optional[int] = None):
        from tqdm import tqdm

        self._bar = tqdm(total=total_steps, initial=max(0, resume_step or 0), desc="train", dynamic_ncols=True)

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        shown = {lab: f"{record[key]:.3g}" for lab, key in _BAR_KEYS if isinstance(record.get(key), float)}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(max(0, int(step) - self._bar.n))

    def close(self) -> None:
        self._bar.close()


# Sinks the run's config turns on: name -> "module:function(config, run_dir, resume_step)", which
# returns the sink or None when the config leaves it off. Imported only when a config is logged, so
# an optional backend costs nothing when unused.
CONFIG_SINKS: Dict[str, str] = {"wandb": "dualrpo_mcore.trainer.sink_wandb:from_config"}


def _config_sinks(config: Mapping[str, Any], run_dir: str, resume_step: Optional[int]) -> List[MetricSink]:
    import importlib

    out = []
    for target in CONFIG_SINKS.values():
        module, _, fn = target.partition(":")
        sink = getattr(importlib.import_module(module), fn)(config, run_dir, resume_step)
        if sink is not None:
            out.append(sink)
    return out


class MetricsLogger:
    """Every sink of one run directory (rank 0 only): ``metrics.jsonl``, TensorBoard, the progress
    bar, and the sinks the run's config turns on (W&B), all with the same names at the same steps.

    ``log(step, metrics)`` writes one record to each; ``log_config(cfg)`` writes ``config.json`` once
    (the plotter reads ``reward_mode`` from it) and opens the config's sinks (:data:`CONFIG_SINKS`)
    with it, so call it before the first ``log``. ``tensorboard=False`` / ``progress=False`` turn
    sinks off (tests, non-interactive jobs).
    """

    def __init__(self, run_dir: str, total_steps: Optional[int] = None, resume_step: Optional[int] = None,
                 tensorboard: bool = True, progress: bool = True, enabled: Optional[bool] = None):
        from dualrpo_mcore.parallel import global_rank

        self.run_dir = run_dir
        self.enabled = global_rank() == 0 if enabled is None else enabled
        self._resume_step = resume_step
        self._config_sinks_open = False
        self.sinks: List[MetricSink] = []
        if not self.enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        jsonl = JsonlSink(run_dir, resume_step)
        self.path = jsonl.path
        self.sinks.append(jsonl)
        if tensorboard:
            self.sinks.append(TensorBoardSink(run_dir, resume_step))
        if progress:
            self.sinks.append(ProgressSink(total_steps, resume_step))

    def log_config(self, config: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from dualrpo_mcore.atomic import atomic_write_json

        atomic_write_json(os.path.join(self.run_dir, "config.json"), config, indent=2, sort_keys=True, default=str)
        if not self._config_sinks_open:  # a config's sinks open once per start
            self._config_sinks_open = True
            self.sinks.extend(_config_sinks(config, self.run_dir, self._resume_step))
        for sink in self.sinks:
            sink.log_config(config)

    def log(self, step: int, metrics: Mapping[str, Any], durable: bool = False) -> Dict[str, Any]:
        """Write one step's record to every sink; returns it (non-finite values as None). ``durable``:
        fsync every file sink before returning (the record then survives a power loss, not only a kill)."""
        record: Dict[str, Any] = {"step": int(step), "time": time.time()}
        record.update({k: v if isinstance(v, str) else to_float(v) for k, v in metrics.items()})
        if not self.enabled:
            return record
        for sink in self.sinks:
            sink.write(int(step), record)
        if durable:
            self.sync()
        return record

    def sync(self) -> None:
        """Make every sink's records durable (fsync of the JSONL and TensorBoard files, after their flush)."""
        for sink in self.sinks:
            sink.sync()

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str) -> list:
    """All records of a metrics file (torn lines skipped), None for values logged as non-finite."""
    out = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write (or a blank one)
    return out
