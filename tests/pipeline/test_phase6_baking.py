"""Phase 6 (tool and persona baking) on a small trained model: the A/B cycle rule, persona adherence and its
checker, a persona taught and baked (adherence without the prompt rises to the prompted model's; half-baking
lands between), the phase's own checks, and the phase through the orchestrator (registered, tracked once,
rollback to 5 and resume, and a real SIGKILL mid-phase then `forge resume`)."""
import copy
from types import SimpleNamespace

import pytest
import torch

from forge.baking import get_prompt, interpolate
from forge.baking.prompts import adheres
from forge.data import CharTokenizer, make_examples
from forge.data.tools import encode_rows
from forge.pipeline.config import load_config
from forge.pipeline.controller import HandoffError, LoadedModel, PhaseContext
from forge.pipeline.phases.phase6_baking import BakingPhase
from forge.pipeline.phases.phase6_baking.cycles import plateaued, run_cycles
from forge.pipeline.phases.phase6_baking.personas import (
    Format,
    formatted,
    persona_cycle,
)
from forge.pipeline.phases.phase6_baking.recipe import grown_model
from forge.pipeline.training import make_optimizer
from forge.tracking import Tracker

TASKS = {"addition": 1.0, "copy": 1.0}
SMALL = ("wandb.mode=disabled", "phases.phase6.tool_tasks=[multiplication,addition]",
         "phases.phase6.tool_questions_per_level=8", "phases.phase6.format_steps=60",
         "phases.phase6.tool_steps=60", "phases.phase6.teach_steps=60", "phases.phase6.baking_steps=10",
         "phases.phase6.max_cycles=2", "phases.phase6.target_score=0", "phases.phase6.val_questions=2",
         "phases.phase6.eval_questions=4", "phases.phase6.persona_questions=64",
         "phases.phase6.persona_eval_questions=16", "phases.phase6.batch_size=32")
PHASE5 = tuple(f"phases.phase5.{kv}" for kv in (
    "steps=250", "advance_accuracy=0.6", "num_levels=8", "eval_questions=16", "val_questions=16", "baking_steps=2",
    "self_model_questions=400", "self_model_steps=20", "dream_questions=8", "min_curriculum_gain=-1",
    "max_forgetting=1", "min_self_model_z=0", "max_tasks_not_advanced=2"))
LENIENT = ("phases.phase6.min_tool_lift=-1", "phases.phase6.max_base_accuracy_drop=1",
           "phases.phase6.min_kl_reduction=0", "phases.phase6.max_adherence_gap=1")


@pytest.fixture(scope="module")
def trained(addition_copy_model):
    """A dim-64 two-layer model trained on addition and copy."""
    model, tokenizer = addition_copy_model
    return copy.deepcopy(model), CharTokenizer.from_dict(tokenizer.to_dict())


def _cfg(**changes):
    return SimpleNamespace(**{**load_config(overrides=SMALL).phases.phase6.model_dump(), **changes,
                              "optimizer": load_config().phases.phase6.optimizer})


def test_cycles_switch_on_a_plateau_and_stop_at_the_target():
    cfg = SimpleNamespace(max_cycles=10, target_score=0.7, plateau_window=3, plateau_threshold=0.02)
    scores, state = iter([0.1, 0.11, 0.115, 0.5, 0.8]), {"score": 0.0, "baked": 0}

    def run_a(_cycle):
        state["score"] = next(scores)
        return state["score"]

    def run_b(_cycle):
        state["baked"] += 1
        return 0.9
    log = run_cycles(run_a, run_b, lambda: state["score"], lambda: state["baked"] >= 1, cfg)
    assert [(e["kind"], e["decision"]) for e in log] == [("A", "continue"), ("A", "continue"), ("A", "switch"),
                                                          ("B", "switch"), ("A", "continue"), ("A", "stop")]
    assert "moved less than 0.02 over 3 cycles" in log[2]["reason"] and log[3]["reason"] == "every persona baked"
    assert "reached" not in log[4]["reason"] and ">= target 0.7" in log[5]["reason"] and state["baked"] == 1
    done = {"baked": False}

    def bake(_cycle):
        done["baked"] = True
        return 0.5
    quick = run_cycles(lambda _c: 0.9, bake, lambda: 0.9, lambda: done["baked"], cfg)
    assert [(e["kind"], e["decision"]) for e in quick] == [("A", "switch"), ("B", "stop")]
    assert "reached the target" in quick[0]["reason"]
    never = run_cycles(lambda _c: 0.9, lambda _c: 0.5, lambda: 0.9, lambda: False,
                       SimpleNamespace(**{**vars(cfg), "max_cycles": 3}))
    assert [e["kind"] for e in never] == ["A", "B", "B"] and never[-1]["reason"] == "max_cycles 3 reached"
    flat = run_cycles(lambda _c: 0.2, lambda _c: 0.5, lambda: 0.2, lambda: True, cfg)
    assert [e["decision"] for e in flat] == ["continue", "continue", "stop"]
    assert "every persona is baked" in flat[-1]["reason"]
    assert plateaued([0.1, 0.5, 0.51, 0.52], 3, 0.03) and not plateaued([0.5, 0.52], 3, 0.03)


def test_adherence_is_the_personas_own_format():
    ids = {m: i for i, m in enumerate(["<read>", "<test>", "<fix>", "<check>"], start=100)}
    swe, researcher = get_prompt("phase6_swe_bench"), get_prompt("phase6_researcher")
    assert adheres([100, 5, 6, 101, 102], swe, ids) and not adheres([100, 5, 6, 102, 101], swe, ids)   # the order
    assert not adheres([5, 6, 101, 102], swe, ids) and adheres([100, 101, 102], swe, ids)   # an empty answer too
    assert not adheres([100, 5, 100, 6, 101, 102], swe, ids)                   # a marker inside the answer
    assert adheres([5, 6, 103], researcher, ids) and adheres([100, 5, 6, 103], researcher, ids)   # others ignored
    assert not adheres([5, 6], researcher, ids) and not adheres([103, 5, 6], researcher, ids)


def _marker_probability(model, examples, tokenizer, marker: str) -> float:
    """Mean probability the model gives `marker` right after each plain answer (teacher-forced)."""
    rows = [formatted(ex, tokenizer, Format()) for ex in examples]
    tokens, _ = encode_rows(rows, tokenizer.pad_id, model.config.max_len)
    with torch.no_grad():
        probs = model(tokens).float().softmax(-1)
    at = [len(ids) - 2 for ids, _ in rows]      # the last answer token predicts <eos> or the marker
    return float(torch.stack([probs[b, t, tokenizer.token_id(marker)] for b, t in enumerate(at)]).mean())


def test_a_persona_is_taught_then_baked_and_half_baking_lands_between(trained):
    model, tokenizer = copy.deepcopy(trained)
    tokenizer = CharTokenizer.from_dict(tokenizer.to_dict())
    grown = grown_model(SimpleNamespace(model=model), tokenizer)
    cfg = _cfg(teach_steps=300, baking_steps=60)
    data = {"train": make_examples(TASKS, 256, "train", 5), "held_out": make_examples(TASKS, 48, "val", 6),
            "calls": lambda _model, examples: [None] * len(examples)}
    make_opt = lambda m: make_optimizer(m, cfg.optimizer, cfg.lr)   # noqa: E731
    before = copy.deepcopy(grown)
    out = persona_cycle(grown, make_opt, "phase6_researcher", data, tokenizer, Format(), cfg, seed=0)
    m = out["metrics"]
    assert m["taught"] and m["prompted_adherence_before"] < 0.1 and m["adherence_before"] < 0.1, m
    assert m["prompted_adherence"] >= 0.8 and m["adherence_taught"] <= 0.2, m      # the prompt alone decides
    assert m["adherence"] >= m["prompted_adherence"] - 0.15 and m["kl_reduction"] >= 0.5, m
    assert out["format"] == Format((), ("<check>",))
    held = data["held_out"]
    p = [_marker_probability(interpolate(grown, out["model"], s), held, tokenizer, "<check>") for s in (0, 0.5, 1)]
    assert p[0] < p[1] < p[2] and p[0] < 0.2 < p[2], p
    assert _marker_probability(before, held, tokenizer, "<check>") < 0.05


@pytest.fixture(scope="module")
def phase_run(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("phase6")
    model, tokenizer = copy.deepcopy(trained)
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS}
    config = load_config(overrides=(f"run_root={root}", *SMALL))
    tracker = Tracker(root, "s", mode="disabled")
    tracker.start_phase(6, "baking", {})
    ctx = PhaseContext("s", 6, config, config.phase(6), root, root, None, tracker,
                       [LoadedModel(model, {"name": "curriculum"}, meta)], lambda *_: None, 0, torch.device("cpu"))
    phase = BakingPhase()
    phase.validate_input(ctx)
    return ctx, phase, phase.execute(ctx)


def test_phase6_reports_tools_personas_and_its_cycles(phase_run):
    ctx, phase, result = phase_run
    m = result.metrics
    assert m["cycles_completed"] == len(m["cycle_log"]) == 2 and [e["kind"] for e in m["cycle_log"]] == ["A", "B"]
    assert m["calls_considered"] > m["calls_kept"] > 0
    assert m["tool_lift"] == pytest.approx(m["tool_accuracy"] - m["no_tool_accuracy"])
    assert set(m["tool_level_accuracy"]) == {"multiplication", "addition"}
    assert min(int(lv) for lv in m["tool_level_accuracy"]["multiplication"]) == 6
    assert "persona_kl_reduction/phase6_researcher" in m and m["min_persona_kl_reduction"] <= 1
    output = result.models[0]
    assert output.metadata["personas"] == ["phase6_researcher"] and output.metadata["tools"] == ["calculator"]
    assert output.metadata["answer_format"] == {"before": [], "after": ["<check>"]}
    tokenizer = CharTokenizer.from_dict(output.metadata["tokenizer"])
    assert tokenizer.vocab_size == output.model.config.vocab_size and tokenizer.token_id("<calc>")


def test_phase6_fails_its_own_checks_with_the_numbers(phase_run):
    ctx, phase, result = phase_run
    good = {"tool_lift": 0.5, "base_accuracy_drop": 0.0, "min_persona_kl_reduction": 0.9,
            "max_persona_adherence_gap": 0.0}
    cases = [({"tool_lift": 0.1, "tool_accuracy": 0.2, "no_tool_accuracy": 0.1}, r"by only 0.100 \(with it 0.200"),
             ({"base_accuracy_drop": 0.2, "input_accuracy": 0.9, "accuracy": 0.7}, "fell by 0.200"),
             ({"min_persona_kl_reduction": 0.5}, "KL fell by only 50%"),
             ({"max_persona_adherence_gap": 0.3}, "0.300 less often")]
    for change, message in cases:
        bad = copy.deepcopy(result)
        bad.metrics.update(good, **change)
        with pytest.raises(HandoffError, match=message):
            phase.validate_output(bad, ctx)


def test_a_model_too_short_for_its_calls_is_refused_before_training(trained):
    model, tokenizer = trained
    config = load_config(overrides=("wandb.mode=disabled",))
    small = copy.deepcopy(model)
    small.config.max_len = 24
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS}
    ctx = PhaseContext("s", 6, config, config.phase(6), None, None, None, None,
                       [LoadedModel(small, {"name": "x"}, meta)], lambda *_: None, 0, torch.device("cpu"))
    with pytest.raises(HandoffError, match="phases.phase6.beyond_level: no level >= 6 of 'addition' fits max_len 24"):
        BakingPhase().validate_input(ctx)


def _registered(registry, model, tokenizer, tmp_path, phase: int = 5, checks=None):
    """A source session holding `model` as a completed phase's output; returns (session id, model id)."""
    from forge.registry import new_session_id, save_checkpoint

    source = registry.create_session(new_session_id("src"), {})
    checks = checks or {"levels_completed": 3}
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS,
            **checks}
    path = save_checkpoint(model.state_dict(), tmp_path / f"phase{phase}.safetensors", meta).path
    model_id = registry.register_model(source, f"phase{phase}", f"phase{phase}", path, meta, phase=phase,
                                       metrics=checks)
    registry.record_phase_result(source, phase, "completed", [model_id], checks, 1.0)
    return source, model_id


def test_phases_5_and_6_through_the_pipeline_register_track_and_resume(trained, tmp_path):
    """A registered Phase 4 model through a small Phase 5 and the real Phase 6: Phase 6's model is registered
    with Phase 5's as parent, each metric tracked once and catalogued; after a rollback to 5, resume redoes
    Phase 6 on the reloaded weights with the same metrics."""
    from _catalogue import uncatalogued

    from forge.pipeline.orchestrator import Pipeline
    from forge.registry import ModelRegistry
    from forge.tracking import read_metrics

    model, tokenizer = trained
    config = load_config(overrides=(f"run_root={tmp_path / 'runs'}", *SMALL, *LENIENT, *PHASE5))
    registry = ModelRegistry(config.registry_path())
    source, _ = _registered(registry, model, tokenizer, tmp_path, phase=4,
                            checks={"compression_ratio": 10.0, "accuracy_drop": 0.0, "accuracy_retention": 1.0})
    pipeline = Pipeline(config, registry, log=lambda _msg: None, progress_bars=False)
    report = pipeline.run(from_phase=5, source_session=source, to_phase=6)
    assert report.status == "completed" and report.completed == [5, 6], report.message
    sid = report.session_id
    (p5,), (p6,) = registry.list_models(session_id=sid, phase=5), registry.list_models(session_id=sid, phase=6)
    assert p6["parent_ids"] == [p5["id"]]
    names = [name for line in read_metrics(pipeline.session_dir(sid)) for name in line["metrics"]]
    assert names.count("phase6/tool_lift") == 1 and names.count("phase6/persona_adherence/phase6_researcher") == 1
    assert uncatalogued(pipeline.session_dir(sid)) == []
    first = pipeline.completed(sid)[6]["metrics"]
    pipeline.rollback(sid, 5)
    assert sorted(pipeline.completed(sid)) == [5]
    pipeline.resume(sid)
    assert pipeline.completed(sid)[6]["metrics"] == first
    assert len(registry.list_models(session_id=sid, phase=6)) == 2
    registry.close()


def test_a_run_killed_mid_phase6_resumes_and_registers_once(trained, tmp_path):
    """`forge run --only 6` killed with SIGKILL once its first cycle is logged, then `forge resume`."""
    from _kill_resume import kill_then_resume, logged

    from forge.registry import ModelRegistry

    model, tokenizer = trained
    runs = tmp_path / "runs"
    with ModelRegistry(runs / "registry.db") as registry:
        source, _ = _registered(registry, model, tokenizer, tmp_path)
    session = kill_then_resume(tmp_path, runs, source, 6, (*SMALL, *LENIENT), logged(runs, '"tool_score"'))
    with ModelRegistry(runs / "registry.db") as registry:
        assert len(registry.list_models(session_id=session, phase=6)) == 1
