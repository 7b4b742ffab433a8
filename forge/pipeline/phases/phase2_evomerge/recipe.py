"""Phase 2, EvoMerge: evolve merges of Phase 1's models and hand on the champion.

`forge.merge.evolve` searches merge recipes (linear, SLERP, TIES, DARE, FrankenMerge, DFS) over the three
Phase 1 models, with their shared trunk as the base of the task-vector methods (TIES, DARE).
Fitness (higher is better, `forge.merge.evolution.score`): validation accuracy, exp(-answer loss), and
speed and memory relative to the inputs. Speed is a deterministic cost model (forward FLOPs of one token,
2 x the parameters a token passes through), not a stopwatch, so a resumed or repeated run picks the same
champion; the measured evaluation time is reported beside it.

The champion must beat the best input model's fitness; the phase reports by how much, and the
champion's accuracy on the held-out test split (never used for selection) next to the inputs'.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from forge.data import CharTokenizer, evaluate, make_examples
from forge.merge import evolve
from forge.merge.evolution import EvolutionConfig
from forge.nn import TransformerConfig, build_model
from forge.pipeline.controller import HandoffError, ModelOutput, PhaseController, PhaseResult
from forge.pipeline.config import as_dict
from forge.registry.checkpoint import load_checkpoint


def token_flops(config: TransformerConfig) -> float:
    """Forward FLOPs per token, 2 x (parameters a token multiplies with): blocks plus the head."""
    block = 4 * config.dim * config.dim + 3 * config.dim * config.hidden
    return 2.0 * (config.n_layers * block + config.dim * config.vocab_size)


class EvoMergePhase(PhaseController):
    phase = 2
    name = "evomerge"

    def validate_input(self, ctx) -> None:
        if len(ctx.inputs) < 2:
            raise HandoffError(f"phase 2 merges at least 2 models; got {len(ctx.inputs)}")
        configs = {str(sorted(i.metadata["model_config"].items())) for i in ctx.inputs}
        if len(configs) != 1:
            raise HandoffError("phase 2 needs models of one architecture; the inputs' model_config differ")
        for item in ctx.inputs:
            for key in ("base_checkpoint", "base_sha256", "tokenizer", "task_weights"):
                if key not in item.metadata:
                    raise HandoffError(f"input model {item.record['name']} lacks metadata {key!r}")

    def execute(self, ctx) -> PhaseResult:
        cfg, started = ctx.phase_config, time.perf_counter()
        meta = ctx.inputs[0].metadata
        shape = TransformerConfig.from_dict(meta["model_config"])
        tokenizer = CharTokenizer.from_dict(meta["tokenizer"])
        base, _ = load_checkpoint(Path(meta["base_checkpoint"]), expected_sha256=meta["base_sha256"])
        base = {key: value.to(ctx.device) for key, value in base.items()}   # merged with the inputs' states
        tasks = sorted({t for item in ctx.inputs for t in item.metadata["task_weights"]})
        val = make_examples({t: 1.0 for t in tasks}, cfg.eval_examples, "val", ctx.seed)
        test = make_examples({t: 1.0 for t in tasks}, cfg.eval_examples, "test", ctx.seed)
        states = [{k: v.detach().clone() for k, v in item.model.state_dict().items()} for item in ctx.inputs]
        fitness = _fitness_fn(shape, tokenizer, val, ctx.device)
        result = evolve(states, base, fitness, _evolution_config(cfg), progress=ctx.progress)
        champion_shape = TransformerConfig.from_dict({**shape.to_dict(), "n_layers": result.champion.n_layers})
        champion = build_model(champion_shape).to(ctx.device)
        champion.load_state_dict(result.champion_state)
        metrics = self._metrics(result, champion, [i.model for i in ctx.inputs], test, tokenizer, shape.max_len)
        for stats in result.history:
            ctx.tracker.log({"best_fitness": stats.best, "mean_fitness": stats.mean}, step=stats.generation)
        output = ModelOutput(name="champion", model=champion, metrics=metrics, metadata={
            "model_config": champion_shape.to_dict(), "tokenizer": tokenizer.to_dict(),
            "parameter_count": champion.num_parameters(), "task_weights": {t: 1.0 for t in tasks},
            "fitness": float(result.champion.score), "merge_technique": result.champion.recipe.operator,
            "recipe": result.champion.recipe.to_dict(), "evolution": result.to_dict()})
        return PhaseResult(success=True, models=[output], metrics=metrics, duration_s=time.perf_counter() - started)

    @staticmethod
    def _metrics(result, champion, inputs, test, tokenizer, max_len) -> dict:
        champion_test = evaluate(champion, test, tokenizer, max_len)["accuracy"]
        input_test = [evaluate(m, test, tokenizer, max_len)["accuracy"] for m in inputs]
        return {"champion_fitness": float(result.champion.score), "best_input_fitness": float(result.baseline.score),
                "fitness_gain": float(result.gain), "fitness_gain_relative": float(result.gain_relative),
                "champion_val_accuracy": float(result.champion.metrics["accuracy"]),
                "best_input_val_accuracy": float(result.baseline.metrics["accuracy"]),
                "champion_test_accuracy": float(champion_test), "best_input_test_accuracy": float(max(input_test)),
                "champion_operator": result.champion.recipe.operator, "evaluations": int(result.evaluations),
                "generations": len(result.history) - 1}


def _evolution_config(cfg) -> EvolutionConfig:
    """The phase-2 config section as the plain values `forge.merge.evolve` reads."""
    return EvolutionConfig(generations=cfg.generations, population_size=cfg.population_size,
                           elite_count=cfg.elite_count, mutation_strength=cfg.mutation_strength,
                           operators=list(cfg.operators), fitness_weights=as_dict(cfg.fitness_weights),
                           seed=cfg.seed)


def _fitness_fn(shape: TransformerConfig, tokenizer, val, device="cpu"):
    """fitness(state, n_layers) -> accuracy and loss on `val` (the model evaluated on `device`), cost-model
    seconds, and weight bytes."""

    def fitness(state, n_layers: int) -> dict:
        config = TransformerConfig.from_dict({**shape.to_dict(), "n_layers": n_layers})
        model = build_model(config).to(device)
        model.load_state_dict(state)
        model.eval()
        started = time.perf_counter()
        with torch.no_grad():
            result = evaluate(model, val, tokenizer, shape.max_len)
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        return {"accuracy": float(result["accuracy"]), "loss": float(result["loss"]),
                "seconds": token_flops(config) / 1e9, "bytes": float(nbytes),
                "measured_seconds": time.perf_counter() - started}

    return fitness
