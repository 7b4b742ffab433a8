"""Generation with and without the key/value cache, against one teacher-forced pass of the same questions: how
the decoding numbers of benchmarks/RESULTS.md ("Phase 7") were measured.

    forge run                                              # a session with a Phase 6 model
    forge models --phase 6                                 # its id
    python benchmarks/generation.py --model-id p6-baked-... [--run-root runs] [--questions 256] [--rounds 5]

The model answers `--questions` questions of Phase 6's tool tasks at levels 6-10 (those it needs its calculator
for), greedily and with the calculator where its vocabulary has the call tokens, three ways taking turns round
by round (forge.bench.time_interleaved): `evaluate` (one teacher-forced pass per batch: the unit), generation
with the cache (forge.data.decoding feeding each row its new tokens through Transformer.forward_at), and the
same generation re-running the whole batch for every new token (the model behind a plain function, which has
no cache). Prints median milliseconds, each as teacher-forced passes, the ratio, and whether both generations
wrote the same tokens.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from forge.bench import time_interleaved
from forge.data.batching import prompt_ids
from forge.data.evaluate import evaluate
from forge.data.levels import level_examples
from forge.data.tools import answer_with_tool, calculator_for
from forge.pipeline.config import load_config
from forge.pipeline.loading import load_model


def questions(tokenizer, max_len: int, n: int, seed: int) -> list:
    """n test-split questions of Phase 6's tool tasks at levels 6-10, round robin, each leaving room to answer."""
    tasks = load_config().phases.phase6.tool_tasks
    pools = [[ex for ex in level_examples(task, level, n, "test", seed)
              if len(prompt_ids(ex, tokenizer)) + len(ex.answer) + 1 < max_len]
             for task in tasks for level in range(6, 11)]
    picked = [ex for row in zip(*[p for p in pools if p]) for ex in row]
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} questions fit max_len={max_len}; ask for fewer")
    return picked[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", required=True, help="a registered model id, or a .safetensors checkpoint")
    parser.add_argument("--run-root", default="runs")
    parser.add_argument("--questions", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    loaded = load_model(args.model_id, run_root=args.run_root)
    model, tokenizer, max_len = loaded.model, loaded.tokenizer, loaded.model.config.max_len
    examples = questions(tokenizer, max_len, args.questions, args.seed)
    tool = calculator_for(tokenizer)
    plain = lambda tokens: model(tokens)       # noqa: E731 (no forward_at: NextLogits re-runs the batch)
    cached_ids = [o.ids for o in answer_with_tool(model, examples, tokenizer, max_len, tool=tool)]
    rerun_ids = [o.ids for o in answer_with_tool(plain, examples, tokenizer, max_len, tool=tool)]
    samples = time_interleaved({
        "evaluate (one teacher-forced pass)": lambda: evaluate(model, examples, tokenizer, max_len),
        "generation with the cache": lambda: answer_with_tool(model, examples, tokenizer, max_len, tool=tool),
        "generation re-running the batch": lambda: answer_with_tool(plain, examples, tokenizer, max_len, tool=tool),
    }, torch.device("cpu"), rounds=args.rounds)
    medians = {label: statistics.median(s) * 1e3 for label, s in samples.items()}
    unit = next(iter(medians.values()))
    print(f"{args.questions} questions, {torch.get_num_threads()} threads, median of {args.rounds} rounds:")
    for label, ms in medians.items():
        print(f"  {label:36s} {ms:9.1f} ms  ({ms / unit:.1f} passes)")
    cached, rerun = list(medians.values())[1:]
    print(f"cache speedup {rerun / cached:.2f}x; same tokens both ways: {cached_ids == rerun_ids}")


if __name__ == "__main__":
    main()
