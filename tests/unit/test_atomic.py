"""dualrpo_mcore.atomic: content, no temp left behind, a failed write keeps the old file, atomic_dir
publishes only on success."""
import json
import os
import stat

import pytest

from dualrpo_mcore import atomic
from dualrpo_mcore.atomic import atomic_dir, atomic_path, atomic_write, atomic_write_json


def _entries(d):
    return sorted(os.listdir(d))


@pytest.mark.parametrize("fsync", [True, False])
def test_atomic_write_text_and_bytes(tmp_path, fsync):
    p = tmp_path / "a.txt"
    atomic_write(p, "héllo\n", fsync=fsync)
    assert p.read_bytes() == "héllo\n".encode("utf-8")
    atomic_write(str(p), b"\x00\xffraw", fsync=fsync)  # replaces, str path works too
    assert p.read_bytes() == b"\x00\xffraw"
    assert _entries(tmp_path) == ["a.txt"]


def test_atomic_write_rejects_other_types(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(TypeError, match="str or bytes"):
        atomic_write(p, {"not": "bytes"})
    assert p.read_text() == "old" and _entries(tmp_path) == ["a.txt"]


def test_atomic_write_keeps_permissions_of_umask(tmp_path):
    # a mkstemp-based temp would publish a 0600 file; the helper must not narrow permissions
    old = os.umask(0o022)
    try:
        p = tmp_path / "perm.txt"
        atomic_write(p, "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_atomic_write_json_roundtrip(tmp_path):
    p = tmp_path / "d.json"
    obj = {"b": [1, 2.5, None], "a": "ü"}
    atomic_write_json(p, obj, indent=2, sort_keys=True)
    text = p.read_text(encoding="utf-8")
    assert text == json.dumps(obj, indent=2, sort_keys=True) + "\n"
    assert json.loads(text) == obj
    assert _entries(tmp_path) == ["d.json"]


def test_serializer_failure_keeps_old_file(tmp_path):
    p = tmp_path / "d.json"
    atomic_write_json(p, {"v": 1})
    before = p.read_bytes()
    with pytest.raises(TypeError):
        atomic_write_json(p, {"v": object()})  # json cannot serialize it
    assert p.read_bytes() == before
    assert _entries(tmp_path) == ["d.json"]


def test_failure_mid_write_keeps_old_file(tmp_path):
    # the writer has already put half of the new content on disk when it fails
    p = tmp_path / "data.bin"
    p.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(p) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
            assert os.path.exists(tmp) and os.path.dirname(tmp) == str(tmp_path)
            raise RuntimeError("boom")
    assert p.read_bytes() == b"old content"
    assert _entries(tmp_path) == ["data.bin"]


def test_atomic_path_success_and_missing_file(tmp_path):
    p = tmp_path / "out.bin"
    with atomic_path(p) as tmp:
        assert tmp.endswith(".tmp") and not os.path.exists(p)
        with open(tmp, "wb") as f:
            f.write(b"new")
    assert p.read_bytes() == b"new" and _entries(tmp_path) == ["out.bin"]
    with pytest.raises(FileNotFoundError, match="created no file"):
        with atomic_path(p):
            pass  # the writer forgot to write: the old file must survive
    assert p.read_bytes() == b"new"


def test_atomic_dir_publishes_on_success(tmp_path):
    out = tmp_path / "sub" / "model"  # missing parent is created
    with atomic_dir(out) as d:
        assert not out.exists() and os.path.isdir(d)
        assert os.path.dirname(d) == str(out.parent)
        os.makedirs(os.path.join(d, "inner"))
        with open(os.path.join(d, "inner", "w.txt"), "w") as f:
            f.write("w")
    assert (out / "inner" / "w.txt").read_text() == "w"
    assert _entries(out.parent) == ["model"]


def test_atomic_dir_removed_on_error(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(ValueError, match="mid-save"):
        with atomic_dir(out) as d:
            with open(os.path.join(d, "part.bin"), "wb") as f:
                f.write(b"partial")
            raise ValueError("mid-save")
    assert not out.exists()
    assert _entries(tmp_path) == []


def test_atomic_dir_refuses_existing(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_dir(out):
            pytest.fail("the body must not run when the target exists")
    assert (out / "keep.txt").read_text() == "keep" and _entries(tmp_path) == ["model"]


def test_atomic_dir_target_appearing_during_write(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(FileExistsError, match="appeared"):
        with atomic_dir(out) as d:
            open(os.path.join(d, "mine"), "w").close()
            out.mkdir()
            (out / "theirs").write_text("t")
    assert _entries(out) == ["theirs"] and _entries(tmp_path) == ["model"]


def test_fsync_is_called_for_file_and_directory(tmp_path, monkeypatch):
    # durability is not observable without a power cut: check the calls instead
    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                          real(fd)))
    p = tmp_path / "f.txt"
    atomic_write(p, "x")
    assert any(s.endswith(".tmp") for s in synced) and str(tmp_path) in synced
    synced.clear()
    atomic_write(p, "y", fsync=False)
    assert synced == []
