"""Phase 3, Quiet-STaR (Zelikman et al. 2024, "Quiet-STaR", arXiv 2403.09629): teach the champion to think.

1. Thought tokens: `<think>`, `</think>` and strategy tokens join the tokenizer; the model's embedding and
   head grow by those rows (`resize_vocab`: old rows copied, new rows small).
2. Warm-up (`thought_warmup.py`): supervised steps on each task's worked thought
   (`forge.data.rationale`), both formats trained alike, so the model samples thoughts worth refining.
3. The phase-3 reasoning prompt ("think, then say:") is baked in with PromptBaker.
4. RL (`rl_thoughts.ThoughtTrainer`): sampled thoughts after `<sep>`, reward = log p(answer | thought)
   - log p(answer | no thought), REINFORCE with the mean reward of an input's thoughts as baseline,
   the answer's NLL with and without a thought, and KL to the baked model (KLRegularizer with
   `optimizer.kl_coefficient`), optimized with MuonGrokfast as the `optimizer:` config block sets it.
5. Anti-theater, on held-out (test split) inputs, every mode actually run: accuracy with the model's own greedy
   thoughts against no thought, an empty thought, and another input's thought. The phase fails unless
   thoughts raise accuracy (thought_gain > min_thought_gain), the model with thoughts beats the model that
   came in (gain_over_input > min_gain_over_input), their content matters (content_gain > 0) and they differ
   across inputs (distinct_thoughts >= min_distinct_thoughts).
"""
from __future__ import annotations

import copy
import time

import torch

from forge.data import CharTokenizer, evaluate, make_examples
from forge.nn import resize_vocab
from forge.nn.losses import KLRegularizer, kl_to_teacher
from forge.pipeline.controller import ModelOutput, PhaseController, PhaseResult, require_one_input
from forge.pipeline.phases.phase3_quietstar.rl_thoughts import ThoughtTrainer, bake_reasoning_prompt
from forge.pipeline.phases.phase3_quietstar.thought_warmup import warm_up_thoughts
from forge.pipeline.phases.phase3_quietstar.thoughts import (ThoughtIds, ablation_eval, build_rows, example_ids,
                                                             thought_token_names, thoughts_for)
from forge.pipeline.training import make_optimizer


class QuietStarPhase(PhaseController):
    phase = 3
    name = "quietstar"

    def validate_input(self, ctx) -> None:
        require_one_input(ctx, "trains")

    def execute(self, ctx) -> PhaseResult:
        cfg, started, source = ctx.phase_config, time.perf_counter(), ctx.inputs[0]
        tokenizer = CharTokenizer.from_dict(source.metadata["tokenizer"])
        tasks = dict(source.metadata["task_weights"])
        train = make_examples(tasks, cfg.train_examples, "train", cfg.seed)
        test = make_examples(tasks, cfg.eval_examples, "test", cfg.seed)
        max_len = source.model.config.max_len
        input_accuracy = evaluate(source.model, test, tokenizer, max_len)["accuracy"]
        tokenizer.add_special_tokens(thought_token_names(cfg.thinking_tokens))
        _check_fits(train + test, tokenizer, cfg.thought_length, max_len)
        ids = ThoughtIds.from_tokenizer(tokenizer)
        grown = resize_vocab(source.model, tokenizer.vocab_size, seed=cfg.seed)
        warmup = self._warm_up(ctx, grown, train, tokenizer, ids)
        ctx.progress(0.55, "baking the reasoning prompt")
        bake = bake_reasoning_prompt(grown, train, tokenizer, cfg, cfg.seed)
        baked = bake.model
        model = copy.deepcopy(baked)
        log = self._train(ctx, model, baked, train, tokenizer, ids)
        ctx.progress(0.97, "ablation checks")
        checks = ablation_eval(model, test, tokenizer, ids, cfg.thought_length)
        baked_checks = ablation_eval(baked, test, tokenizer, ids, cfg.thought_length)
        metrics = _metrics(checks, baked_checks, input_accuracy, bake, log, model, baked, test, tokenizer, ids, cfg)
        metrics.update(_tenths("warmup_loss", warmup))
        output = ModelOutput(name="quietstar", model=model, metrics=metrics, metadata={
            "model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
            "parameter_count": model.num_parameters(), "task_weights": tasks,
            "thought_tokens": thought_token_names(cfg.thinking_tokens), "thought_length": cfg.thought_length,
            "thought_gain": metrics["thought_gain"], "coherence_score": metrics["coherence_score"],
            "validity_rate": metrics["validity_rate"], "sample_thoughts": checks["samples"],
            "reward_curve": log[:: max(1, len(log) // 50)]})
        return PhaseResult(success=True, models=[output], metrics=metrics, duration_s=time.perf_counter() - started)

    @staticmethod
    def _warm_up(ctx, model, train, tokenizer, ids) -> list[float]:
        """cfg.warmup_steps supervised steps on the tasks' worked thoughts (in place); returns the losses."""
        cfg = ctx.phase_config
        if cfg.warmup_steps == 0:
            return []
        optimizer = make_optimizer(model, cfg.optimizer, cfg.warmup_lr)

        def on_step(step: int, loss: float) -> None:
            if step % 20 == 0:
                ctx.progress(0.02 + 0.5 * step / cfg.warmup_steps, f"warm-up step {step} loss {loss:.3f}")
            if step % 100 == 0:
                ctx.tracker.log({"warmup/loss": loss}, step=step)

        return warm_up_thoughts(model, optimizer, train, tokenizer, ids, steps=cfg.warmup_steps,
                                batch_size=cfg.warmup_batch_size, plain_weight=cfg.plain_answer_weight,
                                seed=cfg.seed, on_step=on_step)

    @staticmethod
    def _train(ctx, model, baked, train, tokenizer, ids) -> list[float]:
        """cfg.rl_steps RL steps; returns the mean reward of each step's sampled thoughts."""
        cfg = ctx.phase_config
        optimizer = make_optimizer(model, cfg.optimizer, cfg.rl_lr)
        kl = KLRegularizer(baked, cfg.optimizer.kl_coefficient)
        trainer = ThoughtTrainer(model, optimizer, kl, train, tokenizer, ids, cfg, cfg.seed)
        rewards = []
        with trainer.training():
            for step in range(1, cfg.rl_steps + 1):
                stats = trainer.step()
                rewards.append(stats["reward"])
                if step % 10 == 0:
                    ctx.progress(0.6 + 0.35 * step / cfg.rl_steps, f"RL step {step} reward {stats['reward']:.3f}")
                if step % 25 == 0:
                    ctx.tracker.log({f"rl/{k}": v for k, v in stats.items()}, step=cfg.warmup_steps + step)
        model.eval()
        return rewards



def check_thought_gain(metrics: dict, cfg) -> None:
    """The anti-theater rules (the 3->4 handoff rule's bounds) on Phase 3's metrics; HandoffError with the
    measured numbers when thoughts do not help, do not beat the input model, carry no content or barely differ."""
    from forge.pipeline.handoff import check_bounds, outgoing_rule

    check_bounds(outgoing_rule(3).metrics, metrics, "phase 3 (quietstar)", cfg, at_phase_end=True)


def _check_fits(examples, tokenizer, thought_length: int, max_len: int) -> None:
    """prompt + <sep> + <think> thought </think> + answer + <eos> must fit the model's max_len."""
    longest = max(len(tokenizer.encode(ex.prompt)) + len(tokenizer.encode(ex.answer)) + 3 for ex in examples)
    if longest + thought_length + 2 > max_len:
        raise ValueError(f"phases.phase3.thought_length: {thought_length} does not fit; the longest example needs "
                         f"{longest} tokens + thought_length + 2 markers <= max_len {max_len}")


def _tenths(name: str, values: list[float]) -> dict:
    """{name_first, name_last}: the means of the first and last tenth of `values` (nothing when empty)."""
    if not values:
        return {}
    tail = max(1, len(values) // 10)
    return {f"{name}_first": sum(values[:tail]) / tail, f"{name}_last": sum(values[-tail:]) / tail}


def _metrics(checks, baked_checks, input_accuracy, bake, rewards, model, baked, test, tokenizer, ids, cfg) -> dict:
    metrics = {k: v for k, v in checks.items() if k != "samples"}
    metrics.update({"input_accuracy": float(input_accuracy), "gain_over_input": checks["accuracy"] - input_accuracy,
                    "baked_accuracy": baked_checks["accuracy"],
                    "baked_thought_gain": baked_checks["thought_gain"],
                    "baked_rationale_match": baked_checks["rationale_match"],
                    "bake_kl_before": bake.kl_before, "bake_kl_after": bake.kl_after,
                    "kl_to_baked": _kl_to_baked(model, baked, test, tokenizer, ids, cfg.thought_length)})
    metrics.update(_tenths("train_reward", rewards))
    return metrics


@torch.no_grad()
def _kl_to_baked(model, baked, test, tokenizer, ids, length) -> float:
    """KL(baked || model) per position over held-out thought sequences (the model's greedy thoughts)."""
    prefixes, answers = example_ids(test, tokenizer)
    rows = build_rows(prefixes, answers, ids, thoughts_for(model, prefixes, ids, length)[0])
    device = next(model.parameters()).device
    tokens = rows.tokens.to(device)
    return float(kl_to_teacher(model(tokens), baked(tokens), mask=tokens != ids.pad))
