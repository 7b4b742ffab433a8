"""Phase 7, Self-guided experts: Transformer² (Sun et al. 2025, arXiv 2501.06252) singular-value experts that the
model finds, trains and picks itself.

1. Discovery (discovery.py): the incoming model answers held-out questions of every task and level with its
   calculator; the (task, level) cells it does not solve are clustered by their error features into
   min_experts..max_experts clusters, each named by its dominant tasks.
2. Training (training.py): one SVF expert per cluster (forge.nn.svf: z-vectors on the MLP matrices' top
   singular values) by REINFORCE (or cross-entropy on the true answers; `compare_methods` trains both and reports
   both), on the cluster's training questions, through MuonGrokfast's phase-7 settings.
3. Dispatch (dispatch.py): (a) a prompt router on the base model's hidden state; (b) CEM few-shot mixing on the
   task the base model does worst on (or `few_shot_task`); (c) NSGA-II over per-layer-group mixing weights
   (accuracy on validation questions against the expert parameters used).

The model handed to Phase 8 is a plain Transformer: the NSGA-II front's most accurate mixture folded into the
base weights (the base itself when no mixture beats it on the validation questions). Why this and not the base
plus expert files: Phase 8's codecs compress plain weight matrices, and per-question routing needs forge's SVF
code at inference, so the one model that runs anywhere and carries the experts' measured gain is a static
mixture; the experts (a few hundred floats each) and the router are saved beside it in the phase folder
(experts/<name>.safetensors, router.safetensors) for routed inference, and need no compression.
All accuracies: forge.data.tools.answer_with_tool (calls answered, persona markers left out), exact answers.
"""
from __future__ import annotations

import math
import random
import time

import numpy as np

from forge.data import CharTokenizer
from forge.data.calculator import calculate
from forge.data.evaluate import mean
from forge.data.levels import NUM_LEVELS, level_examples
from forge.data.tools import add_tool_tokens, call_ids, encode_rows, sequence
from forge.nn import resize_vocab
from forge.nn.svf import (add_svf, fold_svf, lora_parameter_count, mix_experts, save_expert, svf_layers,
                          svf_parameter_count)
from forge.pipeline.controller import HandoffError, ModelOutput, PhaseController, PhaseResult, require_one_input
from forge.pipeline.phases.phase7_experts.discovery import cluster_cells, correct_flags, measure_cells
from forge.pipeline.phases.phase7_experts.dispatch import Router, cem, group_weights, nsga2_search, prompt_features
from forge.pipeline.phases.phase7_experts.training import train_expert

ROUTER_QUESTIONS = 8     # training questions per cell the router learns from


class Questions:
    """The phase's question sets and the true-answer rows of the incoming model's format (its persona markers
    around the answer, the question's own calculator call where the calculator takes it)."""

    def __init__(self, tasks, tokenizer, max_len: int, answer_format: dict, cfg):
        self.tokenizer, self.max_len = tokenizer, max_len
        self.before = [tokenizer.token_id(t) for t in answer_format.get("before", [])]
        self.after = [tokenizer.token_id(t) for t in answer_format.get("after", [])]
        probe = {(t, lv): level_examples(t, lv, 16, "train", 0) for t in tasks for lv in range(1, NUM_LEVELS + 1)}
        self.cells = sorted(key for key, exs in probe.items() if all(self.fits(ex) for ex in exs))
        self.discovery = {c: level_examples(*c, cfg.discovery_questions, "val", cfg.seed) for c in self.cells}
        self.test = {c: level_examples(*c, cfg.eval_questions, "test", cfg.seed) for c in self.cells}
        self.train = {c: level_examples(*c, cfg.train_questions, "train", cfg.seed) for c in self.cells}

    def row(self, example):
        try:
            calculate(example.prompt)
            call = call_ids(example.prompt, self.tokenizer)
        except ValueError:          # CalculatorError: not an expression the calculator takes
            call = None
        return sequence(example, self.tokenizer, call, self.before, self.after)

    def fits(self, example) -> bool:
        return len(self.row(example)[0]) <= self.max_len

    def true_rows(self, examples):
        return encode_rows([self.row(ex) for ex in examples], self.tokenizer.pad_id, self.max_len)




class ExpertsPhase(PhaseController):
    phase = 7
    name = "experts"

    def validate_input(self, ctx) -> None:
        item = require_one_input(ctx, "builds experts on")
        tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
        if tokenizer.vocab_size > item.model.config.vocab_size:
            raise HandoffError(f"input model has {item.model.config.vocab_size} vocabulary rows; its tokenizer "
                               f"needs {tokenizer.vocab_size}")
        task = ctx.phase_config.few_shot_task
        if task is not None and item.metadata["task_weights"].get(task, 0) <= 0:
            raise HandoffError(f"phases.phase7.few_shot_task: {task!r} is not one of the model's tasks "
                               f"{sorted(t for t, w in item.metadata['task_weights'].items() if w > 0)}")

    def execute(self, ctx) -> PhaseResult:
        cfg, started, item = ctx.phase_config, time.perf_counter(), ctx.inputs[0]
        tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
        add_tool_tokens(tokenizer)     # a model from before Phase 6 gets the call format's rows (it never calls)
        base = resize_vocab(item.model, tokenizer.vocab_size).eval()
        tasks = sorted(t for t, w in item.metadata["task_weights"].items() if w > 0)
        qs = Questions(tasks, tokenizer, base.config.max_len, item.metadata.get("answer_format", {}), cfg)
        cells = measure_cells(base, qs.discovery, tokenizer, qs.max_len, qs.true_rows)
        clusters, solved = cluster_cells(cells, cfg.min_experts, cfg.max_experts, cfg.solved_accuracy, cfg.seed)
        ctx.progress(0.1, f"{len(clusters)} clusters: " + ", ".join(f"{c.name} ({c.size})" for c in clusters))
        run = _Run(ctx, cfg, base, tokenizer, qs)
        run.cells = cells
        run.train_all(clusters)
        metrics = run.report(clusters, solved)
        model = run.handed_on
        meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(),
                "task_weights": dict(item.metadata["task_weights"]), "parameter_count": model.num_parameters(),
                "num_experts": len(clusters), "experts": run.expert_files, "router": run.router_file,
                "mixture": run.mixture, "few_shot_task": run.few_shot_task}
        meta.update({k: item.metadata[k] for k in ("tools", "personas", "answer_format") if k in item.metadata})
        output = ModelOutput(name="experts", model=model, metadata=meta, metrics=metrics)
        return PhaseResult(success=True, models=[output], metrics=metrics, duration_s=time.perf_counter() - started)


class _Run:
    """The state the steps share: the base, its SVF copy, the experts and their files."""

    def __init__(self, ctx, cfg, base, tokenizer, qs: Questions):
        self.ctx, self.cfg, self.base, self.tokenizer, self.qs = ctx, cfg, base, tokenizer, qs
        self.svf = add_svf(base, cfg.svf_singular_values, cfg.max_mult)
        self.experts, self.training, self.expert_files, self.logged = [], {}, {}, 0
        self.router_file, self.mixture, self.handed_on, self.few_shot_task = None, {}, base, None
        self.cells = []     # discovery's measured cells

    def flags(self, expert, examples) -> list[bool]:
        model = self.base if expert is None else fold_svf(self.svf, expert)
        return correct_flags(model, examples, self.tokenizer, self.qs.max_len)

    def train_all(self, clusters) -> None:
        cfg = self.cfg
        methods = [cfg.method] + ([m for m in ("reinforce", "cross_entropy") if m != cfg.method]
                                  if cfg.compare_methods else [])
        for i, cluster in enumerate(clusters):
            train = [ex for c in cluster.cells for ex in self.qs.train[tuple(c)]]
            val = [ex for c in cluster.cells for ex in self.qs.discovery[tuple(c)]]
            for method in methods:
                self.ctx.progress(0.1 + 0.5 * i / max(1, len(clusters)), f"expert {cluster.name}: {method}")
                log = lambda step, loss, reward, n=cluster.name, m=method, at=self.logged: self.ctx.tracker.log(
                    {f"svf/{m}/loss/{n}": loss, **({} if math.isnan(reward) else {f"svf/{m}/reward/{n}": reward})},
                    step=at + step)     # one step axis for the phase: each training run continues it
                out = train_expert(add_svf(self.base, cfg.svf_singular_values, cfg.max_mult), self.base, train,
                                   val, self.tokenizer, cfg, method=method, true_rows=self.qs.true_rows,
                                   seed=cfg.seed + 101 * i, on_step=log)
                self.training[(cluster.name, method)] = out
                self.logged += cfg.svf_steps
            expert = self.training[(cluster.name, cfg.method)]["expert"]
            self.experts.append(expert)
            path = save_expert(self.ctx.phase_dir / "experts" / f"{cluster.name}.safetensors", expert,
                               {"name": cluster.name, "cells": cluster.cells, "method": cfg.method})
            self.expert_files[cluster.name] = str(path.name)

    def report(self, clusters, solved) -> dict:
        """Every metric of the phase (see the module and the catalogue's phase-7 entries)."""
        m = self.expert_metrics(clusters)
        m.update(self.routing_metrics(clusters, solved))
        if self.experts:
            m.update(self.few_shot_metrics())
            m.update(self.search_metrics())
        m.update(self.size_metrics(clusters, solved))
        return m

    def expert_metrics(self, clusters) -> dict:
        m = {"num_experts": len(clusters), "expert_gain": {}, "expert_base_accuracy": {}, "expert_accuracy": {},
             "cluster_size": {}, "cluster_error_rate": {}}
        for cluster, expert in zip(clusters, self.experts):
            test = [ex for c in cluster.cells for ex in self.qs.test[tuple(c)]]
            base, own = mean(self.flags(None, test)), mean(self.flags(expert, test))
            m["expert_base_accuracy"][cluster.name], m["expert_accuracy"][cluster.name] = base, own
            m["expert_gain"][cluster.name] = own - base
            m["cluster_size"][cluster.name], m["cluster_error_rate"][cluster.name] = cluster.size, cluster.error_rate
            for method in ("reinforce", "cross_entropy"):
                out = self.training.get((cluster.name, method))
                if out is not None:
                    acc = own if method == self.cfg.method else mean(self.flags(out["expert"], test))
                    m.setdefault(f"{method}_accuracy", {})[cluster.name] = acc
        m["min_expert_gain"] = min(m["expert_gain"].values(), default=0.0)
        for method in ("reinforce", "cross_entropy"):
            if m.get(f"{method}_accuracy"):
                m[f"mean_{method}_accuracy"] = float(np.mean(list(m[f"{method}_accuracy"].values())))
        return m

    def routing_metrics(self, clusters, solved) -> dict:
        """The router's accuracy at naming the cluster, and the routed / base / random-expert accuracy on the
        whole held-out (test) set."""
        cell_class = {tuple(c): i for i, cl in enumerate(clusters) for c in cl.cells}
        label = lambda ex, cell: cell_class.get(cell, len(clusters))   # the last class: the base
        train = [(ex, label(ex, cell)) for cell in self.qs.cells for ex in self.qs.train[cell][:ROUTER_QUESTIONS]]
        test = [(ex, label(ex, cell)) for cell in self.qs.cells for ex in self.qs.test[cell]]
        router = Router(prompt_features(self.base, [ex for ex, _ in train], self.tokenizer), [y for _, y in train],
                        len(clusters) + 1, steps=self.cfg.router_steps, seed=self.cfg.seed)
        self._save_router(router)
        chosen = router.predict(prompt_features(self.base, [ex for ex, _ in test], self.tokenizer))
        rng = random.Random(self.cfg.seed)
        random_pick = [rng.randrange(len(clusters)) if clusters else 0 for _ in test]
        options = self.experts + [None]
        examples = [ex for ex, _ in test]
        base = mean(self.flags(None, examples))
        routed = self._assigned(options, examples, chosen)
        random_acc = self._assigned(options, examples, random_pick) if clusters else base
        return {"base_accuracy": base, "routed_accuracy": routed, "accuracy": routed, "random_expert_accuracy":
                random_acc, "routing_gain": routed - base, "routing_over_random": routed - random_acc,
                "routing_accuracy": mean(c == y for c, (_, y) in zip(chosen, test)),
                "held_out_questions": len(test)}

    def _assigned(self, options, examples, choice) -> float:
        right = 0
        for k, expert in enumerate(options):
            mine = [ex for ex, c in zip(examples, choice) if c == k]
            right += sum(self.flags(expert, mine)) if mine else 0
        return right / max(1, len(examples))

    def _save_router(self, router: Router) -> None:
        from safetensors.torch import save_file

        path = self.ctx.phase_dir / "router.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"weight": router.linear.weight.detach().contiguous(), "bias": router.linear.bias.detach(),
                   "mean": router.mean.contiguous(), "std": router.std.contiguous()}, str(path))
        self.router_file = path.name

    def few_shot_metrics(self) -> dict:
        """CEM over α on `few_shot_questions` val examples of the target task (configured, or the task the base
        model answered worst at discovery); on its test questions, the CEM mixture against the best single expert
        (picked on the same few-shot examples) and the base."""
        cfg, qs = self.cfg, self.qs
        task = cfg.few_shot_task or min(sorted({c.task for c in self.cells}), key=lambda t: mean(
            f for c in self.cells if c.task == t for f in c.correct))
        cells, self.few_shot_task = [c for c in qs.cells if c[0] == task], task
        if not cells:
            raise HandoffError(f"phases.phase7.few_shot_task: {task!r} has no level that fits the model")
        shots = random.Random(cfg.seed).sample([ex for c in cells for ex in qs.discovery[c]],
                                               min(cfg.few_shot_questions, sum(len(qs.discovery[c]) for c in cells)))
        test = [ex for c in cells for ex in qs.test[c]]
        score = lambda alpha: mean(self.flags(mix_experts(self.experts, list(alpha)), shots))
        found = cem(score, len(self.experts), population=cfg.cem_population, elites=cfg.cem_elites,
                    iterations=cfg.cem_iterations, seed=cfg.seed)
        singles = [mean(self.flags(e, shots)) for e in self.experts]
        best_single = self.experts[int(np.argmax(singles))]
        cem_acc = mean(self.flags(mix_experts(self.experts, list(found["alpha"])), test))
        single_acc = mean(self.flags(best_single, test))
        return {"few_shot_task_index": sorted({c[0] for c in qs.cells}).index(task), "cem_accuracy": cem_acc,
                "best_single_expert_accuracy": single_acc, "cem_gain_over_best_single": cem_acc - single_acc,
                "few_shot_base_accuracy": mean(self.flags(None, test)), "cem_alpha": {
                    str(i): float(a) for i, a in enumerate(found["alpha"])}}

    def search_metrics(self) -> dict:
        """NSGA-II over per-group mixtures; the front's most accurate point is folded into the model handed on
        when it beats the base on the same validation questions."""
        cfg, names = self.cfg, list(svf_layers(self.svf))
        blocks = sorted({int(n.split(".")[1]) for n in names})
        per = -(-len(blocks) // min(cfg.layer_groups, len(blocks)))
        groups = [[n for n in names if int(n.split(".")[1]) in blocks[g: g + per]] for g in range(0, len(blocks), per)]
        sizes = [sum(svf_layers(self.svf)[n].k for n in g) for g in groups]
        pool = [ex for c in self.qs.cells for ex in self.qs.discovery[c]]
        val = random.Random(cfg.seed + 7).sample(pool, min(cfg.adas_questions, len(pool)))
        accuracy = lambda x: mean(self.flags(mix_experts(self.experts, group_weights(x, groups, len(
            self.experts))), val))
        out = nsga2_search(accuracy, sizes, len(self.experts), population=cfg.adas_population,
                           generations=cfg.adas_generations, crossover_rate=cfg.crossover_rate,
                           mutation_rate=cfg.mutation_rate, seed=cfg.seed)
        best = max(out["front"], key=lambda p: (p["accuracy"], -p["parameters"]))
        base_val = mean(self.flags(None, val))
        if best["accuracy"] > base_val:
            weights = group_weights(np.array(best["x"]), groups, len(self.experts))
            self.handed_on = fold_svf(self.svf, mix_experts(self.experts, weights)).eval()
            self.mixture = {"groups": groups, "alpha": best["x"]}
        return {"adas_front_size": len(out["front"]), "adas_evaluations": len(out["evaluations"]),
                "adas_best_val_accuracy": best["accuracy"], "adas_base_val_accuracy": base_val,
                "adas_best_parameters": best["parameters"], "mixture_folded": float(bool(self.mixture))}

    def size_metrics(self, clusters, solved) -> dict:
        flags = correct_flags(self.handed_on, [ex for c in self.qs.cells for ex in self.qs.test[c]], self.tokenizer,
                              self.qs.max_len)
        return {"params_per_expert": svf_parameter_count(self.svf),
                "lora_r8_params": lora_parameter_count(self.svf, 8), "solved_cells": len(solved),
                "handed_on_accuracy": mean(flags)}
