"""A whole pipeline phase, idle and beside a busy machine, run by the real `forge` command (issue 17, "Under load":
"with one competing busy process per core, a phase must take at most 2.5x its idle time").

    python benchmarks/phase_under_load.py [--phases 1 3] [--busy N] [--settle 70] [--source-session S --run-root R]
                                          [--set KEY=VALUE ...]

For each phase, `forge run --only P` runs twice in a fresh process with the command's own OpenMP defaults
(forge/cli.py `openmp_defaults`: it reads the load average once, at start): first on the idle machine, then beside N
busy processes (pure-Python loops, one per core by default: what another job does to a laptop), started `--settle`
seconds before the phase so the 1-minute load average shows them, as it would for a job already running. The
phase's wall time is the one the orchestrator prints ("phase P (...): done in X s"). Phase 1 needs no input; a
later phase takes the models of `--source-session` in `--run-root` (for example a default `forge run`'s session).
SIZES shrinks each phase so a pair of runs takes minutes, keeping its checks passable; `--set` adds overrides.
Results: benchmarks/RESULTS.md, "Under load".
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from forge.cli import openmp_defaults
from under_load import busy     # benchmarks/under_load.py: one pure-Python loop per process

SIZES = {
    1: ["phases.phase1.shared_steps=300", "phases.phase1.steps=150", "phases.phase1.eval_every=75",
        "phases.phase1.eval_examples=256", "phases.phase1.train_examples=5000",
        "phases.phase1.min_margin_over_baseline=0.0"],
    3: ["phases.phase3.warmup_steps=300", "phases.phase3.rl_steps=60", "phases.phase3.baking_steps=10",
        "phases.phase3.train_examples=2000", "phases.phase3.eval_examples=256", "phases.phase3.min_thought_gain=-1.0",
        "phases.phase3.min_gain_over_input=-1.0", "phases.phase3.min_distinct_thoughts=0.0"],
}
DONE = re.compile(r"phase (\d+) \([^)]*\): done in ([0-9.]+)s")


def settle_down(quiet: float, most_s: float = 300.0) -> None:
    """Wait (at most `most_s`) until the 1-minute load average is below `quiet`: the idle run must start on a
    machine that looks idle to the command's OpenMP choice too."""
    deadline = time.monotonic() + most_s
    while os.getloadavg()[0] >= quiet and time.monotonic() < deadline:
        time.sleep(5)


def run_phase(phase: int, args, run_root: str) -> dict:
    """`forge run --only phase` in a fresh process: the phase's wall time as printed, the whole command's, the load
    average it started under and the OpenMP setting it chose (as `forge backends` would report it)."""
    command = [sys.executable, "-m", "forge", "run", "--only", str(phase), "--set", f"run_root={run_root}",
               "--set", "wandb.mode=disabled"]
    if args.source_session and phase > 1:
        command += ["--source-session", args.source_session]
    for value in SIZES.get(phase, []) + args.set:
        command += ["--set", value]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    load = os.getloadavg()[0]
    started = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    times = {int(p): float(s) for p, s in DONE.findall(out.stdout)}
    if phase not in times:      # a failed check still ran the phase: time the whole command instead
        print(f"phase {phase} printed no 'done' line (exit {out.returncode}); timing the whole command. Its end:\n"
              f"{out.stdout[-1500:]}\n{out.stderr[-1500:]}", flush=True)
    chosen: dict[str, str] = {}
    openmp_defaults(chosen, load=load)      # what the command decided at its start
    return {"phase_s": times.get(phase, wall), "command_s": wall, "load": load,
            "openmp": " ".join(f"{k}={v}" for k, v in chosen.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phases", type=int, nargs="+", default=[1])
    parser.add_argument("--busy", type=int, default=os.cpu_count())
    parser.add_argument("--settle", type=float, default=70.0, help="seconds the load runs before the phase starts")
    parser.add_argument("--source-session", default=None, help="session whose models feed a phase after 1")
    parser.add_argument("--run-root", default=None, help="run_root holding --source-session (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], help="one more config override")
    parser.add_argument("--quiet-load", type=float, default=0.5,
                        help="the idle run waits until the 1-minute load average is below this")
    args = parser.parse_args()
    root = args.run_root or tempfile.mkdtemp(prefix="forge_load_")
    print(f"{os.cpu_count()} CPUs; load: {args.busy} busy processes started {args.settle:.0f} s before each loaded run")
    for phase in args.phases:
        settle_down(args.quiet_load)
        idle = run_phase(phase, args, root)
        procs = busy(args.busy)
        try:
            time.sleep(args.settle)
            loaded = run_phase(phase, args, root)
        finally:
            for p in procs:
                p.kill()
        print(f"phase {phase}: idle {idle['phase_s']:7.1f} s (load {idle['load']:.2f}, {idle['openmp']})  loaded "
              f"{loaded['phase_s']:7.1f} s (load {loaded['load']:.2f}, {loaded['openmp']})  slowdown "
              f"{loaded['phase_s'] / idle['phase_s']:.2f}x  [whole commands {idle['command_s']:.1f} / "
              f"{loaded['command_s']:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
