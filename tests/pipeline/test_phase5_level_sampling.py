"""Phase 5's edge level sampler (`phases.phase5.level_sampling: edge`): the weights favour the levels neither
mastered nor hopeless, the climb draws its mixed questions by them, learns the levels' running accuracies from
its own training answers, and is seeded. No model is trained: `train_step` is replaced by a stub."""
from collections import Counter
from types import SimpleNamespace

import pytest

from forge.pipeline.config import ConfigError, load_config
from forge.pipeline.phases.phase5_curriculum import climb as climb_module
from forge.pipeline.phases.phase5_curriculum.climb import EDGE_PRIOR, Climber, edge_weights


def _climber(sampling: str, seed: int = 0, **changes) -> Climber:
    cfg = SimpleNamespace(**{**load_config().phases.phase5.model_dump(), "level_sampling": sampling, **changes})
    return Climber(None, None, None, 48, {"copy": 2, "reversal": 1}, cfg, seed=seed)


def test_edge_weights_favour_a_level_half_right_over_mastered_and_hopeless_ones():
    mastered, edge, hopeless, nearly = edge_weights([1.0, 0.5, 0.0, 0.9])
    assert edge > nearly > mastered > 0 and edge > 5 * hopeless and mastered == hopeless


def test_the_edge_sampler_draws_mostly_the_edge_level_and_uniform_does_not():
    draws = {}
    for sampling in ("uniform", "edge"):
        climber = _climber(sampling)
        for level in range(1, 11):
            climber.mix_accuracy["copy", level] = 1.0 if level < 4 else 0.0
        climber.mix_accuracy["copy", 4] = 0.5
        draws[sampling] = Counter(climber.mix_level("copy") for _ in range(4000))
    assert draws["edge"][4] / 4000 > 0.5 > 0.2 > draws["uniform"][4] / 4000
    assert set(draws["edge"]) == set(range(1, 11))       # the floor: mastered and hopeless levels still come up


def test_the_climb_learns_each_levels_accuracy_from_its_training_answers(monkeypatch):
    def all_right(model, optimizer, examples, tokenizer, max_len, net):
        return 0.0, [True] * len(examples)
    monkeypatch.setattr(climb_module, "train_step", all_right)
    climber = _climber("edge", steps=40, eval_every=10_000)
    climber.run()
    assert climber.step == 40
    for task in ("copy", "reversal"):
        rows = [climber.mix_accuracy[task, level] for level in range(1, 11)]
        assert all(acc > 0.9 for acc in rows), rows      # ~3 mixed answers a level and step, all right
    assert EDGE_PRIOR == 0.5


def test_the_edge_sampler_is_seeded():
    def draws(seed: int) -> list[int]:
        climber = _climber("edge", seed=seed)
        climber.mix_accuracy.update({("copy", lv): lv / 10 for lv in range(1, 11)})
        return [climber.mix_level("copy") for _ in range(200)]
    assert draws(3) == draws(3) != draws(4)


def test_the_config_refuses_an_unknown_sampler():
    assert load_config().phases.phase5.level_sampling == "uniform"
    with pytest.raises(ConfigError):
        load_config(overrides=("phases.phase5.level_sampling=progress",))
