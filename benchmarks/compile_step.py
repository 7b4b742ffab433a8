"""Does `torch.compile` of the model pay for a Phase 1 training step on the CPU? (issue 17, part 2: "Consider
torch.compile of the model where it pays on the CPU and say what it measured.")

    python benchmarks/compile_step.py [--steps 20] [--threads 1] [--mode default]

The pipeline's Phase 1 model and batch (dim 96, 3 blocks, 4 heads, 48 tokens, 342k parameters, batch 64; as
benchmarks/optimizer_step.py builds them), forward + answer cross-entropy + backward, eager against
`torch.compile(model)` (inductor). The pipeline trims every batch to its longest row, so a run sees many widths:
the script times a fixed width (48) and a cycle of the widths the default Phase 1 data produces, and the
compile time of the first call and of the first call at each new width (inductor recompiles, or marks the
width dynamic after the second). Prints medians in ms and the compiled / eager ratio. Results:
benchmarks/RESULTS.md, "torch.compile of the model".
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from optimizer_step import model_and_batch   # benchmarks/optimizer_step.py (the script's folder is on sys.path)

from forge.ops.precision import cpu_model, vector_flags


def step_fn(net, x: torch.Tensor):
    def step() -> None:
        logits = net(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
    return step


def timed(fn, steps: int) -> tuple[float, float]:
    """(first call in s, median of the next `steps` calls in ms)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times) * 1000


def widths_cycle(net, x: torch.Tensor, widths: list[int], rounds: int) -> tuple[list[float], float]:
    """(seconds of the first call at each width, median ms of the calls after the first round)."""
    firsts, later = [], []
    for round_ in range(rounds):
        for width in widths:
            start = time.perf_counter()
            step_fn(net, x[:, :width])()
            (firsts if round_ == 0 else later).append(time.perf_counter() - start)
    return firsts, statistics.median(later) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", default="default", help="torch.compile mode (default, max-autotune-no-cudagraphs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()}; vector flags: {' '.join(vector_flags())}; torch {torch.__version__}; "
          f"{args.threads} thread(s)")
    model, x, _ = model_and_batch()
    compiled = torch.compile(model, mode=args.mode)
    widths = [22, 30, 38, 46, 48]          # batch widths like the default data's (its longest row of 64)
    results = {}
    for name, net in (("eager", model), ("compiled", compiled)):
        first, fixed = timed(step_fn(net, x), args.steps)
        firsts, cycled = widths_cycle(net, x, widths, 4)
        results[name] = fixed, cycled
        print(f"{name:9s} first call {first:7.2f} s | width 48: {fixed:7.1f} ms | widths {widths} first calls "
              f"{', '.join(f'{s:.2f}' for s in firsts)} s, then {cycled:7.1f} ms")
    print(f"compiled / eager: width 48 {results['compiled'][0] / results['eager'][0]:.2f}, "
          f"cycled widths {results['compiled'][1] / results['eager'][1]:.2f} (below 1: compiled faster)")


if __name__ == "__main__":
    main()
