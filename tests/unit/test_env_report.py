"""`dualrpo env`: the version checks against declared ranges, and the report as a command."""
import pytest

from dualrpo_mcore import cli, env

pytest.importorskip("packaging", reason="packaging (version ranges) is not installed; the range checks need it")

REQS = [
    "torch>=2.4",
    "megatron-core<0.20,>=0.16.1",
    "transformers<6,>=5.0",
    'sglang<0.6,>=0.5.11; extra == "sglang"',
    'transformer-engine[pytorch]<2.12,>=2.9; python_version < "3.0" and extra == "te"',
    'transformer-engine[pytorch]<3,>=2.9; python_version >= "3.0" and extra == "te"',
    'nemo-run==0.11.1; extra == "launch"',
]
EXTRAS = ["sglang", "te", "launch"]


def versions(**kw):
    table = {"torch": "2.13.0", "megatron-core": "0.19.2", "transformers": "5.25.0"}
    table.update({k.replace("_", "-"): v for k, v in kw.items()})
    return lambda name: table.get(env._canon(name))


def problems(**kw):
    return {c.name: c.problem for c in env.check_versions(REQS, EXTRAS, versions(**kw)) if c.problem}


def test_supported_stack_has_no_problem():
    assert problems() == {}
    assert problems(megatron_core="0.16.1", transformer_engine="2.11.0", sglang="0.5.23") == {}


def test_megatron_outside_range_names_package_and_range():
    found = problems(megatron_core="0.20.0")
    assert list(found) == ["megatron-core"]
    assert "0.20.0" in found["megatron-core"] and ">=0.16.1,<0.20" in found["megatron-core"]


def test_optional_outside_its_extra_range_is_a_problem_but_absent_is_not():
    assert "[sglang] extra" in problems(sglang="0.6.1")["sglang"]
    assert problems(sglang=None) == {}


def test_missing_core_requirement_is_a_problem():
    table = versions()
    assert "not installed" in {c.name: c.problem for c in env.check_versions(
        REQS, EXTRAS, lambda n: None if env._canon(n) == "transformers" else table(n))}["transformers"]


def test_marker_picks_the_te_range_of_this_python():
    # The python_version >= "3.0" line applies here, so TE 2.14 passes with megatron-core 0.19 ...
    assert problems(transformer_engine="2.14.0") == {}
    # ... but megatron-core 0.16 declares TE < 2.12, which the report enforces on any Python.
    found = problems(megatron_core="0.16.1", transformer_engine="2.14.0")
    assert "megatron-core 0.16.1" in found["transformer-engine"] and "<2.12" in found["transformer-engine"]


def test_spec_text_puts_the_lower_bound_first():
    from packaging.specifiers import SpecifierSet

    assert env.spec_text(SpecifierSet("<0.20,>=0.16.1")) == ">=0.16.1,<0.20"
    assert env.spec_text(SpecifierSet("")) == "any"


def test_installed_package_declares_the_megatron_range():
    own = env.own_requirements()
    if own is None:
        pytest.skip(reason="dualrpo-mcore is not installed as a distribution here (source tree only)")
    reqs, extras = own
    assert any(r.replace(" ", "").startswith("megatron-core") and "<0.20" in r for r in reqs), reqs
    assert {"sglang", "te", "launch", "test"} <= set(extras)


def test_command_reports_and_passes_here(capsys):
    assert cli.main(["env", "--no-extras"]) == 0
    out = capsys.readouterr().out
    for name in ("Python", "torch", "megatron-core", "transformer-engine", "sglang", "transformers", "nemo-run",
                 "GPUs:", "kernels:"):
        assert name in out


def test_command_fails_naming_package_and_range(capsys, monkeypatch):
    from packaging.requirements import Requirement

    own = env.own_requirements()
    if own is None:
        pytest.skip(reason="dualrpo-mcore is not installed as a distribution here (source tree only)")
    declared = next(Requirement(r) for r in own[0] if r.startswith("megatron-core"))
    real = env.installed_version
    monkeypatch.setattr(env, "installed_version",
                        lambda name: "0.99.0" if env._canon(name) == "megatron-core" else real(name))
    assert cli.main(["env", "--no-extras"]) == 1
    err = capsys.readouterr().err
    assert "megatron-core 0.99.0" in err and env.spec_text(declared.specifier) in err


def test_extras_are_imported_in_their_own_interpreter():
    lines = env.extra_lines(["launch", "sglang", "unknown"], timeout=120)
    assert len(lines) == 2 and lines[0].startswith("[launch]") and lines[1].startswith("[sglang]")
