"""Atomic, resumable training checkpoints: model + optimizer through Megatron-Core's distributed
checkpointing, plus per-rank loop state (step, data position, RNG streams, normaliser, ...).
Layout, atomicity, what is never saved: docs/design.md §3.6.

Failures (why they are agreed on: :mod:`.storage`): a save runs in phases (prepare, Megatron's
common file, the sharded write, the per-rank files, the publish), each ending where every rank learns
whether any rank failed (:func:`.storage.agree`); then every rank raises the same
:class:`~.storage.CheckpointSaveError`, naming the file, the free space and the last good checkpoint.
The tiny ``metadata.json`` Megatron writes from rank 0 alone behind a bare barrier is
written once before that barrier, inside our strategy, where a failure can still be agreed on.

Backend on CPU (gloo) and GPU: Megatron's stock ``torch_dist`` save strategy hands the writing to
forked writer processes and needs ``psutil``; neither is available in every environment (the gloo
test workers are daemonic processes, which may not fork children, and psutil is not a Megatron
dependency). :class:`SyncTorchDistSave` writes the same torch_dist format synchronously from the
calling process with ``torch.distributed.checkpoint``; loading uses Megatron's stock torch_dist
loader. The optimizer is saved with Megatron's ``sharded_state_dict`` (for the distributed optimizer
with the ``dp_reshardable`` layout, which does no communication; see :data:`OPTIM_METADATA`).

The loop passes ``poisoned=True`` when the step was skipped; non-finite parameters are agreed on
across ranks, so every rank raises together instead of some hanging in a collective.
"""
from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..atomic import atomic_write, fsync_dir, fsync_tree
from . import faults, storage
from .context import broadcast

STEP_RE = re.compile(r"^step_(\d{8})$")
TMP_SUFFIX = ".tmp"
LATEST = "latest"
META = "meta.json"
FORMAT_VERSION = 1
# dp_reshardable: each DP rank writes its own optimizer shard with no gather (the older default,
# fully_sharded_model_space, is rejected by Megatron 0.16's ShardedTensor validation).
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


class PoisonedStepError(RuntimeError):
    """Raised instead of writing a checkpoint of a step whose parameters or loss were non-finite."""


# ----------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> Dict[str, Any]:
    """Every random stream the loop draws from: python, numpy, torch CPU, CUDA and Megatron's
    model-parallel tracker (per-TP-rank streams for init/dropout) where present."""
    state: Dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _megatron_tracker()
    if tracker is not None:
        state["megatron_tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = _megatron_tracker()
    if tracker is not None and state.get("megatron_tracker"):
        tracker.set_states(state["megatron_tracker"])


def _megatron_tracker():
    try:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
    except ImportError:
        return None
    tracker = get_cuda_rng_tracker()
    return tracker if getattr(tracker, "get_states", None) and tracker.get_states() else None


# ----------------------------------------------------------------------------- dist plumbing
def _any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    d = storage.live_dist()
    if not d:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    if d.get_backend() == "nccl":
        t = t.cuda()
    d.all_reduce(t, op=d.ReduceOp.MAX)
    return bool(t.item() > 0)


class _Agreed(Exception):
    """Some rank failed in the phase just ended; every rank learnt it at the same point."""

    def __init__(self, failures):
        super().__init__(failures[0][1])
        self.failures = failures


def _agreement(phase: str, error: Optional[BaseException] = None) -> None:
    failures = storage.agree(error, phase)
    if failures:
        raise _Agreed(failures)


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _meta(path: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(path, META), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _write_rank_state(path: str, payload: Dict[str, Any]) -> None:
    with open(path, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())


# -------------------------------------------------------------------------- Megatron backend
def _sync_save_strategy(checkpoint_point):
    """``checkpoint_point(phase, error=None)``: called on every rank just before the collective write
    (so a failure of Megatron's rank-0-only common file is agreed on there, not met by the peers inside
    the collective) and after it (see ``CheckpointManager._write``)."""
    from megatron.core.dist_checkpointing.strategies import torch as mtorch

    class SyncTorchDistSave(mtorch.TorchDistSaveShardedStrategy):
        """Megatron's torch_dist format written synchronously in this process (see module doc)."""

        def __init__(self):
            super().__init__("torch_dist", 1, thread_count=1)

        def save(self, sharded_state_dict, checkpoint_dir):
            from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
            from torch.distributed import checkpoint as dcp

            checkpoint_point("common")  # Megatron's common.pt, written by rank 0 alone, is done
            sd, _, _ = mtorch._replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica)
            pyt = mtorch.mcore_to_pyt_state_dict(sd, False)
            planner = mtorch.MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                              flatten_state_dict=False)
            dcp.save(pyt, storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                     planner=planner)
            # Megatron writes this file next, on rank 0 alone, before a bare barrier where a failure
            # could not be agreed on; written here first, Megatron's rewrite needs no new space.
            error = None
            if storage.dist_rank() == 0:
                try:
                    save_config(CheckpointingConfig(self.backend, self.version), str(checkpoint_dir))
                except Exception as e:  # noqa: BLE001 - agreed on below
                    error = e
            checkpoint_point("metadata", error)

    return SyncTorchDistSave()


def _unwrap(module):
    # DDP wrappers (Megatron's or torch's) keep the real model in ``.module``; the sharded state
    # dict must come from the model so keys match across wrapped/unwrapped runs.
    while hasattr(module, "module") and isinstance(getattr(module, "module"), torch.nn.Module):
        module = module.module
    return module


def _as_list(model) -> List[torch.nn.Module]:
    if model is None:
        return []
    return [_unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def _spec_backend(chunks) -> Optional[str]:
    """The resolved layer spec ('te' / 'local') the chunks were built with, when they say."""
    specs = {getattr(m, "backend", None) for m in chunks} - {None}
    return specs.pop() if len(specs) == 1 else None


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"  # Megatron's convention for virtual-pipeline chunks


def _sharded_state(chunks, optimizer, is_loading: bool) -> Dict[str, Any]:
    model_sd = {_model_key(i, len(chunks)): m.sharded_state_dict() for i, m in enumerate(chunks)}
    sd: Dict[str, Any] = dict(model_sd)
    if optimizer is not None:
        flat = model_sd["model"] if len(chunks) == 1 else model_sd
        sd["optimizer"] = optimizer.sharded_state_dict(flat, is_loading=is_loading, metadata=OPTIM_METADATA)
    return sd


def _distributed_inner(optimizer) -> list:
    if optimizer is None:
        return []
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return [o for o in getattr(optimizer, "chained_optimizers", [optimizer]) if isinstance(o, DistributedOptimizer)]


def _adam_steps(optimizer) -> List[Optional[float]]:
    """The Adam step count of each distributed optimizer. Megatron 0.16 (no Apex/TE) loads the
    dp_reshardable layout's per-param ``step`` from the *current* in-memory value, not from the
    checkpoint, which would silently change Adam's bias correction after a resume; we save it
    ourselves and put it back after loading."""
    out: List[Optional[float]] = []
    for o in _distributed_inner(optimizer):
        steps = {float(s["step"]) for s in o.optimizer.state.values() if "step" in s}
        out.append(steps.pop() if len(steps) == 1 else None)
    return out


def _restore_adam_steps(optimizer, steps: Sequence[Optional[float]]) -> None:
    for o, step in zip(_distributed_inner(optimizer), steps):
        if step is None:
            continue
        for s in o.optimizer.state.values():
            if "step" in s:
                s["step"] = torch.tensor(step, dtype=s["step"].dtype, device=s["step"].device)


def _nonfinite_params(chunks) -> bool:
    # One flag per tensor, reduced on the device: a single host sync instead of one per parameter.
    flags = [torch.isfinite(p.detach()).all() for m in chunks for p in m.parameters()]
    return bool(flags) and not bool(torch.stack(flags).all())


# ------------------------------------------------------------------------------------ manager
class CheckpointManager:
    """Save / find / load the training checkpoints under ``root``, keeping the last ``keep_last``.

    Every rank calls :meth:`save` and :meth:`load` (they are collective when torch.distributed is
    initialised); only rank 0 touches directories and markers.
    """

    def __init__(self, root: str, keep_last: Optional[int] = 3, check_space: bool = True):
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), got {keep_last}")
        self.root = os.path.abspath(root)
        self.keep_last = keep_last
        # Off where free space is not what a write can use (compressing file systems).
        self.check_space = check_space

    # ---- discovery
    def step_dir(self, step: int) -> str:
        return os.path.join(self.root, f"step_{int(step):08d}")

    def complete(self) -> List[Tuple[int, str]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        out = []
        for name in os.listdir(self.root):
            m = STEP_RE.match(name)
            path = os.path.join(self.root, name)
            if m and os.path.isfile(os.path.join(path, META)):
                out.append((int(m.group(1)), path))
        return sorted(out)

    def latest(self) -> Optional[str]:
        """Newest complete checkpoint: the ``latest`` marker if it is valid, else by scanning."""
        marker = os.path.join(self.root, LATEST)
        done = self.complete()
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as f:
                path = os.path.join(self.root, f.read().strip())
            # Trust the marker only when it names the newest complete dir: a crash between the
            # rename and the marker update leaves it one step behind.
            if os.path.isfile(os.path.join(path, META)) and done and done[-1][1] == path:
                return path
        return done[-1][1] if done else None

    def resolve_resume(self, spec: Union[str, None]) -> Optional[str]:
        """``None``/``"none"``/``""`` -> start fresh; ``"auto"`` -> newest complete checkpoint under
        ``root`` (None if there is none); a path -> that checkpoint, or the newest inside it if it
        is a checkpoint root. A path that holds no complete checkpoint is an error naming it."""
        if spec is None or str(spec).strip().lower() in ("", "none", "no"):
            return None
        if str(spec).strip().lower() == "auto":
            return self.latest()
        path = os.path.abspath(str(spec))
        if os.path.isfile(os.path.join(path, META)):
            return path
        inner = CheckpointManager(path, keep_last=None).latest() if os.path.isdir(path) else None
        if inner is None:
            raise FileNotFoundError(f"--resume {spec}: no complete checkpoint (a directory with {META}) "
                                    f"at {path}")
        return inner

    # ---- save
    def save(self, step: int, model=None, optimizer=None, extra_state: Optional[Dict[str, Any]] = None,
             poisoned: bool = False, save_rng: bool = True, layout: Optional[Dict[str, Any]] = None) -> str:
        """Write checkpoint ``step`` atomically and prune to ``keep_last``; returns its path.

        ``model``: a Megatron module (or list of virtual-pipeline chunks; DDP wrappers are
        unwrapped); ``optimizer``: a Megatron optimizer; ``extra_state``: this rank's loop state
        (data loader ``state_dict()``, normaliser, config, ...), any torch-picklable objects;
        ``layout``: the run's parallel layout and model shape (:func:`.recovery.layout_differences`
        checks it on load). A failed write raises on every rank (module doc); a partial
        ``step_N.tmp`` stays (never loaded) until the next save or start removes it.
        """
        chunks = _as_list(model)
        if poisoned:
            raise PoisonedStepError(f"refusing to checkpoint step {step}: it was marked poisoned (NaN/inf)")
        if _any_rank(_nonfinite_params(chunks)):
            raise PoisonedStepError(f"refusing to checkpoint step {step}: non-finite parameters on some rank")
        tmp = self.step_dir(step) + TMP_SUFFIX
        try:
            self._write(step, tmp, chunks, optimizer, extra_state, save_rng, layout)
        except _Agreed as e:
            failures = e.failures
        except storage.FAILURES as e:  # noqa: BLE001 - failed alone: the others wait at the next agreement
            failures = storage.agree(e, tmp)
        else:
            return self.step_dir(step)
        raise self._save_failed(step, tmp, failures)

    def _write(self, step: int, tmp: str, chunks, optimizer, extra_state, save_rng: bool, layout) -> None:
        """The save's phases; each ends where every rank agrees on whether any rank failed in it."""
        error = None
        if storage.dist_rank() == 0:
            try:
                os.makedirs(self.root, exist_ok=True)
                self.clean_stale()
                self._check_space(step, tmp)
                os.makedirs(os.path.join(tmp, "dist"))
            except Exception as e:  # noqa: BLE001 - agreed on below
                error = e
        _agreement("prepare", error)
        if chunks or optimizer is not None:
            from megatron.core import dist_checkpointing

            dist_checkpointing.save(_sharded_state(chunks, optimizer, is_loading=False),
                                    os.path.join(tmp, "dist"), sharded_strategy=_sync_save_strategy(_agreement))
        payload = {"step": int(step), "extra": extra_state or {},
                   "rng": capture_rng_state() if save_rng else None, "adam_steps": _adam_steps(optimizer)}
        rank_file = os.path.join(tmp, f"rank_{storage.dist_rank():05d}.pt")
        _write_rank_state(rank_file, payload)
        faults.at("mid_checkpoint", step, rank_file)
        _agreement("rank state")
        error = None
        if storage.dist_rank() == 0:
            try:
                self._publish(step, tmp, self.step_dir(step), has_model=bool(chunks),
                              has_optimizer=optimizer is not None, spec_backend=_spec_backend(chunks), layout=layout)
            except Exception as e:  # noqa: BLE001 - agreed on below
                error = e
        _agreement("publish", error)

    def _check_space(self, step: int, tmp: str) -> None:
        """Refuse before writing when the newest checkpoint (the same model, the same size) would not
        fit: a clear error instead of a short write deep inside torch.save."""
        if not self.check_space:
            return
        done = self.complete()
        need = _meta(done[-1][1]).get("bytes") if done else None
        free, _ = storage.disk_space(self.root)
        if need and free is not None and free < need:
            raise OSError(errno.ENOSPC, f"No space left on device: it needs about {storage.human(need)}, "
                                        f"the size of {os.path.basename(done[-1][1])}", tmp)

    def _save_failed(self, step: int, tmp: str, failures) -> Exception:
        text = None
        if storage.dist_rank() == 0:
            rank, _, exc = failures[0]
            who = f" (rank {rank})" if storage.dist_world() > 1 else ""
            kept = (f"Nothing of step {step} was kept: {os.path.basename(tmp)} is partial, never loaded, and "
                    f"removed at the next start" if os.path.exists(tmp) else f"Nothing of step {step} was written")
            text = storage.write_failed(f"checkpoint of step {step}{who}", self.root, exc, self.latest(), kept=kept,
                                        target=tmp)
        error = storage.CheckpointSaveError(broadcast(text))
        local = [exc for r, _, exc in failures if r == storage.dist_rank()]
        error.__cause__ = local[0] if local else None
        return error

    def _publish(self, step: int, tmp: str, final: str, has_model: bool, has_optimizer: bool,
                 spec_backend: Optional[str] = None, layout: Optional[Dict[str, Any]] = None) -> None:
        meta = {"step": int(step), "world_size": storage.dist_world(), "format": FORMAT_VERSION, "time": time.time(),
                "model": has_model, "optimizer": has_optimizer, "optimizer_metadata": OPTIM_METADATA}
        if spec_backend is not None:
            meta["spec_backend"] = spec_backend
        if layout is not None:
            meta["layout"] = layout
        meta["bytes"] = _tree_bytes(tmp)
        _write_meta(os.path.join(tmp, META), meta)
        fsync_tree(tmp)
        if os.path.exists(final):  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.root)
        atomic_write(os.path.join(self.root, LATEST), os.path.basename(final) + "\n")
        self.prune()

    def clean_stale(self) -> List[str]:
        """Remove leftover ``*.tmp`` dirs of saves that never completed (rank 0, before a save)."""
        names = os.listdir(self.root) if os.path.isdir(self.root) else []
        removed = [n for n in names if n.endswith(TMP_SUFFIX) and STEP_RE.match(n[: -len(TMP_SUFFIX)])]
        for name in removed:
            shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        return removed

    def prune(self) -> List[str]:
        """Delete all but the newest ``keep_last`` complete checkpoints."""
        done = self.complete()
        if self.keep_last is None or len(done) <= self.keep_last:
            return []
        doomed = [p for _, p in done[: len(done) - self.keep_last]]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        return doomed

    # ---- load
    def load(self, path: Optional[str] = None, model=None, optimizer=None, restore_rng: bool = True,
             strict: bool = True, layout: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Load a complete checkpoint (default: :meth:`latest`) into ``model``/``optimizer`` in place,
        restore this rank's RNG streams, and return ``{"step", "extra", "path", "meta"}``.

        An unreadable file raises :class:`~.storage.CheckpointLoadError` naming it; a checkpoint of
        another ``layout`` that cannot be resharded raises :class:`~.storage.CheckpointMismatchError`
        naming the differences."""
        path = path or self.latest()
        if path is None or not os.path.isfile(os.path.join(path, META)):
            raise FileNotFoundError(f"no complete checkpoint to load at {path or self.root}")
        try:
            with open(os.path.join(path, META), encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise storage.CheckpointLoadError(f"{os.path.join(path, META)}: {storage.cause(e)}") from e
        chunks = _as_list(model)
        if optimizer is not None and not meta.get("optimizer"):
            raise ValueError(f"{path} holds no optimizer state (saved without an optimizer)")
        saved, here = meta.get("spec_backend"), _spec_backend(chunks)
        if saved and here and saved != here:
            raise ValueError(f"{path} holds a model built with the {saved!r} layer spec, this run builds "
                             f"{here!r} (its weight names differ); set actor.model.spec_backend={saved!r}")
        from .recovery import check_layout

        check_layout(path, meta.get("layout"), layout)
        if chunks or optimizer is not None:
            try:
                self._load_megatron(path, chunks, optimizer, strict)
            except storage.FAILURES as e:  # noqa: BLE001 - one line naming the file; the cause stays chained
                where = storage.filename_of(e) or ", ".join(storage.short_shards(os.path.join(path, "dist"))) or \
                    os.path.join(path, "dist")
                raise storage.CheckpointLoadError(f"{where}: {storage.cause(e)}") from e
        rank_file = os.path.join(path, f"rank_{storage.dist_rank():05d}.pt")
        if not os.path.isfile(rank_file):
            raise FileNotFoundError(f"{rank_file} missing: {path} was saved by {meta.get('world_size')} "
                                    f"ranks, this run has {storage.dist_world()}")
        try:
            payload = torch.load(rank_file, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt file: say which
            raise storage.CheckpointLoadError(storage.unreadable(rank_file, e)) from e
        if optimizer is not None:
            _restore_adam_steps(optimizer, payload.get("adam_steps") or [])
        if restore_rng and payload.get("rng") is not None:
            restore_rng_state(payload["rng"])
        return {"step": payload["step"], "extra": payload["extra"], "path": path, "meta": meta}

    @staticmethod
    def _load_megatron(path: str, chunks, optimizer, strict: bool) -> None:
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(_sharded_state(chunks, optimizer, is_loading=True),
                                         os.path.join(path, "dist"))
        for i, m in enumerate(chunks):
            m.load_state_dict(loaded[_model_key(i, len(chunks))], strict=strict)
        if optimizer is not None:
            # The optimizer copies into views of parameters that require grad.
            with torch.no_grad():
                optimizer.load_state_dict(loaded["optimizer"])


def _write_meta(path: str, meta: Dict[str, Any]) -> None:
    """The completion stamp of a checkpoint dir (a separate function so tests can make it fail)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())

