"""Phase 4, BitNet 1.58-bit: ternary weights, STE fine-tuning, a packed 2-bit checkpoint.

BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764): every hidden Linear becomes a `forge.nn.BitLinear` with
weights q * scale, q = clamp(round(W / absmean(W)), -1, 1) in {-1, 0, +1} (so |w| < absmean/2 -> 0),
and per-token absmax int8 activations. Embeddings, norms and the output head stay fp32
(`preserve_layers`). The phase:

1. evaluates the float input model on held-out test examples of its tasks;
2. converts a deep copy to BitLinear. BitLinear's own input RMSNorm is replaced by the identity: the
   Transformer already normalizes the inputs of q/k/v and gate/up, and without it the quantized model is
   exactly the float architecture with quantized weights and activations, so the dequantized float model
   handed on computes the same function up to the int8 activation rounding;
3. "calibrates": BitLinear has no calibrated state (weight scales come from the weights, activation
   scales per token at run time), so calibration only *measures*, on `calibration_samples` training
   examples, the relative error of each layer's int8 activations, ternary weights and outputs;
4. fine-tunes the latent weights through the straight-through estimator with MuonGrokfast (ste_mode,
   momentum 0.9, Grokfast lambda 1.5: the original system's phase-4 settings, the defaults of
   `phases.phase4.optimizer`);
5. freezes to packed 2-bit weights, saves them as `bitnet_packed.safetensors` and compares its size on
   disk with the input's fp32 file;
6. evaluates the packed model and the dequantized float model it hands on (weights q * scale, no
   activation quantization); `accuracy_drop` is the larger of the two drops from the float model.
"""
from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from forge.data import CharTokenizer, encode_batch, evaluate, make_examples
from forge.nn import TransformerConfig
from forge.nn.quantize import bit_layers, calibrate, dequantize, freeze_all, sparsity, to_bitlinear
from forge.pipeline.controller import HandoffError, ModelOutput, PhaseController, PhaseResult, require_one_input
from forge.pipeline.phases.phase3_quietstar.thought_warmup import train_with_thoughts
from forge.pipeline.phases.phase3_quietstar.thoughts import ThoughtIds, accuracy_with_thoughts, example_ids, thoughts_for
from forge.pipeline.training import TrainingLog, make_optimizer, train_on_examples
from forge.registry.checkpoint import save_checkpoint

PACKED_FILE = "bitnet_packed.safetensors"
STE_SETTINGS = dict(grokfast_lambda=1.5, muon_ste_mode=True, momentum=0.9)   # seed phase4_config.yaml


def thinking(item, tokenizer) -> tuple[ThoughtIds, int] | None:
    """(thought ids, thought length) of a model that thinks (Phase 3's output: `thought_tokens` in its
    metadata); None for any other model."""
    if "thought_tokens" not in item.metadata:
        return None
    return ThoughtIds.from_tokenizer(tokenizer), int(item.metadata["thought_length"])


def thought_metrics(item, handed: nn.Module, test, tokenizer) -> dict:
    """For a model that thinks, its accuracy with its own thoughts before quantization and after (the
    dequantized model handed on); {} for any other model."""
    setup = thinking(item, tokenizer)
    if setup is None:
        return {}
    ids, length = setup
    before = accuracy_with_thoughts(item.model, test, tokenizer, ids, length)
    after = accuracy_with_thoughts(handed, test, tokenizer, ids, length)
    return {"float_thought_accuracy": before, "thought_accuracy": after, "thought_accuracy_drop": before - after}


def file_size(record: dict) -> int:
    """Bytes on disk of a registered model's checkpoint file."""
    return Path(record["path"]).stat().st_size


def _quality(result: dict) -> dict:
    return {"accuracy": float(result["accuracy"]), "loss": float(result["loss"]),
            "perplexity": float(result["perplexity"])}


class BitNetPhase(PhaseController):
    phase = 4
    name = "bitnet"

    def validate_input(self, ctx) -> None:
        item = require_one_input(ctx, "quantizes")
        path = item.record.get("path")
        if not path or not Path(path).is_file():
            raise HandoffError(f"input model {item.record.get('name')!r} has no checkpoint file to compare "
                               f"sizes with (record path {path!r})")
        if not bit_layers(to_bitlinear(item.model, ctx.phase_config.preserve_layers)):
            raise HandoffError(f"preserve_layers {ctx.phase_config.preserve_layers} leave no Linear to quantize")

    def execute(self, ctx) -> PhaseResult:
        cfg, started, item = ctx.phase_config, time.perf_counter(), ctx.inputs[0]
        shape = TransformerConfig.from_dict(item.metadata["model_config"])
        tokenizer = CharTokenizer.from_dict(item.metadata["tokenizer"])
        tasks = {t: 1.0 for t in sorted(item.metadata["task_weights"])}
        train = make_examples(tasks, cfg.train_examples, "train", ctx.seed)
        test = make_examples(tasks, cfg.eval_examples, "test", ctx.seed)
        score = lambda m: _quality(evaluate(m, test, tokenizer, shape.max_len))   # noqa: E731
        before = score(item.model)
        model = to_bitlinear(item.model, cfg.preserve_layers)
        calibration = calibrate(model, encode_batch(train[:cfg.calibration_samples], tokenizer,
                                                  shape.max_len).tokens.to(ctx.device))
        ctx.progress(0.05, "converted to BitLinear; calibration measured")
        quantized_only = score(model)
        log = self._fine_tune(ctx, model, item, train, tokenizer, shape.max_len)
        packed = score(freeze_all(model))
        info = save_checkpoint(model.state_dict(), ctx.phase_dir / PACKED_FILE, {
            "model_config": shape.to_dict(), "tokenizer": tokenizer.to_dict(),
            "format": "BitNet b1.58: BitLinear packed_weight (uint8, 4 ternary codes q+1 per byte, planar) "
                      "and weight_scale; embeddings, norms and head fp32; BitLinear input norm = identity",
            "bit_layers": sorted(bit_layers(model))})
        handed = dequantize(model, shape)
        metrics = self._metrics(before, quantized_only, packed, score(handed), calibration, log,
                                file_size(item.record), info.size_bytes, sparsity(model))
        metrics.update(thought_metrics(item, handed, test, tokenizer))
        meta = {**{k: item.metadata[k] for k in ("thought_tokens", "thought_length") if k in item.metadata},
                "model_config": shape.to_dict(), "tokenizer": tokenizer.to_dict(),
                "task_weights": dict(item.metadata["task_weights"]), "parameter_count": handed.num_parameters(),
                "compression_ratio": metrics["compression_ratio"],
                "accuracy_retention": metrics["accuracy_retention"],
                "packed_checkpoint": str(info.path), "packed_sha256": info.sha256,
                "packed_size_bytes": info.size_bytes, "float_size_bytes": metrics["float_size_bytes"],
                "quantization": "BitNet b1.58 absmean ternary, per tensor; dequantized weights q * scale"}
        output = ModelOutput(name="bitnet", model=handed, metadata=meta, metrics=metrics, tags=("ternary",))
        return PhaseResult(success=True, models=[output], metrics=metrics, duration_s=time.perf_counter() - started)

    @staticmethod
    def _fine_tune(ctx, model, item, train, tokenizer, max_len) -> TrainingLog | None:
        """STE fine-tuning on the answers; a thinking input model (Phase 3's) is also trained on the thoughts it
        wrote itself before quantization, or quantization erases its thinking (measured: accuracy with thoughts
        0.82 -> 0.004 after plain-format fine-tuning, while accuracy without them held)."""
        cfg = ctx.phase_config
        if cfg.fine_tune_steps == 0:
            return None

        def on_step(step: int, loss: float) -> None:
            if step % 10 == 0:
                ctx.progress(0.05 + 0.9 * step / cfg.fine_tune_steps, f"STE step {step} loss {loss:.3f}")
            if step % 50 == 0:
                ctx.tracker.log({"train_loss": loss}, step=step)

        optimizer = make_optimizer(model, cfg.optimizer, cfg.fine_tune_lr)
        common = dict(steps=cfg.fine_tune_steps, batch_size=cfg.batch_size, seed=ctx.seed, on_step=on_step)
        setup = thinking(item, tokenizer)
        if setup is None:
            return train_on_examples(model, optimizer, train, tokenizer, max_len=max_len, **common)
        ids, length = setup
        own = thoughts_for(item.model.eval(), example_ids(train, tokenizer)[0], ids, length)[0]
        return TrainingLog(losses=train_with_thoughts(model, optimizer, train, own, tokenizer, ids, plain_weight=1.0,
                                                      **common))

    @staticmethod
    def _metrics(before, quantized_only, packed, handed, calibration, log, float_bytes, packed_bytes,
                 zero_fraction) -> dict:
        """Sizes, and quality of the float input, the ternary model before fine-tuning, the packed model
        and the dequantized model handed on (all on the same held-out test examples)."""
        base = before["accuracy"]
        retention = (lambda acc: acc / base if base > 0 else float(acc >= base))   # noqa: E731
        drop = max(base - packed["accuracy"], base - handed["accuracy"])
        gap = quantized_only["loss"] - before["loss"]
        metrics = {
            "float_accuracy": before["accuracy"], "float_loss": before["loss"],
            "float_perplexity": before["perplexity"],
            "quantized_only_accuracy": quantized_only["accuracy"], "quantized_only_loss": quantized_only["loss"],
            "packed_accuracy": packed["accuracy"], "packed_loss": packed["loss"],
            "packed_perplexity": packed["perplexity"],
            "accuracy": handed["accuracy"], "val_accuracy": handed["accuracy"], "val_loss": handed["loss"],
            "val_perplexity": handed["perplexity"],
            "accuracy_drop": drop, "accuracy_retention": retention(min(packed["accuracy"], handed["accuracy"])),
            "packed_accuracy_retention": retention(packed["accuracy"]),
            "perplexity_degradation": packed["perplexity"] / before["perplexity"] - 1.0,
            "loss_recovery": (quantized_only["loss"] - packed["loss"]) / gap if gap > 0 else 1.0,
            "float_size_bytes": int(float_bytes), "packed_size_bytes": int(packed_bytes),
            "compression_ratio": float_bytes / packed_bytes, "model_size_mb": packed_bytes / 2**20,
            "sparsity_ratio": zero_fraction, **calibration}
        if log is not None:
            metrics["final_train_loss"] = log.smoothed_loss()
        return metrics
