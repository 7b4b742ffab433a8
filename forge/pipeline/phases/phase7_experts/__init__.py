"""Phase 7, Self-guided experts: discovery.py clusters the incoming model's errors, training.py trains an SVF expert
per cluster (forge.nn.svf) by REINFORCE or cross-entropy, dispatch.py routes, mixes (CEM) and searches mixtures
(NSGA-II), recipe.py is the phase."""
from forge.pipeline.phases.phase7_experts.recipe import ExpertsPhase

__all__ = ["ExpertsPhase"]
