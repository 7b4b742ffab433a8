"""Real, small phases for orchestrator tests: they build forge.nn.Transformer models, train them
for a few AdamW steps on a copy task, and hand them on. Knobs come from the environment so a
subprocess run can be told to sleep (and be killed) in a given phase."""
from __future__ import annotations

import os
import time

import torch

from forge.nn import build_model
from forge.pipeline.controller import ModelOutput, PhaseController, PhaseResult, check_result

VOCAB = 32
MODEL_CONFIG = {"vocab_size": VOCAB, "dim": 64, "n_layers": 2, "n_heads": 4, "max_len": 16}
TOKENIZER = {"kind": "test-chars", "chars": "abcdefghijklmnopqrstuvwxyz012345"}


def copy_batch(seed: int, batch: int = 8, length: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and next-token targets of counting sequences (t, t+1, t+2, ... mod VOCAB)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (batch, 1), generator=g)
    seq = (start + torch.arange(length)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def loss_of(model, seed: int) -> float:
    tokens, targets = copy_batch(seed)
    with torch.no_grad():
        logits = model(tokens)
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1)))


def maybe_sleep(ctx) -> None:
    """FORGE_TEST_SLEEP="<phase>:<seconds>": write <run_dir>/phase<N>.started, then sleep."""
    spec = os.environ.get("FORGE_TEST_SLEEP", "")
    if spec and int(spec.split(":")[0]) == ctx.phase:
        (ctx.run_dir / f"phase{ctx.phase}.started").write_text(str(os.getpid()))
        time.sleep(float(spec.split(":")[1]))


class TrainPhase(PhaseController):
    phase, name = 1, "cognate"

    def validate_output(self, result, ctx) -> None:
        """Structural checks only: these models skip Phase 1's pass checks at the phase's end, so the tests
        can watch the handoff gate refuse them."""
        check_result(result, self.phase, self.name)

    def execute(self, ctx) -> PhaseResult:
        cfg = ctx.phase_config
        outputs = []
        for index, spec in enumerate(cfg.models):
            torch.manual_seed(cfg.init_seed)
            model = build_model(MODEL_CONFIG)
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
            first = loss_of(model, 10_000)
            for step in range(cfg.steps):
                tokens, targets = copy_batch(spec.seed * 1000 + step)
                loss = torch.nn.functional.cross_entropy(model(tokens).reshape(-1, VOCAB), targets.reshape(-1))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                ctx.progress((index * cfg.steps + step + 1) / (len(cfg.models) * cfg.steps), f"{spec.name}")
            final = loss_of(model, 10_000)
            margin = (first - final) / first
            outputs.append(ModelOutput(spec.name, model, {"model_config": MODEL_CONFIG, "tokenizer": TOKENIZER,
                                                          "specialization": "copy", "final_loss": final,
                                                          "seed": spec.seed},
                                       {"val_loss": final, "margin_over_baseline": margin}))
        maybe_sleep(ctx)
        return PhaseResult(True, outputs, {"mean_final_loss": sum(o.metrics["val_loss"] for o in outputs) / len(outputs)})


class MergePhase(PhaseController):
    phase, name = 2, "evomerge"
    fail_times = 0       # tests set this to make execute raise that many times
    die_with = None      # a BaseException type raised after logging (a process dying mid-phase), once
    metadata_padding = 0  # extra characters in the champion's metadata (to make the registry need new pages)

    def execute(self, ctx) -> PhaseResult:
        for step in range(3):
            ctx.tracker.log({"fitness": -float(step)}, step=step)
        if MergePhase.die_with is not None:
            dying, MergePhase.die_with = MergePhase.die_with, None
            raise dying()
        maybe_sleep(ctx)
        if MergePhase.fail_times > 0:
            MergePhase.fail_times -= 1
            raise RuntimeError("merge exploded (test)")
        states = [item.model.state_dict() for item in ctx.inputs]
        merged = build_model(ctx.inputs[0].metadata["model_config"])
        merged.load_state_dict({k: sum(s[k] for s in states) / len(states) for k in states[0]})
        fitness = -loss_of(merged, 20_000)
        best_input = max(-loss_of(item.model, 20_000) for item in ctx.inputs)
        metadata = {**ctx.inputs[0].metadata, "fitness": fitness, "merge_technique": "linear",
                    "padding": "x" * MergePhase.metadata_padding}
        metrics = {"fitness": fitness, "fitness_gain": fitness - best_input}
        return PhaseResult(True, [ModelOutput("champion", merged, metadata, metrics)], dict(metrics))


TEST_PHASES = {1: ("cognate", f"{__name__}:TrainPhase"), 2: ("evomerge", f"{__name__}:MergePhase"),
               3: ("quietstar", None)}   # the pipeline tests stop after the small phases 1 and 2
