"""How Phase 1's merge setup was chosen: do weight merges of three branches keep their skills?

Trains a trunk on all five Phase 1 tasks (the default model shape), branches the three default
specialists from it, and evaluates each branch, their linear merge (the average) and TIES merges
(Yadav et al. 2023) on the uniform validation mix, as the pipeline does.

    python benchmarks/merge_setup.py --trunk-steps 600 --branch-steps 300 --lr 0.002 --branch-lr 0.002
    python benchmarks/merge_setup.py --trunk-steps 600 --branch-steps 300 --lr 0.002 --branch-lr 0.0005

Results are in benchmarks/RESULTS.md ("Pipeline"). A branch-off at step 0 (no trunk) is
`forge run --set phases.phase1.shared_steps=0 --set phases.phase1.steps=800 --set phases.phase1.branch_lr=0.002`.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from forge.data import CharTokenizer, evaluate, make_examples
from forge.merge import linear, ties
from forge.nn import build_model
from forge.optim import create_optimizer_from_phase
from forge.pipeline.config import load_config
from forge.pipeline.training import train_on_examples


def train(model, weights: dict, steps: int, lr: float, seed: int, tokenizer, cfg) -> None:
    optimizer = create_optimizer_from_phase(model, 1, lr=lr, adamw_lr=lr)
    examples = make_examples(weights, cfg.train_examples, "train", seed)
    train_on_examples(model, optimizer, examples, tokenizer, steps=steps, batch_size=cfg.batch_size,
                      max_len=model.config.max_len, seed=seed)


def report(name: str, model, val, tokenizer) -> None:
    result = evaluate(model, val, tokenizer, model.config.max_len)
    per_task = {k: round(v, 2) for k, v in result["per_task_accuracy"].items()}
    print(f"{name:<16} accuracy {result['accuracy']:.3f}  loss {result['loss']:.3f}  {per_task}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trunk-steps", type=int, default=600)
    parser.add_argument("--branch-steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--branch-lr", type=float, default=0.0005)
    args = parser.parse_args()
    cfg = load_config().phases.phase1
    tokenizer = CharTokenizer()
    tasks = {t: 1.0 for spec in cfg.models for t in spec.task_weights}
    shape = {"vocab_size": tokenizer.vocab_size, **cfg.model.model_dump()}
    val = make_examples(tasks, 512, "val", 0)
    torch.manual_seed(cfg.init_seed)
    trunk, started = build_model(shape), time.perf_counter()
    if args.trunk_steps:
        train(trunk, tasks, args.trunk_steps, args.lr, cfg.init_seed, tokenizer, cfg)
    report("trunk", trunk, val, tokenizer)
    base = {k: v.clone() for k, v in trunk.state_dict().items()}
    states = []
    for spec in cfg.models:
        branch = copy.deepcopy(trunk)
        train(branch, dict(spec.task_weights), args.branch_steps, args.branch_lr, spec.seed, tokenizer, cfg)
        report(spec.name, branch, val, tokenizer)
        states.append(branch.state_dict())
    merged = build_model(shape)
    for name, state in [("linear", linear(states, [1, 1, 1]))] + [
            (f"ties d{d} s{s}", ties(states, [1, 1, 1], base, density=d, scale=s))
            for d in (0.2, 0.5, 1.0) for s in (1.0, 2.0)]:
        merged.load_state_dict(state)
        report(name, merged, val, tokenizer)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
