"""What the non-GEMM parts of a pipeline training step cost, each against the code it replaced (issue 17, part 2:
"profile a Phase 1 training step and remove what is not compute").

    python benchmarks/train_step.py [--rounds 8] [--steps 5] [--threads 1] [--cases rotary allocator packing steps]

The pipeline's Phase 1 model (dim 96, 3 blocks, 4 heads, 48 tokens; batch 64), forward + backward of the
cross-entropy, in one process, the variants alternating round by round (the median of `--steps` steps a round, the
median over rounds), so that a VM's speed swings hit every variant alike:

- rotary: `forge.nn.apply_rotary` (written out in reals) against one complex multiply (tried, not kept), and none;
- mask: the attention with its cached additive causal mask against `masked_fill` (the results are bit-identical:
  checked here on the loss and every gradient);
- allocator: the same step in two fresh processes, glibc's own malloc thresholds against the `forge` command's
  (`forge.cli.malloc_defaults`), with the wall time, system time and page faults per step;
- packing: real question batches of the default pipeline's five tasks (Phase 5's uniform control: levels 1-10;
  Phase 1's trunk: the default difficulty) as one padded row per question against `forge.data.pack_batch`'s packed rows, the
  batching itself included, with the tokens (padding included) each step computes;
- steps: the same batches as whole training steps (drawing, forward, backward, MuonGrokfast) through the pipeline's
  `train_on_tokens`, padded against packed.

Results: benchmarks/RESULTS.md, "Training step".
"""
from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

import forge.nn.attention as attention
from forge.data import NUM_LEVELS, CharTokenizer, encode_batch, level_examples, make_examples, pack_batch
from forge.nn import Transformer, TransformerConfig
from forge.pipeline.config import OptimizerConfig
from forge.pipeline.training import answer_nll, make_optimizer, train_on_tokens
from forge.ops.precision import cpu_model, vector_flags

SHAPE = dict(vocab_size=40, dim=96, n_layers=3, n_heads=4, max_len=48)
BATCH = 64


def complex_rotary(x: torch.Tensor, base: float = 10000.0, offset=0) -> torch.Tensor:
    """RoPE as one complex multiply over a complex view of the pairs (tried, measured, not kept: RESULTS)."""
    seq, head_dim = x.shape[-2], x.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)
    theta = base ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=dtype) / head_dim)
    if isinstance(offset, torch.Tensor):
        angles = offset.to(dtype)[:, None, :, None] * theta
    else:
        angles = torch.arange(offset, offset + seq, device=x.device, dtype=dtype)[:, None] * theta
    pairs = torch.view_as_complex(x.to(dtype).contiguous().unflatten(-1, (head_dim // 2, 2)))
    return torch.view_as_real(pairs * torch.complex(angles.cos(), angles.sin())).flatten(-2).to(x.dtype)


def masked_fill_forward(self, x, past_kv=None, use_cache=False):
    """CausalSelfAttention.forward before the additive mask (no cache: what training runs)."""
    batch, seq, _ = x.shape
    q, k, v = self.qkv_heads(x, offset=0)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), -math.inf)
    self._record_max_logits(scores)
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    out = self.o_proj((probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, seq, self.dim))
    return (out, (k, v)) if use_cache else out


def make_step():
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**SHAPE))
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SHAPE["max_len"]))

    def step():
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, SHAPE["vocab_size"]), tokens.reshape(-1))
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]
    return step


def alternate(variants: dict, rounds: int, steps: int) -> dict[str, float]:
    """Median ms of a step per variant; each variant is (install, uninstall), applied around its turn."""
    step, times = make_step(), {name: [] for name in variants}
    for _ in range(rounds):
        for name, (install, uninstall) in variants.items():
            install()
            step()
            runs = []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                runs.append(time.perf_counter() - start)
            uninstall()
            times[name].append(statistics.median(runs))
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def rotary_and_mask(rounds: int, steps: int) -> None:
    current_rotary, current_forward = attention.apply_rotary, attention.CausalSelfAttention.forward

    def rotary(fn):
        return ((lambda: setattr(attention, "apply_rotary", fn)),
                (lambda: setattr(attention, "apply_rotary", current_rotary)))
    none = lambda x, base=0.0, offset=0: x   # noqa: E731
    print("| rotary | forward + backward, median ms |\n|---|---|")
    for name, ms in alternate({"written-out real form (forge)": rotary(current_rotary),
                               "complex multiply (tried)": rotary(complex_rotary),
                               "no rotary (floor)": rotary(none)}, rounds, steps).items():
        print(f"| {name} | {ms:.1f} |")

    def forward(fn):
        return ((lambda: setattr(attention.CausalSelfAttention, "forward", fn)),
                (lambda: setattr(attention.CausalSelfAttention, "forward", current_forward)))
    step = make_step()
    loss_add, grads_add = step()
    attention.CausalSelfAttention.forward = masked_fill_forward
    loss_fill, grads_fill = step()
    attention.CausalSelfAttention.forward = current_forward
    same = torch.equal(loss_add, loss_fill) and all(torch.equal(a, b) for a, b in zip(grads_add, grads_fill))
    print(f"\nadditive mask vs masked_fill: loss and gradients bit-identical: {same}\n")
    print("| causal mask | forward + backward, median ms |\n|---|---|")
    for name, ms in alternate({"cached additive mask (forge now)": forward(current_forward),
                               "masked_fill (before)": forward(masked_fill_forward)}, rounds, steps).items():
        print(f"| {name} | {ms:.1f} |")


def allocator_child(mode: str, steps: int) -> None:
    """In a fresh process: `steps` timed steps after 3 warm ones; prints wall, system ms and faults per step."""
    if mode == "forge":
        from forge.cli import malloc_defaults
        malloc_defaults({})
    step = make_step()
    for _ in range(3):
        step()
    before, runs = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        runs.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(1000 * statistics.median(runs), 1000 * (after.ru_stime - before.ru_stime) / steps,
          (after.ru_minflt - before.ru_minflt) / steps)


def allocator(rounds: int, steps: int, threads: int) -> None:
    print("\n| malloc | round | step, median ms | system ms a step | page faults a step |\n|---|---|---|---|---|")
    for r in range(max(1, rounds // 4)):
        for mode in ("glibc", "forge"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, "--steps", str(8 * steps),
                                  "--threads", str(threads)], capture_output=True, text=True, check=True).stdout
            wall, system, faults = (float(v) for v in out.split()[-3:])
            label = "glibc defaults" if mode == "glibc" else "forge.cli.malloc_defaults"
            print(f"| {label} | {r + 1} | {wall:.1f} | {system:.1f} | {faults:.0f} |")


PIPELINE_TASKS = ("addition", "copy", "modular", "reversal", "sorting")   # the default config's Phase 1 tasks


def packing_batches(kind: str, count: int) -> list:
    """`count` batches of BATCH questions of the default pipeline's tasks: Phase 5's uniform control (levels 1-10
    alike) or Phase 1's trunk (the tasks at their default difficulty, equal weights)."""
    rng = random.Random(0)
    if kind == "phase 5":
        pools = {(t, lv): level_examples(t, lv, 200, "train", 0) for t in PIPELINE_TASKS
                 for lv in range(1, NUM_LEVELS + 1)}
        keys = sorted(pools)
        return [[rng.choice(pools[rng.choice(keys)]) for _ in range(BATCH)] for _ in range(count)]
    pool = make_examples({t: 1.0 for t in PIPELINE_TASKS}, 2000, "train", 0)
    return [rng.sample(pool, BATCH) for _ in range(count)]


def packing(rounds: int, steps: int) -> None:
    """Padded rows (one per question, `encode_batch`) against packed rows (`pack_batch`), batching included."""
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(**{**SHAPE, "vocab_size": tokenizer.vocab_size}))

    def padded(examples):
        batch = encode_batch(examples, tokenizer, SHAPE["max_len"])
        return batch.tokens.numel(), answer_nll(model(batch.tokens), batch.targets)

    def packed(examples):
        batch = pack_batch(examples, tokenizer, SHAPE["max_len"])
        return batch.tokens.numel(), answer_nll(model(batch.tokens, positions=batch.positions,
                                                      segments=batch.segments), batch.targets)
    print("\n| batches | rows | tokens a step (with padding) | forward + backward, median ms |\n|---|---|---|---|")
    for kind in ("phase 5", "phase 1"):
        batches, times, tokens = packing_batches(kind, steps), {"padded": [], "packed": []}, {}
        for _ in range(rounds):
            for name, build in (("padded", padded), ("packed", packed)):
                runs = []
                for examples in batches:
                    start = time.perf_counter()
                    model.zero_grad()
                    tokens[name], loss = build(examples)
                    loss.backward()
                    runs.append(time.perf_counter() - start)
                times[name].append(statistics.median(runs))
        for name, values in times.items():
            print(f"| {kind} | {name} | {tokens[name]} | {1000 * statistics.median(values):.1f} |")


def whole_steps(rounds: int, steps: int) -> None:
    """Whole training steps (batch drawing, forward, backward, MuonGrokfast) through the pipeline's own loop,
    `forge.pipeline.training.train_on_tokens`, on a fresh model of the Phase 1 shape: padded rows (the model's
    `supports_packing` switched off) against packed rows, alternating by round."""
    tokenizer = CharTokenizer()
    print("\n| questions | rows | whole step, median ms |\n|---|---|---|")
    for kind in ("phase 5", "phase 1"):
        pool = [ex for batch in packing_batches(kind, 40) for ex in batch]
        encoded = encode_batch(pool, tokenizer, SHAPE["max_len"])
        torch.manual_seed(0)
        model = Transformer(TransformerConfig(**{**SHAPE, "vocab_size": tokenizer.vocab_size}))
        optimizer = make_optimizer(model, OptimizerConfig(), 1e-3)
        times = {"padded": [], "packed": []}
        for r in range(rounds):
            for name in times:
                model.supports_packing = name == "packed"
                start = time.perf_counter()
                train_on_tokens(model, optimizer, encoded.tokens, encoded.targets, tokenizer.pad_id, steps=4 * steps,
                                batch_size=BATCH, seed=r)
                times[name].append((time.perf_counter() - start) / (4 * steps))
        for name, values in times.items():
            print(f"| {kind} | {name} | {1000 * statistics.median(values):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", nargs="+", choices=["rotary", "allocator", "packing", "steps"],
                        default=["rotary", "allocator", "packing", "steps"])
    parser.add_argument("--child", choices=["glibc", "forge"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return allocator_child(args.child, args.steps)
    flags = " ".join(vector_flags())
    print(f"CPU: {cpu_model()}, flags {flags}; torch {torch.__version__}, {args.threads} thread(s)\n")
    if "rotary" in args.cases:
        rotary_and_mask(args.rounds, args.steps)
    if "allocator" in args.cases:
        allocator(args.rounds, args.steps, args.threads)
    if "packing" in args.cases:
        packing(args.rounds, args.steps)
    if "steps" in args.cases:
        whole_steps(args.rounds, args.steps)


if __name__ == "__main__":
    main()
