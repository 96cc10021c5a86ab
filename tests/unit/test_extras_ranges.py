"""The declared ranges (setup.py) against what the packages themselves declare and what pip resolved.

A real resolver run of ``.[sglang]`` and ``.[te]`` downloads gigabytes (scripts/check_extras_resolve.py,
run by hand); its results and the pins read from the packages' wheels are recorded here and in
docs/compatibility.md, and these tests keep setup.py consistent with them at no cost.
"""
import ast
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("packaging", reason="packaging (version ranges) is not installed; the range checks need it")
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

# Requires-Dist of each sglang wheel (METADATA, read 2026-12-07): (torch pin, transformers pin).
SGLANG_PINS = {
    "0.5.11": ("2.11.0", "5.6.0"), "0.5.12.post1": ("2.11.0", "5.6.0"), "0.5.13.post1": ("2.11.0", "5.8.1"),
    "0.5.14": ("2.11.0", "5.8.1"), "0.5.15.post1": ("2.11.0", "5.12.1"), "0.5.16": ("2.11.0", "5.12.1"),
    "0.5.17": ("2.11.0", "5.12.1"), "0.5.18": ("2.13.0", "5.12.1"), "0.5.19": ("2.13.0", "5.12.1"),
    "0.5.20": ("2.13.0", "5.12.1"), "0.5.21": ("2.13.0", "5.12.1"), "0.5.22": ("2.14.1", "5.19.0"),
    "0.5.23": ("2.14.1", "5.19.0"),
}
# megatron-core wheels' METADATA: Requires-Python and the Transformer Engine range they declare.
MCORE = {"0.16.1": ("3.10", ">=2.9.0a0,<2.12.0"), "0.17.0": ("3.12", None), "0.18.0": ("3.12", None),
         "0.19.0": ("3.12", None), "0.19.2": ("3.12", None)}
TE_RELEASES = ["2.8.0", "2.9.0", "2.10.0", "2.11.0", "2.12.0", "2.14.1", "2.17.1", "2.20.2"]
# pip install --dry-run --ignore-installed of each extra (2026-12-07; [te] on 3.11 with build isolation,
# since transformer_engine_torch's sdist needs a CUDA torch to produce its metadata).
RESOLVED = {
    ("3.11", "sglang"): {"megatron-core": "0.16.1", "torch": "2.14.1", "transformers": "5.19.0", "sglang": "0.5.23"},
    ("3.12", "sglang"): {"megatron-core": "0.19.2", "torch": "2.14.1", "transformers": "5.19.0", "sglang": "0.5.23"},
    ("3.11", "te"): {"megatron-core": "0.16.1", "torch": "2.14.1", "transformers": "5.25.0",
                     "transformer-engine": "2.11.0"},
    ("3.12", "te"): {"megatron-core": "0.19.2", "torch": "2.14.1", "transformers": "5.25.0",
                     "transformer-engine": "2.20.2"},
}


def _setup_literals():
    tree = ast.parse((ROOT / "setup.py").read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("INSTALL_REQUIRES", "EXTRAS"):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found["INSTALL_REQUIRES"], found["EXTRAS"]


INSTALL_REQUIRES, EXTRAS = _setup_literals()


def declared(name: str, python: str, extra: str = ""):
    """Our specifier for ``name`` on ``python`` (core requirements, then the extra's)."""
    env = {"python_version": python, "python_full_version": python + ".0", "extra": extra}
    for line in INSTALL_REQUIRES + EXTRAS.get(extra, []):
        req = Requirement(line)
        if req.name == name and (req.marker is None or req.marker.evaluate(env)):
            return req.specifier
    raise AssertionError(f"{name} not declared for Python {python} [{extra}]")


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_megatron_range_takes_every_release_the_python_can_install(python):
    spec = declared("megatron-core", python)
    for version, (needs, _) in MCORE.items():
        if Version(python) >= Version(needs):
            assert spec.contains(version), (version, spec)
    assert not spec.contains("0.20.0") and not spec.contains("0.16.0")


@pytest.mark.parametrize("version", sorted(SGLANG_PINS, key=Version))
def test_every_sglang_in_range_pins_a_torch_and_transformers_we_accept(version):
    assert declared("sglang", "3.12", "sglang").contains(version, prereleases=True)
    torch_pin, tf_pin = SGLANG_PINS[version]
    for python in ("3.11", "3.12"):
        assert declared("torch", python).contains(torch_pin), (version, torch_pin)
        assert declared("transformers", python).contains(tf_pin), (version, tf_pin)


def test_sglang_floor_excludes_releases_pinning_transformers_4():
    spec = declared("sglang", "3.11", "sglang")
    assert not spec.contains("0.5.9") and not spec.contains("0.5.10.post1") and spec.contains("0.5.11")
    assert not spec.contains("0.6.0")


def test_te_on_311_is_inside_what_megatron_016_declares():
    ours, theirs = declared("transformer-engine", "3.11", "te"), MCORE["0.16.1"][1]
    from packaging.specifiers import SpecifierSet

    for te in TE_RELEASES:
        if ours.contains(te):
            assert SpecifierSet(theirs).contains(te), te
    assert ours.contains("2.11.0") and not ours.contains("2.12.0")


def test_te_on_312_follows_megatron_017_to_019_which_declare_no_bound():
    ours = declared("transformer-engine", "3.12", "te")
    assert all(MCORE[v][1] is None for v in ("0.17.0", "0.18.0", "0.19.0", "0.19.2"))
    assert ours.contains("2.9.0") and ours.contains("2.20.2") and not ours.contains("2.8.0")
    assert not ours.contains("3.0.0")


def test_env_report_knows_the_megatron_016_te_range():
    from packaging.specifiers import SpecifierSet

    from dualrpo_mcore import env

    ours, theirs = SpecifierSet(env.TE_BY_MCORE["0.16"]), SpecifierSet(MCORE["0.16.1"][1])
    assert [ours.contains(te) for te in TE_RELEASES] == [theirs.contains(te) for te in TE_RELEASES]


@pytest.mark.parametrize("key", sorted(RESOLVED))
def test_recorded_resolutions_satisfy_the_declared_ranges(key):
    python, extra = key
    for name, version in RESOLVED[key].items():
        assert declared(name, python, extra).contains(version, prereleases=True), (key, name, version)


def test_resolver_script_summarizes_pip_reports():
    spec = importlib.util.spec_from_file_location("check_extras_resolve", ROOT / "scripts" / "check_extras_resolve.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = {"install": [{"metadata": {"name": n, "version": v}} for n, v in
                          [("Megatron_Core", "0.19.2"), ("torch", "2.14.1"), ("numpy", "2.3.5"),
                           ("transformer_engine", "2.20.2")]]}
    assert mod.summarize(report) == {"megatron-core": "0.19.2", "torch": "2.14.1", "transformer-engine": "2.20.2"}
