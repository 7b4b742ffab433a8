"""Per-call cost of every forge op at a tiny size, where the arithmetic is nothing and what is left is overhead
(issue 17, part 2: "per-call overhead of every op at most 20 us").

    python benchmarks/op_overhead.py [--calls 2000] [--threads 1] [--crossover]

Each case calls the public op (default backend, eager) on inputs of a few elements, `--calls` times after a
warm-up, and prints the median of 5 timed batches in microseconds per call, beside one `torch.add` of the same
tensor (the floor any torch call pays) and the 20 us target. `--crossover` also times Newton-Schulz on square
float32 matrices of growing size with the one-call native path (forge.ops.newton_schulz.SMALL_MAX_WORK) and with
the blocked torch path, to place that constant. Results: benchmarks/RESULTS.md, "Per-call overhead".
"""
from __future__ import annotations

import argparse
import functools
import importlib
import statistics
import time

import torch

from forge import ops
from forge.ops.precision import cpu_model, vector_flags

ns_module = importlib.import_module("forge.ops.newton_schulz")  # forge.ops exports a function of that name

TARGET_US = 20.0


def per_call_us(fn, calls: int) -> float:
    """Median over 5 batches of `calls` calls, in microseconds per call."""
    for _ in range(max(10, calls // 20)):
        fn()
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(batches)


def cases() -> dict:
    """name -> a no-argument call of the op on tiny inputs."""
    g, w, x = torch.randn(2, 2), torch.randn(4, 8), torch.randn(1, 8)
    grads, emas = [torch.randn(16)], [torch.randn(16)]
    rings, sums = [torch.zeros(4, 16)], [torch.zeros(16)]
    logits_s, logits_t, keep = torch.randn(1, 8), torch.randn(1, 8), torch.ones(1, dtype=torch.bool)
    tracked = logits_s.clone().requires_grad_()
    packed, scale = ops.pack_ternary(torch.randint(-1, 2, (4, 8), dtype=torch.int8)), torch.ones(1)
    return {
        "newton_schulz 2x2": lambda: ops.newton_schulz(g),
        "newton_schulz 4x8 (optimizer path, no finite check)": lambda: ops.newton_schulz(w, check_finite=False),
        "grokfast_ema_ 1x16": lambda: ops.grokfast_ema_(grads, emas),
        "grokfast_ma_ 1x16": lambda: ops.grokfast_ma_(grads, rings, sums, 10),
        "kl_div_logits 1x8": lambda: ops.kl_div_logits(logits_s, logits_t),
        "kl_div_logits 1x8 masked": lambda: ops.kl_div_logits(logits_s, logits_t, mask=keep),
        "kl_div_logits 1x8 forward + backward (no target)": lambda: ops.kl_div_logits(tracked, logits_t).backward(),
        "ste_ternary 4x8": lambda: ops.ste_ternary(w),
        "ste_act_int8 1x8": lambda: ops.ste_act_int8(x),
        "ternary_quant 4x8": lambda: ops.ternary_quant(w),
        "act_quant_int8 1x8": lambda: ops.act_quant_int8(x),
        "ternary_linear 1x8 -> 4": lambda: ops.ternary_linear(x, packed, scale, 4),
        "torch.add 1x16 (floor)": lambda: grads[0].add(emas[0]),
    }


def crossover(calls: int) -> None:
    """Native one-call Newton-Schulz against the blocked torch path, square float32 matrices."""
    print("\nnewton_schulz float32, native one-call path vs blocked torch path (us per call)")
    print("| m = n | m^2 n | native | torch ops | native / torch ops |")
    print("|---|---|---|---|---|")
    limit = ns_module.SMALL_MAX_WORK
    for m in (2, 4, 8, 16, 24, 32, 48, 64):
        call = functools.partial(ops.newton_schulz, torch.randn(m, m))
        ns_module.SMALL_MAX_WORK = 1 << 62
        native = per_call_us(call, max(20, calls // m))
        ns_module.SMALL_MAX_WORK = 0
        blocked = per_call_us(call, max(20, calls // m))
        ns_module.SMALL_MAX_WORK = limit
        print(f"| {m} | {m ** 3} | {native:.1f} | {blocked:.1f} | {native / blocked:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--crossover", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_model()} ({' '.join(vector_flags())}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    print("| op, tiny input | us per call | target |")
    print("|---|---|---|")
    for name, fn in cases().items():
        us = per_call_us(fn, args.calls)
        verdict = "" if "floor" in name or "no target" in name else ("met" if us <= TARGET_US else "missed")
        print(f"| {name} | {us:.1f} | {verdict} |")
    if args.crossover:
        crossover(args.calls)


if __name__ == "__main__":
    main()
