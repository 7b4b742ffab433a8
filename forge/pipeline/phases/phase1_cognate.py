"""Phase 1, Cognate: train three diverse small models from one shared initialization.

The seed system trained three 25M-parameter models that collapsed to one token. Here each model is a
`forge.nn.Transformer` trained with MuonGrokfast (the phase-1 preset) on the built-in tasks, with its own
data seed and task mix; all three start from the same initial weights, because Phase 2 merges them and
weight-space merges (linear, TIES, DARE) only make sense between models that share an origin (model
soups, Wortsman et al. 2022, arXiv 2203.05482; task arithmetic, Ilharco et al. 2023, arXiv 2212.04089).
The shared initialization is saved next to the models as `init.safetensors` for Phase 2's task vectors.

Each model must beat a trivial baseline (most frequent answer per task, or copying the prompt) on held-out
data by `min_margin_over_baseline`, and the three must differ (prediction disagreement and weight distance).
"""
from __future__ import annotations

import itertools
import time

import torch

from forge.data import CharTokenizer, evaluate, make_examples, trivial_baseline
from forge.nn import Transformer, TransformerConfig, build_model
from forge.optim import create_optimizer_from_phase
from forge.pipeline.controller import HandoffError, ModelOutput, PhaseController, PhaseResult
from forge.pipeline.training import train_on_examples
from forge.registry.checkpoint import save_checkpoint


def as_dict(value) -> dict:
    """A config section as a plain dict (pydantic model or mapping)."""
    return value.model_dump() if hasattr(value, "model_dump") else dict(value)


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
        torch.manual_seed(cfg.init_seed)
        init_state = {k: v.detach().clone() for k, v in Transformer(shape).state_dict().items()}
        init_info = save_checkpoint(init_state, ctx.phase_dir / "init.safetensors",
                                    {"model_config": shape.to_dict(), "role": "shared initialization"})
        tasks = sorted({task for spec in cfg.models for task in as_dict(spec.task_weights)})
        val = make_examples({t: 1.0 for t in tasks}, cfg.eval_examples, "val", ctx.seed)
        outputs, trained = [], []
        for index, spec in enumerate(cfg.models):
            model = build_model(shape)
            model.load_state_dict(init_state)
            train = make_examples(as_dict(spec.task_weights), cfg.train_examples, "train", spec.seed)
            log = self._train_one(ctx, model, train, tokenizer, spec, index)
            metrics = self._model_metrics(model, log, train, val, tokenizer, shape)
            ctx.tracker.log({f"{spec.name}/{k}": v for k, v in metrics.items() if isinstance(v, float)})
            meta = {"model_config": shape.to_dict(), "tokenizer": tokenizer.to_dict(),
                    "parameter_count": model.num_parameters(), "task_weights": as_dict(spec.task_weights),
                    "seed": spec.seed, "specialization": _specialization(spec.task_weights),
                    "final_loss": metrics["final_train_loss"], "loss_curve": log.losses[:: max(1, len(log.losses) // 100)],
                    "init_checkpoint": str(init_info.path), "init_sha256": init_info.sha256}
            outputs.append(ModelOutput(name=spec.name, model=model, metadata=meta, metrics=metrics))
            trained.append(model)
        phase_metrics = self._diversity(trained, init_state, val, tokenizer, shape.max_len)
        phase_metrics["best_val_accuracy"] = max(o.metrics["val_accuracy"] for o in outputs)
        ctx.tracker.log(phase_metrics)
        return PhaseResult(success=True, models=outputs, metrics=phase_metrics,
                           duration_s=time.perf_counter() - started)

    def _train_one(self, ctx, model, train, tokenizer, spec, index):
        cfg = ctx.phase_config
        optimizer = create_optimizer_from_phase(model, 1, lr=cfg.lr, adamw_lr=cfg.lr)
        total = len(cfg.models) * cfg.steps

        def on_step(step: int, loss: float) -> None:
            if step % 10 == 0 or step == cfg.steps:
                ctx.progress((index * cfg.steps + step) / total, f"{spec.name} step {step} loss {loss:.3f}")
            if step % 50 == 0:
                ctx.tracker.log({f"{spec.name}/train_loss": loss}, step=index * cfg.steps + step)

        return train_on_examples(model, optimizer, train, tokenizer, steps=cfg.steps, batch_size=cfg.batch_size,
                                 max_len=model.config.max_len, seed=spec.seed, on_step=on_step)

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
    def _diversity(models, init_state, val, tokenizer, max_len) -> dict:
        """Mean pairwise disagreement of greedy next-token predictions on the validation prompts, and the
        smallest relative distance between two models' task vectors (theta - theta_init)."""
        from forge.data import encode_batch

        tokens = encode_batch(val, tokenizer, max_len).tokens
        with torch.no_grad():
            preds = [m(tokens).argmax(-1) for m in models]
        keep = tokens != tokenizer.pad_id
        disagreement = [float((a != b)[keep].float().mean()) for a, b in itertools.combinations(preds, 2)]
        vectors = [torch.cat([(m.state_dict()[k] - init_state[k]).flatten().float() for k in init_state])
                   for m in models]
        distances = [float((a - b).norm() / ((a.norm() + b.norm()) / 2)) for a, b in itertools.combinations(vectors, 2)]
        return {"diversity": sum(disagreement) / len(disagreement),
                "diversity_min_distance": min(distances)}

    def validate_output(self, result: PhaseResult, ctx) -> None:
        need = ctx.phase_config.min_margin_over_baseline
        for output in result.models:
            margin = output.metrics["margin_over_baseline"]
            if margin < need:
                raise HandoffError(f"{output.name}: accuracy {output.metrics['val_accuracy']:.3f} beats the trivial "
                                   f"baseline by {margin:.3f}, less than the required {need}")
        if result.metrics["diversity_min_distance"] < 0.05 or result.metrics["diversity"] <= 0.0:
            raise HandoffError(f"phase 1 models are not diverse: {result.metrics}")


def _specialization(task_weights) -> str:
    """The task(s) a model's data mix favours most, e.g. "addition" or "copy+reversal"."""
    weights = as_dict(task_weights)
    top = max(weights.values())
    return "+".join(sorted(t for t, w in weights.items() if w == top))
