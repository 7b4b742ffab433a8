"""forge.merge: model-merging operators on state dicts and the evolutionary merge search (Phase 2)."""
from forge.merge.evolution import (
    FITNESS_KEYS,
    Candidate,
    EvolutionConfig,
    EvolutionResult,
    GenerationStats,
    evolve,
    score,
)
from forge.merge.operators import (
    OPERATORS,
    SLERP_COLINEAR_THRESHOLD,
    Recipe,
    apply_recipe,
    block_index,
    count_layers,
    dare,
    dfs,
    frankenmerge,
    linear,
    rename_block,
    slerp,
    slerp_many,
    ties,
)

__all__ = [
    "FITNESS_KEYS", "Candidate", "EvolutionConfig", "EvolutionResult", "GenerationStats", "evolve", "score",
    "OPERATORS", "SLERP_COLINEAR_THRESHOLD", "Recipe", "apply_recipe", "block_index", "count_layers",
    "dare", "dfs", "frankenmerge", "linear", "rename_block", "slerp", "slerp_many", "ties",
]
