"""Phase 5, Curriculum: the Phase 4 model climbs difficulty levels it could not solve, and the climb is
measured against plain training with the same number of optimizer steps.

0. The eudaimonia prompt is baked in (see below).
1. Levels (forge.data.levels): every task at difficulty 1..num_levels, seeded, split-disjoint questions.
2. Assessment: accuracy per task and level on held-out test questions; a task starts at the hardest level
   whose accuracy is still >= target_accuracy (0 when none is).
3. Climbing (climb.Climber): part of each task's share of a batch from its next level's question pool
   (mastered questions retired, failed ones hinted next time when hints are on), the rest (`mix_fraction`)
   from all its levels; held-out validation questions decide when a level is passed; dreams consolidate
   each passed level.
4. The control: the same incoming model, the same number of optimizer steps on questions drawn uniformly
   from all levels. curriculum_gain = climbed accuracy - uniform accuracy on the test questions of the
   levels above each task's start.
5. Self-model (self_model.py): the climbed model learns to say <right>/<wrong> after its own answers (a probe:
   only the two verdict rows of its head change).
The eudaimonia prompt ("be exact:") is baked in with PromptBaker first (KL before and after): the prompt
means nothing to these models, so its teacher is a worse model and the bake costs accuracy (measured: 0.69 ->
0.38 on the tasks' default questions; baked after the climb instead, it cost the long reversal levels up to
0.4), which the climb then repairs. Start levels and the forgetting check use the incoming model's table
(`level_accuracy_before`); the climb and its control both start from the baked model
(`baked_level_accuracy`). The model handed on is the climbed one with its verdict; its table is measured
again (`per_level_accuracy`).
"""
from __future__ import annotations

import copy
import time

import torch

from forge.data import CharTokenizer, evaluate, make_examples
from forge.data.levels import level_examples
from forge.nn import resize_vocab
from forge.pipeline.controller import HandoffError, ModelOutput, PhaseController, PhaseResult, require_one_input
from forge.pipeline.phases.phase5_curriculum.climb import Climber, train_uniform
from forge.pipeline.phases.phase5_curriculum.curriculum import HINT, accuracy_table, pooled, start_level
from forge.pipeline.phases.phase5_curriculum.self_model import (RIGHT, WRONG, auroc, calibration_error, confidence,
                                                                own_answer_rows, train_self_model)
from forge.pipeline.prompt_bake import bake_task_prompt
from forge.pipeline.training import make_optimizer

TASK_MIX_QUESTIONS = 512   # held-out questions of the tasks' default difficulty (Phase 4's eval_examples)


def grown_model(item, tokenizer: CharTokenizer):
    """The incoming model with embedding rows for the hint and verdict tokens (added to `tokenizer`)."""
    tokenizer.add_special_tokens([HINT, RIGHT, WRONG])
    return resize_vocab(item.model, tokenizer.vocab_size).eval()


def compare(model, tokenizer, tasks: list[str], cfg, seed: int, progress=lambda *_: None, log_step=None,
            before: dict | None = None) -> dict:
    """Climb from `model` and train the uniform control from it with the same number of steps; returns
    {before, starts, climber, log, climbed, uniform (models), climbed_table, uniform_table}. The start levels
    come from `before` (default: `model`'s own accuracy table). Used by the phase and by
    benchmarks/phase5_ablation.py."""
    max_len = model.config.max_len
    table = lambda m: accuracy_table(m, tasks, cfg.num_levels, cfg.eval_questions, "test", seed,   # noqa: E731
                                     tokenizer, max_len)
    before = table(model) if before is None else before
    starts = {t: start_level(before[t], cfg.target_accuracy) for t in tasks}
    progress(0.03, "assessed: start levels " + ", ".join(f"{t} {s}" for t, s in starts.items()))
    torch.manual_seed(seed)
    climbed = copy.deepcopy(model)

    def on_step(step: int, loss: float, status: str) -> None:
        if step % 10 == 0:
            progress(0.03 + 0.5 * step / cfg.steps, f"step {step}/{cfg.steps} loss {loss:.3f}: {status}")
        if log_step is not None and step % 25 == 0:
            log_step(step, {"train_loss": loss})

    def on_check(check: dict) -> None:
        if log_step is not None:
            log_step(check["step"], {f"level/{check['task']}": check["level"],
                                     f"level_accuracy/{check['task']}": check["accuracy"]})

    climber = Climber(climbed, make_optimizer(climbed, cfg.optimizer, cfg.lr), tokenizer, max_len, starts, cfg,
                      seed, on_step=on_step, on_check=on_check)
    log = climber.run()
    torch.manual_seed(seed)
    uniform = copy.deepcopy(model)
    train_uniform(uniform, make_optimizer(uniform, cfg.optimizer, cfg.lr), tokenizer, max_len, tasks, cfg, seed,
                  climber.step, on_step=lambda s, loss: s % 10 == 0 and progress(
                      0.53 + 0.3 * s / climber.step, f"uniform control step {s}/{climber.step} loss {loss:.3f}"))
    return {"before": before, "starts": starts, "climber": climber, "log": log, "climbed": climbed,
            "uniform": uniform, "climbed_table": table(climbed), "uniform_table": table(uniform)}


def gains(run: dict) -> dict:
    """curriculum_gain (levels above each start) and the forgetting of both on the levels at or below it."""
    starts = run["starts"]
    above = lambda t, lv: lv > starts[t]    # noqa: E731
    below = lambda t, lv: lv <= starts[t]   # noqa: E731
    out = {"curriculum_accuracy_above_start": pooled(run["climbed_table"], above),
           "uniform_accuracy_above_start": pooled(run["uniform_table"], above),
           "start_accuracy_above_start": pooled(run["before"], above)}
    if out["curriculum_accuracy_above_start"] is not None:
        out["curriculum_gain"] = out["curriculum_accuracy_above_start"] - out["uniform_accuracy_above_start"]
    base = pooled(run["before"], below)
    if base is not None:
        out["climbed_forgetting"] = base - pooled(run["climbed_table"], below)
        out["uniform_forgetting"] = base - pooled(run["uniform_table"], below)
    return {k: v for k, v in out.items() if v is not None}


def self_model_metrics(model, tokenizer, tasks: list[str], cfg, seed: int) -> dict:
    """Train the verdict after the model's own answers (train questions of every task and level), then its
    AUROC, standard error, z = (AUROC - 0.5) / se and calibration error on held-out test questions."""
    max_len, verdicts = model.config.max_len, (tokenizer.token_id(RIGHT), tokenizer.token_id(WRONG))
    per_cell = max(1, cfg.self_model_questions // (len(tasks) * cfg.num_levels))
    questions = lambda split, n, s: [ex for t in tasks for lv in range(1, cfg.num_levels + 1)   # noqa: E731
                                     for ex in level_examples(t, lv, n, split, s)]
    rows = own_answer_rows(model, questions("train", per_cell, seed + 2), tokenizer, max_len)
    losses = train_self_model(model, rows, verdicts, steps=cfg.self_model_steps, lr=cfg.self_model_lr)
    held_out = own_answer_rows(model, questions("test", max(1, per_cell // 4), seed + 3), tokenizer, max_len)
    probs = confidence(model, held_out, verdicts)
    area, se = auroc(probs, held_out.correct)
    return {"self_model_auroc": area, "self_model_auroc_se": se, "self_model_auroc_z": (area - 0.5) / se,
            "self_model_calibration_error": calibration_error(probs, held_out.correct),
            "self_model_train_right_fraction": float(rows.correct.float().mean()),
            "self_model_questions": len(held_out.examples), **({"self_model_final_loss": losses[-1]} if losses else {})}


class CurriculumPhase(PhaseController):
    phase = 5
    name = "curriculum"

    def validate_input(self, ctx) -> None:
        item = require_one_input(ctx, "trains")
        cfg, max_len = ctx.phase_config, item.model.config.max_len
        for task in sorted(item.metadata["task_weights"]):
            longest = max(len(ex.prompt) + len(ex.answer) for ex in level_examples(task, cfg.num_levels, 32, "train", 0))
            need = longest + 4 + (1 + cfg.max_hint if cfg.max_hint else 0)   # <bos> <sep> <eos> verdict, hint
            if need > max_len:
                raise HandoffError(f"phases.phase5.num_levels: level {cfg.num_levels} of {task!r} needs {need} tokens "
                                   f"(with hint and verdict); the model's max_len is {max_len}: lower num_levels")

    def execute(self, ctx) -> PhaseResult:
        cfg, started, item = ctx.phase_config, time.perf_counter(), ctx.inputs[0]
        tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
        tasks = sorted(t for t, w in item.metadata["task_weights"].items() if w > 0)
        incoming = grown_model(item, tokenizer)
        mix = make_examples({t: 1.0 for t in tasks}, TASK_MIX_QUESTIONS, "test", ctx.seed)   # as Phase 4 measures
        score = lambda m: evaluate(m, mix, tokenizer, incoming.config.max_len)["accuracy"]   # noqa: E731
        ctx.progress(0.01, "baking the eudaimonia prompt")
        bake = bake_task_prompt(incoming, "phase5_eudaimonia", make_examples(
            {t: 1.0 for t in tasks}, 64 * len(tasks), "train", cfg.seed), tokenizer, lr=cfg.baking_lr,
            steps=cfg.baking_steps, traj_len=cfg.baking_traj_len, seed=cfg.seed)
        baked = bake.model.eval()
        table = lambda m: accuracy_table(m, tasks, cfg.num_levels, cfg.eval_questions, "test", cfg.seed,  # noqa: E731
                                         tokenizer, m.config.max_len)
        run = compare(baked, tokenizer, tasks, cfg, cfg.seed, ctx.progress, before=table(incoming),
                      log_step=lambda step, values: ctx.tracker.log(values, step=step))
        ctx.progress(0.86, "self-model: learning to judge its own answers")
        handed = run["climbed"]
        self_model = self_model_metrics(handed, tokenizer, tasks, cfg, cfg.seed)
        final = table(handed)
        metrics = phase_metrics(run, final, self_model, bake)
        metrics["baked_level_accuracy"] = _by_level(table(baked))
        metrics.update(input_accuracy=score(incoming), baked_accuracy=score(baked))
        metrics["accuracy"] = metrics["val_accuracy"] = score(handed)
        meta = {**{k: item.metadata[k] for k in ("thought_tokens", "thought_length") if k in item.metadata},
                "model_config": handed.config.to_dict(), "tokenizer": tokenizer.to_dict(),
                "task_weights": dict(item.metadata["task_weights"]), "parameter_count": handed.num_parameters(),
                "levels_completed": metrics["levels_completed"], "start_level": dict(run["starts"]),
                "final_level": {c.task: c.final for c in run["climber"].climbs.values()},
                "self_model_tokens": [RIGHT, WRONG], "hint_token": HINT}
        output = ModelOutput(name="curriculum", model=handed, metadata=meta, metrics=metrics)
        return PhaseResult(success=True, models=[output], metrics=metrics, duration_s=time.perf_counter() - started)


def phase_metrics(run: dict, final: dict, self_model: dict, bake) -> dict:
    climbs, log, starts = run["climber"].climbs.values(), run["log"], run["starts"]
    top = run["climber"].cfg.num_levels
    below = lambda t, lv: lv <= starts[t]   # noqa: E731
    base = pooled(run["before"], below)
    dreams = log.dreams
    metrics = {
        "levels_completed": sum(len(c.passed) for c in climbs),
        "tasks_not_advanced": sum(c.start < top and not c.passed for c in climbs),
        "start_level": {c.task: c.start for c in climbs}, "final_level": {c.task: c.final for c in climbs},
        "level_accuracy_before": _by_level(run["before"]), "per_level_accuracy": _by_level(final),
        "uniform_level_accuracy": _by_level(run["uniform_table"]),
        "climbed_level_accuracy": _by_level(run["climbed_table"]),
        "level_table_accuracy": pooled(final, lambda *_: True),
        "start_level_accuracy_drop": 0.0 if base is None else base - pooled(final, below),
        "optimizer_steps": run["climber"].step, "final_train_loss": sum(log.losses[-20:]) / max(1, len(log.losses[-20:])),
        "dreams_generated": sum(d["generated"] for d in dreams), "dreams_kept": sum(d["kept"] for d in dreams),
        "dreams_kept_correct": sum(d["correct"] for d in dreams) / max(1, sum(d["kept"] for d in dreams)),
        "questions_retired": sum(len(pool.retired) for pool in run["climber"].pools),
        "bake_kl_before": bake.kl_before, "bake_kl_after": bake.kl_after,
        **gains(run), **self_model}
    return metrics


def _by_level(table: dict) -> dict:
    return {task: {str(level): acc for level, acc in row.items()} for task, row in table.items()}
