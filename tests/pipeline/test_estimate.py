"""The dry-run estimate: every implemented phase gets a time that follows its config's step counts."""
import pytest

from forge.pipeline.config import load_config
from forge.pipeline.estimate import GENERATION_PASSES, estimate

COSTS = {"train_step_s": 0.05, "eval_batch_s": 0.01}


def test_each_phase_scales_with_its_own_steps():
    base = estimate(load_config(), [1, 2, 3, 4, 5, 6], COSTS)
    assert set(base) == {1, 2, 3, 4, 5, 6} and all(v > 0 for v in base.values())
    changes = {"phases.phase1.shared_steps=1600": (1, 1000 * 0.05),
               "phases.phase3.warmup_steps=2200": (3, 1000 * 2 * 0.05),
               "phases.phase3.rl_steps=1300": (3, 1000 * 3 * 0.05 * 16 * 4 / 64),
               "phases.phase4.fine_tune_steps=1800": (4, 1000 * 3 * 0.05),
               "phases.phase5.baking_steps=1030": (5, 1000 * 0.05),
               "phases.phase6.tool_steps=900": (6, 2 * 500 * 2 * 0.05),       # two A-cycles, rows twice as long
               "phases.phase6.baking_steps=1100": (6, 1000 * 4 * 0.05)}
    for override, (phase, added) in changes.items():
        changed = estimate(load_config(overrides=(override,)), [1, 2, 3, 4, 5, 6], COSTS)
        assert changed[phase] - base[phase] == pytest.approx(added), override
        assert all(changed[p] == base[p] for p in base if p != phase), override


def test_only_the_planned_phases_are_estimated():
    assert set(estimate(load_config(), [3], COSTS)) == {3}
    assert set(estimate(load_config(), [5, 6], COSTS)) == {5, 6}
    assert set(estimate(load_config(), [8], COSTS)) == {8}
    assert set(estimate(load_config(), [7, 8], COSTS)) == {7, 8}


def test_the_compression_estimate_follows_fine_tuning_search_and_stages():
    """Phase 8: each distillation step is a phase-1 step at its batch size; the SeedLM search scales with the seeds
    tried; every stage answers the held-out set once more."""
    base = estimate(load_config(), [8], COSTS)[8]
    steps = estimate(load_config(overrides=("phases.phase8.vptq_finetune_steps=2200",)), [8], COSTS)[8]
    assert steps - base == pytest.approx(1000 * 0.05 * 32 / 64)
    fewer = estimate(load_config(overrides=("phases.phase8.seedlm_seeds=255",)), [8], COSTS)[8]
    one = estimate(load_config(overrides=("phases.phase8.stages=[seedlm]",)), [8], COSTS)[8]
    assert 0 < fewer < base and 0 < one < base


def test_the_experts_estimate_follows_training_and_search_sizes():
    """Phase 7: each expert's training (max_experts, twice when both methods are compared) and NSGA-II's
    candidates, each answered with the calculator (GENERATION_PASSES passes of its questions)."""
    base = estimate(load_config(), [7], COSTS)[7]
    one = estimate(load_config(overrides=("phases.phase7.compare_methods=false",)), [7], COSTS)[7]
    more = estimate(load_config(overrides=("phases.phase7.adas_generations=8",)), [7], COSTS)[7]
    assert 0 < one < base and more - base == pytest.approx(6 * 5 * GENERATION_PASSES * 0.01)


def test_the_curriculum_estimate_counts_the_climb_and_its_control():
    """Phase 5 trains `steps` twice (the climb and the uniform control with as many steps) and checks every
    task's level every eval_every steps."""
    base = estimate(load_config(), [5], COSTS)[5]
    more = estimate(load_config(overrides=("phases.phase5.steps=2400", "phases.phase5.eval_every=50")), [5], COSTS)[5]
    assert more - base == pytest.approx(2 * 1200 * 0.05)    # twice the steps, the same number of checks


def test_the_step_costs_are_counted_work_not_a_timing(monkeypatch):
    """Two dry runs give the same estimate whatever the machine is doing: no clock is read, and the costs
    follow parameters x tokens."""
    import time

    from forge.pipeline import estimate as module

    monkeypatch.setattr(time, "perf_counter", lambda: (_ for _ in ()).throw(AssertionError("timed")))
    config = load_config()
    costs = module.measure(config)
    assert costs == module.measure(config) and estimate(config, [1, 2]) == estimate(config, [1, 2])
    parameters = module._parameters(config)
    width = module._typical_width(config)
    assert costs["train_step_s"] == pytest.approx(6 * parameters * 64 * width / module.REFERENCE_FLOPS_PER_S)
    wider = load_config(overrides=("phases.phase1.model.dim=256",))
    assert module.measure(wider)["train_step_s"] > 2 * costs["train_step_s"]
