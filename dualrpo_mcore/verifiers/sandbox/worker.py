"""One sandboxed verifier worker: ``python -m dualrpo_mcore.verifiers.sandbox.worker --scorer MOD:FN``.

Started only by :class:`dualrpo_mcore.verifiers.sandbox.pool.VerifierPool`. Model output is untrusted,
so the worker is the blast radius: whatever a response makes the scorer do (run for hours,
allocate 10 GB, overflow the C stack, try to run a shell) stays in this process, which the
parent can kill and replace.

Protocol (both directions): frames of a 4-byte big-endian unsigned length followed by that many
bytes of UTF-8 JSON (``ensure_ascii`` on, so lone surrogates survive the trip). No pickle, no
eval, anywhere.

* worker -> parent, once after warm-up: ``{"type": "ready", "pid": N}``; or, if the scorer can
  not be imported, ``{"type": "fatal", "error": "..."}`` and exit.
* parent -> worker: ``{"id": K, "spec": {...}, "response": "...", "progress": P}``.
* worker -> parent: ``{"type": "result", "id": K, "reward": R, "status": S, "info": {...}}``.
* EOF on stdin: exit 0.

Hardening, in the order it is applied (before the scorer is imported):

1. The protocol keeps private duplicates of fds 0/1; fd 1 is then pointed at stderr and fd 0
   at /dev/null, and ``sys.stdout`` is ``sys.stderr``, so a stray ``print`` (Python or C) can
   not corrupt the frame stream and nothing can read the protocol pipe behind our back.
2. ``RLIMIT_AS`` (a memory bomb raises MemoryError here instead of waking the machine's OOM
   killer), ``RLIMIT_FSIZE = 0`` with SIGXFSZ ignored (writes fail with EFBIG instead of killing
   us), ``RLIMIT_CORE = 0`` (a segfault leaves no multi-GB core file).
3. ``PR_SET_PDEATHSIG`` (Linux, when asked): the kernel kills the worker if the parent thread
   that started it dies, even in the middle of a C-level bignum computation.
4. After warm-up, an audit hook refuses process creation, signals to other processes, writes,
   file-system mutation, sockets and ctypes loading. Python documents audit hooks as not being
   a security boundary; here they are a tripwire behind the real boundary (this process plus
   the limits above plus the parent's SIGKILL), and they make a scorer that eval()s model
   output fail loudly instead of running ``os.system``.

The parent starts us with cwd in a fresh empty temp dir, a minimal environment, no inherited
fds and a new session (so ``killpg`` also reaches any grandchild).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import resource
import signal
import struct
import sys

HEADER = struct.Struct(">I")
# The parent never sends more than this (it caps responses first); anything bigger means
# the stream is corrupt, and the only safe reaction is to exit.
MAX_REQUEST_BYTES = 64 << 20
MAX_INFO_CHARS = 2000
EXIT_MEMORY = 3  # exit code after MemoryError; the parent reports the sample as a crash
STATUSES = ("ok", "bad_spec", "unparsable", "error")

_PR_SET_PDEATHSIG = 1

# Scored once by each new worker, one sample per built-in task, so that a worker's first real
# samples do not pay the verifiers' lazy imports (sympy parsers, rapidfuzz, matching code).
_OK = "<think>ok</think> <answer>{}</answer>"
DEFAULT_WARMUP = [
    [{"verifier": "math", "answer": "\\frac{1}{2}"}, _OK.format("\\boxed{0.5}")],
    [{"verifier": "math", "answer": "x^2-1"}, _OK.format("\\boxed{(x-1)(x+1)}")],
    [{"verifier": "choice", "answer": "B", "params": {"options": ["1", "2"]}}, _OK.format("(B) 2")],
    [{"verifier": "numeric", "answer": 2.5}, _OK.format("2.5")],
    [{"verifier": "counting", "answer": 3}, _OK.format("three")],
    [{"verifier": "ocr", "answer": "STOP"}, _OK.format("stop")],
    [{"verifier": "grounding", "answer": [0, 0, 10, 10]}, _OK.format("[0, 0, 9, 10]")],
    [{"verifier": "detection", "answer": [[0, 0, 10, 10], [20, 20, 30, 30]]},
     _OK.format("[[0, 0, 9, 10], [20, 20, 30, 31]]")],
    [{"verifier": "format"}, _OK.format("1")],
]

# Audit events refused after warm-up. Opening files for reading stays allowed (lazy imports,
# sympy data files); opening for writing is checked separately in the hook.
_BLOCKED_EVENTS = frozenset({
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
    "subprocess.Popen", "pty.spawn", "os.startfile",
    "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link", "os.truncate",
    "os.chmod", "os.chown", "os.chdir", "os.chroot", "os.putenv", "os.unsetenv", "shutil.rmtree",
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "sys.setprofile", "sys.settrace",
    "os.killpg", "signal.pthread_kill",
})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _audit_hook(event: str, args: tuple) -> None:
    if event in _BLOCKED_EVENTS:
        raise PermissionError(f"verifier sandbox: {event} is not allowed")
    if event == "os.kill" and args and args[0] != os.getpid():
        # Killing ourselves is harmless (and how the pool's tests fake a segfault);
        # killing anything else, e.g. the trainer, is not.
        raise PermissionError("verifier sandbox: os.kill of another process is not allowed")
    if event == "open" and len(args) >= 3:
        mode, flags = args[1], args[2]
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS)
        if writes:
            # PermissionError is an OSError, so the import system's bytecode writer ignores it.
            raise PermissionError("verifier sandbox: opening files for writing is not allowed")


def _take_protocol_fds():
    """Return (reader, writer) for the protocol and make fds 0/1 useless to everyone else."""
    proto_in = os.fdopen(os.dup(0), "rb", buffering=1 << 16)
    proto_out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # C-level writes to stdout land in stderr
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdout = sys.stderr
    sys.stdin = open(os.devnull)  # noqa: SIM115 (lives as long as the process)
    return proto_in, proto_out


def _set_limits(max_memory_mb: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    # Terminal ^C goes to the trainer, which closes the pool; the worker must not die
    # half-way through writing a frame.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limits = [(resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_CORE, 0)]
    if max_memory_mb > 0:
        limits.append((resource.RLIMIT_AS, max_memory_mb << 20))
    for which, value in limits:
        _soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))


def _set_parent_death_signal(parent_pid: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes  # before the audit hook, which refuses ctypes later

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def encode_frame(obj: dict) -> bytes:
    """One protocol frame. ``ensure_ascii`` keeps lone surrogates (valid in a Python str, not in
    UTF-8) intact; raises TypeError/ValueError for what JSON can not carry."""
    body = json.dumps(obj, ensure_ascii=True, default=_plain).encode("ascii")
    return HEADER.pack(len(body)) + body


def _plain(obj):
    """numpy scalars and arrays (specs read from parquet often hold them) as plain JSON."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def worker_command(scorer: str, max_memory_mb: int, parent_pid: int, warmup_json: str,
                   imports=()) -> list:
    """argv of a worker: no user site-packages, no bytecode writes."""
    cmd = [sys.executable, "-s", "-B", "-m", "dualrpo_mcore.verifiers.sandbox.worker", "--scorer", scorer,
           "--max-memory-mb", str(max_memory_mb), "--parent-pid", str(parent_pid), "--pdeathsig",
           "--warmup", warmup_json]
    for module in imports:
        cmd += ["--import", module]
    return cmd


def worker_env(tmpdir: str, pythonpath: list) -> dict:
    """The whole environment of a worker: nothing of the trainer's (tokens, cluster settings)
    leaks in; HOME/TMPDIR point at its own empty, read-only temp dir."""
    return {
        "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": tmpdir,
        "TMPDIR": tmpdir, "PYTHONPATH": os.pathsep.join(pythonpath),
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    }


def _read_frame(inp):
    head = inp.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"request frame of {size} bytes exceeds {MAX_REQUEST_BYTES}")
    body = inp.read(size)
    if len(body) < size:
        return None
    return json.loads(body)


def _load_scorer(path: str):
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"scorer must be 'module:function', got {path!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"scorer {path!r} is not callable")
    return obj


def _short(text: object) -> str:
    text = str(text)
    return text if len(text) <= MAX_INFO_CHARS else text[:MAX_INFO_CHARS] + "..."


def _clean_info(info: object) -> dict:
    """Keep only JSON-safe scalars: the parent must not trust (or choke on) scorer output."""
    out = {}
    if isinstance(info, dict):
        for key, value in list(info.items())[:32]:
            if isinstance(value, (bool, int, str)) or value is None:
                out[_short(key)] = _short(value) if isinstance(value, str) else value
            elif isinstance(value, float):
                out[_short(key)] = value if math.isfinite(value) else str(value)
            else:
                out[_short(key)] = _short(repr(value))
    return out


def score_one(scorer, request: dict) -> dict:
    """Run the scorer on one request; every outcome except a dead process becomes a result."""
    reward, status, info = 0.0, "ok", {}
    try:
        out = scorer(request.get("spec"), request.get("response"), progress=request.get("progress"))
        if isinstance(out, tuple) and len(out) == 2:
            out, info = out
            info = _clean_info(info)
            if info.get("status") in STATUSES:
                status = info["status"]
        reward = float(out)
        if not math.isfinite(reward):
            reward, status, info["error"] = 0.0, "error", f"non-finite reward {out!r}"
        reward = min(1.0, max(0.0, reward))
    except MemoryError:
        raise
    except RecursionError as exc:
        reward, status, info = 0.0, "error", {"error": "RecursionError: " + _short(exc)}
    except Exception as exc:  # noqa: BLE001 -- any scorer bug is this sample's problem only
        reward, status, info = 0.0, "error", {"error": f"{type(exc).__name__}: {_short(exc)}"}
    return {"type": "result", "id": request.get("id"), "reward": reward, "status": status, "info": info}


def _warm(scorer, warmup_json: str) -> None:
    """Run the warm-up samples once so the first real sample does not pay lazy imports."""
    try:
        samples = json.loads(warmup_json) if warmup_json else []
    except ValueError:
        samples = []
    for item in samples:
        if isinstance(item, list) and len(item) == 2:
            score_one(scorer, {"id": -1, "spec": item[0], "response": item[1]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dualrpo_mcore.verifiers.sandbox.worker")
    parser.add_argument("--scorer", required=True, help="module:function to call per sample")
    parser.add_argument("--max-memory-mb", type=int, default=2048)
    parser.add_argument("--parent-pid", type=int, default=0)
    parser.add_argument("--pdeathsig", action="store_true")
    parser.add_argument("--warmup", default="", help="JSON list of [spec, response] pairs")
    parser.add_argument("--import", dest="imports", action="append", default=[],
                        help="module to import first (e.g. one that registers custom verifiers)")
    args = parser.parse_args(argv)

    proto_in, proto_out = _take_protocol_fds()
    _set_limits(args.max_memory_mb)
    if args.pdeathsig and args.parent_pid:
        _set_parent_death_signal(args.parent_pid)
    try:
        for module in args.imports:
            importlib.import_module(module)
        scorer = _load_scorer(args.scorer)
        _warm(scorer, args.warmup)
    except BaseException as exc:  # noqa: BLE001 -- report any startup failure, then exit
        proto_out.write(encode_frame({"type": "fatal", "error": f"{type(exc).__name__}: {_short(exc)}"}))
        return 2
    sys.addaudithook(_audit_hook)
    proto_out.write(encode_frame({"type": "ready", "pid": os.getpid()}))
    while True:
        try:
            request = _read_frame(proto_in)
        except MemoryError:
            os._exit(EXIT_MEMORY)
        if request is None:
            return 0
        try:
            reply = score_one(scorer, request)
        except MemoryError:
            # The heap may be in any state now; a fresh process is cheaper than doubt.
            os._exit(EXIT_MEMORY)
        proto_out.write(encode_frame(reply))


if __name__ == "__main__":
    sys.exit(main())
