"""forge.data: built-in procedural tasks, the character tokenizer, batching and evaluation."""
from forge.data.batching import IGNORE_INDEX, Batch, PackedBatch, encode_batch, pack_batch, pack_rows, per_segment_all
from forge.data.evaluate import evaluate, exact_matches, greedy_answers, trivial_baseline
from forge.data.levels import NUM_LEVELS, level_examples, level_task
from forge.data.modular import modular_arithmetic_split
from forge.data.sampling import SampledAnswer, sample_answers
from forge.data.tasks import SPLITS, TASKS, Example, Task, make_examples, rationale, split_of
from forge.data.tokenizer import DEFAULT_CHARS, CharTokenizer

__all__ = [
    "modular_arithmetic_split",
    "NUM_LEVELS", "level_examples", "level_task", "SampledAnswer", "sample_answers",
    "CharTokenizer", "DEFAULT_CHARS",
    "Example", "Task", "TASKS", "SPLITS", "make_examples", "rationale", "split_of",
    "Batch", "encode_batch", "IGNORE_INDEX", "PackedBatch", "pack_batch", "pack_rows", "per_segment_all",
    "evaluate", "exact_matches", "greedy_answers", "trivial_baseline",
]
