"""Phase 1, Cognate: train a shared trunk, then three diverse specialists branched from it.

The original system trained three 25M-parameter models that collapsed to one token. Here each model is a
`forge.nn.Transformer` trained with MuonGrokfast (the phase-1 preset) on the built-in tasks. Phase 2
merges them, and weight-space merges only work between models that stay in one linearly connected
basin: networks trained from the same initialization diverge into different basins unless they share
the start of training (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket
Hypothesis", arXiv 1912.05576), which is why model soups and task arithmetic fine-tune from one
pretrained model (Wortsman et al. 2022, arXiv 2203.05482; Ilharco et al. 2023, arXiv 2212.04089).
Measured here at the default sizes: three models trained 800 steps each from one random initialization
gave no merge near the best input (fitness 0.905 vs 0.964; 0.49 vs 0.99 with milder task mixes);
branched from a 600-step trunk at the trunk's rate, linear and TIES merges still lost 5-47 accuracy
points; at an 8x lower branch rate (the default) Phase 2's champion beats the best input by about 1%
fitness (benchmarks/merge_setup.py, benchmarks/RESULTS.md). So the phase trains a trunk on all tasks
for `shared_steps`, saves it as `trunk.safetensors` (the base of Phase 2's task vectors), and branches
three specialists from it, each with its own data seed and task mix, at the lower `branch_lr`.

Each model must beat a trivial baseline (most frequent answer per task, or copying the prompt) on held-out
data by `min_margin_over_baseline`, and the three must differ (prediction disagreement and task-vector
distance).
"""
from __future__ import annotations

import itertools
import time

import torch

from forge.data import CharTokenizer, evaluate, make_examples, trivial_baseline
from forge.nn import Transformer, TransformerConfig, build_model
from forge.pipeline.config import as_dict
from forge.pipeline.controller import HandoffError, ModelOutput, PhaseController, PhaseResult
from forge.pipeline.devices import model_device
from forge.pipeline.training import make_optimizer, train_on_examples
from forge.registry.checkpoint import save_checkpoint


class CognatePhase(PhaseController):
    phase = 1
    name = "cognate"

    def validate_input(self, ctx) -> None:
        if ctx.inputs:
            raise HandoffError(f"phase 1 creates its models; it got {len(ctx.inputs)} input models")
        if len(ctx.phase_config.models) < 2:
            raise HandoffError("phase 1 needs at least two model specs to produce diverse models")

    def execute(self, ctx) -> PhaseResult:
        cfg, started = ctx.phase_config, time.perf_counter()
        tokenizer = CharTokenizer()
        shape = TransformerConfig(vocab_size=tokenizer.vocab_size, **as_dict(cfg.model))
        tasks = {t: 1.0 for t in sorted({task for spec in cfg.models for task in as_dict(spec.task_weights)})}
        val = make_examples(tasks, cfg.eval_examples, "val", ctx.seed)
        trunk, trunk_info = self._trunk(ctx, shape, tokenizer, tasks)
        base_state = {k: v.detach().clone() for k, v in trunk.state_dict().items()}
        outputs, trained = [], []
        for index, spec in enumerate(cfg.models):
            model = build_model(shape).to(ctx.device)
            model.load_state_dict(base_state)
            train = make_examples(as_dict(spec.task_weights), cfg.train_examples, "train", spec.seed)
            log = self._train_one(ctx, model, train, tokenizer, val, spec, index)
            metrics = self._model_metrics(model, log, train, val, tokenizer, shape)
            ctx.tracker.log({f"{spec.name}/{k}": v for k, v in metrics.items() if isinstance(v, float)})
            meta = {"model_config": shape.to_dict(), "tokenizer": tokenizer.to_dict(),
                    "parameter_count": model.num_parameters(), "task_weights": as_dict(spec.task_weights),
                    "seed": spec.seed, "specialization": _specialization(spec.task_weights),
                    "final_loss": metrics["final_train_loss"], "loss_curve": log.losses[:: max(1, len(log.losses) // 100)],
                    "val_curve": [(step, e["accuracy"]) for step, e in log.evals],
                    "base_checkpoint": str(trunk_info.path), "base_sha256": trunk_info.sha256}
            outputs.append(ModelOutput(name=spec.name, model=model, metadata=meta, metrics=metrics))
            trained.append(model)
        phase_metrics = self._diversity(trained, base_state, val, tokenizer, shape.max_len)
        phase_metrics["best_val_accuracy"] = max(o.metrics["val_accuracy"] for o in outputs)
        phase_metrics["trunk_val_accuracy"] = float(evaluate(trunk, val, tokenizer, shape.max_len)["accuracy"])
        return PhaseResult(success=True, models=outputs, metrics=phase_metrics,
                           duration_s=time.perf_counter() - started)

    def _trunk(self, ctx, shape, tokenizer, tasks):
        """The shared trunk: `shared_steps` of training on every task, saved as the merge base."""
        cfg = ctx.phase_config
        torch.manual_seed(cfg.init_seed)
        trunk = Transformer(shape).to(ctx.device)   # initialized on the CPU: the same weights on any device
        if cfg.shared_steps:
            train = make_examples(tasks, cfg.train_examples, "train", cfg.init_seed)
            optimizer = make_optimizer(trunk, cfg.optimizer, cfg.lr)
            train_on_examples(trunk, optimizer, train, tokenizer, steps=cfg.shared_steps, batch_size=cfg.batch_size,
                              max_len=shape.max_len, seed=cfg.init_seed,
                              on_step=self._reporter(ctx, "trunk", 0))
        info = save_checkpoint(trunk.state_dict(), ctx.phase_dir / "trunk.safetensors",
                               {"model_config": shape.to_dict(), "role": "shared trunk (merge base)",
                                "steps": cfg.shared_steps})
        return trunk, info

    @staticmethod
    def _reporter(ctx, name: str, offset: int):
        """on_step callback: progress over all of the phase's steps, and the loss every 50 steps."""
        cfg = ctx.phase_config
        total = cfg.shared_steps + len(cfg.models) * cfg.steps

        def on_step(step: int, loss: float) -> None:
            if step % 10 == 0:
                ctx.progress((offset + step) / total, f"{name} step {step} loss {loss:.3f}")
            if step % 50 == 0:
                ctx.tracker.log({f"{name}/train_loss": loss}, step=offset + step)

        return on_step

    def _train_one(self, ctx, model, train, tokenizer, val, spec, index):
        cfg = ctx.phase_config
        optimizer = make_optimizer(model, cfg.optimizer, cfg.branch_lr)
        return train_on_examples(model, optimizer, train, tokenizer, steps=cfg.steps, batch_size=cfg.batch_size,
                                 max_len=model.config.max_len, seed=spec.seed,
                                 evaluate=lambda m: evaluate(m, val, tokenizer, model.config.max_len),
                                 eval_every=cfg.eval_every,
                                 on_step=self._reporter(ctx, spec.name, cfg.shared_steps + index * cfg.steps))

    @staticmethod
    def _model_metrics(model, log, train, val, tokenizer, shape) -> dict:
        result = evaluate(model, val, tokenizer, shape.max_len)
        baseline = trivial_baseline(train, val)["accuracy"]
        first = sum(log.losses[:10]) / min(10, len(log.losses))
        return {"val_accuracy": float(result["accuracy"]), "val_loss": float(result["loss"]),
                "val_perplexity": float(result["perplexity"]), "baseline_accuracy": float(baseline),
                "margin_over_baseline": float(result["accuracy"] - baseline),
                "final_train_loss": log.smoothed_loss(),
                "loss_reduction": float(1.0 - log.smoothed_loss() / first),
                "per_task_accuracy": result.get("per_task_accuracy", {})}

    @staticmethod
    def _diversity(models, base_state, val, tokenizer, max_len) -> dict:
        """Mean pairwise disagreement of greedy next-token predictions on the validation prompts, and the
        smallest relative distance between two models' task vectors (theta - theta_trunk)."""
        from forge.data import encode_batch

        tokens = encode_batch(val, tokenizer, max_len).tokens.to(model_device(models[0]))
        with torch.no_grad():
            preds = [m(tokens).argmax(-1) for m in models]
        keep = tokens != tokenizer.pad_id
        disagreement = [float((a != b)[keep].float().mean()) for a, b in itertools.combinations(preds, 2)]
        vectors = [torch.cat([(m.state_dict()[k] - base_state[k]).flatten().float() for k in base_state])
                   for m in models]
        distances = [float((a - b).norm() / ((a.norm() + b.norm()) / 2)) for a, b in itertools.combinations(vectors, 2)]
        return {"diversity": sum(disagreement) / len(disagreement),
                "diversity_min_distance": min(distances)}


def _specialization(task_weights) -> str:
    """The task(s) a model's data mix favours most, e.g. "addition" or "copy+reversal"."""
    weights = as_dict(task_weights)
    top = max(weights.values())
    return "+".join(sorted(t for t, w in weights.items() if w == top))
