"""The metric catalogue (one place for every phase's metric names and directions) and a tracker
that flags metrics getting worse from one phase to the next.

The original system's continuity tracker flagged any drop of more than 10 % as a degradation, which is the
wrong way round for perplexity, size and latency; here every metric carries its direction.
"""
from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Mapping, NamedTuple

from forge.phase_table import check_phase_number

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class MetricSpec:
    name: str
    higher_is_better: bool
    description: str


def _specs(*rows: tuple[str, bool, str]) -> dict[str, MetricSpec]:
    return {name: MetricSpec(name, higher, text) for name, higher, text in rows}


_HIGHER, _LOWER = True, False
# shared by several phases, so continuity can compare them across the pipeline
_QUALITY = (
    ("val_loss", _LOWER, "mean answer-token cross-entropy on held-out data"),
    ("val_accuracy", _HIGHER, "exact-match accuracy of greedy answers on held-out data"),
    ("val_perplexity", _LOWER, "exp(val_loss)"),
    ("per_task_accuracy/*", _HIGHER, "held-out accuracy on one task (per_task_accuracy/<task>)"),
)
_SIZE = (
    ("model_size_mb", _LOWER, "size of the saved model file in MiB"),
    ("latency_ms", _LOWER, "time to answer one batch of evaluation prompts, milliseconds"),
)

METRIC_CATALOGUE: dict[int, dict[str, MetricSpec]] = {
    1: _specs(*_QUALITY, ("train_loss", _LOWER, "training loss (answer tokens) at the logged step"),
              ("baseline_accuracy", _HIGHER, "accuracy of the trivial baseline on the same data"),
              ("margin_over_baseline", _HIGHER, "val_accuracy minus baseline_accuracy"),
              ("diversity", _HIGHER, "mean pairwise disagreement between the three models"),
              ("grad_norm", _LOWER, "global gradient norm (spikes show instability)"),
              ("final_train_loss", _LOWER, "training loss averaged over the last 20 steps"),
              ("loss_reduction", _HIGHER, "1 - final training loss / first training loss"),
              ("diversity_min_distance", _HIGHER, "smallest relative distance between two models' task vectors"),
              ("best_val_accuracy", _HIGHER, "val_accuracy of the best of the three models"),
              ("trunk_val_accuracy", _HIGHER, "val_accuracy of the shared trunk the three branch from")),
    2: _specs(*_QUALITY, *_SIZE, ("fitness", _HIGHER, "weighted fitness of a merged candidate"),
              ("best_fitness", _HIGHER, "best fitness in the generation"),
              ("mean_fitness", _HIGHER, "mean fitness of the generation"),
              ("champion_fitness", _HIGHER, "fitness of the final champion"),
              ("fitness_gain", _HIGHER, "champion fitness minus the best input model's"),
              ("fitness_gain_relative", _HIGHER, "fitness_gain / the best input model's fitness"),
              ("best_input_fitness", _HIGHER, "fitness of the best Phase 1 model"),
              ("champion_val_accuracy", _HIGHER, "champion's accuracy on the validation split (selection)"),
              ("best_input_val_accuracy", _HIGHER, "best input model's accuracy on the validation split"),
              ("champion_test_accuracy", _HIGHER, "champion's accuracy on the test split (never selected on)"),
              ("best_input_test_accuracy", _HIGHER, "best input model's accuracy on the test split"),
              ("evaluations", _LOWER, "fitness evaluations the search made"),
              ("generations", _HIGHER, "generations after generation 0"),
              ("diversity", _HIGHER, "population diversity (mean pairwise parameter distance)"),
              ("tokens_per_second", _HIGHER, "evaluation throughput"),
              ("memory_mb", _LOWER, "peak memory of an evaluation, MiB")),
    3: _specs(*_QUALITY, ("train_loss", _LOWER, "training loss of the thought-augmented model"),
              ("thought_validity", _HIGHER, "fraction of generated thoughts that are well formed"),
              ("accuracy_gain", _HIGHER, "accuracy with thoughts minus accuracy without"),
              ("kl_divergence", _LOWER, "KL between the baked model and the student"),
              ("reward", _HIGHER, "mean RL reward"),
              ("accuracy_no_thoughts", _HIGHER, "held-out accuracy without a thought block"),
              ("accuracy_empty_thought", _HIGHER, "held-out accuracy with an empty <think></think>"),
              ("accuracy_shuffled_thoughts", _HIGHER, "held-out accuracy with another input's thought"),
              ("thought_gain", _HIGHER, "accuracy with thoughts minus the best no-thought accuracy"),
              ("content_gain", _HIGHER, "accuracy with own thoughts minus with another input's"),
              ("distinct_thoughts", _HIGHER, "distinct non-empty held-out thoughts / non-empty thoughts"),
              ("thinking_rate", _HIGHER, "fraction of held-out inputs given a non-empty thought"),
              ("rationale_match", _HIGHER, "thoughts equal to the task's rationale, where it has one"),
              ("gain_over_input", _HIGHER, "accuracy with thoughts minus the input model's accuracy"),
              ("validity_rate", _HIGHER, "fraction of thoughts closed by </think>"),
              ("coherence_score", _HIGHER, "fraction of thoughts that raise the answer's log-probability"),
              ("mean_reward", _HIGHER, "held-out mean of log p(answer | thought) - log p(answer)"),
              ("answer_in_thought", _LOWER, "fraction of thoughts that contain the answer text"),
              ("kl_to_baked", _LOWER, "KL(baked || model) on held-out thought sequences"),
              ("input_accuracy", _HIGHER, "Phase 2 champion's held-out accuracy"),
              ("baked_accuracy", _HIGHER, "accuracy with thoughts after the warm-up and the bake (before RL)"),
              ("baked_thought_gain", _HIGHER, "thought_gain of the baked model before RL"),
              ("baked_rationale_match", _HIGHER, "rationale_match of the baked model before RL"),
              ("bake_kl_before", _LOWER, "held-out KL of the bake before training"),
              ("bake_kl_after", _LOWER, "held-out KL of the bake after training"),
              ("train_reward_first", _HIGHER, "mean reward of the first tenth of RL steps"),
              ("train_reward_last", _HIGHER, "mean reward of the last tenth of RL steps"),
              ("warmup_loss_first", _LOWER, "mean warm-up loss of its first tenth of steps"),
              ("warmup_loss_last", _LOWER, "mean warm-up loss of its last tenth of steps"),
              ("warmup/loss", _LOWER, "warm-up step loss"),
              ("per_task_accuracy_no_thoughts/*", _HIGHER, "held-out accuracy on one task without a thought"),
              *[(f"rl/{k}", h, f"RL step {k}") for k, h in (("loss", _LOWER), ("policy_loss", _LOWER),
                ("answer_nll_thought", _LOWER), ("answer_nll_plain", _LOWER), ("kl", _LOWER),
                ("reward", _HIGHER), ("closed", _HIGHER))]),
    4: _specs(*_QUALITY, *_SIZE, ("compression_ratio", _HIGHER, "original size / compressed size"),
              ("accuracy_retention", _HIGHER, "accuracy after / accuracy before quantization"),
              ("perplexity_degradation", _LOWER, "perplexity after / before, minus 1"),
              ("sparsity_ratio", _HIGHER, "fraction of ternary weights that are zero"),
              ("float_accuracy", _HIGHER, "test accuracy of the float input model"),
              ("float_thought_accuracy", _HIGHER, "test accuracy of the float input model with its own thoughts"),
              ("thought_accuracy", _HIGHER, "test accuracy of the dequantized model with its own thoughts"),
              ("thought_accuracy_drop", _LOWER, "float_thought_accuracy minus thought_accuracy"),
              ("float_loss", _LOWER, "test answer loss of the float input model"),
              ("float_perplexity", _LOWER, "test perplexity of the float input model"),
              ("quantized_only_accuracy", _HIGHER, "test accuracy of the ternary model before STE fine-tuning"),
              ("quantized_only_loss", _LOWER, "test loss of the ternary model before STE fine-tuning"),
              ("packed_accuracy", _HIGHER, "test accuracy of the frozen packed ternary model (int8 activations)"),
              ("packed_loss", _LOWER, "test loss of the frozen packed ternary model"),
              ("packed_perplexity", _LOWER, "test perplexity of the frozen packed ternary model"),
              ("accuracy", _HIGHER, "test accuracy of the dequantized float model handed on"),
              ("accuracy_drop", _LOWER, "float accuracy minus the lower of packed and dequantized accuracy"),
              ("packed_accuracy_retention", _HIGHER, "packed accuracy / float accuracy"),
              ("loss_recovery", _HIGHER, "share of the quantization loss increase that STE fine-tuning removed"),
              ("float_size_bytes", _LOWER, "bytes of the input's fp32 checkpoint file"),
              ("packed_size_bytes", _LOWER, "bytes of the packed ternary checkpoint file"),
              ("final_train_loss", _LOWER, "STE fine-tuning loss averaged over the last 20 steps"),
              ("calibration_activation_error", _LOWER, "mean relative error of int8 activations"),
              ("calibration_weight_error", _LOWER, "mean relative error of ternary weights"),
              ("calibration_output_error", _LOWER, "mean relative error of BitLinear outputs vs float"),
              ("calibration_max_output_error", _LOWER, "largest per-layer relative output error")),
    5: _specs(*_QUALITY, ("train_loss", _LOWER, "curriculum training loss"),
              ("final_train_loss", _LOWER, "climb training loss averaged over the last 20 steps"),
              ("accuracy", _HIGHER, "test accuracy of the handed-on model on the tasks' default questions"),
              ("input_accuracy", _HIGHER, "the same for the incoming model"),
              ("baked_accuracy", _HIGHER, "the same after the eudaimonia bake, before the climb"),
              ("level_table_accuracy", _HIGHER, "held-out accuracy of the handed-on model over every task and level"),
              ("levels_completed", _HIGHER, "curriculum levels passed, all tasks together"),
              ("tasks_not_advanced", _LOWER, "tasks that started below the top level and passed none"),
              ("level_accuracy", _HIGHER, "accuracy on the current level"),
              ("level/*", _HIGHER, "the level a task is climbing (level/<task>), at each held-out check"),
              ("level_accuracy/*", _HIGHER, "validation accuracy of a task on its current level at a check"),
              ("start_level/*", _HIGHER, "hardest level a task answered at target_accuracy before the phase"),
              ("final_level/*", _HIGHER, "highest level a task had passed (or started at) at the end"),
              ("per_level_accuracy/*", _HIGHER, "held-out accuracy of the handed-on model on one task's level "
                                                "(per_level_accuracy/<task>/<level>)"),
              ("level_accuracy_before/*", _HIGHER, "held-out accuracy of the incoming model per task and level"),
              ("baked_level_accuracy/*", _HIGHER, "the same after the eudaimonia bake (where the climb starts)"),
              ("climbed_level_accuracy/*", _HIGHER, "held-out accuracy after the climb, per task and level"),
              ("uniform_level_accuracy/*", _HIGHER, "held-out accuracy after uniform training, per task and level"),
              ("curriculum_accuracy_above_start", _HIGHER, "climbed accuracy on the levels above each start"),
              ("uniform_accuracy_above_start", _HIGHER, "uniform-control accuracy on the levels above each start"),
              ("start_accuracy_above_start", _HIGHER, "incoming accuracy on the levels above each start"),
              ("curriculum_gain", _HIGHER, "climbed minus uniform accuracy on the levels above each start"),
              ("start_level_accuracy_drop", _LOWER, "accuracy lost on the levels mastered before (handed-on model)"),
              ("climbed_forgetting", _LOWER, "accuracy lost on the mastered levels right after the climb"),
              ("uniform_forgetting", _LOWER, "accuracy lost on the mastered levels by uniform training"),
              ("optimizer_steps", _HIGHER, "optimizer steps of the climb (dreams included) and of the control"),
              ("questions_retired", _HIGHER, "training questions retired as mastered"),
              ("dreams_generated", _HIGHER, "prompts the model dreamt answers to"),
              ("dreams_kept", _HIGHER, "dreams kept for their confidence"),
              ("dreams_kept_correct", _HIGHER, "fraction of kept dreams whose answer is actually right"),
              ("self_model_auroc", _HIGHER, "AUROC of the <right>/<wrong> verdict against correctness, held out"),
              ("self_model_auroc_se", _LOWER, "Hanley-McNeil standard error of that AUROC"),
              ("self_model_auroc_z", _HIGHER, "(AUROC - 0.5) / standard error"),
              ("self_model_calibration_error", _LOWER, "expected calibration error of the verdict (10 bins)"),
              ("self_model_train_right_fraction", _HIGHER, "share of right own answers in the verdict training data"),
              ("self_model_questions", _HIGHER, "held-out questions the verdict was judged on"),
              ("self_model_final_loss", _LOWER, "verdict + answer loss over the last 10 self-model steps"),
              ("bake_kl_before", _LOWER, "held-out KL(prompted teacher || model) before the eudaimonia bake"),
              ("bake_kl_after", _LOWER, "the same KL after the bake")),
    6: _specs(*_QUALITY, ("accuracy", _HIGHER, "accuracy on the incoming tasks' questions, calculator on"),
              ("input_accuracy", _HIGHER, "the same for the incoming model (no tool)"),
              ("base_accuracy_drop", _LOWER, "input_accuracy - accuracy"),
              ("tool_accuracy", _HIGHER, "accuracy with the calculator on the beyond-ability test set"),
              ("no_tool_accuracy", _HIGHER, "the same model on that set without the calculator"),
              ("incoming_accuracy_beyond", _HIGHER, "the incoming model on that set"),
              ("tool_lift", _HIGHER, "tool_accuracy - no_tool_accuracy"),
              ("tool_accuracy/*", _HIGHER, "tool accuracy per task on the beyond-ability set"),
              ("no_tool_accuracy/*", _HIGHER, "no-tool accuracy per task on the beyond-ability set"),
              ("tool_level_accuracy/*", _HIGHER, "tool accuracy per task and level (tool_level_accuracy/<task>/<level>)"),
              ("no_tool_level_accuracy/*", _HIGHER, "no-tool accuracy per task and level"),
              ("call_rate", _HIGHER, "share of beyond-ability answers that call the calculator"),
              ("call_rate/*", _HIGHER, "the same per task"),
              ("base_call_rate/*", _LOWER, "share of answers to the incoming tasks that call the calculator"),
              ("call_error_rate", _LOWER, "share of calls the calculator refused"),
              ("calls_kept", _HIGHER, "training questions with a call kept by the Toolformer filter (last cycle)"),
              ("calls_considered", _HIGHER, "candidate calls the filter scored (last cycle)"),
              ("cycles_completed", _HIGHER, "A/B cycles run"),
              ("tool_score", _HIGHER, "held-out tool accuracy after each cycle (val split)"),
              ("cycle_A/*", _HIGHER, "an A-cycle's metric"), ("cycle_B/*", _HIGHER, "a B-cycle's metric"),
              ("min_persona_kl_reduction", _HIGHER, "the smallest KL reduction of a baked persona"),
              ("max_persona_adherence_gap", _LOWER, "the largest prompted - handed-on adherence of a baked persona"),
              ("persona_kl_before/*", _LOWER, "KL(prompted || unprompted) before baking, per persona"),
              ("persona_kl_after/*", _LOWER, "the same after baking"),
              ("persona_kl_reduction/*", _HIGHER, "1 - KL after / KL before"),
              ("persona_adherence/*", _HIGHER, "behaviour shown without the prompt, baked model"),
              ("persona_half_baked_adherence/*", _HIGHER, "the same at half-baking strength 0.5"),
              ("persona_prompted_adherence/*", _HIGHER, "behaviour shown with the prompt (the teacher)"),
              ("persona_prompted_adherence_before/*", _HIGHER, "the same before any teaching"),
              ("persona_adherence_before/*", _LOWER, "behaviour shown without the prompt before the cycle"),
              ("persona_adherence_taught/*", _LOWER, "the same after teaching, before baking"),
              ("persona_adherence_gap/*", _LOWER, "prompted - unprompted adherence after baking"),
              ("persona_final_adherence/*", _HIGHER, "behaviour shown without the prompt by the model handed on"),
              ("persona_final_adherence_gap/*", _LOWER, "prompted adherence - the handed-on model's"),
              ("persona_taught/*", _HIGHER, "1 when prompt-following was taught first"),
              ("persona_accuracy_before/*", _HIGHER, "accuracy on the persona questions before the cycle"),
              ("persona_accuracy_after/*", _HIGHER, "the same after it")),
    7: _specs(*_QUALITY, *_SIZE, ("num_experts", _HIGHER, "experts discovered (clusters of the model's errors)"),
              ("expert_accuracy/*", _HIGHER, "an expert's held-out accuracy on its own cluster (calculator on)"),
              ("expert_base_accuracy/*", _HIGHER, "the base model's held-out accuracy on that cluster"),
              ("expert_gain/*", _HIGHER, "expert minus base accuracy on the expert's cluster"),
              ("min_expert_gain", _HIGHER, "the smallest expert_gain"),
              ("cluster_size/*", _HIGHER, "discovery questions in a cluster"),
              ("cluster_error_rate/*", _HIGHER, "the base model's error rate on a cluster's discovery questions"),
              ("reinforce_accuracy/*", _HIGHER, "held-out cluster accuracy of the REINFORCE-trained expert"),
              ("cross_entropy_accuracy/*", _HIGHER, "the same for the cross-entropy-trained expert"),
              ("mean_reinforce_accuracy", _HIGHER, "mean over clusters of reinforce_accuracy"),
              ("mean_cross_entropy_accuracy", _HIGHER, "mean over clusters of cross_entropy_accuracy"),
              ("svf/*/loss/*", _LOWER, "an expert's training loss per step (svf/<method>/loss/<cluster>)"),
              ("svf/*/reward/*", _HIGHER, "mean REINFORCE reward per step, +1 right / -1 wrong"),
              ("accuracy", _HIGHER, "the prompt-routed experts on the whole held-out set (= routed_accuracy)"),
              ("base_accuracy", _HIGHER, "the base model on the whole held-out set (every task and level)"),
              ("routed_accuracy", _HIGHER, "the prompt-routed experts on the whole held-out set"),
              ("random_expert_accuracy", _HIGHER, "a random expert per question on the whole held-out set"),
              ("routing_gain", _HIGHER, "routed_accuracy - base_accuracy"),
              ("routing_over_random", _HIGHER, "routed_accuracy - random_expert_accuracy"),
              ("routing_accuracy", _HIGHER, "fraction of held-out questions routed to their cluster's expert"),
              ("held_out_questions", _HIGHER, "questions of the held-out (test) set"),
              ("few_shot_task_index", _HIGHER, "CEM's target task, its index in the sorted task list"),
              ("cem_accuracy", _HIGHER, "the CEM mixture on the target task's held-out questions"),
              ("best_single_expert_accuracy", _HIGHER, "the best single expert (on the few shots) there"),
              ("cem_gain_over_best_single", _HIGHER, "cem_accuracy - best_single_expert_accuracy"),
              ("few_shot_base_accuracy", _HIGHER, "the base model on the target task's held-out questions"),
              ("cem_alpha/*", _HIGHER, "CEM's mixing weight of expert <i>"),
              ("adas_front_size", _HIGHER, "points on NSGA-II's Pareto front"),
              ("adas_evaluations", _HIGHER, "mixtures NSGA-II evaluated"),
              ("adas_best_val_accuracy", _HIGHER, "validation accuracy of the front's most accurate mixture"),
              ("adas_base_val_accuracy", _HIGHER, "the base model on the same validation questions"),
              ("adas_best_parameters", _LOWER, "expert z values that mixture uses"),
              ("mixture_folded", _HIGHER, "1 when that mixture beat the base and was folded into the model"),
              ("params_per_expert", _LOWER, "z values of one expert (Σ adapted singular values)"),
              ("lora_r8_params", _LOWER, "parameters of a rank-8 LoRA on the same matrices"),
              ("solved_cells", _HIGHER, "task-level cells the base already solves (no expert)"),
              ("handed_on_accuracy", _HIGHER, "the folded model handed to Phase 8 on the held-out set")),
    8: _specs(*_QUALITY, *_SIZE, ("compression_ratio", _HIGHER, "the incoming model's fp32 file / the final file"),
              ("accuracy_retention", _HIGHER, "final accuracy / the incoming model's (= final_retention)"),
              ("accuracy", _HIGHER, "held-out accuracy of the final (last kept) stage's model"),
              ("input_accuracy", _HIGHER, "held-out accuracy of the incoming model (Phase 7's; Phase 6's when 7 is skipped)"),
              ("final_retention", _HIGHER, "final accuracy / the incoming model's"),
              ("stage_file_bytes/*", _LOWER, "a stage's checkpoint file, every byte (stage_file_bytes/<stage>)"),
              ("stage_bits_per_weight/*", _LOWER, "(file bytes - preserved float tensors) * 8 / compressed weights"),
              ("stage_accuracy/*", _HIGHER, "a stage's held-out accuracy, evaluated as rebuilt from its bytes"),
              ("stage_retention/*", _HIGHER, "a stage's accuracy / the incoming model's"),
              ("stage_retention_of_parent/*", _HIGHER, "a stage's accuracy / the stage it started from"),
              ("stage_kept/*", _HIGHER, "1 when the stage passed its gates, 0 when it was rolled back"),
              ("stage_encode_seconds/*", _LOWER, "wall time of a stage's encoding (and fine-tuning)"),
              ("stage_eval_seconds/*", _LOWER, "wall time of a stage's evaluation"),
              ("stage_attempts/*", _LOWER, "seeds a stage tried (VPTQ: again while its gate refuses, up to vptq_attempts)"),
              ("stage_first_attempt_accuracy/*", _HIGHER, "a stage's held-out accuracy on its first seed"),
              ("stages_kept", _HIGHER, "stages that passed their gates"),
              ("final_stage_index", _HIGHER, "the final stage: 1 SeedLM, 2 VPTQ, 3 hyper (0: none kept)"),
              ("final_bytes", _LOWER, "the final model's file"),
              ("final_bits_per_weight", _LOWER, "the final stage's bits per compressed weight"),
              ("input_size_bytes", _LOWER, "the incoming model's fp32 file"),
              ("compressed_weights", _HIGHER, "weights of the compressed Linear layers"),
              ("ternary_size_bytes", _LOWER, "Phase 4's packed ternary file (an ancestor of the input)"),
              ("size_vs_ternary", _LOWER, "the final file / Phase 4's packed ternary file"),
              ("finetune_kl_first", _LOWER, "mean KL to the incoming model over VPTQ fine-tuning's first tenth"),
              ("finetune_kl_last", _LOWER, "the same over its last tenth")),
}


def lookup_metric(name: str, phase: int | None = None,
                  catalogue: Mapping[int, Mapping[str, MetricSpec]] = METRIC_CATALOGUE) -> MetricSpec | None:
    """The spec of `name`, or None when the catalogue does not know it.

    A prefixed name ("phase3/per_task_accuracy/addition", "cognate-a/val_loss") is looked up by its '/'
    suffixes, longest first; an entry with '*' is a family ("per_task_accuracy/*" holds every task's). The
    phase's own entry wins; otherwise any phase's entry (the catalogue gives one direction per name).
    """
    parts = name.split("/")
    candidates = ["/".join(parts[i:]) for i in range(len(parts))]
    phases = ([phase] if phase in catalogue else []) + sorted(catalogue)
    for key in candidates:
        for p in phases:
            if key in catalogue[p]:
                return catalogue[p][key]
            family = next((spec for pattern, spec in catalogue[p].items()
                           if "*" in pattern and fnmatch.fnmatchcase(key, pattern)), None)
            if family is not None:
                return family
    return None


class Regression(NamedTuple):
    metric: str
    from_phase: int
    to_phase: int
    old: float
    new: float


def check_phase(phase) -> int:
    return check_phase_number(phase)


def _is_worse(spec: MetricSpec, old: float, new: float, tolerance: float) -> bool:
    """new is worse than old by more than tolerance * |old| in the metric's direction; a NaN after
    a number counts as worse (a diverged phase), a NaN before is not compared."""
    if math.isnan(old):
        return False
    if math.isnan(new):
        return True
    slack = tolerance * abs(old)
    return new < old - slack if spec.higher_is_better else new > old + slack


class MetricContinuityTracker:
    """Keeps each phase's final metrics and reports those that got worse from phase to phase.

    Each metric is compared between consecutive phases that recorded it. Names the catalogue does
    not know are kept but flagged (`unknown`), and never reported as regressions: their direction
    is unknown.
    """

    def __init__(self, catalogue: Mapping[int, Mapping[str, MetricSpec]] = METRIC_CATALOGUE):
        self.catalogue = catalogue
        self._values: dict[int, dict[str, float]] = {}
        self.unknown: set[str] = set()

    def record(self, phase: int, metrics: Mapping[str, float]) -> list[str]:
        """Store `metrics` for `phase` (merging with earlier calls); returns the unknown names."""
        check_phase(phase)
        clean = {}
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metrics[{name!r}] must be a number, got {type(value).__name__}")
            clean[str(name)] = float(value)
        unknown = sorted(n for n in clean if lookup_metric(n, phase, self.catalogue) is None)
        for name in set(unknown) - self.unknown:
            log.warning("metric %r (phase %d) is not in the catalogue; its direction is unknown", name, phase)
        self.unknown.update(unknown)
        self._values.setdefault(phase, {}).update(clean)
        return unknown

    def trend(self, metric: str) -> list[tuple[int, float]]:
        """(phase, value) for every phase that recorded `metric`, in phase order."""
        return [(p, v[metric]) for p, v in sorted(self._values.items()) if metric in v]

    def regressions(self, tolerance: float = 0.1) -> list[Regression]:
        """Metrics that got worse by more than `tolerance` (relative to the earlier value)."""
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance >= 0:
            raise ValueError(f"Invalid tolerance: {tolerance!r}; expected a number >= 0")
        names = sorted({n for values in self._values.values() for n in values} - self.unknown)
        found = []
        for name in names:
            points = self.trend(name)
            for (p_old, old), (p_new, new) in zip(points, points[1:]):
                spec = lookup_metric(name, p_new, self.catalogue)
                if _is_worse(spec, old, new, tolerance):
                    found.append(Regression(name, p_old, p_new, old, new))
        return found


def flat_numbers(metrics: Mapping, prefix: str = "") -> dict[str, float]:
    """Nested numeric metrics as one level of 'a/b' keys (what trackers log; lists, text and booleans are left
    out). The pipeline logs a phase's metrics this way and the dashboard reads them back the same way."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_numbers(value, f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
