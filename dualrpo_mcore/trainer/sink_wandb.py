"""Weights & Biases as a :class:`~.metrics.MetricSink`: the same metric names at the same steps as
``metrics.jsonl`` and TensorBoard, and the resolved config once.

Turned on by ``logging.wandb.mode`` ('offline' or 'online'; default 'disabled') and opened by
:meth:`~.metrics.MetricsLogger.log_config`, because W&B wants the run's config when the run starts.

Resuming: the W&B run id is kept in ``<run_dir>/wandb_run_id``, so a resumed run continues the same W&B
run (``resume="allow"``; offline, each start writes its own run directory under that id). W&B's steps
only increase, so it keeps the points it already has for the steps a resume redoes and ignores the
new ones; they are the same values where the resume is bitwise (CPU), and the JSONL and TensorBoard,
which purge them, are the record elsewhere. W&B's own rewind (``resume_from``), which would purge them
too, is a private preview, so it is not used. A fresh start (no resume) begins a new W&B run, as the
JSONL starts a new file.

Durability: W&B writes through its own service process, so ``sync`` cannot fsync it; the JSONL and
TensorBoard files are the run's record, W&B mirrors them.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from .metrics import MetricSink, _scalars

ID_FILE = "wandb_run_id"


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError(f"logging.wandb.mode is set but wandb does not import ({e}): "
                          "pip install 'dualrpo-mcore[wandb]'") from e
    return wandb


def from_config(config: Mapping[str, Any], run_dir: str, resume_step: Optional[int]) -> Optional["WandbSink"]:
    """The sink the resolved config's ``logging.wandb`` asks for, or None when it is disabled."""
    from .rl_config import WandbConfig

    logging = config.get("logging") if isinstance(config, Mapping) else None
    section = logging.get("wandb") if isinstance(logging, Mapping) else None
    section = dict(section) if isinstance(section, Mapping) else {}
    if section.get("mode", "disabled") == "disabled":
        return None
    return WandbSink(WandbConfig(**section), run_dir, resume_step)


class WandbSink(MetricSink):
    def __init__(self, cfg, run_dir: str, resume_step: Optional[int] = None):
        self.cfg, self.run_dir = cfg, run_dir
        self._wandb = _import_wandb()
        self._run = None
        self._resume_step = resume_step

    def _start(self, config: Mapping[str, Any]) -> None:
        cfg, wandb = self.cfg, self._wandb
        id_path = os.path.join(self.run_dir, ID_FILE)
        previous = None
        if self._resume_step is not None and self._resume_step >= 0 and os.path.exists(id_path):
            with open(id_path, encoding="utf-8") as f:
                previous = f.read().strip() or None
        kwargs = dict(project=cfg.project, entity=cfg.entity, mode=cfg.mode, tags=list(cfg.tags),
                      name=cfg.name or os.path.basename(os.path.normpath(self.run_dir)),
                      dir=cfg.dir or self.run_dir, config=dict(config))
        if previous:
            kwargs.update(id=previous, resume="allow")
        os.makedirs(kwargs["dir"], exist_ok=True)
        self._run = wandb.init(**kwargs)
        from dualrpo_mcore.atomic import atomic_write

        atomic_write(id_path, self._run.id)

    def log_config(self, config: Mapping[str, Any]) -> None:
        if self._run is None:
            self._start(config)
        else:
            self._run.config.update(dict(config), allow_val_change=True)

    def write(self, step: int, record: Mapping[str, Any]) -> None:
        if self._run is None:
            raise RuntimeError("the W&B sink got a record before the run's config (MetricsLogger.log_config)")
        self._run.log(_scalars(record), step=int(step))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
