"""The `dualrpo` entry point: every listed command parses, and a missing subcommand says so."""
import pytest

from dualrpo_mcore import cli
from helpers.cli import run_dualrpo


def test_present_commands_build_and_missing_module_is_hidden(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("dualrpo_mcore.no_such_module", "not in this build"))
    parser = cli.build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert "ghost" not in choices
    assert {"bench", "data", "convert"} <= set(choices)


def test_no_command_prints_help_and_returns_2(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_bench_without_name_returns_2(capsys):
    assert cli.main(["bench"]) == 2
    assert "verifiers" in capsys.readouterr().out


def test_unknown_command_is_an_argparse_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


def test_python_dash_m_is_the_same_cli():
    out = run_dualrpo("--help", timeout=120, threads=None, check=False)
    assert out.returncode == 0 and "convert" in out.stdout
