import os

import pytest

# Tests must never reach for a model or dataset hub (there is none in CI).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from helpers.synth import synth  # noqa: E402  (after the offline switches: it imports the package)


# Module-scoped: the tests only read the set, and writing it costs seconds on 2 cores, so one per
# module rather than one per test (and not one per session, so no module sees another's leftovers).
@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    """One train and one held-out sample per task."""
    return synth(tmp_path_factory.mktemp("synth"), per_task=1)


@pytest.fixture(scope="module")
def synth_dir2(tmp_path_factory):
    """Two train samples per task (runs with two prompts per step or batches of four), one held out."""
    return synth(tmp_path_factory.mktemp("synth"), per_task=2)


@pytest.fixture(scope="module")
def synth_dir_cli(tmp_path_factory):
    """As ``synth_dir``, written by ``dualrpo data synth`` in a subprocess (the end-to-end tests)."""
    return synth(tmp_path_factory.mktemp("synth"), per_task=1, cli=True)
