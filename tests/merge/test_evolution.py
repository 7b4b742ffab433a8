"""Evolutionary merge search on a real small problem: three residual MLPs trained from one init on
different samples of one classification task; fitness = accuracy and loss on a shared validation set."""
import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forge.merge import EvolutionConfig, Recipe, apply_recipe, evolve, score
from forge.merge.evolution import _Shape, crossover, default_recipe, initial_population, mutate, random_recipe

D, HIDDEN, LAYERS, CLASSES = 8, 16, 2, 3


class Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.fc = nn.Linear(h, h)

    def forward(self, x):
        return x + torch.relu(self.fc(x))


class ResMLP(nn.Module):
    """embed -> n residual blocks (named blocks.<i>, so frankenmerge/dfs apply) -> head."""

    def __init__(self, n_layers=LAYERS):
        super().__init__()
        self.embed = nn.Linear(D, HIDDEN)
        self.blocks = nn.ModuleList(Block(HIDDEN) for _ in range(n_layers))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def teacher_data(n, g, w1, w2):
    x = torch.randn(n, D, generator=g)
    return x, (torch.tanh(x @ w1) @ w2).argmax(1)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: with two threads on a shared 2-core machine each step waits on the other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def problem(_one_thread):
    """Three models fine-tuned from one init on 60 different examples each; a 1000-example validation set."""
    tg = torch.Generator().manual_seed(99)
    w1, w2 = torch.randn(D, 12, generator=tg), torch.randn(12, CLASSES, generator=tg)
    g = torch.Generator().manual_seed(0)
    x_val, y_val = teacher_data(1000, g, w1, w2)
    torch.manual_seed(0)
    base = {k: v.clone() for k, v in ResMLP().state_dict().items()}
    states = []
    for _ in range(3):
        x, y = teacher_data(60, g, w1, w2)
        model = ResMLP()
        model.load_state_dict(base)
        opt = torch.optim.Adam(model.parameters(), lr=0.03)
        for _ in range(60):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    calls = []

    def fitness(state, n_layers):
        calls.append(n_layers)
        model = ResMLP(n_layers)
        model.load_state_dict(state)
        with torch.no_grad():
            logits = model(x_val)
        return {"accuracy": (logits.argmax(1) == y_val).float().mean().item(),
                "loss": F.cross_entropy(logits, y_val).item(),
                "seconds": 1e-3 * (n_layers + 2),          # deterministic speed proxy: cost grows with depth
                "bytes": 4 * sum(v.numel() for v in state.values())}
    return SimpleNamespace(states=states, base=base, fitness=fitness, calls=calls)


def run(problem, **overrides):
    config = EvolutionConfig(**{"generations": 6, "seed": 0, **overrides})
    problem.calls.clear()
    return evolve(problem.states, problem.base, problem.fitness, config)


def test_champion_beats_the_best_input_and_is_what_it_claims(problem):
    result = run(problem)
    input_scores = [c.score for c in result.inputs]
    assert result.baseline.score == max(input_scores) and result.baseline_index == input_scores.index(max(input_scores))
    assert result.champion.score > result.baseline.score + 0.01, (result.champion.score, result.baseline.score)
    assert result.gain == pytest.approx(result.champion.score - result.baseline.score)
    assert result.champion.recipe.operator in EvolutionConfig().operators
    # the returned state is the champion's recipe applied, and scores what the champion says
    again, n_layers = apply_recipe(result.champion.recipe, problem.states, problem.base)
    assert all(torch.equal(again[k], result.champion_state[k]) for k in again)
    assert problem.fitness(result.champion_state, n_layers) == pytest.approx(result.champion.metrics)
    summary = result.to_dict()
    assert Recipe.from_dict(summary["champion"]["recipe"]) == result.champion.recipe
    assert len(summary["history"]) == 7


def test_elitism_keeps_the_best_score_and_generation_zero_tries_every_operator(problem):
    result = run(problem, generations=5)
    bests = [h.best for h in result.history]
    assert all(b >= a for a, b in zip(bests, bests[1:])), bests
    assert result.history[0].operators == 6
    assert result.champion.score == bests[-1] == max(c.score for c in result.candidates[3:])
    for h in result.history:
        assert h.best >= h.mean and h.diversity >= 0
    gen0 = [c.recipe for c in result.candidates[3:11]]
    assert [r.operator for r in gen0[:6]] == list(EvolutionConfig().operators)
    assert any(c.n_layers != LAYERS for c in result.candidates)   # DFS changed the depth somewhere


def test_reproducible_with_a_seed(problem):
    a, b, c = run(problem, generations=3), run(problem, generations=3), run(problem, generations=3, seed=1)
    assert [h.to_dict() for h in a.history] == [h.to_dict() for h in b.history]
    assert a.champion.recipe == b.champion.recipe
    assert [x.recipe.key() for x in a.candidates] == [x.recipe.key() for x in b.candidates]
    assert [x.recipe.key() for x in a.candidates] != [x.recipe.key() for x in c.candidates]


def test_fitness_cache_counts(problem):
    # one discrete operator and no continuous noise: recipes repeat, and repeats are not re-evaluated
    result = run(problem, operators=["frankenmerge"], mutation_strength=0.0, generations=8, population_size=6)
    requested = 6 + 8 * (6 - 2)
    assert result.cache_hits > 0
    assert result.evaluations == len(problem.calls) == len(result.candidates)
    assert result.evaluations - 3 + result.cache_hits == requested
    keys = [c.recipe.key() for c in result.candidates]
    assert len(set(keys)) == len(keys)


def test_progress_is_reported(problem):
    seen = []
    evolve(problem.states, problem.base, problem.fitness, EvolutionConfig(generations=2),
           progress=lambda fraction, message: seen.append((fraction, message)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(seen) == 3
    assert "champion" in seen[-1][1]


# ---------------------------------------------------------------- pieces

def test_score_formula():
    metrics = {"accuracy": 0.5, "loss": 2.0, "seconds": 0.02, "bytes": 400.0}
    reference = {"seconds": 0.01, "bytes": 800.0}
    weights = {"accuracy": 1.0, "loss": 0.3, "speed": 0.05, "memory": 0.1}
    expected = 0.5 + 0.3 * math.exp(-2.0) + 0.05 * 0.5 + 0.1 * 2.0
    assert score(metrics, weights, reference) == pytest.approx(expected)
    assert score({"accuracy": 0.2, "loss": math.nan}, {"accuracy": 1.0, "loss": 1.0}) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="lack 'loss'"):
        score({"accuracy": 0.5}, {"accuracy": 1.0, "loss": 0.3})
    with pytest.raises(ValueError, match="reference"):
        score(metrics, {"speed": 1.0})
    with pytest.raises(ValueError, match="unknown keys \\['ppl'\\]"):
        score(metrics, {"ppl": 1.0})
    with pytest.raises(ValueError, match="metrics.accuracy"):
        score({"accuracy": 1.5}, {"accuracy": 1.0})


def test_config_is_validated(problem):
    cases = [({"population_size": 1}, "population_size"), ({"elite_count": 8}, "elite_count"),
             ({"operators": ["linear", "blend"]}, "operators"), ({"fitness_weights": {"acc": 1.0}}, "unknown keys"),
             ({"mutation_strength": -0.1}, "mutation_strength"), ({"generations": -1}, "generations")]
    for override, field in cases:
        with pytest.raises(ValueError, match=field):
            evolve(problem.states, problem.base, problem.fitness, EvolutionConfig(**override))
    with pytest.raises(ValueError, match="lacks the phase-2 fields \\['seed'\\]"):
        evolve(problem.states, problem.base, problem.fitness, SimpleNamespace(**{
            k: v for k, v in vars(EvolutionConfig()).items() if k != "seed"}))
    with pytest.raises(ValueError, match="need base"):
        evolve(problem.states, None, problem.fitness, EvolutionConfig())
    plain = SimpleNamespace(**{**vars(EvolutionConfig()), "generations": 1, "operators": ["linear", "slerp"]})
    assert evolve(problem.states, None, problem.fitness, plain).history[-1].generation == 1


def test_generation_zero_mutation_and_crossover_stay_valid(problem):
    shape = _Shape(n_models=3, n_layers=LAYERS)
    rng = random.Random(0)
    ops = EvolutionConfig().operators
    assert initial_population(ops, 4, shape, rng) == [default_recipe(op, shape) for op in ops[:4]]
    gen0 = initial_population(ops, 9, shape, rng)
    assert [r.operator for r in gen0[6:]] == ["linear", "slerp", "ties"]
    recipes = [random_recipe(op, shape, rng) for op in ops for _ in range(3)]
    for _ in range(60):
        a, b = rng.choice(recipes), rng.choice(recipes)
        child = mutate(a, 0.2, shape, rng)
        mixed = crossover(a, b, shape, rng)
        assert child.operator == a.operator and mixed.operator in (a.operator, b.operator)
        for recipe in (child, mixed):
            w = recipe.params["weights"]
            assert all(x > 0 for x in w) and sum(w) == pytest.approx(1.0, abs=1e-5)
            assert 0.05 <= recipe.params.get("density", 0.5) <= 1.0
            assert 0.0 <= recipe.params.get("drop_rate", 0.0) <= 0.95
            assert 1 <= len(recipe.params.get("path", [[0, 0]])) <= shape.max_depth
            state, n_layers = apply_recipe(recipe, problem.states, problem.base)
            assert n_layers == len(recipe.params.get("path", [0] * LAYERS))
        recipes.append(child)
