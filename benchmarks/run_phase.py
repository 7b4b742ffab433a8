"""Run one phase's controller on a registered model, outside a session: how the Phase 3 and 4 numbers
in benchmarks/RESULTS.md were measured while Phase 3 is off by default (so `forge run` never reaches 4).

    forge run                                          # makes runs/registry.db with a Phase 2 champion
    forge models --phase 2                             # its id
    python benchmarks/run_phase.py --phase 4 --model-id p2-champion-...   [--set phases.phase4.x=y ...]

Nothing is registered; the phase's files go to a temporary folder. Prints the phase's metrics and
whether its own output check (validate_output) passes.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from forge.pipeline.config import load_config
from forge.pipeline.controller import HandoffError, PhaseContext
from forge.pipeline.orchestrator import Pipeline
from forge.pipeline.phases import load_controller_class
from forge.registry import ModelRegistry
from forge.tracking import Tracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", type=int, required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--run-root", default="runs")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    config = load_config(overrides=(f"run_root={args.run_root}", "wandb.mode=disabled", *args.overrides))
    with ModelRegistry(config.registry_path()) as registry:
        inputs = Pipeline(config, registry, log=print, progress_bars=False).load_models([args.model_id])
        out = Path(tempfile.mkdtemp(prefix=f"forge-phase{args.phase}-"))
        tracker = Tracker(out, "run_phase", mode="disabled")
        tracker.start_phase(args.phase, "run_phase", {})
        ctx = PhaseContext("run_phase", args.phase, config, config.phase(args.phase), out, out, registry, tracker,
                           inputs, lambda fraction, message: None, config.seed, torch.device("cpu"))
        phase = load_controller_class(args.phase)()
        torch.manual_seed(config.seed + args.phase)   # as the orchestrator seeds a phase: same numbers as forge run
        started = time.perf_counter()
        phase.validate_input(ctx)
        result = phase.execute(ctx)
        print(f"phase {args.phase} took {time.perf_counter() - started:.1f} s; files in {out}")
        for key, value in result.metrics.items():
            if isinstance(value, dict):
                value = {k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()}
            print(f"  {key}: {round(value, 4) if isinstance(value, float) else value}")
        try:
            phase.validate_output(result, ctx)
            print("validate_output: passed")
        except HandoffError as error:
            print(f"validate_output: FAILED: {error}")


if __name__ == "__main__":
    main()
