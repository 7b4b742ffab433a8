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
