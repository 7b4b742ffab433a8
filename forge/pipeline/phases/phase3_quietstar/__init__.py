"""Phase 3, Quiet-STaR: thought tokens, a warm-up on worked thoughts, a baked reasoning prompt and
REINFORCE (recipe.py). thoughts.py holds the thought format (token ids, rows, sampling, ablations) that
Phase 4 reuses for a thinking model; thought_warmup.py and rl_thoughts.py are the two training stages."""
from forge.pipeline.phases.phase3_quietstar.recipe import QuietStarPhase, check_thought_gain

__all__ = ["QuietStarPhase", "check_thought_gain"]
