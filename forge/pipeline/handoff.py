"""Handoff rules: what the models leaving phase N must satisfy before phase N+1 may start.

The table follows the seed specification's HANDOFF_RULES (Agent Forge V2 spec section 3.1.4:
cognate->evomerge 3 models in 22.5-27.5M params with {specialization, final_loss, seed};
evomerge->quietstar 1 model with {fitness, merge_technique}; quietstar->bitnet accuracy >= 0.80 with
{coherence_score, validity_rate}; bitnet->curriculum compression >= 7 with {compression_ratio,
accuracy_retention}) and its constants (PHASE7_MIN_EXPERTS_DISCOVERED = 2, levels/cycles >= 1),
scaled to our 0.1-5M parameter models. Thresholds that are settings read the config, so
`--set phases.phase1.min_margin_over_baseline=0.3` tightens the rule too.
Rule 3->4 requires Phase 3's measured thought gain; rules 4->5 onward guard phases that are not
implemented yet and are provisional.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Union

from forge.pipeline.controller import REQUIRED_METADATA, HandoffError, LoadedModel

if TYPE_CHECKING:
    from forge.pipeline.config import PipelineConfig

PARAM_RANGE = (100_000, 5_000_000)   # seed: 22.5M-27.5M (25M +- 10 %); ours: a tiny model
Threshold = Union[float, str]        # a number, or a config path such as "phases.phase1.min_margin_over_baseline"
Count = Union[int, Callable[["PipelineConfig"], int]]


@dataclass(frozen=True)
class MetricBound:
    """A bound on one metric of every handed-off model: low <= value (or < when strict) <= high."""
    name: str
    low: Threshold | None = None
    high: Threshold | None = None
    strict: bool = False


@dataclass(frozen=True)
class HandoffRule:
    source: int
    target: int
    model_count: Count
    required_metadata: tuple[str, ...] = ()
    metrics: tuple[MetricBound, ...] = ()
    param_range: tuple[int, int] = PARAM_RANGE
    notes: str = field(default="", compare=False)


def _phase1_model_count(config: "PipelineConfig") -> int:
    return len(config.phases.phase1.models)


_RULES = (
    HandoffRule(1, 2, _phase1_model_count, ("specialization", "final_loss", "seed"),
                (MetricBound("margin_over_baseline", low="phases.phase1.min_margin_over_baseline"),),
                notes="every configured cognate model, each beating the trivial baseline by the margin"),
    HandoffRule(2, 3, 1, ("fitness", "merge_technique"),
                (MetricBound("fitness_gain", low=0.0, strict=True),),
                notes="one champion whose fitness beats the best input model's"),
    HandoffRule(3, 4, 1, ("thought_gain", "coherence_score", "validity_rate"),
                (MetricBound("thought_gain", low="phases.phase3.min_thought_gain", strict=True),
                 MetricBound("gain_over_input", low="phases.phase3.min_gain_over_input", strict=True),
                 MetricBound("content_gain", low=0.0, strict=True)),
                notes="thoughts must raise held-out accuracy over no thought, and beat another input's thought "
                      "(seed: accuracy >= 0.80 at 25M params on real benchmarks)"),
    HandoffRule(4, 5, 1, ("compression_ratio", "accuracy_retention"),
                (MetricBound("compression_ratio", low="phases.phase4.min_compression"),
                 MetricBound("accuracy_drop", high="phases.phase4.max_accuracy_drop")),
                notes="provisional; seed: compression >= 7 at 25M params"),
    HandoffRule(5, 6, 1, ("levels_completed",), (MetricBound("levels_completed", low=1),), notes="provisional"),
    HandoffRule(6, 7, 1, ("cycles_completed",), (MetricBound("cycles_completed", low=1),), notes="provisional"),
    HandoffRule(7, 8, 1, ("num_experts",), (MetricBound("num_experts", low=2),), notes="provisional"),
)
HANDOFF_RULES: dict[tuple[int, int], HandoffRule] = {(rule.source, rule.target): rule for rule in _RULES}


def resolve(threshold: Threshold, config: "PipelineConfig") -> float:
    """A threshold's number: itself, or the value at its config path."""
    if not isinstance(threshold, str):
        return float(threshold)
    node = config
    for part in threshold.split("."):
        if not hasattr(node, part):
            raise ValueError(f"handoff threshold names {threshold!r}, which is not a config field")
        node = getattr(node, part)
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ValueError(f"handoff threshold {threshold!r} is not a number: {node!r}")
    return float(node)


def expected_count(rule: HandoffRule, config: "PipelineConfig") -> int:
    return rule.model_count(config) if callable(rule.model_count) else rule.model_count


def describe(rule: HandoffRule, config: "PipelineConfig") -> str:
    """One line for dry runs and `forge phases`: the rule with its thresholds resolved."""
    parts = [f"{expected_count(rule, config)} model(s)",
             f"{rule.param_range[0]:,}-{rule.param_range[1]:,} params",
             "metadata {" + ", ".join(REQUIRED_METADATA + rule.required_metadata) + "}"]
    for bound in rule.metrics:
        if bound.low is not None:
            parts.append(f"{bound.name} {'>' if bound.strict else '>='} {resolve(bound.low, config):g}")
        if bound.high is not None:
            parts.append(f"{bound.name} <= {resolve(bound.high, config):g}")
    return f"{rule.source}->{rule.target}: " + ", ".join(parts)


def _check_bound(bound: MetricBound, value, who: str, config: "PipelineConfig") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HandoffError(f"{who}: metric {bound.name} must be a finite number, got {value!r}")
    if bound.low is not None:
        low = resolve(bound.low, config)
        if value < low or (bound.strict and value == low):
            raise HandoffError(f"{who}: {bound.name} = {value:.4g} must be {'>' if bound.strict else '>='} {low:g}")
    if bound.high is not None and value > (high := resolve(bound.high, config)):
        raise HandoffError(f"{who}: {bound.name} = {value:.4g} must be <= {high:g}")


def _check_model(rule: HandoffRule, item: LoadedModel, config: "PipelineConfig") -> dict:
    name = item.record.get("name", item.model_id)
    who = f"handoff {rule.source}->{rule.target}: model {name!r}"
    count = sum(p.numel() for p in item.model.parameters())
    low, high = rule.param_range
    if not low <= count <= high:
        raise HandoffError(f"{who} has {count:,} parameters; allowed {low:,}-{high:,}")
    missing = [k for k in REQUIRED_METADATA + rule.required_metadata if k not in item.metadata]
    if missing:
        raise HandoffError(f"{who} metadata lacks {', '.join(missing)}")
    metrics = item.record.get("metrics") or {}
    for bound in rule.metrics:
        if bound.name not in metrics:
            raise HandoffError(f"{who} has no metric {bound.name}")
        _check_bound(bound, metrics[bound.name], who, config)
    return {"parameters": count, **{b.name: metrics[b.name] for b in rule.metrics}}


def check_handoff(rule: HandoffRule, inputs: list[LoadedModel], config: "PipelineConfig") -> dict:
    """Check every rule on the handed-off models; returns the validation metrics to register.
    Raises HandoffError with the first reason they fail."""
    want = expected_count(rule, config)
    if len(inputs) != want:
        raise HandoffError(f"handoff {rule.source}->{rule.target}: needs {want} model(s), got {len(inputs)}")
    per_model = {item.record.get("name", item.model_id): _check_model(rule, item, config) for item in inputs}
    return {"model_count": len(inputs), "models": per_model}


def validate_table(config: "PipelineConfig") -> list[str]:
    """Check the table against the config (every threshold path resolves); returns the descriptions."""
    for pair in zip(range(1, 8), range(2, 9)):
        if pair not in HANDOFF_RULES:
            raise ValueError(f"no handoff rule for phase {pair[0]} -> {pair[1]}")
    return [describe(rule, config) for rule in HANDOFF_RULES.values()]
