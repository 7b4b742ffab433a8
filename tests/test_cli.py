"""The `forge` command, run as a user runs it: in a subprocess."""
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def forge(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "forge.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_backends_lists_every_op():
    result = forge("backends")
    assert result.returncode == 0, result.stderr
    for op in ("newton_schulz", "grokfast_ema", "grokfast_ma"):
        assert op in result.stdout


def test_bench_quick_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = forge("bench", "--quick", "--rounds", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    impls = {(r["op"], r["impl"]) for r in rows}
    assert ("newton_schulz", "forge.cpu") in impls and ("grokfast_ema", "forge.cpu") in impls
    for r in rows:
        assert r["median_ms"] > 0 and r["speedup_vs_ref"] > 0
        if r["op"] == "newton_schulz" and r["impl"] == "forge.cpu":
            assert r["rel_err_vs_fp64"] < 1e-3


def test_pipeline_commands_say_they_are_not_built_yet():
    result = forge("run")
    assert result.returncode == 2 and "not built yet" in result.stderr


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_build_needs_no_torch():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(r.split(">")[0].split("=")[0].strip() == "torch" for r in requires)
