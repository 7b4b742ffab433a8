"""Phase 6, Tool and persona baking: the Phase 5 model learns to call a calculator it was not born with, and
keeps a persona without its prompt.

A-cycles (toolformer.py): candidate calls to forge's calculator are kept where they lower the answer's loss by
`call_threshold` (Toolformer's filter); the model is fine-tuned on the kept calls (and on the questions without
a kept call, plainly), and scored with and without the tool on held-out questions beyond what it can compute
itself (levels >= `beyond_level` of the tool tasks). B-cycles (personas.py): a persona prompt's behaviour is
taught when the model does not follow it yet, then baked with PromptBaker (LoRA, KL to the frozen prompted
model) and interpolated by `half_baking_strength`. cycles.py alternates them by their metric histories.
The model handed on writes calls (answered by forge.data.tools.generate) and its personas' markers; its answer
is the text after its last call with the markers left out (ToolOutput.answer).
"""
from __future__ import annotations

import copy
import random
import time

from forge.data import CharTokenizer, exact_matches, make_examples
from forge.data.evaluate import mean
from forge.data.levels import level_examples
from forge.data.tools import add_tool_tokens, answer_with_tool
from forge.baking.prompts import persona_markers
from forge.nn import resize_vocab
from forge.pipeline.controller import HandoffError, ModelOutput, PhaseController, PhaseResult, require_one_input
from forge.pipeline.phases.phase6_baking.cycles import run_cycles
from forge.pipeline.phases.phase6_baking.personas import Format, adherence, persona_cycle
from forge.pipeline.phases.phase6_baking.toolformer import (filter_calls, format_scorer, tool_levels, tool_rows,
                                                            tool_scores, train_rows)
from forge.pipeline.training import make_optimizer

BASE_QUESTIONS = 512   # held-out questions of the incoming tasks' default difficulty (as Phases 4 and 5 measure)
MARKER_ROOM = 3        # tokens kept free in a tool row for a persona's markers


def grown_model(item, tokenizer: CharTokenizer):
    """The incoming model with rows for the call format's tokens and the personas' markers."""
    add_tool_tokens(tokenizer)
    tokenizer.add_special_tokens(persona_markers())
    return resize_vocab(item.model, tokenizer.vocab_size).eval()


def question_sets(cfg, tokenizer, max_len: int, tasks: list[str], seed: int) -> dict:
    """Training questions of every tool task and fitting level, the beyond-ability val / test sets, the
    incoming tasks' questions (replay, persona training, base accuracy)."""
    levels = {t: tool_levels(t, tokenizer, max_len, 10, MARKER_ROOM) for t in cfg.tool_tasks}
    beyond = {t: [lv for lv in lvs if lv >= cfg.beyond_level] for t, lvs in levels.items()}
    pick = lambda table, n, split, s: [(lv, ex) for t, lvs in table.items() for lv in lvs   # noqa: E731
                                       for ex in level_examples(t, lv, n, split, s)]
    mix, test = {t: 1.0 for t in tasks}, pick(beyond, cfg.eval_questions, "test", seed)
    return {"levels": levels, "beyond_levels": beyond,
            "train": [ex for _, ex in pick(levels, cfg.tool_questions_per_level, "train", seed)],
            "val": [ex for _, ex in pick(beyond, cfg.val_questions, "val", seed)],
            "test": [ex for _, ex in test], "test_levels": [lv for lv, _ in test],
            "replay": make_examples(mix, 2000, "train", seed + 1),
            "persona_train": _half_and_half(make_examples(mix, cfg.persona_questions, "train", seed + 2),
                                            [ex for _, ex in pick(levels, 4, "train", seed + 5)], seed),
            "persona_held_out": make_examples(mix, cfg.persona_eval_questions, "val", seed + 3),
            "base": make_examples(mix, BASE_QUESTIONS, "test", seed)}


def _half_and_half(base: list, tool: list, seed: int) -> list:
    """The persona questions: the incoming tasks' questions and as many tool questions (so the teacher and the
    bake see where the model calls), shuffled together."""
    rng = random.Random(seed)
    mixed = base[: len(base) // 2] + rng.sample(tool, min(len(tool), len(base) - len(base) // 2))
    rng.shuffle(mixed)
    return mixed


class BakingPhase(PhaseController):
    phase = 6
    name = "baking"

    def validate_input(self, ctx) -> None:
        item = require_one_input(ctx, "bakes")
        tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
        add_tool_tokens(tokenizer)
        for task in ctx.phase_config.tool_tasks:
            if not any(lv >= ctx.phase_config.beyond_level for lv in
                       tool_levels(task, tokenizer, item.model.config.max_len, 10, MARKER_ROOM)):
                raise HandoffError(f"phases.phase6.beyond_level: no level >= {ctx.phase_config.beyond_level} of "
                                   f"{task!r} fits max_len {item.model.config.max_len} with its calculator call")

    def execute(self, ctx) -> PhaseResult:
        cfg, started, item = ctx.phase_config, time.perf_counter(), ctx.inputs[0]
        tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
        tasks = sorted(t for t, w in item.metadata["task_weights"].items() if w > 0)
        incoming = grown_model(item, tokenizer)
        max_len = incoming.config.max_len
        data = question_sets(cfg, tokenizer, max_len, tasks, cfg.seed)
        ctx.progress(0.02, f"{len(data['train'])} tool questions; beyond-ability set " + ", ".join(
            f"{t} L{min(lvs)}-{max(lvs)}" for t, lvs in data["beyond_levels"].items()))
        run = _Run(copy.deepcopy(incoming), tokenizer, data, cfg, ctx)
        log = run_cycles(run.tool_cycle, run.persona_cycle, run.tool_score, run.all_baked, cfg,
                         on_cycle=run.record)
        metrics = final_metrics(run, incoming, log, data, tokenizer, max_len)
        meta = {"model_config": run.model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
                "task_weights": dict(item.metadata["task_weights"]), "parameter_count": run.model.num_parameters(),
                "cycles_completed": len(log), "tools": ["calculator"], "personas": run.baked,
                "answer_format": {"before": list(run.format.before), "after": list(run.format.after)}}
        meta.update({k: item.metadata[k] for k in ("thought_tokens", "thought_length") if k in item.metadata})
        output = ModelOutput(name="baked", model=run.model, metadata=meta, metrics=metrics)
        return PhaseResult(success=True, models=[output], metrics=metrics, duration_s=time.perf_counter() - started)


class _Run:
    """The state the cycles share: the model, its answer format, the last filter, the baked personas."""

    def __init__(self, model, tokenizer, data, cfg, ctx):
        self.model, self.tokenizer, self.data, self.cfg, self.ctx = model, tokenizer, data, cfg, ctx
        self.format, self.filtered, self.baked, self.personas = Format(), None, [], {}
        self.kept: list[dict] = []

    def make_opt(self, model):
        return make_optimizer(model, self.cfg.optimizer, self.cfg.lr)

    def tool_cycle(self, cycle: int) -> float:
        cfg, max_len = self.cfg, self.model.config.max_len
        scorer = self.model
        if self.filtered is None:
            self.ctx.progress(0.05, f"cycle {cycle} (A): teaching a scorer the call format")
            scorer = format_scorer(self.model, self.make_opt, self.data["train"], self.tokenizer, max_len,
                                   steps=cfg.format_steps, batch_size=cfg.batch_size, seed=cfg.seed + cycle)
        self.filtered = filter_calls(scorer, self.data["train"], self.tokenizer, max_len, cfg.call_threshold)
        self.kept.append({"cycle": cycle, "considered": self.filtered.considered,
                          "kept": sum(c is not None for c in self.filtered.calls),
                          **{f"kept_rate/{t}": self.filtered.kept_rate(t) for t in cfg.tool_tasks}})
        self.ctx.progress(0.1 + 0.07 * cycle, f"cycle {cycle} (A): kept {self.kept[-1]['kept']} calls of "
                                              f"{len(self.filtered.calls)} questions; fine-tuning")
        train_rows(self.model, self.make_opt(self.model), self.tool_rows(self.format), self.tokenizer, max_len,
                   steps=cfg.tool_steps, batch_size=cfg.batch_size, seed=cfg.seed + cycle, what="phase 6 tool use")
        return self.tool_score()

    def tool_rows(self, fmt: Format):
        return tool_rows(self.filtered, self.data["replay"], self.tokenizer, self.cfg.seed, *fmt.ids(self.tokenizer))

    def persona_cycle(self, cycle: int) -> float:
        persona = self.cfg.personas[len(self.baked) % len(self.cfg.personas)]
        self.ctx.progress(0.1 + 0.07 * cycle, f"cycle {cycle} (B): persona {persona}")
        data = {"train": self.data["persona_train"], "held_out": self.data["persona_held_out"],
                "calls": lambda model, examples: filter_calls(model, examples, self.tokenizer, model.config.max_len,
                                                              self.cfg.call_threshold).calls}
        out = persona_cycle(self.model, self.make_opt, persona, data, self.tokenizer, self.format, self.cfg,
                            self.cfg.seed + cycle)
        self.model, self.format = out["model"], out["format"]
        self.baked.append(persona)
        self.personas[persona] = out["metrics"]
        return sum(self.personas[p]["adherence"] for p in self.personas) / len(self.personas)

    def tool_score(self) -> float:
        outs = answer_with_tool(self.model, self.data["val"], self.tokenizer, self.model.config.max_len)
        return sum(o.correct(ex, self.tokenizer) for o, ex in zip(outs, self.data["val"])) / len(self.data["val"])

    def all_baked(self) -> bool:
        return set(self.cfg.personas) <= set(self.baked)

    def record(self, entry: dict) -> None:
        self.ctx.tracker.log({f"cycle_{entry['kind']}/{entry['metric']}": entry["value"],
                              "tool_score": entry["tool_score"]}, step=entry["cycle"])


def final_metrics(run: _Run, incoming, log: list[dict], data: dict, tokenizer, max_len: int) -> dict:
    """The phase's metrics: tool use on the beyond-ability test set, base accuracy, personas, the cycle log."""
    test, base = data["test"], data["base"]
    m = tool_scores(run.model, test, tokenizer, max_len, data["test_levels"])
    m["incoming_accuracy_beyond"] = mean(exact_matches(incoming, test, tokenizer, max_len))
    m["tool_lift"] = m["tool_accuracy"] - m["no_tool_accuracy"]
    outs = answer_with_tool(run.model, base, tokenizer, max_len)
    m["input_accuracy"] = mean(exact_matches(incoming, base, tokenizer, max_len))
    m["accuracy"] = m["val_accuracy"] = mean(o.correct(ex, tokenizer) for o, ex in zip(outs, base))
    m["base_accuracy_drop"] = m["input_accuracy"] - m["accuracy"]
    for task in sorted({ex.task for ex in base}):
        m[f"base_call_rate/{task}"] = mean(o.called(tokenizer) for o, ex in zip(outs, base) if ex.task == task)
    for persona, pm in run.personas.items():
        for key, value in pm.items():
            m[f"persona_{key}/{persona}"] = float(value)
    for persona, pm in run.personas.items():     # the model handed on, after every later cycle
        final = adherence(run.model, persona, data["persona_held_out"], tokenizer, prompted=False)
        m[f"persona_final_adherence/{persona}"] = final
        m[f"persona_final_adherence_gap/{persona}"] = pm["prompted_adherence"] - final
    if run.personas:
        m["min_persona_kl_reduction"] = min(pm["kl_reduction"] for pm in run.personas.values())
        m["max_persona_adherence_gap"] = max(m[f"persona_final_adherence_gap/{p}"] for p in run.personas)
    m.update(cycles_completed=len(log), cycle_log=log, calls_kept=run.kept[-1]["kept"] if run.kept else 0,
             calls_considered=run.kept[-1]["considered"] if run.kept else 0, call_filter_log=run.kept)
    return m
