"""Misbehaving scorers for the verifier-pool tests, run *inside* pool workers.

Kept under tests/ (the pool gets this directory through its ``pythonpath`` option) rather than in
the package, so that an installed dualrpo-mcore ships no function whose job is to segfault.
``behave`` picks a behaviour from ``spec["verifier"]``, so one batch can mix well-behaved and
hostile samples and the tests can check that the rest of the batch is unaffected.
"""
from __future__ import annotations

import os
import signal
import time


def _sleep(spec, response):
    time.sleep(float(spec.get("answer", 60)))
    return 1.0


def _spin(spec, response):
    while True:  # pure-Python busy loop: only SIGKILL ends it
        pass


def _bigint(spec, response):
    return float(9 ** 9 ** 9 ** 2 > 0)  # one C-level call that holds the GIL for a long time


def _segfault(spec, response):
    os.kill(os.getpid(), signal.SIGSEGV)
    time.sleep(5)
    return 1.0


def _memory_bomb(spec, response):
    block = bytearray(10 * 1024 ** 3)  # 10 GiB: far over the worker's RLIMIT_AS
    return float(len(block) > 0)


def _exit(spec, response):
    os._exit(7)


def _raise(spec, response):
    raise ValueError("scorer bug")


def _print(spec, response):
    print("stray print that must not corrupt the protocol")
    os.write(1, b"\x00\x00\x00\x05hello")  # a fake frame written straight to fd 1
    return 1.0


def _nan(spec, response):
    return float("nan")


def _big(spec, response):
    return 5.0


def _write_file(spec, response):
    with open(spec["answer"], "w") as f:  # the sandbox must refuse this
        f.write("pwned")
    return 1.0


def _shell(spec, response):
    os.system(f"touch {spec['answer']}")  # the sandbox must refuse this too
    return 1.0


def _echo(spec, response):
    return 1.0 if response == spec.get("answer") else 0.0, {"status": "ok", "detail": ""}


def _bad_spec(spec, response):
    return 0.0, {"status": "bad_spec", "detail": "test"}


def _introspect(spec, response):
    import resource
    import sys

    return 1.0, {
        "status": "ok",
        "as_mb": resource.getrlimit(resource.RLIMIT_AS)[0] >> 20,
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[0],
        "core": resource.getrlimit(resource.RLIMIT_CORE)[0],
        "cwd": os.getcwd(),
        "cwd_entries": len(os.listdir(".")),
        "env": ",".join(sorted(os.environ)),
        "stdout_is_stderr": sys.stdout is sys.stderr,
        "fd1_is_fd2": os.path.samestat(os.fstat(1), os.fstat(2)),
        "sigxfsz_ignored": signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN,
        "torch_loaded": "torch" in sys.modules,
    }


BEHAVIOURS = {
    "introspect": _introspect,
    "echo": _echo, "sleep": _sleep, "spin": _spin, "bigint": _bigint, "segfault": _segfault,
    "memory": _memory_bomb, "exit": _exit, "raise": _raise, "print": _print, "nan": _nan,
    "big": _big, "write_file": _write_file, "shell": _shell, "bad_spec": _bad_spec,
}


IMPORTED = []  # modules named in the pool's ``imports`` option append themselves here


def _imported(spec, response):
    return float(bool(IMPORTED)), {"status": "ok", "imported": ",".join(IMPORTED)}


BEHAVIOURS["imported"] = _imported


def behave(spec, response, *, progress=None):
    if progress == "len":  # lets a test see what the worker received
        return min(1.0, len(response) / 1e7), {"status": "ok", "len": len(response)}
    return BEHAVIOURS[spec["verifier"]](spec, response)

