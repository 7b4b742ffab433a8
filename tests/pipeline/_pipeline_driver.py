"""Run the real `forge` CLI with the test phases in the phase table (used as a subprocess)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _pipeline_test_phases import TEST_PHASES  # noqa: E402

from forge import cli  # noqa: E402
from forge.pipeline.phases import PHASES  # noqa: E402

PHASES.update(TEST_PHASES)
sys.exit(cli.main(sys.argv[1:]))
