"""Rough run-time estimate for a dry run: the config's step and evaluation counts times the counted work of
one training step and one evaluation forward pass of the configured model, at a fixed reference rate.

Counted, not timed: a timing taken at the moment of the dry run swung 50-fold with the machine's load (605 s
estimated idle, 31,700 s with other jobs on the cores, for a 680 s run). Work is 6 * parameters * tokens FLOP
for a training step (forward and backward) and 2 * parameters * tokens for a forward pass (Kaplan et al. 2020);
REFERENCE_FLOPS_PER_S is what the 2-core CPU of benchmarks/RESULTS.md ("Pipeline") sustained on this tiny
model: 1,500 phase-1 steps and 24 evaluation batches, 4.96 TFLOP, in 82.6 s. A faster or busier machine
takes proportionally less or more; the estimate says so.
"""
from __future__ import annotations

import math

from forge.pipeline.config import PipelineConfig

_FORMULAS = (1, 2, 3, 4, 5, 6, 7, 8)   # the phases with a time formula
VOCAB_ESTIMATE = 100        # the character vocabulary of forge.data is under 100 tokens
EVAL_BATCH = 256            # forge.data.evaluate's default batch (one teacher-forced pass per batch)
REFERENCE_FLOPS_PER_S = 6.0e10
# a generation with the key/value cache (forge.data.decoding) costs about this many teacher-forced passes of the
# same questions: 5.1-5.2 measured by benchmarks/generation.py on a default run's Phase 6 model (15 re-running
# the batch)
GENERATION_PASSES = 5


def _parameters(config: PipelineConfig) -> int:
    from forge.nn import build_model

    shape = config.phases.phase1.model
    model = build_model({"vocab_size": VOCAB_ESTIMATE, "dim": shape.dim, "n_layers": shape.n_layers,
                         "n_heads": shape.n_heads, "max_len": shape.max_len})
    return sum(p.numel() for p in model.parameters())


def measure(config: PipelineConfig) -> dict[str, float]:
    """Seconds per training step (batch_size x typical width) and per evaluation batch (256 sequences) at
    REFERENCE_FLOPS_PER_S: counted work, the same on every machine and under any load."""
    p1 = config.phases.phase1
    width = min(_typical_width(config), p1.model.max_len)
    parameters = _parameters(config)
    return {"train_step_s": 6 * parameters * p1.batch_size * width / REFERENCE_FLOPS_PER_S,
            "eval_batch_s": 2 * parameters * EVAL_BATCH * width / REFERENCE_FLOPS_PER_S}


def _typical_width(config: PipelineConfig) -> int:
    """Tokens in a training batch: batches are trimmed to their longest row, so the longest of a batch-size
    sample of phase 1's examples (<bos> prompt <sep> answer <eos>)."""
    from forge.data import make_examples

    p1 = config.phases.phase1
    examples = make_examples(dict(p1.models[0].task_weights), p1.batch_size, "train", 0)
    return max(len(e.prompt) + len(e.answer) + 3 for e in examples)


def estimate(config: PipelineConfig, phases: list[int], costs: dict[str, float] | None = None) -> dict[int, float]:
    """Estimated seconds for each of `phases` that has a formula (phases 1 to 8)."""
    if not set(_FORMULAS) & set(phases):
        return {}
    costs = costs or measure(config)
    p1, p2 = config.phases.phase1, config.phases.phase2

    def evaluation(examples: int) -> float:
        return math.ceil(examples / EVAL_BATCH) * costs["eval_batch_s"]
    out = {}
    if 1 in phases:
        evals = p1.steps // p1.eval_every + 1
        branches = len(p1.models) * (p1.steps * costs["train_step_s"] + evals * evaluation(p1.eval_examples))
        out[1] = p1.shared_steps * costs["train_step_s"] + branches
    if 2 in phases:
        out[2] = (p2.generations + 1) * p2.population_size * evaluation(p2.eval_examples)
    out.update(_later_phases(config, phases, costs["train_step_s"], evaluation))
    return out


def _later_phases(config: PipelineConfig, phases: list[int], step_s: float, evaluation) -> dict[int, float]:
    """Phases 3 to 5 in units of a phase-1 step: a warm-up step trains two formats, an RL step samples
    thoughts token by token and trains two formats of batch_size * num_thoughts rows, an STE step of a thinking
    model trains two formats and pays for the quantization. The factors (2, 3, 3) were fitted to one default
    run: estimated 171 s and 123 s, measured 160 s and 133 s (benchmarks/RESULTS.md, Pipeline)."""
    p1, p3, p4, p5 = config.phases.phase1, config.phases.phase3, config.phases.phase4, config.phases.phase5
    out = {}
    if 3 in phases:
        warmup = p3.warmup_steps * 2 * step_s * p3.warmup_batch_size / p1.batch_size
        rl = p3.rl_steps * 3 * step_s * p3.batch_size * p3.num_thoughts / p1.batch_size
        out[3] = warmup + rl + p3.baking_steps * step_s + 10 * evaluation(p3.eval_examples)
    if 4 in phases:
        out[4] = 3 * p4.fine_tune_steps * step_s * p4.batch_size / p1.batch_size + 6 * evaluation(p4.eval_examples)
    if 5 in phases:
        tasks = len({t for m in p1.models for t, w in m.task_weights.items() if w > 0})
        climbs = 2 * p5.steps * step_s * p5.batch_size / p1.batch_size       # the climb and the uniform control
        checks = p5.steps // p5.eval_every * tasks * evaluation(p5.val_questions)
        tables = 4 * evaluation(tasks * p5.num_levels * p5.eval_questions)
        # the self-model's data: its own answers to its questions, generated (its probe trains two head rows on
        # cached features: negligible)
        self_model = GENERATION_PASSES * evaluation(p5.self_model_questions * 5 // 4)
        out[5] = climbs + checks + tables + self_model + p5.baking_steps * step_s
    if 6 in phases:
        out[6] = _phase6(config, step_s, evaluation)
    if 7 in phases:
        out[7] = _phase7(config, step_s, evaluation)
    if 8 in phases:
        out[8] = _phase8(config, step_s, evaluation)
    return out


def _phase6(config: PipelineConfig, step_s: float, evaluation) -> float:
    """Two A-cycles and one B-cycle (the default run: the bake costs tool use, the second A-cycle repairs it).
    Tool rows are about twice as long as phase 1's; a bake step samples a trajectory token by token (about 4
    steps' worth); every generation costs GENERATION_PASSES passes."""
    p1, p6 = config.phases.phase1, config.phases.phase6
    scale = step_s * 2 * p6.batch_size / p1.batch_size
    train = (p6.format_steps + 2 * p6.tool_steps + p6.teach_steps) * scale + 4 * p6.baking_steps * step_s
    questions = len(p6.tool_tasks) * 10 * p6.tool_questions_per_level
    filtering = 2 * evaluation(11 * questions) + evaluation(11 * p6.persona_questions)
    beyond = len(p6.tool_tasks) * 5
    generation = GENERATION_PASSES * (4 * evaluation(beyond * p6.val_questions)
                                      + 2 * evaluation(beyond * p6.eval_questions)
                                      + evaluation(512) + 8 * evaluation(p6.persona_eval_questions))
    return train + filtering + generation


def _phase7(config: PipelineConfig, step_s: float, evaluation) -> float:
    """Every answer is generated with the calculator (GENERATION_PASSES passes of its questions). Cells: the
    incoming tasks times 10 levels. Each expert (max_experts at most, twice with compare_methods) trains svf_steps
    steps that each sample a batch (GENERATION_PASSES small passes, each a phase-1 step at svf_batch_size /
    batch_size) and train on it (one step), with eval_every checks on its cluster; the held-out set is answered
    about 6 times (base, experts, routed, random, handed on); CEM and NSGA-II answer their questions once per
    candidate."""
    p1, p7 = config.phases.phase1, config.phases.phase7
    cells = 10 * len({t for m in p1.models for t, w in m.task_weights.items() if w > 0})
    runs = p7.max_experts * (2 if p7.compare_methods else 1)
    small = step_s * p7.svf_batch_size / p1.batch_size
    per_cluster = cells * p7.discovery_questions // max(1, p7.max_experts)
    checks = (p7.svf_steps // p7.eval_every + 1) * GENERATION_PASSES * evaluation(per_cluster)
    training = runs * (p7.svf_steps * (GENERATION_PASSES + 1) * small + checks)
    held_out = GENERATION_PASSES * (6 * evaluation(cells * p7.eval_questions)
                                    + evaluation(cells * p7.discovery_questions))
    candidates = (1 + p7.cem_population * p7.cem_iterations + p7.max_experts) * evaluation(p7.few_shot_questions)
    candidates += p7.adas_population * p7.adas_generations * evaluation(p7.adas_questions)
    return training + held_out + GENERATION_PASSES * candidates


def _phase8(config: PipelineConfig, step_s: float, evaluation) -> float:
    """The held-out set answered with the calculator (GENERATION_PASSES passes) by the input and each stage; the VPTQ
    fine-tuning's teacher answers its questions once and each distillation step is about one phase-1 step at its
    batch size; the SeedLM search's 2C(P + 1) FLOP per block and seed at REFERENCE_FLOPS_PER_S / 20 (the fused
    kernel's scalar rate; about 8 s exhaustive on the default model)."""
    p1, p8 = config.phases.phase1, config.phases.phase8
    answers = GENERATION_PASSES * (1 + len(p8.stages)) * evaluation(p8.eval_examples)
    tuning = 0.0
    if "vptq" in p8.stages and p8.vptq_finetune_steps:
        steps = p8.vptq_finetune_steps * step_s * p8.finetune_batch_size / p1.batch_size
        tuning = GENERATION_PASSES * evaluation(p8.finetune_examples) + steps
    seeds = p8.seedlm_seeds or 2 ** p8.seedlm_seed_bits - 1
    flops = _block_weights(config) * seeds * 2 * (p8.seedlm_coefficients + 1)     # C weights per block
    search = flops / (REFERENCE_FLOPS_PER_S / 20) if "seedlm" in p8.stages else 0.0
    return answers + tuning + search


def _block_weights(config: PipelineConfig) -> int:
    """Weights of the transformer blocks' Linear layers (what Phase 8 compresses by default)."""
    from torch import nn

    from forge.nn import build_model

    shape = config.phases.phase1.model
    model = build_model({"vocab_size": VOCAB_ESTIMATE, "dim": shape.dim, "n_layers": shape.n_layers,
                         "n_heads": shape.n_heads, "max_len": shape.max_len})
    return sum(m.weight.numel() for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name.startswith("blocks."))
