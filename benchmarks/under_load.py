"""How much a busy machine slows forge down, and what OpenMP's wait policy has to do with it (issue 17, "Under load").

    python benchmarks/under_load.py [--busy N] [--steps 20] [--policies default PASSIVE]

Each case runs in a fresh subprocess (OpenMP reads OMP_WAIT_POLICY once, when torch loads it), with torch's
default thread count, first on an idle machine, then beside N busy processes (pure-Python loops, one per core by
default: what another job does to a laptop). Cases: training steps of the pipeline's Phase 1 model (forward,
backward, MuonGrokfast.step; batch 64, 48 tokens) and forge's Newton-Schulz on one 1024x1024 fp32 matrix.
Prints each case's median time and its slowdown under load, per wait policy (`default`: OMP_WAIT_POLICY unset,
libgomp spins a while before it sleeps; `PASSIVE`; `SPIN=n`: GOMP_SPINCOUNT=n) and thread count (`--threads`, 0:
torch's default). Results and what they mean: benchmarks/RESULTS.md, "Under load".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASE = r"""
import json, statistics, sys, time
import torch
from forge.nn import Transformer, TransformerConfig
from forge.ops import newton_schulz
from forge.optim import MuonGrokfast

case, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
if case == "train_step":
    model = Transformer(TransformerConfig(vocab_size=76, dim=96, n_layers=3, n_heads=4, max_len=48))
    opt = MuonGrokfast(model.parameters(), lr=0.02)
    x = torch.randint(0, 76, (64, 48))
    def run():
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad(); loss.backward(); opt.step()
else:
    g = torch.randn(1024, 1024)
    run = lambda: newton_schulz(g)
run()
times = []
for _ in range(steps):
    start = time.perf_counter(); run(); times.append(time.perf_counter() - start)
print(json.dumps({"median_ms": 1000 * statistics.median(times), "threads": torch.get_num_threads()}))
"""


def measure(case: str, steps: int, policy: str, threads: int) -> dict:
    """One case in a fresh process; `policy` "default" leaves OMP_WAIT_POLICY unset, "SPIN=n" sets GOMP_SPINCOUNT."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if policy.startswith("SPIN="):
        env["GOMP_SPINCOUNT"] = policy[5:]
    elif policy != "default":
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", CASE, case, str(steps), str(threads)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def busy(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--policies", nargs="+", default=["default", "PASSIVE"])
    parser.add_argument("--cases", nargs="+", default=["train_step", "newton_schulz_1024"])
    parser.add_argument("--threads", type=int, nargs="+", default=[0], help="0: torch's default")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load: {args.busy} busy processes")
    for case in args.cases:
        for policy in args.policies:
            for threads in args.threads:
                _row(case, args, policy, threads)


def _row(case: str, args, policy: str, threads: int) -> None:
    idle = measure(case, args.steps, policy, threads)
    procs = busy(args.busy)
    try:
        time.sleep(1.0)
        loaded = measure(case, args.steps, policy, threads)
    finally:
        for p in procs:
            p.kill()
    print(f"{case:20s} {policy:10s} threads {idle['threads']}: idle {idle['median_ms']:8.1f} ms  loaded "
          f"{loaded['median_ms']:8.1f} ms  slowdown {loaded['median_ms'] / idle['median_ms']:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
