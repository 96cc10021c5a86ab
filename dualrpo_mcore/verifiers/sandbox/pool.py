"""Sandboxed verifier pool: score untrusted model output in killable worker processes.

Contract (results in input order, always completes, the statuses): docs/design.md §3.5. A
``crash`` is a worker that died of anything: segfault, MemoryError, ``os._exit``, EOF, garbage on
the pipe.

Design, and why:

* Workers are ``python -m dualrpo_mcore.verifiers.sandbox.worker`` subprocesses (see that module for the
  wire protocol and the in-worker hardening). Frames are length-prefixed JSON; nothing on the
  reward path is pickled or eval'd, and the parent parses worker output defensively (size cap,
  strict shape) because a worker is exactly the process that has touched untrusted input.
* One dispatcher thread per pool owns every worker and pipe and multiplexes them with
  ``selectors``: callers enqueue jobs and wait. Deadlines are checked in the same loop, so the
  budget holds however many callers share the pool, and the thread that spawned a worker lives as
  long as the worker (which makes the worker's parent-death signal safe to use).
* The pool keeps ``num_workers + spares`` processes alive but never runs more than
  ``num_workers`` samples at once; the spares are warm (scorer imported, warm-up sample run), so a
  killed worker's place is taken at once while its replacement starts in the background.
* Responses over ``max_response_chars`` (default 1 Mi characters) keep their *last* part: final
  answers sit at the end, and a verifier needing the start (``format``) then fails, the right
  reward for such a response. ``info["truncated"]`` and ``stats()["truncated"]`` record it.
* Per-sample time runs from the write to an idle worker; ``total_timeout_s`` also bounds the
  whole call (how the ``verify`` front door keeps its budget during a cold start).
"""
from __future__ import annotations

import atexit
import collections
import contextlib
import json
import logging
import math
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import dualrpo_mcore
from dualrpo_mcore.verifiers.base import response_text
from dualrpo_mcore.verifiers.sandbox.worker import DEFAULT_WARMUP, EXIT_MEMORY, HEADER, encode_frame, worker_command, worker_env

STATUSES = ("ok", "timeout", "crash", "error", "bad_spec", "unparsable")
DEFAULT_SCORER = "dualrpo_mcore.verifiers.scoring:score_with_info"
MAX_RESULT_BYTES = 1 << 20  # a result frame is a float and a short info dict
_STDERR_TAIL = 4096
_log = logging.getLogger(__name__)
# The directory that holds the dualrpo_mcore package (on the workers' PYTHONPATH: a source checkout runs
# without an install).
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(dualrpo_mcore.__file__)))


class VerifierPoolError(RuntimeError):
    """The pool itself is unusable (closed, or workers cannot start: a config/install problem)."""


@dataclass(frozen=True)
class VerifyResult:
    """One sample's outcome: reward in [0, 1], a status from STATUSES, seconds from dispatch."""

    reward: float
    status: str
    elapsed_s: float
    info: dict = field(default_factory=dict, compare=False)


class _Batch:
    def __init__(self, n: int):
        self.results: list[Optional[VerifyResult]] = [None] * n
        self.left = n
        self.done = threading.Event()
        self.error: Optional[str] = None


@dataclass
class _Job:
    batch: _Batch
    index: int
    frame: bytes  # the encoded request, ready to write
    timeout_s: float
    deadline: float  # absolute: latest time to finish (inf when the caller gave none)
    enqueued: float
    info: dict


class _Worker:
    """Parent-side handle of one worker process and its three pipes."""

    def __init__(self, proc: subprocess.Popen, tmpdir: str):
        self.proc = proc
        self.tmpdir = tmpdir
        self.state = "starting"  # starting | idle | busy | dead
        self.job: Optional[_Job] = None
        self.started = time.monotonic()
        self.dispatched = 0.0
        self.deadline = math.inf
        self.rbuf = bytearray()
        self.wbuf = memoryview(b"")
        self.errtail = bytearray()
        self.served = 0


def _clean_reward(value: Any) -> Optional[float]:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return min(1.0, max(0.0, float(value))) if ok else None


class VerifierPool:
    """A fixed-size pool of sandboxed verifier workers; see the module docstring.

    Args:
        num_workers: samples scored concurrently (one process each).
        timeout_s: per-sample budget in seconds, from dispatch to result.
        max_memory_mb: address-space limit of each worker (``RLIMIT_AS``); 0 disables it.
        scorer: ``"module:function"`` called as ``fn(spec, response, progress=...)``, returning a
            float or ``(float, info)`` with ``info["status"]``. Trusted configuration.
        spares: extra warm workers kept ready to replace a killed one without a stall.
        max_response_chars: longer responses keep only their tail (see module docstring).
        max_samples_per_worker: recycle a worker after this many samples (bounds cache growth).
        startup_timeout_s: a worker not ready by then is killed and counted as a failed start.
        pythonpath: extra import roots for the worker (e.g. a tests directory).
        imports: modules each worker imports before the scorer, e.g. the module that calls
            ``register_verifier`` for a custom verifier (docs/design.md §3.5).
        warmup: ``[spec, response]`` pairs each new worker scores before reporting ready;
            None uses a math sample when the scorer is the default one.
    """

    def __init__(self, num_workers: int = 2, timeout_s: float = 5.0, max_memory_mb: int = 2048,
                 scorer: str = DEFAULT_SCORER, *, spares: int = 1,
                 max_response_chars: int = 1 << 20, max_samples_per_worker: int = 5000,
                 startup_timeout_s: float = 120.0, pythonpath: Sequence[str] = (),
                 imports: Sequence[str] = (), warmup: Optional[list] = None):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if ":" not in scorer:
            raise ValueError(f"scorer must be 'module:function', got {scorer!r}")
        self.num_workers, self.timeout_s, self.scorer = num_workers, float(timeout_s), scorer
        self.max_memory_mb, self.spares = int(max_memory_mb), max(0, int(spares))
        self.max_response_chars = int(max_response_chars)
        self.max_samples_per_worker = int(max_samples_per_worker)
        self.startup_timeout_s = float(startup_timeout_s)
        self._imports = list(imports)
        self._pythonpath = [_PACKAGE_ROOT, *[os.path.abspath(p) for p in pythonpath]]
        if warmup is None:
            warmup = DEFAULT_WARMUP if scorer == DEFAULT_SCORER else []
        self._warmup = json.dumps(warmup)
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()  # guards _queue, _stats, _closing, _broken
        self._queue: collections.deque[_Job] = collections.deque()
        self._stats = collections.Counter()
        self._closing = False
        self._broken: Optional[str] = None
        self._ready_event = threading.Event()
        self._workers: list[_Worker] = []
        self._failed_starts = 0
        self._last_start_error: Optional[str] = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, wake_w = os.pipe()
        self._wake_w: Optional[int] = wake_w
        os.set_blocking(self._wake_r, False)
        os.set_blocking(wake_w, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="verifier-pool", daemon=True)
        self._thread.start()
        _LIVE_POOLS.add(self)

    def verify_batch(self, specs: Sequence[Any], responses: Sequence[Any], progress: Any = None, *,
                     timeout_s: Optional[float] = None,
                     total_timeout_s: Optional[float] = None) -> list[VerifyResult]:
        """Score ``responses[i]`` against ``specs[i]``; results in input order, never raises
        for any spec or response content (only for a closed or unstartable pool)."""
        if len(specs) != len(responses):
            raise ValueError(f"{len(specs)} specs but {len(responses)} responses")
        self._check_usable()
        if not specs:
            return []
        if progress is not None and not isinstance(progress, (int, float, str)):
            progress = float(progress)  # e.g. a numpy or torch scalar
        budget = self.timeout_s if timeout_s is None else float(timeout_s)
        now = time.monotonic()
        deadline = math.inf if total_timeout_s is None else now + float(total_timeout_s)
        batch = _Batch(len(specs))
        jobs = [self._make_job(batch, i, spec, response, progress, budget, deadline, now)
                for i, (spec, response) in enumerate(zip(specs, responses))]
        with self._lock:
            self._queue.extend(job for job in jobs if job is not None)
        self._wake()
        while not batch.done.wait(0.5):
            if not self._thread.is_alive():  # a dispatcher bug must not hang the trainer
                raise VerifierPoolError(self._broken or "verifier pool dispatcher thread died")
        if batch.error:
            raise VerifierPoolError(batch.error)
        return list(batch.results)  # type: ignore[arg-type]

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """Block until ``num_workers`` workers are warm (call at trainer start-up)."""
        ok = self._ready_event.wait(timeout)
        self._check_usable()
        return ok

    def stats(self) -> dict:
        """Counters for metrics: samples by status, time totals, worker lifecycle events."""
        with self._lock:
            s = dict(self._stats)
        out = {f"status/{k}": s.get(f"status/{k}", 0) for k in STATUSES}
        for key in ("samples", "truncated", "workers_started", "workers_replaced", "failed_starts",
                    "recycled"):
            out[key] = s.get(key, 0)
        out["elapsed_s_total"] = s.get("elapsed_us_total", 0) / 1e6
        out["elapsed_s_max"] = s.get("elapsed_us_max", 0) / 1e6
        return out

    def close(self) -> None:
        """Stop the dispatcher and every worker (EOF, then SIGKILL after 1 s); idempotent."""
        with self._lock:
            self._closing = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        with self._lock:
            if not self._thread.is_alive() and self._wake_w is not None:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_w = None
        _LIVE_POOLS.discard(self)

    def __enter__(self) -> "VerifierPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in list(self._workers) if w.state != "dead"]

    def _check_usable(self) -> None:
        if os.getpid() != self._owner_pid:
            raise VerifierPoolError("VerifierPool used in a forked child; create a new pool there")
        if self._closing:
            raise VerifierPoolError("VerifierPool is closed")
        if self._broken:
            raise VerifierPoolError(self._broken)

    def _make_job(self, batch, index, spec, response, progress, budget, deadline, now):
        """Encode one request; samples that can not be sent are finished here and now."""
        info: dict = {}
        response = response_text(response)
        if len(response) > self.max_response_chars:
            info["truncated"] = len(response)
            response = response[-self.max_response_chars:]
        try:
            frame = encode_frame({"id": index, "spec": spec, "response": response, "progress": progress})
        except (TypeError, ValueError, RecursionError) as exc:
            self._finish(batch, index, VerifyResult(0.0, "bad_spec", 0.0, {
                "error": f"spec is not JSON-serialisable: {type(exc).__name__}: {exc}"[:300]}))
            return None
        return _Job(batch, index, frame, budget, deadline, now, info)

    def _finish(self, batch: _Batch, index: int, result: VerifyResult) -> None:
        with self._lock:
            self._stats["samples"] += 1
            self._stats[f"status/{result.status}"] += 1
            self._stats["truncated"] += "truncated" in result.info
            us = int(result.elapsed_s * 1e6)
            self._stats["elapsed_us_total"] += us
            self._stats["elapsed_us_max"] = max(self._stats["elapsed_us_max"], us)
        batch.results[index] = result
        batch.left -= 1
        if batch.left == 0:
            batch.done.set()
        elif batch.left < 0:  # pragma: no cover -- would be a dispatcher bug
            raise AssertionError("sample finished twice")

    def _wake(self) -> None:
        with self._lock:  # close() closes the pipe under the same lock: no write to a reused fd
            if self._wake_w is None:
                return
            with contextlib.suppress(OSError):  # full (BlockingIOError): the dispatcher is already due to wake
                os.write(self._wake_w, b"x")

    def _run(self) -> None:
        try:
            while not self._closing:
                self._maintain()
                self._assign()
                for key, events in self._sel.select(self._next_timeout()):
                    self._on_event(key, events)
                self._check_deadlines()
        except BaseException as exc:  # noqa: BLE001 -- fail callers loudly rather than hang them
            _log.exception("verifier pool dispatcher failed")
            self._broken = f"verifier pool dispatcher failed: {type(exc).__name__}: {exc}"
        finally:
            self._shutdown()

    def _maintain(self) -> None:
        """Keep num_workers + spares processes alive; give up after repeated failed starts."""
        alive = [w for w in self._workers if w.state != "dead"]
        self._workers = alive
        if self._broken:
            return
        if self._failed_starts >= 3:
            tail = self._last_start_error or "(no output)"
            self._broken = (f"verifier workers fail to start ({self._failed_starts} times in a row) "
                            f"with scorer {self.scorer!r}: {tail}")
            self._fail_queue(self._broken)
            return
        ready = sum(w.state in ("idle", "busy") for w in self._workers)
        # Spares start only once the regular workers are up, so that at a cold start they do
        # not compete for the CPU with the workers the first samples wait for.
        target = self.num_workers + (self.spares if ready >= self.num_workers else 0)
        while len(self._workers) < target and self._spawn():
            pass
        if ready >= self.num_workers:
            self._ready_event.set()

    def _spawn(self) -> bool:
        cmd = worker_command(self.scorer, self.max_memory_mb, os.getpid(), self._warmup,
                             self._imports)
        tmpdir = None
        try:
            tmpdir = tempfile.mkdtemp(prefix="dualrpo-verifier-")
            os.chmod(tmpdir, 0o500)  # nothing to write in the worker's cwd, even by accident
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, cwd=tmpdir, close_fds=True,
                                    env=worker_env(tmpdir, self._pythonpath),
                                    start_new_session=True, bufsize=0)
        except OSError as exc:  # out of fds/memory/pids: retried by _maintain, counted
            self._failed_starts += 1
            self._last_start_error = f"could not start a worker: {exc}"
            if tmpdir:
                shutil.rmtree(tmpdir, ignore_errors=True)
            return False
        worker = _Worker(proc, tmpdir)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            os.set_blocking(f.fileno(), False)
        self._sel.register(proc.stdout.fileno(), selectors.EVENT_READ, (worker, "out"))
        self._sel.register(proc.stderr.fileno(), selectors.EVENT_READ, (worker, "err"))
        self._workers.append(worker)
        with self._lock:
            self._stats["workers_started"] += 1
        return True

    def _assign(self) -> None:
        busy = sum(w.state == "busy" for w in self._workers)
        idle = [w for w in self._workers if w.state == "idle"]
        now = time.monotonic()
        while idle and busy < self.num_workers:
            with self._lock:
                job = self._queue.popleft() if self._queue else None
            if job is None:
                return
            if now >= job.deadline:  # the caller's overall budget ran out while queued
                self._finish(job.batch, job.index,
                             VerifyResult(0.0, "timeout", now - job.enqueued, dict(job.info)))
                continue
            worker = idle.pop()
            worker.state, worker.job, worker.dispatched = "busy", job, now
            worker.deadline = min(now + job.timeout_s, job.deadline)
            worker.wbuf = memoryview(job.frame)
            busy += 1
            self._flush(worker)

    def _flush(self, worker: _Worker) -> None:
        """Write as much of the pending request as the pipe takes; never blocks."""
        fd = worker.proc.stdin.fileno()
        try:
            while worker.wbuf:
                n = os.write(fd, worker.wbuf)
                worker.wbuf = worker.wbuf[n:]
        except BlockingIOError:
            pass
        except OSError:  # BrokenPipe: the worker died; its stdout EOF reports the crash
            worker.wbuf = memoryview(b"")
        key = self._sel.get_map().get(fd)
        if worker.wbuf and key is None:
            self._sel.register(fd, selectors.EVENT_WRITE, (worker, "in"))
        elif not worker.wbuf and key is not None:
            self._sel.unregister(fd)

    def _next_timeout(self) -> Optional[float]:
        now = time.monotonic()
        times = [w.deadline for w in self._workers if w.state == "busy"]
        times += [w.started + self.startup_timeout_s for w in self._workers if w.state == "starting"]
        if len(self._workers) < self.num_workers:  # a failed spawn: retry soon
            times.append(now + 0.5)
        with self._lock:
            if self._queue:
                times.append(min(j.deadline for j in self._queue))
        times = [t for t in times if t != math.inf]
        return max(0.0, min(times) - now) if times else None

    def _on_event(self, key, events) -> None:
        if key.data is None:  # the wake pipe
            with contextlib.suppress(BlockingIOError):
                while os.read(self._wake_r, 4096):
                    pass
            return
        worker, which = key.data
        if worker.state == "dead":
            return
        if which == "in":
            self._flush(worker)
        elif which == "err":
            self._read_stderr(worker)
        else:
            self._read_stdout(worker)

    def _read_stderr(self, worker: _Worker) -> None:
        chunk = self._read(worker.proc.stderr.fileno())
        if chunk is None:
            return
        if not chunk:
            self._sel.unregister(worker.proc.stderr.fileno())
            return
        worker.errtail += chunk
        del worker.errtail[:-_STDERR_TAIL]

    @staticmethod
    def _read(fd: int) -> Optional[bytes]:
        """What the pipe has now: None if nothing yet, b"" at EOF or on error."""
        try:
            return os.read(fd, 1 << 16)
        except BlockingIOError:
            return None
        except OSError:
            return b""

    def _read_stdout(self, worker: _Worker) -> None:
        chunk = self._read(worker.proc.stdout.fileno())
        if chunk is None:
            return
        if not chunk:
            self._worker_died(worker, "crash", "worker closed its pipe (EOF)")
            return
        worker.rbuf += chunk
        while len(worker.rbuf) >= HEADER.size and worker.state != "dead":
            (size,) = HEADER.unpack_from(worker.rbuf)
            if size > MAX_RESULT_BYTES:
                self._worker_died(worker, "crash", f"protocol violation: {size}-byte frame")
                return
            if len(worker.rbuf) < HEADER.size + size:
                return
            body = bytes(worker.rbuf[HEADER.size:HEADER.size + size])
            del worker.rbuf[:HEADER.size + size]
            try:
                msg = json.loads(body)
                if not isinstance(msg, dict):
                    raise ValueError("frame is not an object")
            except (ValueError, RecursionError) as exc:
                self._worker_died(worker, "crash", f"protocol violation: {exc}"[:300])
                return
            self._on_message(worker, msg)

    def _on_message(self, worker: _Worker, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ready" and worker.state == "starting":
            worker.state = "idle"
            self._failed_starts = 0
        elif kind == "fatal" and worker.state == "starting":
            self._worker_died(worker, "crash", str(msg.get("error"))[:1000])
        elif kind == "result" and worker.state == "busy" and msg.get("id") == worker.job.index:
            job, now = worker.job, time.monotonic()
            reward, status = _clean_reward(msg.get("reward")), msg.get("status")
            info = msg.get("info") if isinstance(msg.get("info"), dict) else {}
            info.update(job.info)
            if reward is None or status not in STATUSES:
                reward, status = 0.0, "error"
                info["error"] = "worker sent an invalid reward or status"
            worker.state, worker.job, worker.deadline = "idle", None, math.inf
            worker.served += 1
            self._finish(job.batch, job.index, VerifyResult(reward, status, now - worker.dispatched, info))
            if worker.served >= self.max_samples_per_worker:
                with self._lock:
                    self._stats["recycled"] += 1
                # An idle worker holds no state worth a graceful exit, and waiting for one would
                # stall the deadlines of the busy ones.
                self._kill(worker)
        else:
            self._worker_died(worker, "crash", f"protocol violation: unexpected {kind!r} message")

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.state == "busy" and now >= worker.deadline:
                self._worker_died(worker, "timeout", f"exceeded {worker.job.timeout_s:g} s budget")
            elif worker.state == "starting" and now >= worker.started + self.startup_timeout_s:
                self._worker_died(worker, "crash", "worker did not become ready in time")
        with self._lock:
            expired = [j for j in self._queue if now >= j.deadline]
            for job in expired:
                self._queue.remove(job)
        for job in expired:
            self._finish(job.batch, job.index, VerifyResult(0.0, "timeout", now - job.enqueued, dict(job.info)))

    def _worker_died(self, worker: _Worker, status: str, why: str) -> None:
        """Kill (if needed) and reap a worker; its sample, if any, scores 0 with ``status``."""
        was, job = worker.state, worker.job
        if status == "crash":
            # an EOF arrives just before the exit status; wait for it to tell why
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=0.2)
        self._kill(worker)
        code = worker.proc.returncode
        if was == "starting":
            self._failed_starts += 1
            tail = worker.errtail.decode("utf-8", "replace").strip().splitlines()[-3:]
            self._last_start_error = f"{why}; exit code {code}; stderr: {' | '.join(tail)}"[:1500]
            with self._lock:
                self._stats["failed_starts"] += 1
        elif was == "busy":
            now = time.monotonic()
            info = dict(job.info, error=why, exit_code=code)
            if code == EXIT_MEMORY:
                info["error"] = "MemoryError in worker"
            elif code is not None and code < 0:
                info["error"] = f"{why}; killed by {signal.Signals(-code).name}" if status == "crash" else why
            self._finish(job.batch, job.index, VerifyResult(0.0, status, now - worker.dispatched, info))
        if was in ("busy", "idle"):
            with self._lock:
                self._stats["workers_replaced"] += 1

    def _kill(self, worker: _Worker) -> None:
        worker.state, worker.job = "dead", None
        if worker.proc.poll() is None:
            # the whole session: a grandchild must not outlive its worker
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.proc.pid, signal.SIGKILL)
        # reap it, release its pipes, remove its temp dir; TimeoutExpired: a process stuck in the kernel
        with contextlib.suppress(subprocess.TimeoutExpired):
            worker.proc.wait(timeout=5.0)
        for f in (worker.proc.stdin, worker.proc.stdout, worker.proc.stderr):
            with contextlib.suppress(KeyError, ValueError):  # not registered, or already closed
                self._sel.unregister(f.fileno())
            with contextlib.suppress(OSError):
                f.close()
        with contextlib.suppress(OSError):
            os.chmod(worker.tmpdir, 0o700)
        shutil.rmtree(worker.tmpdir, ignore_errors=True)

    def _fail_queue(self, why: str, in_flight: Sequence[_Job] = ()) -> None:
        """Fail the jobs ``in_flight`` and every queued one with ``why`` (the pool is unusable)."""
        with self._lock:
            jobs, self._queue = [*in_flight, *self._queue], collections.deque()
        for job in jobs:
            job.batch.error = why
            self._finish(job.batch, job.index, VerifyResult(0.0, "error", 0.0, {"error": why}))

    def _shutdown(self) -> None:
        in_flight = [w.job for w in self._workers if w.job is not None]
        for worker in self._workers:
            worker.job = None
            if worker.state != "dead":
                with contextlib.suppress(OSError):
                    worker.proc.stdin.close()  # EOF: an idle worker exits by itself
        self._fail_queue(self._broken or "VerifierPool closed while scoring", in_flight)
        end = time.monotonic() + 1.0
        for worker in self._workers:
            if worker.state != "dead":
                with contextlib.suppress(subprocess.TimeoutExpired):
                    worker.proc.wait(timeout=max(0.0, end - time.monotonic()))
                self._kill(worker)
        self._workers = []
        self._ready_event.set()  # release wait_ready(); it then reports the pool as closed
        self._sel.close()  # the wake pipe is closed by close(), after the join: no fd reuse race


_LIVE_POOLS: "weakref.WeakSet[VerifierPool]" = weakref.WeakSet()


@atexit.register
def _close_all_pools() -> None:
    for pool in list(_LIVE_POOLS):
        if pool._owner_pid == os.getpid():
            pool.close()
