"""A tiny real `forge run` for the phase-view tests (phases 1-6) and the eight-phase test (TINY_PHASES_7_8): the
real CLI and the real phases, a few dozen steps each, so the pass checks of phases 1-7 and the handoff gates are
switched off (a model this small cannot pass them); the keys and values recorded are the pipeline's own. Run as a script: `_tiny_run.py run --set ...`."""
import sys

TINY_SETS = [
    "wandb.mode=disabled", "hardware.threads=1",
    "phases.phase1.shared_steps=60", "phases.phase1.steps=40", "phases.phase1.eval_every=20",
    "phases.phase1.eval_examples=64", "phases.phase1.train_examples=1000", "phases.phase1.min_margin_over_baseline=0.0",
    "phases.phase2.generations=2", "phases.phase2.population_size=4", "phases.phase2.eval_examples=64",
    "phases.phase3.warmup_steps=20", "phases.phase3.warmup_batch_size=16", "phases.phase3.baking_steps=2",
    "phases.phase3.rl_steps=4", "phases.phase3.train_examples=300", "phases.phase3.eval_examples=32",
    "phases.phase4.calibration_samples=16", "phases.phase4.fine_tune_steps=10", "phases.phase4.batch_size=16",
    "phases.phase4.train_examples=300", "phases.phase4.eval_examples=32",
    "phases.phase5.num_levels=3", "phases.phase5.questions_per_level=20", "phases.phase5.steps=30",
    "phases.phase5.batch_size=16", "phases.phase5.eval_every=10", "phases.phase5.val_questions=16",
    "phases.phase5.eval_questions=8", "phases.phase5.dream_questions=8", "phases.phase5.self_model_steps=5",
    "phases.phase5.self_model_questions=64", "phases.phase5.baking_steps=2",
    "phases.phase6.tool_questions_per_level=8", "phases.phase6.format_steps=10", "phases.phase6.tool_steps=10",
    "phases.phase6.batch_size=16", "phases.phase6.val_questions=4", "phases.phase6.eval_questions=4",
    "phases.phase6.persona_questions=32", "phases.phase6.persona_eval_questions=16", "phases.phase6.teach_steps=10",
    "phases.phase6.max_cycles=2", "phases.phase6.baking_steps=5",
]

TINY_PHASES_7_8 = [
    "phases.phase7.enabled=true", "phases.phase7.svf_steps=4", "phases.phase7.eval_every=2",
    "phases.phase7.discovery_questions=4", "phases.phase7.eval_questions=4", "phases.phase7.train_questions=8",
    "phases.phase7.svf_batch_size=8", "phases.phase7.compare_methods=false", "phases.phase7.router_steps=50",
    "phases.phase7.cem_population=2", "phases.phase7.cem_elites=1", "phases.phase7.cem_iterations=1",
    "phases.phase7.adas_population=2", "phases.phase7.adas_generations=1", "phases.phase7.adas_questions=8",
    "phases.phase8.seedlm_seeds=256", "phases.phase8.eval_examples=32", "phases.phase8.vptq_finetune_steps=20",
    "phases.phase8.finetune_examples=64", "phases.phase8.calibration_samples=16",
    "phases.phase8.min_stage_retention=0", "phases.phase8.min_final_retention=0",
]


def main(argv: list[str]) -> int:
    from forge import cli
    from forge.pipeline import orchestrator
    from forge.pipeline.controller import HandoffError
    from forge.pipeline.phases import load_controller_class

    for phase in range(1, 8):       # Phase 8's own checks stay (TINY_PHASES_7_8 sets gates a tiny model passes)
        load_controller_class(phase).validate_output = lambda self, result, ctx: None
    real_check = orchestrator.check_handoff

    def lenient(rule, inputs, config):
        try:
            return real_check(rule, inputs, config)
        except HandoffError:
            return {"bypassed": 1.0}
    orchestrator.check_handoff = lenient
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
