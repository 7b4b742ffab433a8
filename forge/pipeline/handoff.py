"""Handoff rules: what the models leaving phase N must satisfy before phase N+1 may start.

The table follows the original system's HANDOFF_RULES (Agent Forge V2 spec section 3.1.4:
cognate->evomerge 3 models in 22.5-27.5M params with {specialization, final_loss, seed};
evomerge->quietstar 1 model with {fitness, merge_technique}; quietstar->bitnet accuracy >= 0.80 with
{coherence_score, validity_rate}; bitnet->curriculum compression >= 7 with {compression_ratio,
accuracy_retention}) and its constants (PHASE7_MIN_EXPERTS_DISCOVERED = 2, levels/cycles >= 1),
scaled to our 0.1-5M parameter models. Thresholds that are settings name a field of the source
phase's config section, so `--set phases.phase1.min_margin_over_baseline=0.3` tightens the rule too.

This table is the one home of every phase's pass checks. They are evaluated by one function at two
gates: when a phase ends (`check_phase_end`, from PhaseController.validate_output, so the last phase of
a run fails its own checks too) and when its models are handed on (`check_handoff`, which also guards
models taken from another session with `--only N --source-session`). Rule 8's successor does not exist;
the last phase's own checks are LAST_PHASE_CHECKS.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Union

from forge.phase_table import PHASES
from forge.pipeline.controller import REQUIRED_METADATA, HandoffError, LoadedModel

if TYPE_CHECKING:
    from forge.pipeline.config import PipelineConfig

PARAM_RANGE = (100_000, 5_000_000)   # seed: 22.5M-27.5M (25M +- 10 %); ours: a tiny model
Threshold = Union[float, str]        # a number, or a field of the source phase's config, e.g. "min_margin_over_baseline"
Count = Union[int, Callable[["PipelineConfig"], int]]


@dataclass(frozen=True)
class MetricBound:
    """A bound on one metric: low <= value (or < when strict) <= high. `reason` says what a failure means;
    it is formatted with the metrics and `value`, `limit`. `phase_end_only`: a phase-level metric that the
    handed-off models do not carry. `optional`: checked only where the metric is recorded."""
    name: str
    low: Threshold | None = None
    high: Threshold | None = None
    strict: bool = False
    reason: str = ""
    phase_end_only: bool = False
    optional: bool = False


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


_THOUGHT_NUMBERS = ("accuracy with thoughts {accuracy:.3f}, without {accuracy_no_thoughts:.3f}, empty thought "
                    "{accuracy_empty_thought:.3f}, another input's thought {accuracy_shuffled_thoughts:.3f}")
_RULES = (
    HandoffRule(1, 2, _phase1_model_count, ("specialization", "final_loss", "seed"),
                (MetricBound("margin_over_baseline", low="min_margin_over_baseline",
                             reason="accuracy {val_accuracy:.3f} beats the trivial baseline by less than required"),
                 MetricBound("diversity_min_distance", low=0.05, phase_end_only=True,
                             reason="two models' task vectors are nearly the same: the models are not diverse"),
                 MetricBound("diversity", low=0.0, strict=True, phase_end_only=True,
                             reason="the models agree on every answer: they are not diverse")),
                notes="every configured cognate model, each beating the trivial baseline by the margin"),
    HandoffRule(2, 3, 1, ("fitness", "merge_technique"),
                (MetricBound("fitness_gain", low=0.0, strict=True,
                             reason="the champion's fitness {champion_fitness:.4f} does not beat the best input's "
                                    "{best_input_fitness:.4f}"),),
                notes="one champion whose fitness beats the best input model's"),
    HandoffRule(3, 4, 1, ("thought_gain", "coherence_score", "validity_rate"),
                (MetricBound("thought_gain", low="min_thought_gain", strict=True,
                             reason="thoughts do not help: " + _THOUGHT_NUMBERS),
                 MetricBound("gain_over_input", low="min_gain_over_input", strict=True,
                             reason="the model with thoughts is no better than the model that came in (input "
                                    "accuracy {input_accuracy:.3f}; " + _THOUGHT_NUMBERS + ")"),
                 MetricBound("content_gain", low=0.0, strict=True,
                             reason="thought content does not matter: " + _THOUGHT_NUMBERS),
                 MetricBound("distinct_thoughts", low="min_distinct_thoughts",
                             reason="thoughts barely differ across inputs (over the {thinking_rate:.0%} of inputs "
                                    "with a non-empty thought)")),
                notes="thoughts must raise held-out accuracy over no thought, beat the input model and another "
                      "input's thought (seed: accuracy >= 0.80 at 25M params on real benchmarks)"),
    HandoffRule(4, 5, 1, ("compression_ratio", "accuracy_retention"),
                (MetricBound("compression_ratio", low="min_compression",
                             reason="the compression ratio (fp32 file {float_size_bytes} B / packed "
                                    "{packed_size_bytes} B) is below min_compression"),
                 MetricBound("thought_accuracy_drop", high="max_accuracy_drop", optional=True,
                             reason="accuracy with thoughts dropped {value:.3f} (float {float_thought_accuracy:.3f}, "
                                    "dequantized {thought_accuracy:.3f}) beyond max_accuracy_drop {limit:g}"),
                 MetricBound("accuracy_drop", high="max_accuracy_drop",
                             reason="accuracy drop {value:.3f} (float {float_accuracy:.3f}, packed "
                                    "{packed_accuracy:.3f}, dequantized {accuracy:.3f}) exceeds max_accuracy_drop "
                                    "{limit:g}")),
                notes="seed: compression >= 7 at 25M params"),
    HandoffRule(5, 6, 1, ("levels_completed",),
                (MetricBound("levels_completed", low=1, reason="the curriculum passed no level"),
                 MetricBound("tasks_not_advanced", high="max_tasks_not_advanced", phase_end_only=True,
                             reason="{value:g} task(s) that started below the top level passed no level"),
                 MetricBound("curriculum_gain", low="min_curriculum_gain", strict=True, phase_end_only=True,
                             reason="the curriculum does not beat uniform training on the levels above the start "
                                    "(climbed {curriculum_accuracy_above_start:.3f}, uniform "
                                    "{uniform_accuracy_above_start:.3f})"),
                 MetricBound("start_level_accuracy_drop", high="max_forgetting", phase_end_only=True,
                             reason="accuracy on the levels mastered before fell by {value:.3f}"),
                 MetricBound("self_model_auroc_z", low="min_self_model_z", phase_end_only=True,
                             reason="the self-model's AUROC {self_model_auroc:.3f} (se {self_model_auroc_se:.3f}) is "
                                    "not above 0.5 by min_self_model_z standard errors")),
                notes="seed: PHASE5_MIN_LEVELS_COMPLETED = 1; every task below the top climbs, the climb beats "
                      "uniform training, no forgetting, a self-model better than chance"),
    HandoffRule(6, 7, 1, ("cycles_completed", "tools", "personas", "answer_format"),
                (MetricBound("cycles_completed", low=1, reason="no A/B cycle completed"),
                 MetricBound("tool_lift", low="min_tool_lift", phase_end_only=True,
                             reason="the calculator lifts accuracy beyond the model's ability by only {value:.3f} "
                                    "(with it {tool_accuracy:.3f}, without {no_tool_accuracy:.3f})"),
                 MetricBound("base_accuracy_drop", high="max_base_accuracy_drop", phase_end_only=True,
                             reason="accuracy on the incoming tasks fell by {value:.3f} (incoming "
                                    "{input_accuracy:.3f}, handed on {accuracy:.3f})"),
                 MetricBound("min_persona_kl_reduction", low="min_kl_reduction", phase_end_only=True,
                             reason="a baked persona's KL fell by only {value:.0%}"),
                 MetricBound("max_persona_adherence_gap", high="max_adherence_gap", phase_end_only=True,
                             reason="a baked persona is followed without its prompt {value:.3f} less often than "
                                    "with it")),
                notes="seed: at least one cycle completed; the calculator lifts accuracy beyond the model's own, "
                      "no loss on the incoming tasks, every persona baked (KL -80%, adherence as prompted)"),
    HandoffRule(7, 8, 1, ("num_experts", "experts", "router"),
                (MetricBound("num_experts", low=2,
                             reason="discovery found too few clusters of errors to train experts on"),
                 MetricBound("min_expert_gain", low="min_expert_gain", strict=True, phase_end_only=True,
                             reason="an expert does not beat the base model on its own cluster's held-out questions"),
                 MetricBound("routing_gain", low="min_routing_gain", strict=True, phase_end_only=True,
                             reason="the routed model ({routed_accuracy:.3f}) does not beat the base model "
                                    "({base_accuracy:.3f}) on the whole held-out set"),
                 MetricBound("routing_over_random", low="min_gain_over_random", strict=True, phase_end_only=True,
                             reason="routing ({routed_accuracy:.3f}) does not beat a random expert choice "
                                    "({random_expert_accuracy:.3f})")),
                notes="seed: PHASE7_MIN_EXPERTS_DISCOVERED = 2; every expert beats the base on its cluster, the "
                      "routed model beats the base and a random expert choice on the held-out set"),
)
HANDOFF_RULES: dict[tuple[int, int], HandoffRule] = {(rule.source, rule.target): rule for rule in _RULES}
# The last phase hands nothing on; its own checks, evaluated as it ends (thresholds: fields of phases.phase8)
LAST_PHASE_CHECKS: tuple[MetricBound, ...] = (
    MetricBound("stages_kept", low=1, reason="every compression stage was rolled back: no compressed model"),
    MetricBound("final_retention", low="min_final_retention",
                reason="the final model keeps too little of the incoming model's accuracy {input_accuracy:.3f}"),
    MetricBound("size_vs_ternary", high="max_size_vs_ternary", optional=True,
                reason="the final file ({final_bytes} B) is not smaller than Phase 4's packed ternary file "
                       "({ternary_size_bytes} B)"),
)


def resolve(threshold: Threshold, section) -> float:
    """A threshold's number: itself, or the value of that field of the source phase's config `section`."""
    if not isinstance(threshold, str):
        return float(threshold)
    if not hasattr(section, threshold):
        raise ValueError(f"handoff threshold names {threshold!r}, which is not a field of {type(section).__name__}")
    value = getattr(section, threshold)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"handoff threshold {threshold!r} is not a number: {value!r}")
    return float(value)


def expected_count(rule: HandoffRule, config: "PipelineConfig") -> int:
    return rule.model_count(config) if callable(rule.model_count) else rule.model_count


def describe(rule: HandoffRule, config: "PipelineConfig") -> str:
    """One line for dry runs and `forge phases`: the rule with its thresholds resolved."""
    section = config.phase(rule.source)
    parts = [f"{expected_count(rule, config)} model(s)",
             f"{rule.param_range[0]:,}-{rule.param_range[1]:,} params",
             "metadata {" + ", ".join(REQUIRED_METADATA + rule.required_metadata) + "}"]
    for bound in rule.metrics:
        when = " (at phase end)" if bound.phase_end_only else " (where recorded)" if bound.optional else ""
        if bound.low is not None:
            parts.append(f"{bound.name} {'>' if bound.strict else '>='} {resolve(bound.low, section):g}{when}")
        if bound.high is not None:
            parts.append(f"{bound.name} <= {resolve(bound.high, section):g}{when}")
    return f"{rule.source}->{rule.target}: " + ", ".join(parts)


def _failure(bound: MetricBound, metrics: dict, value: float, limit: float, relation: str) -> str:
    """`name = value must be <relation> limit`, then the bound's reason with the metrics filled in (the bare
    reason text where a metric it names is not recorded here)."""
    text = f"{bound.name} = {value:.4g} must be {relation} {limit:g}"
    if not bound.reason:
        return text
    try:
        reason = bound.reason.format(**{**metrics, "value": value, "limit": limit})
    except (KeyError, ValueError, IndexError):
        reason = re.sub(r" *\{[^}]*\}", "", bound.reason)
    return f"{text}: {reason}"


def check_bounds(bounds, metrics: dict, who: str, section, *, at_phase_end: bool) -> None:
    """Every bound on `metrics` (a phase's or a model's), thresholds read from the source phase's config
    `section`. Raises HandoffError naming `who`, the metric, the limit and what the failure means."""
    for bound in bounds:
        if bound.phase_end_only and not at_phase_end:
            continue
        if bound.name not in metrics:
            if bound.optional:
                continue
            raise HandoffError(f"{who} has no metric {bound.name}")
        value = metrics[bound.name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HandoffError(f"{who}: metric {bound.name} must be a finite number, got {value!r}")
        if bound.low is not None:
            low = resolve(bound.low, section)
            if value < low or (bound.strict and value == low):
                relation = ">" if bound.strict else ">="
                raise HandoffError(f"{who}: {_failure(bound, metrics, value, low, relation)}")
        if bound.high is not None and value > (high := resolve(bound.high, section)):
            raise HandoffError(f"{who}: {_failure(bound, metrics, value, high, '<=')}")


def outgoing_rule(phase: int) -> HandoffRule | None:
    """The rule the models leaving `phase` must pass (None for the last phase)."""
    return HANDOFF_RULES.get((phase, phase + 1))


def phase_end_bounds(phase: int) -> tuple[MetricBound, ...]:
    """The bounds a phase is held to as it ends: its outgoing rule's, or LAST_PHASE_CHECKS for the last phase."""
    rule = outgoing_rule(phase)
    if rule is not None:
        return rule.metrics
    return LAST_PHASE_CHECKS if phase == max(PHASES) else ()


def check_phase_end(phase: int, result, section) -> None:
    """The outgoing rule's metric bounds on a phase's result, as the phase ends: on each model's metrics
    over the phase's (or on the phase's alone when it made no model). `section`: the phase's config."""
    bounds = phase_end_bounds(phase)
    scopes = [(f"phase {phase}: model {output.name!r}", {**result.metrics, **output.metrics})
              for output in result.models] or [(f"phase {phase}", result.metrics)]
    for who, metrics in scopes:
        check_bounds(bounds, metrics, who, section, at_phase_end=True)


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
    check_bounds(rule.metrics, metrics, who, config.phase(rule.source), at_phase_end=False)
    return {"parameters": count, **{b.name: metrics[b.name] for b in rule.metrics if b.name in metrics}}


def check_handoff(rule: HandoffRule, inputs: list[LoadedModel], config: "PipelineConfig") -> dict:
    """Check every rule on the handed-off models; returns the validation metrics to register.
    Raises HandoffError with the first reason they fail."""
    want = expected_count(rule, config)
    if len(inputs) != want:
        raise HandoffError(f"handoff {rule.source}->{rule.target}: needs {want} model(s), got {len(inputs)}")
    per_model = {item.record.get("name", item.model_id): _check_model(rule, item, config) for item in inputs}
    return {"model_count": len(inputs), "models": per_model}


def validate_table(config: "PipelineConfig") -> list[str]:
    """Check the table against the config (a rule between every two consecutive phases, every threshold
    a field of its phase's section); returns the descriptions."""
    phases = sorted(PHASES)
    for pair in zip(phases, phases[1:]):
        if pair not in HANDOFF_RULES:
            raise ValueError(f"no handoff rule for phase {pair[0]} -> {pair[1]}")
    return [describe(rule, config) for rule in HANDOFF_RULES.values()]
