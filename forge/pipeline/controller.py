"""What a phase is to the orchestrator: a PhaseController that turns the models handed to it into
new models (ModelOutput) inside a PhaseResult.

The orchestrator owns everything around `execute`: loading and hash-checking the inputs, the
handoff rules, saving and registering the outputs, tracking and resume. A phase only trains.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:   # torch loads only where a phase runs: `forge status` and friends stay fast
    import torch
    from torch import nn
    from pydantic import BaseModel

    from forge.pipeline.config import PipelineConfig

REQUIRED_METADATA = ("model_config", "tokenizer")   # every model carries its shape and vocabulary


class PipelineError(RuntimeError):
    """The run cannot go on (bad request, missing inputs, a failed phase); the message says why."""


class HandoffError(ValueError):
    """Models do not meet the rules for passing from one phase to the next; says which rule failed."""


@dataclass
class ModelOutput:
    """One model a phase produced. metadata holds "model_config" (TransformerConfig.to_dict()) and
    "tokenizer" (CharTokenizer.to_dict()) so the model can be rebuilt and used anywhere later."""
    name: str
    model: nn.Module
    metadata: dict
    metrics: dict
    tags: tuple = ()
    derived_from: str | None = None   # an earlier model of the same phase it was made from (its registry parent)


@dataclass
class PhaseResult:
    success: bool
    models: list[ModelOutput]
    metrics: dict
    error: str | None = None
    duration_s: float = 0.0


@dataclass
class LoadedModel:
    """A registered model loaded back from its checkpoint (hash verified): the module, its registry
    record (id, path, sha256, metrics, ...) and its metadata."""
    model: nn.Module
    record: dict
    metadata: dict

    @property
    def model_id(self) -> str:
        return self.record["id"]

    def on(self, device) -> "LoadedModel":
        """This model moved to `device` (in place), returned: the orchestrator hands phases their inputs there."""
        self.model.to(device)
        return self


@dataclass
class PhaseContext:
    session_id: str
    phase: int
    config: "PipelineConfig"
    phase_config: "BaseModel"
    run_dir: Path                     # the session folder
    phase_dir: Path                   # this phase's folder inside it
    registry: Any                     # forge.registry.ModelRegistry
    tracker: Any                      # forge.tracking.Tracker
    inputs: list[LoadedModel]         # the models the previous phase handed off
    progress: Callable[[float, str], None]   # fraction 0..1, message
    seed: int
    device: "torch.device"
    extras: dict = field(default_factory=dict)


class PhaseController(ABC):
    """A pipeline phase. Subclasses set `phase` and `name` and implement `execute`."""
    phase: int = 0
    name: str = ""

    def validate_input(self, ctx: PhaseContext) -> None:
        """Raise HandoffError when ctx.inputs cannot feed this phase. The handoff table already
        checked counts, sizes and metadata; override for phase-specific rules."""

    @abstractmethod
    def execute(self, ctx: PhaseContext) -> PhaseResult:
        """Run the phase on ctx.inputs and return the models it made."""

    def validate_output(self, result: PhaseResult, ctx: PhaseContext) -> None:
        """Check the result is usable (a success with at least one model, each with the metadata needed to
        rebuild it and finite metrics), then the phase's pass checks: the metric bounds of its outgoing
        handoff rule (forge.pipeline.handoff, their one home). Raises HandoffError naming the problem."""
        from forge.pipeline.handoff import check_phase_end

        if isinstance(result, PhaseResult) and result.success:
            check_phase_end(self.phase, result, ctx.phase_config)
        check_result(result, self.phase, self.name)


def require_one_input(ctx: PhaseContext, what: str, keys=("model_config", "tokenizer", "task_weights")) -> LoadedModel:
    """The single input model of a one-model phase, with the metadata `keys`; HandoffError otherwise."""
    if len(ctx.inputs) != 1:
        raise HandoffError(f"phase {ctx.phase} {what} exactly one model; got {len(ctx.inputs)}")
    item = ctx.inputs[0]
    missing = [key for key in keys if key not in item.metadata]
    if missing:
        raise HandoffError(f"input model {item.record.get('name')!r} lacks metadata {', '.join(missing)}")
    return item


def check_result(result: PhaseResult, phase: int, name: str) -> None:
    """The checks every phase result must pass (shared by PhaseController.validate_output)."""
    where = f"phase {phase} ({name})"
    if not isinstance(result, PhaseResult):
        raise HandoffError(f"{where}: execute must return a PhaseResult, got {type(result).__name__}")
    if not result.success:
        raise HandoffError(f"{where} reported failure: {result.error or 'no reason given'}")
    if not result.models:
        raise HandoffError(f"{where} produced no models")
    names = [m.name for m in result.models]
    if len(set(names)) != len(names):
        raise HandoffError(f"{where}: model names must be unique, got {names}")
    from torch import nn

    for output in result.models:
        if not isinstance(output.model, nn.Module):
            raise HandoffError(f"{where}: model {output.name!r} is a {type(output.model).__name__}, "
                               "not a torch.nn.Module")
        missing = [k for k in REQUIRED_METADATA if k not in output.metadata]
        if missing:
            raise HandoffError(f"{where}: model {output.name!r} metadata lacks {', '.join(missing)}")
        check_finite_metrics(f"{where}: model {output.name!r} metrics", output.metrics)
    check_finite_metrics(f"{where}: phase metrics", result.metrics)


def check_finite_metrics(what: str, metrics: dict) -> None:
    """Metrics are a flat-or-nested dict of numbers; NaN or inf means the phase went wrong."""
    if not isinstance(metrics, dict):
        raise HandoffError(f"{what} must be a dict, got {type(metrics).__name__}")
    for key, value in metrics.items():
        if isinstance(value, dict):
            check_finite_metrics(f"{what}[{key!r}]", value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isfinite(value):
            raise HandoffError(f"{what}: {key} is {value}")
