"""forge.pipeline: the Agent Forge phases, their config, handoff rules and the orchestrator.

Importing this package loads no registry or training code; `forge.pipeline.orchestrator.Pipeline`
does (it needs forge.registry for checkpoints).
"""
from forge.pipeline.config import ConfigError, PipelineConfig, load_config
from forge.pipeline.controller import (HandoffError, LoadedModel, ModelOutput, PhaseContext, PhaseController,
                                       PhaseResult, PipelineError)
from forge.pipeline.phases import PHASES

__all__ = ["PHASES", "ConfigError", "HandoffError", "LoadedModel", "ModelOutput", "PhaseContext",
           "PhaseController", "PhaseResult", "PipelineConfig", "PipelineError", "load_config"]
