"""Phase 5 (curriculum) on a small trained model: assessment, question pools with mastery and hints, dreams
from the model itself, the self-model's numbers, the phase's own checks, and the phase through the
orchestrator (registered, tracked once, rollback and resume)."""
import copy
import random
from types import SimpleNamespace

import pytest
import torch

from forge.data import CharTokenizer
from forge.data.levels import level_examples
from forge.pipeline.config import load_config
from forge.pipeline.controller import HandoffError, LoadedModel, PhaseContext
from forge.pipeline.phases.phase5_curriculum import CurriculumPhase
from forge.pipeline.phases.phase5_curriculum.climb import Climber
from forge.pipeline.phases.phase5_curriculum.curriculum import HINT, LevelPool, accuracy_table, start_level
from forge.pipeline.phases.phase5_curriculum.dreams import dream
from forge.pipeline.phases.phase5_curriculum.recipe import grown_model
from forge.pipeline.phases.phase5_curriculum.self_model import (RIGHT, WRONG, auroc, calibration_error, confidence,
                                                                own_answer_rows, train_self_model)
from forge.pipeline.training import make_optimizer
from forge.tracking import Tracker

from _small_model import small_trained_model

TASKS = {"copy": 1.0, "reversal": 1.0}
SMALL = ("wandb.mode=disabled", "phases.phase5.steps=300", "phases.phase5.num_levels=8",
         "phases.phase5.eval_questions=48", "phases.phase5.baking_steps=2",
         "phases.phase5.self_model_questions=3200", "phases.phase5.dream_questions=32")


@pytest.fixture(scope="module")
def trained():
    """A dim-64 two-layer model trained on copy and reversal of 3-8 characters (levels 1-6)."""
    return small_trained_model(TASKS, examples=2000, steps=600, max_len=48)


def _cfg(**changes):
    return SimpleNamespace(**{**load_config(overrides=SMALL).phases.phase5.model_dump(), **changes,
                              "optimizer": load_config().phases.phase5.optimizer})


def test_the_assessment_starts_each_task_at_its_edge(trained):
    model, tokenizer = trained
    table = accuracy_table(model, sorted(TASKS), 10, 48, "test", 0, tokenizer, 48)
    assert table == accuracy_table(model, sorted(TASKS), 10, 48, "test", 0, tokenizer, 48)   # same questions
    starts = {t: start_level(row, 0.75) for t, row in table.items()}
    assert all(3 <= s <= 7 for s in starts.values()), (starts, table)     # a stub would say 1
    assert start_level({1: 0.9, 2: 0.5, 3: 0.8, 4: 0.1}, 0.75) == 3 and start_level({1: 0.2}, 0.75) == 0


def test_pools_retire_mastered_questions_and_hint_failed_ones():
    pool = LevelPool("addition", 3, 20, seed=0)
    question = pool.active[0]
    for _ in range(2):
        pool.record(question, False, mastery=2, max_hint=3)
    assert question.hint == 2 and question.streak == 0
    assert question.prompt().prompt == f"{question.example.prompt}{HINT}{question.example.answer[:2]}"
    assert question.prompt().answer == question.example.answer
    for expected_hint in (1, 0):
        pool.record(question, True, mastery=2, max_hint=3)
        assert question.hint == expected_hint and question.streak == 0     # right, but hinted: no streak
    pool.record(question, True, mastery=2, max_hint=3)
    assert question.streak == 1 and question in pool.active
    pool.record(question, True, mastery=2, max_hint=3)
    assert question not in pool.active and question in pool.retired
    rng = random.Random(0)
    assert all(q is not question for q in pool.draw(rng, 500))


class Spy(torch.nn.Module):
    """The model as is, noting which token ids it saw in training and in evaluation."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config
        self.seen = {True: set(), False: set()}

    def forward(self, tokens, **packing):
        self.seen[self.training].update(tokens.unique().tolist())
        return self.model(tokens, **packing)


def test_a_climb_passes_levels_retires_questions_and_never_shows_hints_at_evaluation(trained):
    model, tokenizer = copy.deepcopy(trained)
    tokenizer = CharTokenizer.from_dict(tokenizer.to_dict())
    item = SimpleNamespace(model=model)
    grown = grown_model(item, tokenizer)
    spy = Spy(grown)
    cfg = _cfg(max_hint=2, steps=300, mix_fraction=0.5)
    before = accuracy_table(grown, sorted(TASKS), 7, 48, "test", 0, tokenizer, 48)
    starts = {t: start_level(row, 0.75) for t, row in before.items()}
    climber = Climber(spy, make_optimizer(grown, cfg.optimizer, cfg.lr), tokenizer, 48, starts, cfg, seed=0)
    log = climber.run()
    hint = tokenizer.token_id(HINT)
    assert hint in spy.seen[True] and hint not in spy.seen[False]     # hints in training only
    passed = [(c.task, level) for c in climber.climbs.values() for level, _ in c.passed]
    assert passed, log.checks
    assert all(before[t][lv] < cfg.advance_accuracy for t, lv in passed)   # levels it could not do before
    assert climber.step == cfg.steps and log.dreams
    retired = [q for pool in climber.pools for q in pool.retired]
    asked = {id(q): q.asked for q in retired}
    cfg.steps += 20
    climber.run()
    assert retired and all(q.asked == asked[id(q)] for q in retired)       # retired questions are never asked again


def test_dreams_are_the_models_own_answers(trained):
    """Beyond its training (12 characters) the model's dreams are mostly wrong: they are its answers, not the
    true ones, and exactly what sampling the model gives."""
    model, tokenizer = trained
    prompts = level_examples("reversal", 10, 64, "train", 0)
    kwargs = dict(temperature=1.2, min_confidence=0.0)
    dreams = dream(model, prompts, tokenizer, 48, generator=torch.Generator().manual_seed(0), **kwargs)
    again = dream(model, prompts, tokenizer, 48, generator=torch.Generator().manual_seed(0), **kwargs)
    assert dreams.examples == again.examples and dreams.generated == 64
    assert dreams.kept > 10 and dreams.correct < dreams.kept / 2
    right = {ex.prompt: ex.answer for ex in prompts}
    assert dreams.correct == sum(right[ex.prompt] == ex.answer for ex in dreams.examples)
    strict = dream(model, prompts, tokenizer, 48, temperature=1.2, min_confidence=0.9,
                   generator=torch.Generator().manual_seed(0))
    assert strict.kept < dreams.kept


def test_the_self_model_learns_its_own_correctness_without_changing_its_answers(trained):
    """The verdict is trained on the model's own greedy answers (right on the easy levels, wrong beyond its
    training): afterwards it ranks right answers above wrong ones on held-out questions, and every weight but
    the two verdict rows of the head, hence every answer, is what it was."""
    model, tokenizer = copy.deepcopy(trained)
    tokenizer = CharTokenizer.from_dict(tokenizer.to_dict())
    grown = grown_model(SimpleNamespace(model=model), tokenizer)
    verdicts = (tokenizer.token_id(RIGHT), tokenizer.token_id(WRONG))
    questions = lambda split: [ex for t in TASKS for lv in range(4, 10)   # noqa: E731
                               for ex in level_examples(t, lv, 40, split, 0)]
    rows = own_answer_rows(grown, questions("train"), tokenizer, 48)
    held_out = own_answer_rows(grown, questions("test"), tokenizer, 48)
    assert 0.3 < float(rows.correct.float().mean()) < 0.7      # both verdicts are there to learn
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    untrained, _ = auroc(confidence(grown, held_out, verdicts), held_out.correct)
    losses = train_self_model(grown, rows, verdicts, steps=150, lr=0.01)
    trained_auroc, se = auroc(confidence(grown, held_out, verdicts), held_out.correct)
    assert losses[-1] < losses[0] and trained_auroc > 0.8 and trained_auroc > untrained + 2 * se
    after = grown.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["head.weight"]
    others = [i for i in range(tokenizer.vocab_size) if i not in verdicts]
    assert torch.equal(before["head.weight"][others], after["head.weight"][others])
    again = own_answer_rows(grown, questions("test"), tokenizer, 48)
    assert torch.equal(again.tokens, held_out.tokens)           # the same answers, token for token


def test_auroc_and_calibration_against_a_float64_reference():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 200):
        scores = torch.rand(n + 3, generator=gen).round(decimals=1)      # ties on purpose
        labels = torch.arange(n + 3) % 3 == 0
        pos, neg = scores[labels].tolist(), scores[~labels].tolist()
        pairs = [(1.0 if p > q else 0.5 if p == q else 0.0) for p in pos for q in neg]
        area, se = auroc(scores, labels)
        assert area == pytest.approx(sum(pairs) / len(pairs)) and 0 < se < 0.5
    perfect = auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), torch.tensor([True, True, False, False]))
    assert perfect[0] == 1.0 and auroc(torch.tensor([0.1, 0.9]), torch.tensor([True, False]))[0] == 0.0
    assert auroc(torch.tensor([0.3, 0.4]), torch.tensor([True, True])) == (0.5, 0.5)
    probs, labels = torch.tensor([0.95, 0.95, 0.15, 0.15]), torch.tensor([1, 0, 0, 0])
    assert calibration_error(probs, labels) == pytest.approx(0.5 * 0.45 + 0.5 * 0.15)


@pytest.fixture(scope="module")
def phase_run(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("phase5")
    model, tokenizer = copy.deepcopy(trained)
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS}
    config = load_config(overrides=(f"run_root={root}", *SMALL))
    tracker = Tracker(root, "s", mode="disabled")
    tracker.start_phase(5, "curriculum", {})
    ctx = PhaseContext("s", 5, config, config.phase(5), root, root, None, tracker,
                       [LoadedModel(model, {"name": "bitnet"}, meta)], lambda *_: None, 0, torch.device("cpu"))
    phase = CurriculumPhase()
    phase.validate_input(ctx)
    return ctx, phase, phase.execute(ctx)


def test_phase5_climbs_and_reports_its_tables(phase_run, trained):
    ctx, phase, result = phase_run
    m = result.metrics
    assert m["levels_completed"] >= 1 and m["optimizer_steps"] == 300
    assert all(m["final_level"][t] > m["start_level"][t] for t in TASKS if m["start_level"][t] < 8), m
    assert set(m["per_level_accuracy"]) == set(TASKS) and set(m["per_level_accuracy"]["copy"]) == {str(i) for i in range(1, 9)}
    assert m["curriculum_gain"] == pytest.approx(m["curriculum_accuracy_above_start"] - m["uniform_accuracy_above_start"])
    assert 0.5 < m["self_model_auroc"] <= 1 and m["self_model_auroc_z"] > 2, m
    assert 0 < m["dreams_kept_correct"] <= 1 and m["dreams_kept"] <= m["dreams_generated"]
    output = result.models[0]
    assert output.model.config.vocab_size == CharTokenizer().vocab_size + 3
    assert output.metadata["final_level"] == m["final_level"]


def test_phase5_fails_its_own_checks_with_the_numbers(phase_run):
    ctx, phase, result = phase_run
    bad = copy.deepcopy(result)
    bad.metrics.update(curriculum_gain=-0.1, curriculum_accuracy_above_start=0.2, uniform_accuracy_above_start=0.3)
    with pytest.raises(HandoffError, match=r"does not beat uniform training .*climbed 0.200, uniform 0.300"):
        phase.validate_output(bad, ctx)
    bad = copy.deepcopy(result)
    bad.metrics.update(start_level_accuracy_drop=0.2, curriculum_gain=0.1)
    with pytest.raises(HandoffError, match="mastered before fell by 0.200"):
        phase.validate_output(bad, ctx)
    bad = copy.deepcopy(result)
    bad.metrics.update(tasks_not_advanced=1, curriculum_gain=0.1, start_level_accuracy_drop=0.0)
    with pytest.raises(HandoffError, match="1 task"):
        phase.validate_output(bad, ctx)


def test_too_long_levels_are_refused_before_training(trained):
    model, tokenizer = trained
    config = load_config(overrides=("wandb.mode=disabled",))
    small = copy.deepcopy(model)
    small.config.max_len = 24
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS}
    ctx = PhaseContext("s", 5, config, config.phase(5), None, None, None, None,
                       [LoadedModel(small, {"name": "x"}, meta)], lambda *_: None, 0, torch.device("cpu"))
    with pytest.raises(HandoffError, match="phases.phase5.num_levels: level 10 of 'copy' needs"):
        CurriculumPhase().validate_input(ctx)


def test_phases_4_and_5_through_the_pipeline_register_track_and_resume(trained, tmp_path):
    """A registered phase-3 model through the real Phases 4 and 5: Phase 5's model is registered with Phase 4's
    as parent, each metric is tracked once and catalogued, and after a rollback to Phase 4 a resume redoes
    Phase 5 on the reloaded weights with the same result."""
    from _catalogue import uncatalogued

    from forge.pipeline.orchestrator import Pipeline
    from forge.registry import ModelRegistry, new_session_id, save_checkpoint
    from forge.tracking import read_metrics

    model, tokenizer = trained
    config = load_config(overrides=(f"run_root={tmp_path / 'runs'}", *SMALL, "phases.phase4.eval_examples=128",
                                    "phases.phase4.train_examples=1000", "phases.phase4.fine_tune_steps=40",
                                    "phases.phase4.batch_size=32", "phases.phase4.max_accuracy_drop=1.0",
                                    "phases.phase5.min_curriculum_gain=-1", "phases.phase5.max_forgetting=1",
                                    "phases.phase5.min_self_model_z=0", "phases.phase5.max_tasks_not_advanced=2"))
    registry = ModelRegistry(config.registry_path())
    source = registry.create_session(new_session_id("src"), {})
    checks = {"thought_gain": 0.1, "gain_over_input": 0.1, "content_gain": 0.1, "distinct_thoughts": 1.0}
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS,
            "coherence_score": 1.0, "validity_rate": 1.0, **checks}
    path = save_checkpoint(model.state_dict(), tmp_path / "thinker.safetensors", meta).path
    thinker = registry.register_model(source, "quietstar", "quietstar", path, meta, phase=3, metrics=checks)
    registry.record_phase_result(source, 3, "completed", [thinker], checks, 1.0)
    pipeline = Pipeline(config, registry, log=lambda _msg: None, progress_bars=False)
    report = pipeline.run(from_phase=4, source_session=source, to_phase=5)
    assert report.status == "completed" and report.completed == [4, 5], report.message
    sid = report.session_id
    (p4,), (p5,) = registry.list_models(session_id=sid, phase=4), registry.list_models(session_id=sid, phase=5)
    assert p5["parent_ids"] == [p4["id"]]
    (loaded,) = pipeline.load_models([p5["id"]])
    assert loaded.metadata["self_model_tokens"] == ["<right>", "<wrong>"]
    names = [name for line in read_metrics(pipeline.session_dir(sid)) for name in line["metrics"]]
    assert names.count("phase5/curriculum_gain") == 1 and names.count("phase5/per_level_accuracy/copy/8") == 1
    assert uncatalogued(pipeline.session_dir(sid)) == []
    first = pipeline.completed(sid)[5]["metrics"]
    pipeline.rollback(sid, 4)
    assert sorted(pipeline.completed(sid)) == [4]
    pipeline.resume(sid)
    again = pipeline.completed(sid)[5]["metrics"]
    assert len(registry.list_models(session_id=sid, phase=5)) == 2
    assert again == first
    registry.close()


def test_a_run_killed_mid_climb_resumes_and_registers_phase5_once(trained, tmp_path):
    """`forge run --only 5` on a registered Phase 4 model, killed with SIGKILL while it climbs (its first
    training losses are in metrics.jsonl), then `forge resume`: Phase 5 completes and registers one model."""
    from _kill_resume import kill_then_resume, logged

    from forge.registry import ModelRegistry, new_session_id, save_checkpoint

    model, tokenizer = trained
    runs = tmp_path / "runs"
    with ModelRegistry(runs / "registry.db") as registry:
        source = registry.create_session(new_session_id("src"), {})
        checks = {"compression_ratio": 10.0, "accuracy_drop": 0.0, "accuracy_retention": 1.0}
        meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS,
                **checks}
        path = save_checkpoint(model.state_dict(), tmp_path / "bitnet.safetensors", meta).path
        p4 = registry.register_model(source, "bitnet", "bitnet", path, meta, phase=4, metrics=checks)
        registry.record_phase_result(source, 4, "completed", [p4], checks, 1.0)
    sets = (*SMALL, "phases.phase5.min_curriculum_gain=-1", "phases.phase5.max_forgetting=1",
            "phases.phase5.min_self_model_z=0", "phases.phase5.max_tasks_not_advanced=2")
    session = kill_then_resume(tmp_path, runs, source, 5, sets, logged(runs, '"train_loss"'), timeout=300)
    with ModelRegistry(runs / "registry.db") as registry:
        assert len(registry.list_models(session_id=session, phase=5)) == 1
