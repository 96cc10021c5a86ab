"""Kill anywhere, lose nothing: the order of a step's record and its checkpoint, resuming with a
fallback past unreadable checkpoints, and the checks that a checkpoint fits this run.

The invariant and the order of a record and its checkpoint: docs/design.md §3.6 ("Records before
checkpoints"). The other order would lose the record for good when a kill lands between the two: the
resume starts after the checkpoint.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

from . import faults, storage
from .context import broadcast

log = logging.getLogger(__name__)
# The QwenVLConfig fields that fix the weights' shapes: a checkpoint differing in any cannot load.
SHAPE_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_hidden_size",
              "tie_word_embeddings", "vision_hidden_size", "vision_depth", "vision_heads",
              "vision_ffn_hidden_size", "out_hidden_size", "patch_size", "temporal_patch_size",
              "in_channels", "spatial_merge_size")


# ------------------------------------------------------------------------------------ one step
def commit(ctx, step: int, metrics: Dict[str, Any], checkpoint: bool) -> None:
    """Record ``step`` in every sink, durably if a checkpoint follows, then checkpoint it."""
    from .context import save

    record(ctx, step, metrics, durable=checkpoint)
    faults.at("after_log", step)
    if checkpoint:
        save(ctx, step, poisoned=metrics.get("skipped", 0.0) > 0)
    faults.at("after_checkpoint", step)


def record(ctx, step: int, metrics: Dict[str, Any], durable: bool = False) -> None:
    """Only rank 0 writes records; whether that worked reaches every rank before anyone goes on, so a
    full disk stops all ranks here with the same message (not rank 0 alone, its peers later in a
    collective with "Connection closed by peer")."""
    with _agreed_write(ctx, f"the record of step {step}"):
        ctx.logger.log(step, metrics, durable=durable)


def open_logger(ctx, resolved: Dict[str, Any], start: int) -> None:
    """``ctx.logger`` for a run that starts after ``start`` (records after it dropped), with the
    resolved config written next to it; a failure stops every rank alike."""
    from .metrics import MetricsLogger

    cfg = ctx.cfg
    with _agreed_write(ctx, "opening the metrics files"):
        ctx.logger = MetricsLogger(cfg.logging.run_dir, cfg.schedule.steps, resume_step=records_to_keep(cfg, start),
                                   tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        ctx.logger.log_config(resolved)


@contextmanager
def _agreed_write(ctx, what: str) -> Iterator[None]:
    """The body's ``OSError`` (a write on rank 0) as one :class:`~.storage.StorageError` raised on every
    rank once the body is over, naming ``what`` failed, where, and the last good checkpoint."""
    text = None
    try:
        yield
    except OSError as e:
        text = storage.write_failed(what, ctx.cfg.logging.run_dir, e, _latest(ctx.manager))
    text = broadcast(text)
    if text:
        raise storage.StorageError(text) from None  # the message names the cause: no chained traceback


def records_to_keep(cfg, start: int) -> Optional[int]:
    """The ``resume_step`` of the metrics logger: records after ``start`` are dropped (the resumed run
    writes them again); a resume that found no checkpoint drops them all (-1), step 0's held-out
    eval included, which it redoes. None: a fresh run (the logger sets an old file aside)."""
    if str(cfg.checkpoint.resume or "").strip().lower() in ("", "none", "no"):
        return None
    return start if start > 0 else -1


def _latest(manager) -> Optional[str]:
    try:
        return manager.latest()
    except OSError:
        return None


def preflight(cfg) -> None:
    """Before any model is built: the run and checkpoint dirs must take a write (every rank checks;
    they see the same file system, so they stop together)."""
    from .checkpoint import CheckpointManager

    last = _latest(CheckpointManager(cfg.checkpoint_dir, keep_last=None))
    storage.check_writable([cfg.logging.run_dir, cfg.checkpoint_dir], last_good=last)


# ------------------------------------------------------------------------------------ resume
def resume(ctx) -> int:
    """Restore the checkpoint named by ``checkpoint.resume`` (docs/design.md §3.6); returns its step
    (0: start fresh). A checkpoint of another configuration raises
    :class:`~.storage.CheckpointMismatchError` under ``auto`` too: older ones are of the same
    configuration, so there is no fallback."""
    mgr, spec = ctx.manager, ctx.cfg.checkpoint.resume
    auto = str(spec or "").strip().lower() == "auto"
    candidates, error = None, None
    if ctx.rank0:  # rank 0's view of the directory decides for everyone
        removed = mgr.clean_stale()
        if removed:
            log.warning("removed %s under %s: partial checkpoint(s) of a save that did not finish (never loaded)",
                        ", ".join(removed), mgr.root)
        try:
            named = [] if auto else [mgr.resolve_resume(spec)]
            candidates = [p for _, p in reversed(mgr.complete())] if auto else [p for p in named if p]
        except OSError as e:
            error = f"--resume {spec}: {e if isinstance(e, FileNotFoundError) else storage.cause(e)}"
    candidates, error = broadcast((candidates, error))
    if error:
        raise storage.CheckpointLoadError(error)
    if not candidates:
        return 0
    failed: List[str] = []
    for i, path in enumerate(candidates):
        state, failures = _load(ctx, path)
        if not failures:
            extra = state["extra"]
            ctx.loader.load_state_dict(extra["loader"])
            ctx.actor.load_state_dict(extra["actor"])
            log.info("resumed from %s (step %d)", path, extra["step"])
            return int(extra["step"])
        text = _failure_text(path, failures)
        if not auto or any(isinstance(exc, ValueError) for _, _, exc in failures):
            raise _agreed_error(failures, text)
        failed.append(text)
        if ctx.rank0 and i + 1 < len(candidates):
            log.warning("%s; falling back to %s", text, candidates[i + 1])
    raise storage.CheckpointLoadError(f"--resume {spec}: no checkpoint under {mgr.root} loads: {'; '.join(failed)}. "
                                      f"Move the unreadable ones aside to start over")


def _load(ctx, path: str) -> Tuple[Optional[Dict[str, Any]], list]:
    """Load ``path`` on every rank; every rank learns whether any failed."""
    state, error = None, None
    try:
        state = ctx.manager.load(path, model=ctx.actor.model, optimizer=ctx.actor.optimizer, layout=layout(ctx))
    except storage.FAILURES as e:  # noqa: BLE001 - agreed on below, raised or fallen back from on every rank
        error = e
    return state, storage.agree(error, path)


def _failure_text(path: str, failures) -> str:
    ranks = sorted({r for r, _, _ in failures})
    where = "" if storage.dist_world() == 1 else f" (rank {ranks[0]})" if len(ranks) == 1 else \
        f" (ranks {', '.join(map(str, ranks))})"
    text = failures[0][1]
    text = text[len(path) + 2:] if text.startswith(path + ": ") else text
    return f"cannot load checkpoint {path}{where}: {text}"


def _agreed_error(failures, text: str) -> Exception:
    mismatch = any(isinstance(exc, storage.CheckpointMismatchError) for _, _, exc in failures)
    return (storage.CheckpointMismatchError if mismatch else storage.CheckpointLoadError)(text)


# ------------------------------------------------------------------------------------ layout
def layout(ctx) -> Dict[str, Any]:
    """What a checkpoint of this run is tied to: the parallel layout and the model's shape."""
    info = ctx.actor.info
    return {"tp": info.tp_size, "pp": info.pp_size, "world_size": storage.dist_world(),
            "distributed_optimizer": bool(ctx.actor.distributed_optimizer),
            "model": {k: getattr(ctx.actor.arch, k, None) for k in SHAPE_KEYS}}


def layout_differences(saved: Optional[Dict[str, Any]], here: Optional[Dict[str, Any]]) -> Tuple[List[str], bool]:
    """``(differences, reshardable)`` between the layout a checkpoint was saved with and this run's.

    torch_dist stores global tensors, so the model and a plain optimizer load under another TP/PP.
    Not reshardable: another model shape, another world size (the per-rank files hold each rank's
    loop state and RNG streams), a distributed optimizer under another TP/PP (its dp_reshardable
    layout reshards over data parallelism only), or a switch between the two optimizers."""
    if not saved or not here:
        return [], True
    diffs, fixed = [], False
    for key in sorted(set(saved) | set(here)):
        a, b = saved.get(key), here.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            model = [f"model.{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            diffs += model
            fixed |= bool(model)
        elif a != b:
            diffs.append(f"{key} {a} vs {b}")
            fixed |= key in ("world_size", "distributed_optimizer") or bool(
                key in ("tp", "pp") and (saved.get("distributed_optimizer") or here.get("distributed_optimizer")))
    return diffs, not fixed


def check_layout(path: str, saved: Optional[Dict[str, Any]], here: Optional[Dict[str, Any]]) -> None:
    """Raise :class:`~.storage.CheckpointMismatchError` naming the differences, unless they reshard."""
    diffs, reshardable = layout_differences(saved, here)
    if not diffs:
        return
    text = f"{path}: saved by another configuration (checkpoint vs this run): {', '.join(diffs)}"
    if not reshardable:
        raise storage.CheckpointMismatchError(f"{text}; it cannot be resharded to this run: resume with the "
                                              f"checkpoint's settings, or start a new run")
    if int(os.environ.get("RANK", "0")) == 0:
        log.warning("%s; resharding on load (the losses will not be bitwise those of a run that kept its "
                    "layout)", text)
