"""Steps to 95% validation accuracy on Grokfast's task, per optimizer, measured in one run.

Task and defaults are the Grokfast paper's (Lee et al. 2024, arXiv 2405.20233; github.com/ironjr/grokfast):
x * y mod 97, half of all pairs for training, a 2-layer width-128 4-head decoder, loss and accuracy on
the answer token, minibatches of 512, lr 1e-3, betas (0.9, 0.98), weight decay 0.005, lr warm-up over
10 steps, Grokfast-EMA alpha 0.98 lamb 2.0. The paper reports 39890 steps to 95% for Adam without the
filter and 910 with it (43.8x). Variants (grokking_harness.py): MuonGrokfast with and without the
filter, AdamW with and without it, and optionally the paper's own Adam with coupled L2 weight decay.

    python benchmarks/grokking.py [--p 97] [--max-steps N] [--out results.json]
    python benchmarks/grokking.py --quick      # the test's small setting: p = 59, width 32, 1 layer

Each row's last column is the speed-up of the filter: steps of the unfiltered variant / steps of the
filtered one, both measured here with the same seed and data ("> x" when the unfiltered one never got there).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from forge.bench import machine_info
from forge.data import modular_arithmetic_split
from forge.nn.models import TinyDecoder
from grokking_harness import ALL_VARIANTS, VARIANTS, optimizer_factory, train_until  # this folder's harness

PAPER = dict(p=97, dim=128, layers=2, heads=4, batch_size=512, lr=1e-3, muon_lr=0.02, weight_decay=0.005,
             alpha=0.98, lamb=2.0, max_steps=10000, eval_every=10, target=0.95)
#: The setting of tests/optim/test_grokking.py: small enough for a 2-core CPU in about a minute.
QUICK = dict(PAPER, p=59, dim=32, layers=1, batch_size=256, weight_decay=1.0, max_steps=3000, eval_every=25)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the test's small setting (p=59, width 32, 1 layer)")
    for key, value in PAPER.items():
        flag = "--" + key.replace("_", "-")
        parser.add_argument(flag, type=type(value), default=None, help=f"default {value} ({QUICK[key]} with --quick)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {ALL_VARIANTS}")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (model init, split and batches)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="write settings, machine and every run (with history) as JSON")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else PAPER
    settings = {key: preset[key] if getattr(args, key) is None else getattr(args, key) for key in PAPER}
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        parser.error(f"--variants: unknown {bad}; expected names from {ALL_VARIANTS}")
    seeds = [int(s) for s in args.seeds.split(",")]
    return args, settings, variants, seeds


def run_one(variant: str, seed: int, s: dict, device: torch.device) -> dict:
    """One training run of `variant` in setting `s`; train_until's result plus the variant and seed."""
    data = [t.to(device) for t in modular_arithmetic_split(s["p"], "mul", 0.5, seed=seed)]

    def model_fn():
        return TinyDecoder(s["p"] + 2, dim=s["dim"], n_layers=s["layers"], n_heads=s["heads"], max_len=4).to(device)

    factory = optimizer_factory(variant, lr=s["lr"], muon_lr=s["muon_lr"], betas=(0.9, 0.98),
                                weight_decay=s["weight_decay"], alpha=s["alpha"], lamb=s["lamb"])
    result = train_until(model_fn, factory, data, max_steps=s["max_steps"], target_acc=s["target"],
                         batch_size=s["batch_size"], eval_every=s["eval_every"], seed=seed)
    return dict(result, variant=variant, seed=seed)


def filter_speedup(run: dict, runs: list[dict]) -> str:
    """steps(unfiltered twin) / steps(run) for a "+grokfast" run, as text ("> a" or "< b" when only one
    of the two reached the target within its budget); "" for other runs or when neither did."""
    base, _, filtered = run["variant"].partition("+")
    twin = next((r for r in runs if r["variant"] == base and r["seed"] == run["seed"]), None)
    if not filtered or twin is None or (run["steps_to_target"] is None and twin["steps_to_target"] is None):
        return ""
    if twin["steps_to_target"] is None:
        return f"> {twin['steps'] / run['steps_to_target']:.2f}x"
    if run["steps_to_target"] is None:
        return f"< {twin['steps_to_target'] / run['steps']:.2f}x"
    return f"{twin['steps_to_target'] / run['steps_to_target']:.2f}x"


def markdown_table(runs: list[dict], s: dict) -> str:
    pct = f"{s['target']:.0%}"
    lines = [f"| variant | seed | steps to {pct} val acc | best val acc | seconds | filter speed-up |",
             "|---|---|---|---|---|---|"]
    for r in runs:
        steps = str(r["steps_to_target"]) if r["steps_to_target"] is not None else f"> {r['steps']}"
        lines.append(f"| {r['variant']} | {r['seed']} | {steps} | {r['best_val_acc']:.3f} | {r['seconds']:.0f} "
                     f"| {filter_speedup(r, runs)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, settings, variants, seeds = parse_args(argv)
    device = torch.device(args.device)
    machine = machine_info(device)
    print(f"grokking benchmark on {device}: {machine}")
    print(f"setting: {settings}", flush=True)
    runs = []
    for seed in seeds:
        for variant in variants:
            runs.append(run_one(variant, seed, settings, device))
            r = runs[-1]
            print(f"  {variant} seed {seed}: steps_to_target={r['steps_to_target']} best={r['best_val_acc']:.3f} "
                  f"({r['seconds']:.0f} s)", flush=True)
    print()
    print(markdown_table(runs, settings))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=machine, setting=settings, runs=runs), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
