"""pytest-benchmark setup: the cases come from forge.bench (shared with `forge bench`).

Each implementation of a case is one benchmark in the case's group, so pytest-benchmark prints the
ratios within a group; at the end, a summary gives each implementation's speedup over the case's
reference, measured in this run, and the issue's targets beside them.
"""
import os

import pytest
import torch

QUICK = os.environ.get("FORGE_BENCH_QUICK") == "1"  # small shapes, for a smoke run
DEVICE = torch.device(os.environ.get("FORGE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
_medians: dict[tuple[str, str], float] = {}
_references: dict[str, str] = {}


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture
def record():
    """record(case, impl, benchmark) keeps the median for the end-of-run ratio table."""

    def keep(case, impl, benchmark):
        _references[case.name] = case.reference
        if benchmark.stats is not None:
            _medians[(case.name, impl)] = benchmark.stats.stats.median

    return keep


def run_benchmark(benchmark, fn, device, rounds):
    def call():
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)


def pytest_terminal_summary(terminalreporter):
    if not _medians:
        return
    write = terminalreporter.write_line
    write("")
    write(f"speedup over each case's reference, same run ({DEVICE}):")
    for (case, impl), median in sorted(_medians.items()):
        ref = _medians.get((case, _references[case]))
        if ref:
            write(f"  {case:<28} {impl:<20} {ref / median:6.2f}x")
    write("targets: NS fp32 CPU >= 1.25x square, >= 2x 1024x4096; Grokfast >= 3x published eager, >= 70% of copy")
