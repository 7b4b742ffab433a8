"""Phase 7 (Transformer² experts) parts: discovery follows a model's errors, REINFORCE raises the reward of a
test-sized cluster, CEM finds a known-best mixture of real experts, NSGA-II's front is non-dominated and made of
real evaluations, the prompt router learns the clusters from hidden states."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from forge.data import CharTokenizer
from forge.data.levels import level_examples
from forge.data.tools import add_tool_tokens, encode_rows, sequence
from forge.nn import add_svf, fold_svf, resize_vocab
from forge.nn.svf import expert_of, mix_experts, set_expert
from forge.pipeline.config import load_config
from forge.pipeline.phases.phase7_experts.discovery import cluster_cells, measure_cells
from forge.pipeline.phases.phase7_experts.dispatch import (
    Router,
    cem,
    dominates,
    nsga2_search,
    prompt_features,
)
from forge.pipeline.phases.phase7_experts.training import train_expert

TASKS = {"addition": 1.0, "copy": 1.0}


class OracleModel(nn.Module):
    """A model built to answer every question right except where `fails(task, level)`: there it answers
    wrongly (the true answer reversed, then '9'). It reads the prompt, looks the question up, and puts logit 12
    on the next character of its answer (then <eos>)."""

    def __init__(self, questions: dict, tokenizer, fails):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, {}
        for (task, level), examples in questions.items():
            for ex in examples:
                self.answers[ex.prompt] = ex.answer[::-1] + "9" if fails(task, level) else ex.answer

    def forward(self, tokens):
        tok = self.tokenizer
        logits = torch.zeros(*tokens.shape, tok.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            sep = row.index(tok.sep_id)
            answer = tok.encode(self.answers[tok.decode(row[1:sep])]) + [tok.eos_id]
            for t in range(sep, len(row)):
                logits[b, t, answer[min(t - sep, len(answer) - 1)]] = 12.0
        return logits


def _questions(tasks, levels, n, split="val"):
    return {(t, lv): level_examples(t, lv, n, split, 0) for t in tasks for lv in levels}


def _loss_rows(tokenizer, max_len=48):
    return lambda examples: encode_rows([sequence(ex, tokenizer) for ex in examples], tokenizer.pad_id, max_len)


def test_discovery_clusters_follow_the_errors_not_the_tasks():
    """Fails at reversal everywhere and at sorting above level 5: two experts (reversal; sorting's high levels),
    not one per task; copy, addition and sorting's low levels stay with the base."""
    tokenizer = CharTokenizer()
    add_tool_tokens(tokenizer)
    questions = _questions(["addition", "copy", "reversal", "sorting"], range(1, 11), 6)
    model = OracleModel(questions, tokenizer, lambda t, lv: t == "reversal" or (t == "sorting" and lv > 5))
    cells = measure_cells(model, questions, tokenizer, 48, _loss_rows(tokenizer))
    clusters, solved = cluster_cells(cells, 1, 4, solved_accuracy=0.95, seed=0)
    assert sorted(c.name for c in clusters) == ["reversal", "sorting"]
    by_name = {c.name: c for c in clusters}
    assert by_name["reversal"].cells == [("reversal", lv) for lv in range(1, 11)]
    assert by_name["sorting"].cells == [("sorting", lv) for lv in range(6, 11)]
    assert by_name["sorting"].size == 30 and by_name["reversal"].error_rate == 1.0
    assert {(c.task, c.level) for c in solved} == {(t, lv) for t in ("addition", "copy") for lv in range(1, 11)} | {
        ("sorting", lv) for lv in range(1, 6)}
    none, all_solved = cluster_cells(measure_cells(OracleModel(questions, tokenizer, lambda t, lv: False), questions,
                                                   tokenizer, 48, _loss_rows(tokenizer)), 1, 4, 0.95, 0)
    assert none == [] and len(all_solved) == 40


@pytest.fixture(scope="module")
def trained(addition_copy_model):
    """The dim-64 two-layer model of the Phase 6 tests (addition and copy), grown by the call format's tokens."""
    model, tokenizer = addition_copy_model
    tokenizer = CharTokenizer.from_dict(tokenizer.to_dict())
    add_tool_tokens(tokenizer)
    return resize_vocab(copy.deepcopy(model), tokenizer.vocab_size).eval(), tokenizer


def _cfg(**changes):
    cfg = load_config().phases.phase7
    return cfg.model_copy(update=changes)


def test_reinforce_raises_the_reward_of_a_cluster(trained):
    """Addition at level 2 (base accuracy 0.36 on 64 val questions). Measured over seeds 0, 1, 2: the kept
    expert's greedy accuracy (its reward, +1 right / -1 wrong) 0.41 / 0.45 / 0.45, gains of 3, 6, 6 questions:
    a margin of a few questions, so the test asks for a real gain (at least one question), not a size of it."""
    model, tokenizer = trained
    train, val = level_examples("addition", 2, 256, "train", 0), level_examples("addition", 2, 64, "val", 0)
    cfg = _cfg(svf_steps=60, svf_batch_size=16, svf_lr=0.1, eval_every=10, svf_singular_values=16)
    out = train_expert(add_svf(model, 16), model, train, val, tokenizer, cfg, method="reinforce", true_rows=None,
                       seed=0)
    assert len(out["rewards"]) == 60 and all(r in (-1.0, 1.0) or -1 < r < 1 for r in out["rewards"])
    assert out["val_accuracy"] > out["base_val_accuracy"] and out["best_step"] > 0, out
    assert any(not torch.allclose(z, torch.ones_like(z)) for z in out["expert"].values())
    svf = add_svf(model, 16)
    set_expert(svf, out["expert"])          # the kept expert is what was measured
    assert _greedy_accuracy(svf, val, tokenizer) == out["val_accuracy"]


def _greedy_accuracy(model, examples, tokenizer):
    from forge.pipeline.phases.phase7_experts.discovery import correct_flags

    flags = correct_flags(model, examples, tokenizer, 48)
    return sum(flags) / len(flags)


def test_cem_finds_the_known_best_mixture_of_real_experts(trained):
    """The target is the model under 0.3·z_a + 0.7·z_b of two random experts; CEM scores a mixture by how close
    its logits come to the target's on a few questions, and must land near (0.3, 0.7)."""
    model, tokenizer = trained
    svf = add_svf(model, 8)
    gen = torch.Generator().manual_seed(0)
    experts = [{n: 0.2 + 1.6 * torch.rand(8, generator=gen) for n in expert_of(svf)} for _ in range(2)]
    tokens, _ = _loss_rows(tokenizer)(level_examples("addition", 3, 8, "val", 0))
    with torch.no_grad():
        target = fold_svf(svf, mix_experts(experts, [0.3, 0.7]))(tokens)

    def closeness(alpha):
        with torch.no_grad():
            return -float((fold_svf(svf, mix_experts(experts, alpha.tolist()))(tokens) - target).pow(2).mean())
    found = cem(closeness, 2, population=16, elites=4, iterations=12, seed=0)
    assert np.allclose(found["alpha"], [0.3, 0.7], atol=0.05), found
    assert found["history"] == sorted(found["history"])


def test_nsga2_front_is_non_dominated_and_made_of_real_evaluations(trained):
    """Per-layer-group mixtures of two real experts scored by held-out accuracy with the calculator."""
    from forge.pipeline.phases.phase7_experts.discovery import correct_flags

    model, tokenizer = trained
    svf = add_svf(model, 8)
    gen = torch.Generator().manual_seed(1)
    experts = [{n: 0.5 + torch.rand(8, generator=gen) for n in expert_of(svf)} for _ in range(2)]
    groups = [[n for n in expert_of(svf) if n.startswith(f"blocks.{i}.")] for i in range(2)]
    val = level_examples("addition", 2, 24, "val", 0)
    from forge.pipeline.phases.phase7_experts.dispatch import group_weights

    def accuracy(x):
        flags = correct_flags(fold_svf(svf, mix_experts(experts, group_weights(x, groups, 2))), val, tokenizer, 48)
        return sum(flags) / len(flags)
    out = nsga2_search(accuracy, [24, 24], 2, population=6, generations=3, crossover_rate=0.9, mutation_rate=0.3,
                       seed=0)
    front, log = out["front"], out["evaluations"]
    assert len(log) >= 6 * 3 - 6 and front
    assert not any(dominates(a, b) for a in front for b in front)
    assert not any(dominates(e, f) for e in log for f in front)         # nothing evaluated beats the front
    for point in front:
        logged = [e for e in log if np.allclose(e["x"], point["x"])]
        assert logged and logged[0]["accuracy"] == point["accuracy"] == accuracy(np.array(point["x"]))
    assert len({p["parameters"] for p in log}) > 1


def test_the_router_learns_clusters_from_hidden_states(trained):
    model, tokenizer = trained
    tasks = ["addition", "copy", "reversal"]
    train = [ex for t in tasks for ex in level_examples(t, 3, 40, "train", 0)]
    test = [ex for t in tasks for ex in level_examples(t, 3, 20, "test", 0)]
    router = Router(prompt_features(model, train, tokenizer), [tasks.index(ex.task) for ex in train], 3)
    predicted = router.predict(prompt_features(model, test, tokenizer))
    assert np.mean([p == tasks.index(ex.task) for p, ex in zip(predicted, test)]) >= 0.9


SMALL = ("wandb.mode=disabled", "phases.phase7.enabled=true", "phases.phase7.svf_steps=4", "phases.phase7.eval_every=2",
         "phases.phase7.discovery_questions=4", "phases.phase7.eval_questions=4", "phases.phase7.train_questions=8",
         "phases.phase7.svf_batch_size=8", "phases.phase7.compare_methods=false", "phases.phase7.router_steps=50",
         "phases.phase7.cem_population=2", "phases.phase7.cem_elites=1", "phases.phase7.cem_iterations=1",
         "phases.phase7.adas_population=2", "phases.phase7.adas_generations=1", "phases.phase7.adas_questions=8")
LENIENT = ("phases.phase7.min_expert_gain=-1", "phases.phase7.min_routing_gain=-1",
           "phases.phase7.min_gain_over_random=-1")
BAKED = {"cycles_completed": 1, "tool_lift": 1.0, "base_accuracy_drop": 0.0, "min_persona_kl_reduction": 1.0,
         "max_persona_adherence_gap": 0.0}


def _hand_on_class():
    """A stand-in Phase 6 that hands its input on as a baked model, so a test reaches Phase 7 inside one
    session without paying for a real Phase 6."""
    from forge.pipeline.controller import ModelOutput, PhaseController, PhaseResult

    class _HandOn(PhaseController):
        phase, name = 6, "baking"

        def execute(self, ctx):
            item = ctx.inputs[0]
            meta = {**item.metadata, **BAKED, "tools": ["calculator"], "personas": [],
                    "answer_format": {"before": [], "after": []}}
            return PhaseResult(True, [ModelOutput("baked", item.model, meta, dict(BAKED))], dict(BAKED))
    return _HandOn


HandOnAsBaked = _hand_on_class()    # importable as test_phase7_experts:HandOnAsBaked


def _registered(registry, model, tokenizer, tmp_path, phase: int, checks: dict, extra: dict = ()):
    from forge.registry import new_session_id, save_checkpoint

    source = registry.create_session(new_session_id("src"), {})
    meta = {"model_config": model.config.to_dict(), "tokenizer": tokenizer.to_dict(), "task_weights": TASKS,
            **dict(extra), **checks}
    path = save_checkpoint(model.state_dict(), tmp_path / f"phase{phase}.safetensors", meta).path
    model_id = registry.register_model(source, f"phase{phase}", f"phase{phase}", path, meta, phase=phase,
                                       metrics=checks)
    registry.record_phase_result(source, phase, "completed", [model_id], checks, 1.0)
    return source, model_id


def test_phase7_through_the_pipeline_registers_tracks_and_resumes_after_a_rollback(trained, tmp_path, monkeypatch):
    """A registered Phase 5 model through a stand-in Phase 6 and the real Phase 7: Phase 7's model is registered
    with Phase 6's as parent, is a plain Transformer, each metric is tracked once and catalogued, the expert
    files are written; after a rollback to 6, resume redoes Phase 7 with the same metrics."""
    from _catalogue import uncatalogued

    from forge.nn import Transformer
    from forge.pipeline.orchestrator import Pipeline
    from forge.pipeline.phases import PHASES
    from forge.registry import ModelRegistry
    from forge.tracking import read_metrics

    monkeypatch.setitem(PHASES, 6, ("baking", "test_phase7_experts:HandOnAsBaked"))
    model, tokenizer = trained
    config = load_config(overrides=(f"run_root={tmp_path / 'runs'}", *SMALL, *LENIENT))
    registry = ModelRegistry(config.registry_path())
    source, _ = _registered(registry, model, tokenizer, tmp_path, 5, {"levels_completed": 3})
    pipeline = Pipeline(config, registry, log=lambda _msg: None, progress_bars=False)
    report = pipeline.run(from_phase=6, source_session=source, to_phase=7)
    assert report.status == "completed" and report.completed == [6, 7], report.message
    sid = report.session_id
    (p6,), (p7,) = registry.list_models(session_id=sid, phase=6), registry.list_models(session_id=sid, phase=7)
    assert p7["parent_ids"] == [p6["id"]]
    (loaded,) = pipeline.load_models([p7["id"]])
    assert type(loaded.model) is Transformer and loaded.metadata["num_experts"] >= 2
    assert len(loaded.metadata["experts"]) == loaded.metadata["num_experts"] and loaded.metadata["router"]
    names = [name for line in read_metrics(pipeline.session_dir(sid)) for name in line["metrics"]]
    assert names.count("phase7/num_experts") == 1 and names.count("phase7/routing_gain") == 1
    assert uncatalogued(pipeline.session_dir(sid)) == []
    first = pipeline.completed(sid)[7]["metrics"]
    pipeline.rollback(sid, 6)
    assert sorted(pipeline.completed(sid)) == [6]
    pipeline.resume(sid)
    assert pipeline.completed(sid)[7]["metrics"] == first
    assert len(registry.list_models(session_id=sid, phase=7)) == 2
    registry.close()


def test_a_run_killed_mid_phase7_resumes_and_registers_once(trained, tmp_path):
    """`forge run --only 7` killed with SIGKILL once an expert's training is logged, then `forge resume`."""
    from _kill_resume import kill_then_resume, logged

    from forge.registry import ModelRegistry

    model, tokenizer = trained
    runs = tmp_path / "runs"
    with ModelRegistry(runs / "registry.db") as registry:
        source, _ = _registered(registry, model, tokenizer, tmp_path, 6, BAKED, {
            "tools": ["calculator"], "personas": [], "answer_format": {"before": [], "after": []}})
    session = kill_then_resume(tmp_path, runs, source, 7, (*SMALL, *LENIENT), logged(runs, "svf/"))
    with ModelRegistry(runs / "registry.db") as registry:
        assert len(registry.list_models(session_id=session, phase=7)) == 1
