"""Phase 1 training steps per second on 1 process and on N gloo ranks (issue 16's scaling figure).

    python benchmarks/distributed_scaling.py [--ranks 1 2] [--steps 100] [--repeats 3]

Each case is a fresh process group started by torchrun (`--standalone`; torchrun gives each rank 1 OpenMP thread
unless OMP_NUM_THREADS is set; one process keeps torch's default thread count). It trains the default Phase 1
model (config/pipeline_config.yaml's phases.phase1: shape, batch 64, MuonGrokfast with the phase's settings) with
the pipeline's own loop, forge.pipeline.training.train_on_examples, inside forge.distributed.phase_scope: every
rank takes its slice of each global batch of 64 and DDP averages the gradients, as `forge run --nproc N` does. Cases
run interleaved, `--repeats` times; prints the median steps per second of each rank count and its ratio to the
first, with the CPU it ran on, and where rank 0's step goes (forward, backward with DDP's all-reduce, optimizer step;
fixed batches, this rank's rows). Results: benchmarks/RESULTS.md, "Distributed".
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from forge.ops.precision import cpu_model, vector_flags

CASE = r"""
import sys, time
import torch
from forge import distributed
from forge.data import CharTokenizer, make_examples
from forge.nn import Transformer, TransformerConfig
from forge.pipeline.config import as_dict, load_config
from forge.data import encode_batch
from forge.distributed import data_parallel
from forge.pipeline.training import batch_rows, make_optimizer, rank_share_nll, train_on_examples

steps, share = int(sys.argv[1]), sys.argv[2] == "share"
config = load_config(overrides=[f"hardware.distributed.share_newton_schulz={str(share).lower()}"])
here = distributed.init(config.hardware.distributed, torch.device("cpu"))
cfg, tokenizer = config.phases.phase1, CharTokenizer()
shape = TransformerConfig(vocab_size=tokenizer.vocab_size, **as_dict(cfg.model))
tasks = {t: 1.0 for spec in cfg.models for t in as_dict(spec.task_weights)}
train = make_examples(tasks, cfg.train_examples, "train", 0)
torch.manual_seed(0)
model = Transformer(shape)
with distributed.phase_scope():
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr)
    train_on_examples(model, optimizer, train, tokenizer, steps=10, batch_size=cfg.batch_size, max_len=shape.max_len, seed=0)
    started = time.perf_counter()
    train_on_examples(model, optimizer, train, tokenizer, steps=steps, batch_size=cfg.batch_size,
                      max_len=shape.max_len, seed=1)
    seconds = time.perf_counter() - started
    # where a step goes: this rank's rows of fixed batches, forward / backward (DDP's all-reduce included) / step
    batch, rows, net = encode_batch(train, tokenizer, shape.max_len), batch_rows(cfg.batch_size, "parts"), data_parallel(model)
    parts = [0.0, 0.0, 0.0]
    for i in range(steps // 2):
        idx = torch.arange(i * cfg.batch_size, (i + 1) * cfg.batch_size)
        t0 = time.perf_counter()
        loss = rank_share_nll(net(batch.tokens[idx[rows]]), batch.targets[idx], rows)
        t1 = time.perf_counter()
        optimizer.zero_grad()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        parts = [parts[0] + t1 - t0, parts[1] + t2 - t1, parts[2] + t3 - t2]
if here.is_main:
    ms = " ".join(f"{1e3 * p / (steps // 2):.2f}" for p in parts)
    print(f"RESULT {steps / seconds:.3f} {torch.get_num_threads()} {ms}", flush=True)
distributed.shutdown()
"""


def one_case(ranks: int, steps: int, share: bool) -> tuple[float, int, list[float]]:
    script = [sys.executable, "-c", CASE, str(steps), "share" if share else "each"]
    if ranks > 1:
        script = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                  "--no-python", *script]
    done = subprocess.run(script, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONSAFEPATH": "1"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    if done.returncode or not lines:
        raise RuntimeError(f"{ranks} ranks failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rate, threads, *parts = lines[0].split()[1:]
    return float(rate), int(threads), [float(p) for p in parts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--share-newton-schulz", action="store_true",
                        help="split Muon's orthogonalizations over the ranks (hardware.distributed.share_newton_schulz)")
    args = parser.parse_args()
    print(f"{cpu_model()} ({' '.join(vector_flags())}), {os.cpu_count()} logical CPUs; Phase 1 default model, global batch 64, {args.steps} steps")
    rates: dict[int, list[float]] = {n: [] for n in args.ranks}
    parts: dict[int, list[list[float]]] = {n: [] for n in args.ranks}
    threads: dict[int, int] = {}
    for _ in range(args.repeats):
        for ranks in args.ranks:
            rate, threads[ranks], split = one_case(ranks, args.steps, args.share_newton_schulz)
            rates[ranks].append(rate)
            parts[ranks].append(split)
    base = statistics.median(rates[args.ranks[0]])
    for ranks in args.ranks:
        median = statistics.median(rates[ranks])
        runs = ", ".join(f"{r:.2f}" for r in rates[ranks])
        split = [statistics.median(p[i] for p in parts[ranks]) for i in range(3)]
        print(f"{ranks} rank(s) x {threads[ranks]} thread(s): {median:6.2f} steps/s (runs {runs}), "
              f"{median / base:.2f}x {args.ranks[0]} rank(s); rank 0's step: forward {split[0]:.1f} ms, "
              f"backward {split[1]:.1f} ms (DDP's all-reduce included), optimizer {split[2]:.1f} ms")

if __name__ == "__main__":
    main()
