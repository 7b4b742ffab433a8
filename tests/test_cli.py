"""The `forge` command, run as a user runs it: in a subprocess."""
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from forge.cli import busy_cores, busy_share, malloc_defaults, openmp_defaults
from forge.ops import available_backends

ROOT = Path(__file__).resolve().parents[1]


def forge(*args, timeout=300, cwd=None, env=None):
    """The installed `forge` script (from a repo-root cwd, `python -m forge.cli` would put the Triton source
    folder kernels/ on sys.path, shadowing the PyPI package `kernels` that transformers imports)."""
    script = Path(sys.executable).with_name("forge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "forge.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def test_backends_lists_every_op():
    result = forge("backends")
    assert result.returncode == 0, result.stderr
    for op in ("newton_schulz", "grokfast_ema", "grokfast_ma"):
        assert op in result.stdout
    # the CPU line: model, flags and the bf16 answer ns_dtype="auto" uses (this suite fixes it: FORGE_CPU_BF16=0)
    assert "cpu: " in result.stdout and "bf16 matmul slow (FORGE_CPU_BF16=0)" in result.stdout, result.stdout


@pytest.mark.parametrize("user, load, want", [
    ({}, 0.2, {"GOMP_SPINCOUNT": "3000"}),                    # an idle machine: a short spin
    ({}, 1.5, {"OMP_WAIT_POLICY": "PASSIVE"}),                # other work on the 2 cores: threads sleep at once
    ({"GOMP_SPINCOUNT": "7"}, 1.5, {"GOMP_SPINCOUNT": "7"}),  # the user's own settings stay
    ({"OMP_WAIT_POLICY": "ACTIVE"}, 0.2, {"OMP_WAIT_POLICY": "ACTIVE"})])
def test_openmp_wait_policy_follows_the_load_unless_the_user_chose(user, load, want):
    environ = dict(user)
    openmp_defaults(environ, load=load, cores=2)
    assert environ == want


def test_busy_cores_counts_the_processes_running_now(tmp_path):
    """Real busy processes, one per core, raise the count to about all the cores (the 1-minute load average would
    take a minute to follow them); idle and iowait time are not busy; no /proc/stat: None."""
    cores = os.cpu_count()
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        assert busy_cores(0.5) >= 0.75 * cores
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    # user 60, system 15, steal 5, idle 15, iowait 5 between the samples: 0.8 busy
    assert busy_share([100, 0, 50, 1000, 9, 0, 0, 0, 0, 0], [160, 0, 65, 1015, 14, 0, 0, 5, 0, 0]) == pytest.approx(0.8)
    assert busy_cores(0.01, str(tmp_path / "absent")) is None


def test_the_command_sets_the_wait_policy_before_torch_loads():
    """libgomp reads its wait settings when torch loads: `forge` sets them first (importing forge.cli loads no
    torch) and hands them to what it starts; `forge backends` shows them."""
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    result = forge("backends", env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"threads: \d+ \(OpenMP: (GOMP_SPINCOUNT=3000|OMP_WAIT_POLICY=PASSIVE)\)", result.stdout), result.stdout
    assert "(OpenMP: GOMP_SPINCOUNT=7)" in forge("backends", env=env | {"GOMP_SPINCOUNT": "7"}).stdout
    loaded = subprocess.run([sys.executable, "-c", "import sys, forge.cli; print('torch' in sys.modules)"],
                            capture_output=True, text=True, cwd=ROOT / "tests", check=True).stdout
    assert loaded.strip() == "False"


_ALLOCATION_CYCLES = """
import resource, sys, torch
from forge.cli import malloc_defaults
if sys.argv[1] == "forge":
    print(malloc_defaults({}))
def cycle():   # a step's pattern: 20 activations of 1 MiB alive together, then all freed
    xs = [torch.ones(262144) for _ in range(20)]
    del xs
cycle(); cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_the_command_keeps_freed_activations_for_reuse():
    """Both children start with glibc told to map every block over 128 KiB and to trim at once (its own dynamic
    thresholds trim or not depending on the process's history: 25,000 faults for these cycles in one run, 256 in
    another), so each cycle faults its 20 MiB in again (5 x 5,120 pages); the command's settings, applied on top,
    keep the freed blocks for reuse."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
    faults = {}
    for mode in ("glibc", "forge"):
        out = subprocess.run([sys.executable, "-c", _ALLOCATION_CYCLES, mode], capture_output=True, text=True,
                             cwd=ROOT / "tests", env=env, check=True).stdout.split()
        faults[mode] = int(out[-1])
    assert faults["glibc"] > 5 * 2560, faults         # at least half of the pages faulted in again, each cycle
    assert faults["forge"] * 10 < faults["glibc"], faults
    assert malloc_defaults({"MALLOC_TRIM_THRESHOLD_": "1"}) == "the user's MALLOC_* settings"
    result = forge("backends", env={k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")})
    assert "malloc: mmap threshold 32 MiB, trim threshold 256 MiB" in result.stdout, result.stdout


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


def test_bench_only_codecs_times_the_fused_cpu_kernels_against_decode_then_linear(tmp_path):
    out = tmp_path / "bench.json"
    result = forge("bench", "--quick", "--rounds", "1", "--only", "seedlm,vq_linear", "--json", str(out), timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["case"]) for r in rows} == {
        ("seedlm_search", "256blk-4096seeds"), ("seedlm_linear", "512x512-batch1"), ("seedlm_linear", "512x512-batch8"),
        ("vq_linear", "512x512-batch1"), ("vq_linear", "512x512-batch8")}
    impls = {(r["op"], r["impl"]) for r in rows}
    for op in ("seedlm_search", "seedlm_linear", "vq_linear"):  # an absent backend is left out, not an error
        assert (op, "forge.cpu") in impls or "cpu" not in available_backends(op)
    assert {("seedlm_search", "torch reference"), ("seedlm_linear", "decode + F.linear"),
            ("seedlm_linear", "dense F.linear"), ("vq_linear", "decode + F.linear"), ("vq_linear", "dense F.linear")} <= impls
    assert not any(impl.endswith("triton") for _, impl in impls)  # the Triton interpreter is not timed on the CPU
    for r in rows:
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0 and math.isfinite(r["speedup_vs_ref"])
        if r["op"] == "seedlm_search":  # every backend finds codes of the same quality (Gaussian blocks: ~0.035)
            assert 0 < r["rel_sq_err"] < 0.1
        else:  # the fused kernels compute the decoded weight's product to float32 rounding
            assert r["rel_err_vs_dense"] < 1e-5
    search = {r["impl"]: r["rel_sq_err"] for r in rows if r["op"] == "seedlm_search"}
    assert all(err == pytest.approx(search["torch reference"], rel=1e-4) for err in search.values())


def test_bench_only_rejects_an_unknown_op():
    result = forge("bench", "--only", "newton,nope", timeout=60)
    assert result.returncode == 2
    assert "no benchmarked op starts with ['nope']" in result.stderr and "seedlm_search" in result.stderr


def test_phases_lists_every_phase():
    result = forge("phases")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    names = ["cognate", "evomerge", "quietstar", "bitnet", "curriculum", "baking", "experts", "compression"]
    assert [line.split()[:2] for line in lines] == [[str(n), name] for n, name in enumerate(names, 1)]
    assert [line.split(None, 2)[2] for line in lines] == ["implemented"] * 8
    off = forge("phases", "--set", "phases.phase7.enabled=false")      # what this config would run
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines()[6].endswith("implemented, switched off: runs skip it (--set phases.phase7.enabled=true)")
    assert off.stdout.splitlines()[:6] == lines[:6]


def test_pipeline_errors_exit_nonzero_with_the_reason_and_write_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("phases:\n  phase1: {steps: 5\n")
    cases = [(("run", "--config", str(bad)), "invalid YAML at line"),
             (("run", "--config", str(tmp_path / "missing.yaml")), "config file not found"),
             (("run", "--set", "phases.phase2.population_size=0"), "phases.phase2.population_size: must be >= 2, got 0"),
             (("run", "--set", "phases.phase1.stepz=5"), "phases.phase1.stepz: unknown key"),
             (("run", "--only", "9"), "unknown phase '9'"),
             (("rollback", "some-session", "0"), "unknown phase '0'"),
             (("status",), "no registry at"),
             (("resume", "nope"), "no registry at")]
    for args, reason in cases:
        result = forge(*args, cwd=tmp_path)
        assert result.returncode != 0 and reason in result.stderr, (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_dry_run_validates_and_writes_nothing(tmp_path):
    result = forge("run", "--dry-run", "--set", "phases.phase1.steps=10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "config ok" in result.stdout and "handoff 1->2: 3 model(s)" in result.stdout
    assert re.search(r"phase 3 quietstar +~\d+ s", result.stdout)
    assert re.search(r"phase 4 bitnet +~\d+ s", result.stdout)
    assert re.search(r"phase 5 curriculum +~\d+ s", result.stdout)
    assert re.search(r"phase 6 baking +~\d+ s", result.stdout)
    assert re.search(r"phase 7 experts +~\d+ s", result.stdout)
    assert re.search(r"phase 8 compression +~\d+ s", result.stdout)
    assert "plan: phases 1..8" in result.stdout
    assert "nothing was written" in result.stdout
    off = forge("run", "--dry-run", "--set", "phases.phase3.enabled=false", cwd=tmp_path)
    assert off.returncode == 0, off.stderr
    assert "phase 3 quietstar    is switched off (phases.phase3.enabled: false): skipped" in off.stdout
    assert "plan: phases 1..2, 4..8 (phase 3 is switched off (phases.phase3.enabled: false): skipped)" in off.stdout
    assert re.search(r"phase 4 bitnet +~\d+ s", off.stdout)      # Phase 4 quantizes Phase 2's champion
    assert list(tmp_path.iterdir()) == []


def test_ci_runs_exactly_the_readme_test_command():
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    assert test_command in (ROOT / ".ci" / "run").read_text()


def test_build_needs_no_torch():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(r.split(">")[0].split("=")[0].strip() == "torch" for r in requires)


def test_an_unknown_session_is_answered_before_torch_is_loaded(tmp_path):
    """`forge resume` / `rollback` / `status` with a bad session name exit 2 with the reason, and never import
    torch (which took 23 s on a loaded machine before the answer came)."""
    from forge.registry import ModelRegistry

    ModelRegistry(tmp_path / "runs" / "registry.db").close()
    probe = ("import sys\nfrom forge import cli\nrc = cli.main(sys.argv[1:])\n"
             "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')\nsys.exit(rc)")
    for args in (("resume", "nope"), ("rollback", "nope", "2"), ("status", "nope")):
        result = subprocess.run([sys.executable, "-P", "-c", probe, *args], capture_output=True, text=True,
                                cwd=tmp_path, timeout=120)
        assert result.returncode == 2 and "unknown session 'nope'" in result.stderr, (args, result.stderr)
        assert "torch not loaded" in result.stdout, args


@pytest.mark.parametrize("nproc", [["--nproc", "3"], ["--nproc=3"]])
def test_nproc_hands_the_same_arguments_to_torchrun(monkeypatch, tmp_path, nproc):
    """`forge run --nproc 3 ...` becomes `torchrun --standalone --nproc-per-node=3 -m forge run ...` (the real
    torchrun runs in tests/pipeline/test_distributed_pipeline.py); here only the command line it execs."""
    import os

    from forge import cli

    execs = []
    monkeypatch.setattr(os, "execv", lambda path, argv: execs.append((path, argv)))
    args = ["--set", f"run_root={tmp_path}", "--to-phase", "1"]
    cli.main(["run", *nproc, *args])
    (path, argv), = execs
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", "-m", "forge",
                    "run", *args]
    assert not list(tmp_path.iterdir())   # rank 0 of torchrun creates the session, not this process


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_nproc_must_be_a_positive_whole_number(value, capsys):
    from forge import cli

    with pytest.raises(SystemExit) as stop:
        cli.main(["run", "--nproc", value])
    assert stop.value.code == 2 and "--nproc must be a whole number of processes >= 1" in capsys.readouterr().err


def test_nproc_under_torchrun_is_refused(monkeypatch, tmp_path, capsys):
    from forge import cli

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["run", "--nproc", "2", "--set", f"run_root={tmp_path}"]) == 2
    assert "torchrun has started the ranks already" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
