"""Where a Phase 1 training step goes, and MuonGrokfast.step against the time of its own Newton-Schulz GEMMs
(issue 17, part 2: "the optimizer step at most 1.3x the time of its own Newton-Schulz GEMMs at the machine's
GEMM rate").

    python benchmarks/optimizer_step.py [--steps 30] [--threads 1]

The pipeline's Phase 1 model (config/pipeline_config.yaml phases.phase1: dim 96, 3 blocks, 4 heads, 48 tokens;
342k parameters), batch 64, MuonGrokfast as the pipeline makes it (forge.pipeline.training.make_optimizer; the
phase's Grokfast EMA, QK-clip, fp32 Newton-Schulz). Prints the median time of forward, backward and the optimizer
step, torch.optim.AdamW (foreach) on the same parameters, and the GEMM work of the step's Newton-Schulz calls: the
FLOPs its matrix products execute (torch.utils.flop_counter on the very calls the step makes), the machine's GEMM
rate measured here on a 384x384x384 fp32 product, and their quotient, the ideal NS time. Results:
benchmarks/RESULTS.md, "Per-call overhead".
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch.utils.flop_counter import FlopCounterMode

from forge.data import CharTokenizer
from forge.nn import Transformer, TransformerConfig
from forge.ops import newton_schulz
from forge.ops.precision import cpu_model, vector_flags
from forge.optim import functional
from forge.pipeline.config import as_dict, load_config
from forge.pipeline.training import make_optimizer


def median_ms(fn, steps: int) -> float:
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def gemm_rate(size: int = 384, steps: int = 30) -> float:
    """FLOP/s of one fp32 size^3 product (torch.mm), median."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / (median_ms(lambda: torch.mm(a, b), steps) / 1000)


def model_and_batch():
    config = load_config()
    cfg = config.phases.phase1
    shape = TransformerConfig(vocab_size=CharTokenizer().vocab_size, **as_dict(cfg.model))
    torch.manual_seed(0)
    model = Transformer(shape)
    x = torch.randint(0, shape.vocab_size, (cfg.batch_size, shape.max_len))
    return model, x, make_optimizer(model, cfg.optimizer, cfg.lr)


def ns_flops(optimizer) -> tuple[float, dict]:
    """FLOPs of the matrix products in one step's Newton-Schulz calls, counted on those calls."""
    counted, shapes = [0.0], defaultdict(int)
    original = functional._orthogonalize_stack

    def counting(stack, *args, **kwargs):
        with FlopCounterMode(display=False) as counter:
            out = original(stack, *args, **kwargs)
        counted[0] += counter.get_total_flops()
        shapes[tuple(stack.shape)] += 1
        return out

    functional._orthogonalize_stack = counting
    try:
        optimizer.step()
    finally:
        functional._orthogonalize_stack = original
    return counted[0], dict(shapes)


def step_without_ns_ms(optimizer, steps: int) -> float:
    """The step with every Newton-Schulz call replaced by the identity: what the step costs besides NS."""
    original = functional._orthogonalize_stack
    functional._orthogonalize_stack = lambda stack, *args, **kwargs: stack
    try:
        return median_ms(optimizer.step, steps)
    finally:
        functional._orthogonalize_stack = original


def ns_only_ms(stacks: dict, steps: int) -> float:
    """The step's Newton-Schulz calls alone (fp32, no finite check, as the optimizer makes them)."""
    inputs = [torch.randn(shape) for shape, count in stacks.items() for _ in range(count)]
    return median_ms(lambda: [newton_schulz(g, check_finite=False) for g in inputs], steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, optimizer = model_and_batch()
    loss_of = lambda: torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    loss_of().backward()
    flops, stacks = ns_flops(optimizer)
    forward = median_ms(lambda: loss_of(), args.steps)
    loss = loss_of()
    backward = median_ms(lambda: loss.backward(retain_graph=True), args.steps)
    step = median_ms(optimizer.step, args.steps)
    besides, ns_alone = step_without_ns_ms(optimizer, args.steps), ns_only_ms(stacks, args.steps)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    adamw_ms = median_ms(adamw.step, args.steps)
    rate = gemm_rate()
    ideal = 1000 * flops / rate
    print(f"CPU: {cpu_model()} ({' '.join(vector_flags())}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"batch {x.shape[0]} x {x.shape[1]}")
    print(f"Newton-Schulz stacks per step: {stacks}")
    print("| part | median ms |")
    print("|---|---|")
    for name, ms in (("forward (loss)", forward), ("backward", backward), ("MuonGrokfast.step", step),
                     ("MuonGrokfast.step with Newton-Schulz replaced by the identity", besides),
                     ("the step's Newton-Schulz calls alone", ns_alone),
                     ("torch.optim.AdamW foreach step, same parameters", adamw_ms)):
        print(f"| {name} | {ms:.2f} |")
    print(f"NS GEMM work {flops / 1e6:.1f} MFLOP at {rate / 1e9:.1f} GFLOP/s (384^3 fp32 torch.mm) = {ideal:.2f} ms; "
          f"step / that = {step / ideal:.2f}x (target <= 1.3x); the NS calls alone run at "
          f"{flops / ns_alone / 1e6:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
