"""Storage faults as one clear line: a full disk, a read-only or missing run dir, a failed write, an
unreadable checkpoint.

What an operator needs from such an error is the path, the free space there, the last checkpoint that
is good, and the command that continues the run; a raw ``enforce fail at inline_container.cc`` from
``torch.save`` on a full disk says none of it. Errors that happen on one rank are first agreed on by
every rank (:func:`agree`), so every rank raises the same message at the same point instead of one
rank raising and its peer dying later in a collective with "Connection closed by peer".
"""
from __future__ import annotations

import errno
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

RESUME_HINT = "rerun the same command with --resume auto (checkpoint.resume='auto')"
# torch's zip writer reports a short write as "unexpected pos" without an errno; below this much
# free space such an error is a full disk.
NEARLY_FULL = 1 << 20


def _failures() -> tuple:
    try:
        from torch.distributed.checkpoint.api import CheckpointException
    except ImportError:  # pragma: no cover - torch without distributed checkpointing
        return (Exception,)
    return (Exception, CheckpointException)


# What a save or load may raise and still be agreed on: torch.distributed.checkpoint raises its
# per-rank failures as a BaseException subclass, which ``except Exception`` would let through.
FAILURES = _failures()


class StorageError(OSError):
    """A write the run depends on failed; the message says where, why, and how to go on."""


class CheckpointSaveError(StorageError):
    """A checkpoint could not be written; nothing of it was kept."""


class CheckpointLoadError(RuntimeError):
    """A checkpoint could not be read; the message names the file and the cause."""


class CheckpointMismatchError(CheckpointLoadError, ValueError):
    """A complete checkpoint of another configuration (parallel layout or model shape)."""


# ----------------------------------------------------------------------------------- describing
def human(n: float) -> str:
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} TiB"


def disk_space(path: str) -> Tuple[Optional[int], Optional[int]]:
    """(free bytes, total bytes) of the file system holding ``path`` or its nearest existing parent."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        usage = shutil.disk_usage(probe)
    except OSError:
        return None, None
    return usage.free, usage.total


def space_note(path: str) -> str:
    free, total = disk_space(path)
    if free is None:
        return f"free space at {path} unknown"
    return f"{human(free)} free of {human(total)} at {path}"


def _chain(exc: BaseException):
    """``exc``, its explicit causes, and the per-rank failures torch.distributed.checkpoint collects
    (not ``__context__``: an OSError a library caught and moved past is not the cause)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):  # rank -> exception, or (exception, stack) as torch wraps them
            for v in failures.values():
                v = v[0] if isinstance(v, tuple) and v else v
                todo.append(v if isinstance(v, BaseException) else None)
        todo.append(e.__cause__)


def errno_of(exc: BaseException) -> Optional[int]:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno:
            return e.errno
    return None


def filename_of(exc: BaseException) -> Optional[str]:
    for e in _chain(exc):
        if getattr(e, "filename", None):
            return str(e.filename)
    return None


class _Remote(Exception):
    """Another rank's failure as this rank learns it from :func:`agree` (its text and file)."""

    def __init__(self, text: str, filename: Optional[str]):
        super().__init__(text)
        self.filename = filename


def cause(exc: BaseException) -> str:
    """One line: the OS error with its errno name, else the last line of the innermost message."""
    if isinstance(exc, (StorageError, CheckpointLoadError)):
        return str(exc)  # already one line naming the file
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno:
            return f"{e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, e.errno)})"
        if isinstance(e, _Remote):
            return str(e)
    inner = list(_chain(exc))
    for e in [x for x in inner if getattr(x, "failures", None) is None] + inner:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.startswith("Traceback")]
        if lines:
            line = lines[-1]
            # torch appends paragraphs of advice to the one sentence that says what happened
            return f"{type(e).__name__}: {line.split('. ')[0] if len(line) > 120 else line}"[:300]
    return type(exc).__name__


def describe(exc: BaseException, path: str) -> str:
    """``cause``, led by "disk full" when it is one that does not say so (torch's short writes)."""
    text = cause(exc)
    free, _ = disk_space(path)
    hidden = errno_of(exc) not in (errno.ENOSPC, errno.EDQUOT) and free is not None and free < NEARLY_FULL
    return f"disk full: {text}" if hidden and "disk full" not in text else text


def unreadable(path: str, exc: BaseException) -> str:
    """``<path>: <cause>``; a file torch cannot parse (not a missing one, not an I/O error) is called
    truncated or corrupt, since torch's own words for it range from a zip error to EINVAL."""
    text = f"{path}: {cause(exc)}"
    if errno_of(exc) in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.EIO):
        return text
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return f"{text}: not a readable torch file ({size} bytes), truncated or corrupt"


def short_shards(dist_dir: str) -> List[str]:
    """The shard files of a torch_dist checkpoint shorter than its index says (torch's read error
    names none): ``"<path> (<size> of <needed> bytes)"``."""
    try:
        from torch.distributed.checkpoint import FileSystemReader

        index = FileSystemReader(dist_dir).read_metadata().storage_data
    except Exception:  # noqa: BLE001 - an unreadable index is reported by the load itself
        return []
    need: Dict[str, int] = {}
    for info in index.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    sizes = {name: os.path.getsize(os.path.join(dist_dir, name)) if os.path.exists(os.path.join(dist_dir, name))
             else 0 for name in need}
    return [f"{os.path.join(dist_dir, n)} ({sizes[n]} of {need[n]} bytes)" for n in sorted(need) if sizes[n] < need[n]]


def write_failed(what: str, path: str, exc: BaseException, last_good: Optional[str], kept: str = "",
                 target: Optional[str] = None) -> str:
    """The message of a failed write: what, where (the file if the error names one, else ``target``),
    why, the free space at ``path``, the last good checkpoint, and how to go on."""
    where = filename_of(exc) or target or path
    msg = f"{what} failed writing {where}: {describe(exc, path)}; {space_note(path)}. "
    if kept:
        msg += kept.rstrip(". ") + ". "
    msg += (f"Last good checkpoint: {last_good}. " if last_good
            else "No complete checkpoint yet (a resume starts at step 1). ")
    return msg + f"Free space or fix the path, then {RESUME_HINT}."


# ------------------------------------------------------------------------------------ agreement
def live_dist():
    """``torch.distributed`` when a process group is up, else None (one process)."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def dist_rank() -> int:
    d = live_dist()
    return d.get_rank() if d else 0


def dist_world() -> int:
    d = live_dist()
    return d.get_world_size() if d else 1


def agree(local: Optional[BaseException], where: str = "") -> List[Tuple[int, str, BaseException]]:
    """Every rank's failure at this point, on every rank: ``[(rank, one-line cause, exception)]``
    (the exception itself on the rank that raised it, a stand-in with its text and file elsewhere); empty
    when no rank failed. ``rank`` is where the failure arose: a collective write that failed on rank 1
    raises on every rank, naming rank 1. Collective: every rank calls it at the same point, failed or not."""
    rank, world = dist_rank(), dist_world()
    mine = None
    if local is not None:
        origins = getattr(local, "failures", None)
        origin = min(origins) if isinstance(origins, dict) and origins else rank
        mine = (cause(local), filename_of(local) or where or None, errno_of(local), origin)
    parts = [mine]
    if world > 1:
        parts = [None] * world
        live_dist().all_gather_object(parts, mine)
    out, seen = [], set()
    for r, part in enumerate(parts):
        if part is None or part[3] in seen:
            continue
        text, fname, code, origin = part
        seen.add(origin)
        exc = local if r == rank else (OSError(code, os.strerror(code), fname) if code else _Remote(text, fname))
        out.append((origin, text, exc))
    return sorted(out, key=lambda f: f[0])


# ------------------------------------------------------------------------------------ preflight
def check_writable(dirs: Sequence[str], last_good: Optional[str] = None) -> None:
    """Create each dir and write, fsync and delete a probe file in it; a read-only, missing or full
    location stops the run here, before any model is built, with a :class:`StorageError`."""
    rank = os.environ.get("RANK", "0")
    for d in dict.fromkeys(os.path.abspath(x) for x in dirs):
        probe = os.path.join(d, f".write_probe.{rank}.{os.getpid()}")
        try:
            os.makedirs(d, exist_ok=True)
            with open(probe, "w", encoding="utf-8") as f:
                f.write("ok\n")
                f.flush()
                os.fsync(f.fileno())
            os.remove(probe)
        except OSError as e:
            if e.filename is None:
                e.filename = probe
            raise StorageError(write_failed(f"the run cannot start: the write test of {d}", d, e, last_good)) from e
