"""Pipeline configuration: typed, validated sections loaded from YAML.

`load_config(path, overrides)` reads `config/pipeline_config.yaml`-style files into `PipelineConfig`
(pydantic v2, unknown keys forbidden, no silent type coercion). Every problem becomes one
`ConfigError` line that names the YAML path of the field, e.g.
`phases.phase2.population_size: must be >= 2, got 0`. The model defaults equal the shipped YAML
(a test checks it), so `load_config()` with no file gives the same pipeline as the file.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from forge._checks import read_capped
from forge.phase_table import PHASES, phase_range_text
from forge.registry.registry import safe_name

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "config" / "pipeline_config.yaml"
MAX_CONFIG_BYTES = 1 << 20   # the default config is ~16 KB; read no more than this
# The built-in procedural tasks of forge.data (tests check this list against forge.data.TASKS).
KNOWN_TASKS = ("modular", "addition", "multiplication", "sorting", "copy", "reversal", "word_problems")
MERGE_OPERATORS = ("linear", "slerp", "ties", "dare", "frankenmerge", "dfs")


class ConfigError(ValueError):
    """A configuration problem; the message names the YAML path of each bad field."""


class Section(BaseModel):
    """Base of every section: unknown keys are errors and values keep their YAML type."""
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


# -- top-level sections ---------------------------------------------------------------------------
class WandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = Field("agent-forge", min_length=1, max_length=128)

    @field_validator("project")
    @classmethod
    def _wandb_accepts(cls, project: str) -> str:
        """W&B refuses these names only when a phase starts its run; refuse them before anything is written."""
        bad = sorted(set(project) & set("/\\#?%:"))
        if bad or not project.strip():
            raise ValueError(f"W&B project names cannot be blank or contain / \\ # ? % :, got {project!r}")
        return project


class RegistryConfig(Section):
    path: str | None = None          # None -> <run_root>/registry.db
    timeout: float = Field(30.0, gt=0)


class DistributedConfig(Section):
    """torch.distributed settings, used when torchrun starts several ranks (forge.distributed)."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"   # auto: nccl on CUDA, gloo on the CPU
    timeout_s: float = Field(600.0, gt=0)   # a collective waiting longer (a rank died or hangs) fails the run
    share_newton_schulz: bool = False       # split Muon's orthogonalizations over the ranks; off: each rank does all
    fsdp: bool = False   # FSDP2 (fully_shard of every transformer block and the root) instead of DDP in the loops
    # that train whole models (forge.distributed.parallel_training): the trained copy keeps 1/N of parameters,
    # gradients and optimizer state per rank (the model object itself stays whole on every rank and gets the trained
    # weights back before it is evaluated or sampled and when the loop ends)


class HardwareConfig(Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "float32", "bfloat16"] = "auto"   # training forwards: bf16 autocast or float32;
    # auto: bf16 on CUDA, float32 on the CPU (forge.pipeline.devices)
    threads: int = Field(0, ge=0)    # 0 -> leave torch's default
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)


class CleanupConfig(Section):
    auto_cleanup: bool = False
    max_session_age_days: float | None = Field(30.0, ge=0)
    max_sessions_total: int | None = Field(100, ge=1)
    max_models_per_session: int | None = Field(None, ge=1)
    keep_last_n_checkpoints: int | None = Field(5, ge=1)
    remove_superseded: bool = True


# -- the optimizer of a training phase ------------------------------------------------------------
class OptimizerConfig(Section):
    """MuonGrokfast's settings for one phase (forge.optim.MuonGrokfast; the learning rates of each
    training stage stay in the phase's section). Defaults: the phase presets of forge.optim.PHASE_PRESETS
    (a test checks each phase's defaults against them)."""
    adamw_lr: float | None = Field(None, gt=0)      # AdamW groups' rate (norms, embeddings, head); null = the stage's lr
    grokfast: Literal["ema", "ma", "off"] = "ema"    # Grokfast gradient filter: EMA, moving average, or off
    grokfast_alpha: float = Field(0.98, ge=0, lt=1)  # EMA decay of the slow gradient
    grokfast_lamb: float = Field(2.0, ge=0)          # amplification of the slow gradient: g + lamb * ema
    momentum: float = Field(0.95, ge=0, lt=1)        # Muon momentum
    nesterov: bool = True
    weight_decay: float = Field(0.0, ge=0)           # decoupled weight decay of the Muon and AdamW groups
    qk_clip_threshold: float | None = Field(30.0, gt=0)   # MuonClip tau on attention logits; null = off
    kl_coefficient: float = Field(0.0, ge=0)         # weight of the KL term to a frozen reference, where a phase has one
    ste_mode: bool = False                           # straight-through updates of quantized (BitLinear) latent weights
    ns_dtype: Literal["float32", "auto", "bfloat16"] = "float32"   # Newton-Schulz precision; auto: bf16 where its
    # products are fast (MuonGrokfast's default, `forge backends` says which); float32 here because the default
    # runs in benchmarks/RESULTS.md were measured so


# -- phase 1: cognate -----------------------------------------------------------------------------
class ModelShape(Section):
    dim: int = Field(96, ge=8)
    n_layers: int = Field(3, ge=1)
    n_heads: int = Field(4, ge=1)
    max_len: int = Field(48, ge=8)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "ModelShape":
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into n_heads ({self.n_heads}) heads of even size "
                             "(rotary positions rotate pairs)")
        return self


class CognateModel(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    seed: int = Field(ge=0)
    task_weights: dict[str, float] = Field(min_length=1)

    @field_validator("task_weights")
    @classmethod
    def _known_tasks(cls, weights: dict[str, float]) -> dict[str, float]:
        for task, weight in weights.items():
            if task not in KNOWN_TASKS:
                raise ValueError(f"unknown task {task!r}; allowed: {', '.join(KNOWN_TASKS)}")
            if not weight >= 0:
                raise ValueError(f"weight of task {task!r} must be >= 0, got {weight}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError("at least one task weight must be > 0")
        return weights


def _default_cognate_models() -> list[CognateModel]:
    mixes = [{"addition": 4, "modular": 4, "reversal": 1, "copy": 1, "sorting": 1},
             {"reversal": 4, "copy": 4, "addition": 1, "modular": 1, "sorting": 1},
             {"sorting": 4, "addition": 2, "copy": 1, "reversal": 1, "modular": 1}]
    return [CognateModel(name=f"cognate-{c}", seed=i + 1, task_weights={k: float(v) for k, v in mix.items()})
            for i, (c, mix) in enumerate(zip("abc", mixes))]


class Phase1Config(Section):
    shared_steps: int = Field(600, ge=0)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.002, gt=0)
    branch_lr: float = Field(0.00025, gt=0)
    eval_every: int = Field(100, ge=1)
    eval_examples: int = Field(512, ge=1)
    train_examples: int = Field(20000, ge=1)
    model: ModelShape = Field(default_factory=ModelShape)
    init_seed: int = Field(0, ge=0)
    models: list[CognateModel] = Field(default_factory=_default_cognate_models, min_length=2)  # merging needs >= 2
    min_margin_over_baseline: float = Field(0.15, ge=0, le=1)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(grokfast_lamb=0.3, qk_clip_threshold=30.0))

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[CognateModel]) -> list[CognateModel]:
        """Names must differ as checkpoint files too: safe_name drops a trailing '.', '_' or '-', and case
        is ignored (macOS and Windows), so 'ma', 'ma_', 'ma.' and 'MA' would overwrite one file."""
        seen: dict[str, str] = {}
        for name in (m.name for m in models):
            key = safe_name(name).casefold()
            if key in seen:
                raise ValueError(f"model names must be unique as file names: {seen[key]!r} and {name!r} "
                                 f"would share the checkpoint file {safe_name(name)}.safetensors")
            seen[key] = name
        return models


# -- phase 2: evomerge ----------------------------------------------------------------------------
class FitnessWeights(Section):
    accuracy: float = Field(1.0, ge=0)
    loss: float = Field(0.3, ge=0)
    speed: float = Field(0.05, ge=0)
    memory: float = Field(0.05, ge=0)


class Phase2Config(Section):
    generations: int = Field(10, ge=1)
    population_size: int = Field(8, ge=2)
    elite_count: int = Field(2, ge=1)
    mutation_strength: float = Field(0.05, ge=0)
    operators: list[Literal["linear", "slerp", "ties", "dare", "frankenmerge", "dfs"]] = Field(
        default_factory=lambda: list(MERGE_OPERATORS), min_length=1)
    fitness_weights: FitnessWeights = Field(default_factory=FitnessWeights)
    eval_examples: int = Field(512, ge=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _elite_fits(self) -> "Phase2Config":
        if self.elite_count >= self.population_size:
            raise ValueError(f"elite_count ({self.elite_count}) must be < population_size "
                             f"({self.population_size})")
        return self


# -- phase 3: quietstar ---------------------------------------------------------------------------
class Phase3Config(Section):
    enabled: bool = True    # false: runs skip Phase 3 (Phase 4 quantizes Phase 2's champion)
    thinking_tokens: int = Field(6, ge=2, le=12)     # <think>, </think> + strategy tokens
    warmup_steps: int = Field(1200, ge=0)
    warmup_lr: float = Field(2e-3, gt=0)
    warmup_batch_size: int = Field(64, ge=1)
    baking_steps: int = Field(30, ge=1)
    baking_lr: float = Field(1e-4, gt=0)
    baking_traj_len: int = Field(6, ge=1)
    rl_steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    num_thoughts: int = Field(4, ge=2)
    thought_length: int = Field(8, ge=1)
    temperature: float = Field(0.7, gt=0)
    rl_lr: float = Field(2e-4, gt=0)
    policy_weight: float = Field(1.0, ge=0)
    plain_answer_weight: float = Field(1.0, ge=0)
    train_examples: int = Field(8000, ge=1)
    eval_examples: int = Field(512, ge=2)
    min_thought_gain: float = Field(0.0, ge=-1, le=1)
    min_gain_over_input: float = Field(0.0, ge=-1, le=1)
    min_distinct_thoughts: float = Field(0.5, ge=0, le=1)
    seed: int = Field(0, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(
        grokfast_lamb=0.1, qk_clip_threshold=25.0, kl_coefficient=0.1))


# -- phase 4: bitnet ------------------------------------------------------------------------------
class Phase4Config(Section):
    preserve_layers: list[str] = Field(default_factory=lambda: ["embed", "norm", "head"], min_length=1)
    calibration_samples: int = Field(256, ge=1)
    fine_tune_steps: int = Field(800, ge=0)
    fine_tune_lr: float = Field(5e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    train_examples: int = Field(8000, ge=1)
    eval_examples: int = Field(512, ge=1)
    max_accuracy_drop: float = Field(0.10, ge=0, le=1)
    min_compression: float = Field(4.0, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(
        grokfast_lamb=1.5, momentum=0.9, ste_mode=True))


# -- phase 5: curriculum ------------------------------------------------------------------------
class Phase5Config(Section):
    enabled: bool = True    # false: runs skip Phase 5 (Phase 6 takes Phase 4's model)
    num_levels: int = Field(10, ge=2, le=10)       # forge.data.levels.NUM_LEVELS is 10
    questions_per_level: int = Field(200, ge=1)
    target_accuracy: float = Field(0.75, gt=0, le=1)
    advance_accuracy: float = Field(0.80, gt=0, le=1)
    consecutive_for_mastery: int = Field(3, ge=1)
    max_hint: int = Field(0, ge=0)
    mix_fraction: float = Field(0.75, ge=0, le=1)
    level_sampling: Literal["uniform", "edge"] = "uniform"   # levels of the mixed share; edge: favour 0.1-0.9 accuracy
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    eval_every: int = Field(25, ge=1)
    val_questions: int = Field(64, ge=1)
    eval_questions: int = Field(100, ge=1)
    dream_epochs_per_level: int = Field(1, ge=0)
    dream_temperature: float = Field(1.2, gt=0)
    dream_questions: int = Field(128, ge=0)
    dream_min_confidence: float = Field(0.5, ge=0, le=1)
    self_model_steps: int = Field(200, ge=0)
    self_model_lr: float = Field(1e-2, gt=0)
    self_model_questions: int = Field(2000, ge=1)
    baking_steps: int = Field(30, ge=1)
    baking_lr: float = Field(1e-4, gt=0)
    baking_traj_len: int = Field(8, ge=1)
    min_curriculum_gain: float = Field(-0.10, ge=-1, le=1)
    max_tasks_not_advanced: int = Field(0, ge=0)
    max_forgetting: float = Field(0.05, ge=0, le=1)
    min_self_model_z: float = Field(2.0, ge=0)
    seed: int = Field(0, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(grokfast_lamb=2.0, qk_clip_threshold=30.0))


# -- phase 6: tool and persona baking ---------------------------------------------------------------
# The phase-6 prompts of forge.baking.prompts (named here so the config loads without torch; a test keeps
# the two lists equal).
PersonaId = Literal["phase6_reasoning_specialist", "phase6_creative_thinker", "phase6_technical_expert",
                    "phase6_educator", "phase6_code_specialist", "phase6_data_analyst", "phase6_researcher",
                    "phase6_debugger", "phase6_system_designer", "phase6_swe_bench"]


class Phase6Config(Section):
    enabled: bool = True    # false: runs skip Phase 6 (the next phase takes Phase 5's model)
    tool_tasks: list[Literal["addition", "multiplication", "modular"]] = Field(
        default_factory=lambda: ["addition", "multiplication", "modular"], min_length=1)
    tool_questions_per_level: int = Field(40, ge=1)
    beyond_level: int = Field(6, ge=1, le=10)
    call_threshold: float = Field(1.0, ge=0)
    format_steps: int = Field(400, ge=0)
    tool_steps: int = Field(400, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, ge=1)
    val_questions: int = Field(12, ge=1)
    eval_questions: int = Field(40, ge=1)
    personas: list[PersonaId] = Field(default_factory=lambda: ["phase6_researcher"], min_length=1)
    persona_questions: int = Field(512, ge=1)
    persona_eval_questions: int = Field(128, ge=1)
    min_teacher_adherence: float = Field(0.9, ge=0, le=1)
    teach_steps: int = Field(200, ge=1)
    max_cycles: int = Field(10, ge=1)
    plateau_threshold: float = Field(0.02, ge=0)
    plateau_window: int = Field(3, ge=2)
    half_baking_strength: float = Field(1.0, ge=0, le=1)
    baking_steps: int = Field(100, ge=1)
    baking_lr: float = Field(1e-3, gt=0)
    baking_traj_len: int = Field(20, ge=1)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    target_score: float = Field(0.70, ge=0, le=1)
    min_tool_lift: float = Field(0.30, ge=-1, le=1)
    max_base_accuracy_drop: float = Field(0.05, ge=0, le=1)
    min_kl_reduction: float = Field(0.80, ge=0, le=1)
    max_adherence_gap: float = Field(0.10, ge=0, le=1)
    seed: int = Field(0, ge=0)
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(grokfast_lamb=0.2, qk_clip_threshold=30.0))

    @field_validator("personas")
    @classmethod
    def _personas_once(cls, personas: list[str]) -> list[str]:
        if len(set(personas)) != len(personas):
            raise ValueError(f"a persona is listed twice: {personas}")
        return personas


class Phase7Config(Section):
    """Transformer² experts (forge.pipeline.phases.phase7_experts): discovery from the model's errors, SVF
    z-vectors trained per cluster, the prompt router, CEM few-shot mixing and the NSGA-II mixture search."""
    enabled: bool = True    # false: runs skip it (Phase 8 compresses Phase 6's model)
    min_experts: int = Field(2, ge=1)          # fewest clusters tried (seed PHASE7_MIN_EXPERTS_DISCOVERED: 2)
    max_experts: int = Field(3, ge=1)          # most clusters tried (seed: 10)
    solved_accuracy: float = Field(0.95, ge=0, le=1)   # cells answered at least this well stay with the base
    discovery_questions: int = Field(16, ge=1)  # held-out (val) questions per task and level for discovery
    eval_questions: int = Field(16, ge=1)      # held-out (test) questions per task and level for the reports
    train_questions: int = Field(128, ge=1)     # training questions per cell of a cluster
    svf_singular_values: int = Field(16, ge=1)  # top singular values adapted per MLP matrix (seed: 32)
    max_mult: float = Field(2.0, gt=1)         # z = sigmoid(p) * max_mult; p starts where z = 1
    # how the experts handed on are trained: cross-entropy on the true answers, because REINFORCE (the paper's)
    # gets no signal on a cluster the base model almost never solves (RESULTS "Phase 7")
    method: Literal["reinforce", "cross_entropy"] = "cross_entropy"
    compare_methods: bool = True               # also train every expert the other way and report both
    svf_lr: float = Field(0.1, gt=0)           # z-vector rate (AdamW path; paper 2e-3 over far more steps)
    svf_steps: int = Field(100, ge=1)          # training steps per expert (seed: 5 epochs)
    svf_batch_size: int = Field(16, ge=1)      # questions per step (paper: 256)
    max_grad_norm: float = Field(1.0, gt=0)    # gradient-norm clip on the z-vectors (paper: 1e-3 with its lr)
    eval_every: int = Field(10, ge=1)          # steps between validation checks; the best expert is kept
    router_steps: int = Field(300, ge=1)       # softmax-regression steps of the prompt router
    few_shot_task: Literal["addition", "multiplication", "modular", "copy", "reversal", "sorting", "word_problems",
                           None] = None        # CEM's target task; null: the task the base model does worst
    few_shot_questions: int = Field(16, ge=1)  # the handful of target-task examples CEM scores on (val split)
    cem_population: int = Field(8, ge=2)       # CEM samples per iteration (paper: 32)
    cem_elites: int = Field(2, ge=1)           # CEM elites (paper: 20 %)
    cem_iterations: int = Field(3, ge=1)       # CEM iterations (paper: 50)
    layer_groups: int = Field(3, ge=1)         # NSGA-II mixes per group of consecutive blocks
    adas_questions: int = Field(128, ge=1)     # validation questions NSGA-II's accuracy is measured on
    adas_generations: int = Field(3, ge=1)     # NSGA-II generations (seed: 100)
    adas_population: int = Field(6, ge=2)      # NSGA-II population (seed: 50)
    mutation_rate: float = Field(0.1, ge=0, le=1)    # polynomial mutation probability per variable (seed: 0.1)
    crossover_rate: float = Field(0.7, ge=0, le=1)   # SBX crossover probability (seed: 0.7)
    min_expert_gain: float = Field(0.0, ge=-1, le=1)   # check: every expert beats the base on its cluster by more
    min_routing_gain: float = Field(0.0, ge=-1, le=1)  # check: routed minus base accuracy on the held-out set
    min_gain_over_random: float = Field(0.0, ge=-1, le=1)   # check: routed minus random-expert accuracy there
    seed: int = Field(0, ge=0)                 # seeds the questions, the sampling and the searches
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(
        grokfast_lamb=0.15, qk_clip_threshold=28.0, kl_coefficient=0.05))

    @model_validator(mode="after")
    def _expert_range(self) -> "Phase7Config":
        if self.max_experts < self.min_experts:
            raise ValueError(f"max_experts ({self.max_experts}) must be >= min_experts ({self.min_experts})")
        if self.cem_elites > self.cem_population:
            raise ValueError(f"cem_elites ({self.cem_elites}) must be <= cem_population ({self.cem_population})")
        return self


# -- phase 8: SeedLM -> VPTQ -> hyper-compression, each stage gated -----------------------------------
Stage = Literal["seedlm", "vptq", "hyper"]
STAGE_ORDER = ("seedlm", "vptq", "hyper")


class Phase8Config(Section):
    """Final compression (forge.pipeline.phases.phase8_compression): SeedLM, VPTQ and hyper-compression stages,
    each kept only when it holds accuracy and shrinks the file (see the recipe's docstring)."""
    stages: list[Stage] = Field(default_factory=lambda: ["seedlm", "vptq", "hyper"], min_length=1)
    preserve_layers: list[str] = Field(default_factory=lambda: ["embed", "norm", "head"])   # kept float32
    seedlm_block_size: int = Field(8, ge=1, le=64)     # C: weights per LFSR block (seed: 64; paper/replication: 8)
    seedlm_coefficients: int = Field(3, ge=1, le=16)   # P: 4-bit mantissas per block ((K + 4 + 4P) / C bits a weight)
    seedlm_seed_bits: int = Field(16, ge=2, le=24)     # K: LFSR bits, the paper's taps (seed: 8)
    seedlm_seeds: int | None = Field(None, ge=1)       # seeds tried per block; null: all 2^K - 1 (the paper's search)
    vptq_vector_dim: int = Field(8, ge=1, le=64)       # v: weights per vector (seed: 8)
    vptq_codebook_size: int = Field(64, ge=2, le=65536)    # k: codewords per layer (seed: 256)
    vptq_residual_codebook_size: int = Field(0, ge=0, le=65536)   # residual codewords per layer; 0: none
    vptq_kmeans_iters: int = Field(25, ge=1)           # Lloyd iterations of the codebook k-means (seed: 50)
    vptq_finetune_steps: int = Field(1200, ge=0)       # distillation steps on the stored floats; 0: none
    vptq_finetune_lr: float = Field(1e-3, gt=0)        # AdamW rate of that fine-tuning
    vptq_finetune_frozen: list[str] = Field(default_factory=lambda: ["embed", "head"])   # modules whose floats it leaves
    vptq_attempts: int = Field(2, ge=1, le=8)          # k-means + distillation seeds tried until the gate keeps one
    finetune_examples: int = Field(4096, ge=1)         # training questions the Phase 7 model answers for it
    finetune_batch_size: int = Field(32, ge=1)         # sequences per fine-tuning step
    calibration_samples: int = Field(128, ge=1)        # training prompts whose activations give each Hessian
    hyper_dims: int = Field(2, ge=1, le=8)             # values per trajectory point
    hyper_bits: int = Field(12, ge=1, le=24)           # trajectory index bits (2^bits points)
    eval_examples: int = Field(256, ge=1)              # held-out (test) questions every stage is scored on
    min_stage_retention: float = Field(0.95, ge=0, le=1)   # gate: accuracy kept from the stage before (seed: 0.95)
    min_final_retention: float = Field(0.84, ge=0, le=1)   # gate and check: accuracy kept overall (seed: 0.84)
    max_size_vs_ternary: float = Field(1.0, gt=0)      # check: final file / Phase 4's packed ternary file
    seed: int = Field(0, ge=0)                         # seeds the questions and the k-means

    @model_validator(mode="after")
    def _distinct_stages(self) -> "Phase8Config":
        if len(set(self.stages)) != len(self.stages) or self.stages != sorted(self.stages, key=STAGE_ORDER.index):
            raise ValueError(f"stages must be distinct and in the order {list(STAGE_ORDER)}; got {self.stages}")
        return self


class PhasesConfig(Section):
    phase1: Phase1Config = Field(default_factory=Phase1Config)
    phase2: Phase2Config = Field(default_factory=Phase2Config)
    phase3: Phase3Config = Field(default_factory=Phase3Config)
    phase4: Phase4Config = Field(default_factory=Phase4Config)
    phase5: Phase5Config = Field(default_factory=Phase5Config)
    phase6: Phase6Config = Field(default_factory=Phase6Config)
    phase7: Phase7Config = Field(default_factory=Phase7Config)
    phase8: Phase8Config = Field(default_factory=Phase8Config)


class PipelineConfig(Section):
    run_root: str = Field("runs/", min_length=1)
    seed: int = Field(0, ge=0)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    hardware: HardwareConfig = Field(default_factory=HardwareConfig)
    cleanup: CleanupConfig = Field(default_factory=CleanupConfig)
    phases: PhasesConfig = Field(default_factory=PhasesConfig)

    def phase(self, number: int) -> Section:
        """The config section of phase `number` (a number of forge.phase_table)."""
        if number not in PHASES:
            raise ValueError(f"phase must be one of {phase_range_text()}, got {number!r}")
        return getattr(self.phases, f"phase{number}")

    def registry_path(self) -> Path:
        return Path(self.registry.path) if self.registry.path else Path(self.run_root) / "registry.db"

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


# -- loading ----------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`) and refuses duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax error becomes a ConfigError naming the source, line and column."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
    except (TypeError, ValueError, RecursionError) as error:   # e.g. a list or a map as a mapping key
        raise ConfigError(f"{source}: invalid YAML: {error}") from None


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a config file (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = read_capped(path, MAX_CONFIG_BYTES, "config file", ConfigError,
                      "a pipeline config is a few KB: check the path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: config file is not UTF-8 text ({error})") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def _merge(base: dict, update: dict) -> dict:
    """Deep-merge mappings; lists and scalars in `update` replace those in `base`."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(raw: dict, text: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`50` -> int)."""
    key, sep, value_text = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. phases.phase1.steps=50")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _child(node, part, ".".join(parts[:depth + 1]), key)
    last = parts[-1]
    value = parse_yaml(value_text, f"--set {key}")
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(parts[:-1])}: is not a section (it holds a {type(node).__name__}); "
                          f"cannot set {key}")


def _child(node: Any, part: str, here: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise ConfigError(f"{here.rsplit('.', 1)[0]}: is not a section (it holds a {type(node).__name__}); "
                          f"cannot set {key}")
    return node.setdefault(part, {})


def _index(items: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(items)} items")
    return int(part)


_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
               "list": "a list", "dict": "a mapping", "model": "a mapping (section)"}


def _location(loc: tuple) -> str:
    text = ""
    for item in loc:
        text += f"[{item}]" if isinstance(item, int) else (f".{item}" if text else str(item))
    return text or "<top level>"


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value) if value is not None else "null"


def _describe(error: dict) -> str:
    """One pydantic error as `must be >= 2, got 0` / `unknown key` / `expected an integer, got 'x' (str)`."""
    kind, ctx, got = error["type"], error.get("ctx") or {}, error.get("input")
    bounds = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    if kind in bounds:
        op, name = bounds[kind]
        bound = ctx[name]
        return f"must be {op} {f'{bound:g}' if isinstance(bound, float) else bound}, got {_shown(got)}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {_shown(got)}"
    if kind in ("too_short", "string_too_short"):
        return f"must have at least {ctx.get('min_length')} item(s), got {_shown(got)}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}, got {_shown(got)}"
    if kind == "value_error":
        return str(ctx.get("error", error["msg"]))
    base = kind.split("_")[0]
    if base in _TYPE_WORDS and kind.endswith(("_type", "_parsing", "_from_float", "_attributes_type")):
        return f"expected {_TYPE_WORDS[base]}, got {_shown(got)} ({type(got).__name__})"
    return f"{error['msg']}, got {_shown(got)}"


def as_dict(value) -> dict:
    """A config section as a plain dict (pydantic model or mapping)."""
    return value.model_dump() if hasattr(value, "model_dump") else dict(value)


def config_from_dict(raw: dict) -> PipelineConfig:
    """Validate a raw mapping; all problems at once, one `path: problem` line each."""
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as error:
        lines = [f"{_location(e['loc'])}: {_describe(e)}" for e in error.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Load `path` (None: the built-in defaults, equal to config/pipeline_config.yaml) over the
    defaults, apply `a.b.c=value` overrides, validate. Raises ConfigError naming the YAML path."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'a.b.c=value' strings, not one string")
    raw = PipelineConfig().to_dict()
    if path is not None:
        raw = _merge(raw, read_config_file(path))
    for text in overrides:
        apply_override(raw, text)
    return config_from_dict(raw)
