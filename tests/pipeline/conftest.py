import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def test_phases(monkeypatch):
    """The phase table with the small test phases as phases 1 and 2 (3..8 stay not implemented)."""
    from _pipeline_test_phases import TEST_PHASES

    from forge.pipeline.phases import PHASES

    for number, entry in TEST_PHASES.items():
        monkeypatch.setitem(PHASES, number, entry)
    return PHASES


@pytest.fixture(scope="session")
def addition_copy_model():
    """The dim-64 two-layer model trained on addition and copy (600 steps) that the Phase 6, 7 and 8 tests start
    from, trained once per test run; each user takes its own copy."""
    from _small_model import small_trained_model

    return small_trained_model({"addition": 1.0, "copy": 1.0}, examples=2000, steps=600, max_len=48)
