"""The CI entry point and its second leg: what runs, in which order, and the skip without Python 3.12."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ci_runs_make_test_then_the_py312_leg():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    makes = [ln for ln in lines if ln.startswith("make ")]
    assert makes == ["make test", "make test-deprecations", "make test-py312"]
    makefile = (ROOT / "Makefile").read_text()
    assert "\ntest-py312:" in makefile and "scripts/test_py312.sh" in makefile


def test_leg_skips_with_the_reason_where_no_python312_exists(tmp_path):
    # Only the system's bin folders on PATH: no pyenv, no uv; here that means Python 3.11 only.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYENV", "PYTHON312", "VIRTUAL_ENV"))}
    env.update(PATH="/usr/bin:/bin", VENV312=str(tmp_path / "no-venv"))
    if any(os.path.exists(os.path.join(d, "python3.12")) for d in ("/usr/bin", "/bin")):
        import pytest

        pytest.skip(reason="this machine has a system Python 3.12: the leg would run, not skip")
    res = subprocess.run(["bash", str(ROOT / "scripts" / "test_py312.sh")], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "SKIPPED: no Python 3.12 found" in res.stdout
    assert not (tmp_path / "no-venv").exists()
