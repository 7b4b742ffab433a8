"""Phase 5's curriculum against uniform training, and dreams against none, over several seeds, on one
registered model (normally a Phase 4 model):

    forge run                                                     # a session with a Phase 4 model
    forge models --phase 4                                        # its id
    python benchmarks/phase5_ablation.py --model-id p4-bitnet-... --seeds 0 1 2 [--set phases.phase5.x=y ...]

For each seed (the seed of the questions, batches and sampling; the incoming model is the same) it runs the
phase's climb and its uniform control (forge.pipeline.phases.phase5_curriculum.recipe.compare) from the
model as it comes (without the eudaimonia bake the phase does first), once with
the configured dreams and once with dream_epochs_per_level=0, and prints curriculum_gain, the forgetting of
the levels each task had mastered and the accuracy on the levels the climb passed, with mean and standard
deviation over the seeds. Nothing is registered.
"""
from __future__ import annotations

import argparse
import statistics
import time

from forge.data import CharTokenizer
from forge.pipeline.config import load_config
from forge.pipeline.orchestrator import Pipeline
from forge.pipeline.phases.phase5_curriculum.curriculum import pooled
from forge.pipeline.phases.phase5_curriculum.recipe import compare, gains, grown_model
from forge.registry import ModelRegistry


def one_run(item, cfg, seed: int) -> dict:
    tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
    model = grown_model(item, tokenizer)
    tasks = sorted(t for t, w in item.metadata["task_weights"].items() if w > 0)
    run = compare(model, tokenizer, tasks, cfg, seed)
    passed = {(c.task, level) for c in run["climber"].climbs.values() for level, _ in c.passed}
    out = gains(run)
    out["passed_levels_accuracy"] = pooled(run["climbed_table"], lambda t, lv: (t, lv) in passed) or 0.0
    out["levels_completed"] = len(passed)
    out["start_levels"] = " ".join(f"{t}:{s}" for t, s in run["starts"].items())
    out["final_levels"] = " ".join(f"{c.task}:{c.final}" for c in run["climber"].climbs.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--run-root", default="runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-dream-ablation", action="store_true")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    config = load_config(overrides=(f"run_root={args.run_root}", "wandb.mode=disabled", *args.overrides))
    with ModelRegistry(config.registry_path()) as registry:
        (item,) = Pipeline(config, registry, log=print, progress_bars=False).load_models([args.model_id])
    variants = {"dreams": config.phases.phase5}
    if not args.no_dream_ablation:
        variants["no dreams"] = config.phases.phase5.model_copy(update={"dream_epochs_per_level": 0})
    rows = {}
    for name, cfg in variants.items():
        for seed in args.seeds:
            started = time.perf_counter()
            rows[name, seed] = one_run(item, cfg, seed)
            print(f"{name:9} seed {seed}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in rows[name, seed].items())
                  + f" ({time.perf_counter() - started:.0f} s)", flush=True)
    for name in variants:
        for key in ("curriculum_gain", "climbed_forgetting", "uniform_forgetting", "passed_levels_accuracy"):
            values = [rows[name, s][key] for s in args.seeds if key in rows[name, s]]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"{name:9} {key:24} mean {statistics.mean(values):+.4f}  sd {spread:.4f}  {values}")


if __name__ == "__main__":
    main()
