"""Phase 5, Curriculum: levels, assessment, the climb with mastery, hints and dreams, the uniform control, the
self-model and the eudaimonia bake (recipe.py); curriculum.py holds the tables and question pools, climb.py the
two trainers, dreams.py and self_model.py their stages."""
from forge.pipeline.phases.phase5_curriculum.recipe import CurriculumPhase

__all__ = ["CurriculumPhase"]
