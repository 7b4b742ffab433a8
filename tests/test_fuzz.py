"""Coverage-guided fuzzing (atheris, libFuzzer) of everything that reads untrusted bytes: the config loader
and its --set values, the checkpoint and sidecar loader, the session state reader, the registry opener and the
calculator tool. Each target (tests/fuzz/fuzz_*.py) runs for FORGE_FUZZ_SECONDS (default 60) in its own
process; an exception other than the target's documented error types, a failed assertion, a hang or running
out of memory is a crash, and the test fails with atheris' report (the input that did it is saved by libFuzzer
in the working folder). Run one by hand: python tests/fuzz/fuzz_calculator.py -max_total_time=60."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGETS = sorted(p.stem.removeprefix("fuzz_") for p in (Path(__file__).parent / "fuzz").glob("fuzz_*.py"))
SECONDS = int(os.environ.get("FORGE_FUZZ_SECONDS", "60"))


def test_every_reader_of_untrusted_bytes_has_a_target():
    assert TARGETS == ["calculator", "checkpoint", "config", "registry", "session_state"]


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_target_survives(target, tmp_path):
    script = Path(__file__).parent / "fuzz" / f"fuzz_{target}.py"
    result = subprocess.run([sys.executable, str(script), f"-max_total_time={SECONDS}", "-timeout=20",
                             "-rss_limit_mb=3072", "-print_final_stats=1"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=SECONDS + 240)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-4000:]
    runs = int(re.search(r"stat::number_of_executed_units: (\d+)", report).group(1))
    print(f"fuzz {target}: {runs} executions in {SECONDS} s")
    assert runs > 100, report[-2000:]
