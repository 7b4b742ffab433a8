"""Evolutionary search over merge recipes (Phase 2, EvoMerge).

Generation 0 holds one recipe per operator at its usual setting (the seed's "2^3 = 8 combinations":
every operator tried on the inputs), then random settings of the operators in turn until
`population_size`. Each later generation keeps the `elite_count` best (elitism: the best score never
drops), fills about two thirds of the rest with mutants of the elites (recipe parameters perturbed by
`mutation_strength`) and the last third by merging the losers' recipes pairwise, worst first
(crossover: the seed's "loser merging"). The input models are scored too; the best of them is the
baseline the champion is measured against. Every random choice comes from `random.Random(seed)`,
and each distinct recipe (by `Recipe.key()`) is evaluated once.

`fitness_fn(state, n_layers) -> {"accuracy", "loss", "seconds", "bytes"}` measures a merged model;
`score` combines the metrics with the config's `fitness_weights` (see its docstring).
"""
from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from forge.merge.operators import (
    OPERATORS, LayerKeyFn, RenameFn, Recipe, StateDict, apply_recipe, block_index, check_states, count_layers,
    rename_block,
)
from forge._checks import check_finite_number, check_positive_int

FITNESS_KEYS = ("accuracy", "loss", "speed", "memory")
_METRIC_FOR = {"accuracy": "accuracy", "loss": "loss", "speed": "seconds", "memory": "bytes"}
_LAYER_OPERATORS = ("frankenmerge", "dfs")
_BASE_OPERATORS = ("ties", "dare")

FitnessFn = Callable[[StateDict, int], Mapping[str, float]]


@dataclass
class EvolutionConfig:
    """The phase-2 fields `evolve` reads (any object with these attributes will do)."""
    generations: int = 6                 # generations after generation 0
    population_size: int = 8
    elite_count: int = 2
    mutation_strength: float = 0.05      # std of the Gaussian added to continuous recipe parameters
    operators: Sequence[str] = OPERATORS
    fitness_weights: Mapping[str, float] = field(
        default_factory=lambda: {"accuracy": 1.0, "loss": 0.3, "speed": 0.05, "memory": 0.05})
    seed: int = 0


def read_config(config) -> EvolutionConfig:
    """Copy and validate the phase-2 fields of `config`; errors name the field."""
    names = ("generations", "population_size", "elite_count", "mutation_strength", "operators",
             "fitness_weights", "seed")
    missing = [n for n in names if not hasattr(config, n)]
    if missing:
        raise ValueError(f"config lacks the phase-2 fields {missing}")
    cfg = EvolutionConfig(**{n: getattr(config, n) for n in names})
    if isinstance(cfg.generations, bool) or not isinstance(cfg.generations, int) or cfg.generations < 0:
        raise ValueError(f"generations must be an integer >= 0, got {cfg.generations!r}")
    if check_positive_int("population_size", cfg.population_size) < 2:
        raise ValueError(f"population_size must be >= 2, got {cfg.population_size}")
    if check_positive_int("elite_count", cfg.elite_count) >= cfg.population_size:
        raise ValueError(f"elite_count must be in 1..population_size-1, got {cfg.elite_count}")
    check_finite_number("mutation_strength", cfg.mutation_strength, low=0.0)
    cfg.operators = tuple(cfg.operators)
    bad = [op for op in cfg.operators if op not in OPERATORS]
    if not cfg.operators or bad:
        raise ValueError(f"operators must be a non-empty list from {list(OPERATORS)}, got {list(cfg.operators)}")
    check_fitness_weights(cfg.fitness_weights)
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}")
    return cfg


def check_fitness_weights(weights) -> None:
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"fitness_weights must be a non-empty dict with keys from {list(FITNESS_KEYS)}")
    unknown = sorted(set(weights) - set(FITNESS_KEYS))
    if unknown:
        raise ValueError(f"fitness_weights has unknown keys {unknown}; allowed: {list(FITNESS_KEYS)}")
    for key, value in weights.items():
        check_finite_number(f"fitness_weights.{key}", value, low=0.0)
    if not any(weights.values()):
        raise ValueError("fitness_weights are all 0; at least one must be positive")


# ---------------------------------------------------------------- fitness

def score(metrics: Mapping[str, float], weights: Mapping[str, float],
          reference: Mapping[str, float] | None = None) -> float:
    """Weighted fitness, higher is better; every term is about 1 for a good model of the usual size:

        w_accuracy * accuracy                      (accuracy in [0, 1])
      + w_loss     * exp(-loss)                    (1 / perplexity, in (0, 1]; the seed's 1/ppl term;
                                                    0 when the loss is not finite)
      + w_speed    * reference_seconds / seconds   (relative speed; 1 = as fast as the reference)
      + w_memory   * reference_bytes / bytes       (relative size; 1 = as small as the reference)

    `reference` (evolve uses the mean over the input models) is needed when speed or memory count.
    """
    check_fitness_weights(weights)
    total = 0.0
    for key, weight in weights.items():
        if weight == 0:
            continue
        name = _METRIC_FOR[key]
        if name not in metrics:
            raise ValueError(f"fitness metrics lack {name!r} (needed by fitness_weights.{key}); got {sorted(metrics)}")
        value = float(metrics[name])
        if key == "accuracy":
            total += weight * check_finite_number("metrics.accuracy", value, 0.0, 1.0)
        elif key == "loss":
            total += weight * (math.exp(-value) if math.isfinite(value) else 0.0)
        else:
            if reference is None or name not in reference:
                raise ValueError(f"score needs reference[{name!r}] when fitness_weights.{key} > 0")
            measured = check_finite_number(f"metrics.{name}", value, low=0.0, low_open=True)
            total += weight * float(reference[name]) / measured
    return total


@dataclass
class Candidate:
    """A scored recipe."""
    recipe: Recipe
    metrics: dict
    score: float
    n_layers: int

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "metrics": dict(self.metrics), "score": self.score,
                "n_layers": self.n_layers}


class _Evaluator:
    """Applies recipes, calls fitness_fn, scores; one evaluation per distinct recipe key."""

    def __init__(self, states, base, fitness_fn, weights, layer_key_fn, rename_fn):
        self.states, self.base, self.fitness_fn, self.weights = states, base, fitness_fn, weights
        self.layer_key_fn, self.rename_fn = layer_key_fn, rename_fn
        self.cache: dict[str, Candidate] = {}
        self.evaluations = 0
        self.cache_hits = 0
        self.reference: dict | None = None

    def measure(self, state: StateDict, n_layers: int) -> dict:
        metrics = self.fitness_fn(state, n_layers)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"fitness_fn must return a dict of metrics, got {type(metrics).__name__}")
        self.evaluations += 1
        return {k: float(v) for k, v in metrics.items()}

    def inputs(self, n_layers: int) -> list[Candidate]:
        """Score the input models as they are; their recipes are the one-hot linear merges."""
        count = len(self.states)
        measured = [self.measure(s, n_layers) for s in self.states]
        self.reference = {name: statistics.fmean(m[name]
                                                 for m in measured) for name in ("seconds", "bytes")
                          if all(name in m for m in measured)}
        out = []
        for i, metrics in enumerate(measured):
            recipe = Recipe("linear", {"weights": [float(j == i) for j in range(count)]})
            cand = Candidate(recipe, metrics, score(metrics, self.weights, self.reference), n_layers)
            self.cache[recipe.key()] = cand
            out.append(cand)
        return out

    def __call__(self, recipe: Recipe) -> Candidate:
        key = recipe.key()
        if key in self.cache:
            self.cache_hits += 1
            return self.cache[key]
        state, n_layers = apply_recipe(recipe, self.states, self.base, self.layer_key_fn, self.rename_fn)
        metrics = self.measure(state, n_layers)
        cand = Candidate(recipe, metrics, score(metrics, self.weights, self.reference), n_layers)
        self.cache[key] = cand
        return cand


# ---------------------------------------------------------------- recipes: generation 0

@dataclass(frozen=True)
class _Shape:
    """What recipes may refer to: the number of input models and of layers, the deepest DFS child."""
    n_models: int
    n_layers: int

    @property
    def max_depth(self) -> int:
        return 2 * self.n_layers


def default_recipe(operator: str, shape: _Shape) -> Recipe:
    """The operator's usual setting: equal weights; TIES keeps the top 20 % (the paper's k); DARE drops
    50 %; FrankenMerge takes layer i from model i mod n; DFS does the same and repeats the last layer
    from the next model (one layer deeper)."""
    n, depth = shape.n_models, shape.n_layers
    equal = [1.0 / n] * n
    params = {
        "linear": {"weights": equal},
        "slerp": {"weights": equal},
        "ties": {"weights": equal, "density": 0.2, "scale": 1.0},
        "dare": {"weights": equal, "drop_rate": 0.5, "seed": 0, "combine": "linear", "density": 1.0, "scale": 1.0},
        "frankenmerge": {"layer_sources": [i % n for i in range(depth)], "weights": equal},
        "dfs": {"path": [[i % n, i] for i in range(depth)] + [[depth % n, depth - 1]], "weights": equal},
    }[operator]
    return Recipe(operator, params)


def _random_weights(rng: random.Random, n: int) -> list[float]:
    draws = [rng.expovariate(1.0) + 1e-3 for _ in range(n)]
    return [d / sum(draws) for d in draws]


def _ordered_path(rng: random.Random, depth: int, shape: _Shape) -> list[list[int]]:
    """A DFS path of `depth` picks whose layer indices follow the parents' order, models at random."""
    return [[rng.randrange(shape.n_models), min(shape.n_layers - 1, j * shape.n_layers // depth)]
            for j in range(depth)]


def random_recipe(operator: str, shape: _Shape, rng: random.Random) -> Recipe:
    """A random setting of `operator` (generation 0 beyond the defaults)."""
    params = dict(default_recipe(operator, shape).params)
    params["weights"] = _random_weights(rng, shape.n_models)
    if operator == "ties":
        params.update(density=rng.uniform(0.1, 0.9), scale=rng.uniform(0.7, 1.5))
    elif operator == "dare":
        params.update(drop_rate=rng.uniform(0.1, 0.9), seed=rng.randrange(2**31),
                      combine=rng.choice(["linear", "ties"]), density=rng.uniform(0.3, 1.0))
    elif operator == "frankenmerge":
        params["layer_sources"] = [rng.randrange(shape.n_models) for _ in range(shape.n_layers)]
    elif operator == "dfs":
        low, high = max(1, shape.n_layers - 1), min(shape.max_depth, shape.n_layers + 1)
        params["path"] = _ordered_path(rng, rng.randint(low, high), shape)
    return Recipe(operator, params)


def initial_population(operators: Sequence[str], size: int, shape: _Shape, rng: random.Random) -> list[Recipe]:
    """Generation 0: each operator's default (the first `size` of them), then random settings of the
    operators in turn until there are `size` recipes."""
    recipes = [default_recipe(op, shape) for op in operators][:size]
    i = 0
    while len(recipes) < size:
        recipes.append(random_recipe(operators[i % len(operators)], shape, rng))
        i += 1
    return recipes


# ---------------------------------------------------------------- recipes: mutation and crossover

def _clip(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


def _perturb_weights(weights: list[float], strength: float, rng: random.Random) -> list[float]:
    moved = [max(1e-3, w + rng.gauss(0.0, strength)) for w in weights]
    return [w / sum(moved) for w in moved]


def _mutate_path(path: list, shape: _Shape, rng: random.Random) -> list:
    """One edit of a DFS path: re-pick a model, re-pick a layer, duplicate a pick, or drop one."""
    path = [list(p) for p in path]
    j = rng.randrange(len(path))
    edit = rng.choice(["model", "layer", "insert", "delete"])
    if edit == "insert" and len(path) < shape.max_depth:
        path.insert(j, list(path[j]))
    elif edit == "delete" and len(path) > 1:
        del path[j]
    elif edit == "layer":
        path[j][1] = rng.randrange(shape.n_layers)
    else:
        path[j][0] = rng.randrange(shape.n_models)
    return path


def mutate(recipe: Recipe, strength: float, shape: _Shape, rng: random.Random) -> Recipe:
    """Perturb a recipe: Gaussian noise of std `strength` on the weights (kept positive, renormalized),
    density, scale and drop rate (clipped to their ranges); with probability 1/2 one discrete edit
    (a FrankenMerge layer source re-drawn, a DFS path edit). The operator stays."""
    params = {**default_recipe(recipe.operator, shape).params, **recipe.params}
    params["weights"] = _perturb_weights(params["weights"], strength, rng)
    for key, low, high in (("density", 0.05, 1.0), ("scale", 0.1, 3.0), ("drop_rate", 0.0, 0.95)):
        if key in params:
            params[key] = _clip(params[key] + rng.gauss(0.0, strength), low, high)
    if rng.random() < 0.5:
        if recipe.operator == "frankenmerge":
            sources = list(params["layer_sources"])
            sources[rng.randrange(len(sources))] = rng.randrange(shape.n_models)
            params["layer_sources"] = sources
        elif recipe.operator == "dfs":
            params["path"] = _mutate_path(params["path"], shape, rng)
    return Recipe(recipe.operator, params)


def _blend(key: str, mine, theirs, shape: _Shape, rng: random.Random):
    if key == "weights":
        return [(a + b) / 2 for a, b in zip(mine, theirs)]
    if key == "layer_sources":
        return [a if rng.random() < 0.5 else b for a, b in zip(mine, theirs)]
    if key == "path":   # one-point crossover, depth capped
        child = mine[:rng.randint(1, len(mine))] + theirs[rng.randint(0, len(theirs)):]
        return child[:shape.max_depth]
    if isinstance(mine, float) and isinstance(theirs, float):
        return (mine + theirs) / 2
    return mine if rng.random() < 0.5 else theirs


def crossover(a: Recipe, b: Recipe, shape: _Shape, rng: random.Random) -> Recipe:
    """Merge two recipes: the child takes one parent's operator (at random) and, for each parameter both
    parents have, their mean (weights, density, scale, drop rate), a per-layer pick (layer sources), a
    one-point crossover (DFS paths) or one of the two (seed, combine)."""
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    params = {**default_recipe(first.operator, shape).params, **first.params}
    other = {**default_recipe(second.operator, shape).params, **second.params}
    for key in params:
        if key in other:
            params[key] = _blend(key, params[key], other[key], shape, rng)
    return Recipe(first.operator, params)


# ---------------------------------------------------------------- the search

@dataclass
class GenerationStats:
    """One generation: best and mean score, diversity (the scores' standard deviation, the seed's
    fitness_std), the number of distinct operators, and the best recipe."""
    generation: int
    best: float
    mean: float
    diversity: float
    operators: int
    best_recipe: dict

    def to_dict(self) -> dict:
        return dict(vars(self))


@dataclass
class EvolutionResult:
    """The champion (best recipe found) and its state, the baseline (best input), and the search record."""
    champion: Candidate
    champion_state: StateDict
    baseline: Candidate
    baseline_index: int
    inputs: list[Candidate]
    population: list[Candidate]
    history: list[GenerationStats]
    evaluations: int          # fitness_fn calls (inputs included)
    cache_hits: int           # recipes met again and not re-evaluated
    candidates: list[Candidate] = field(default_factory=list)   # every evaluated recipe, in order

    @property
    def gain(self) -> float:
        """champion score - best input score."""
        return self.champion.score - self.baseline.score

    @property
    def gain_relative(self) -> float:
        """gain / |best input score| (0 when that score is 0)."""
        return self.gain / abs(self.baseline.score) if self.baseline.score else 0.0

    def to_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        return {"champion": self.champion.to_dict(), "baseline": self.baseline.to_dict(),
                "baseline_index": self.baseline_index, "gain": self.gain, "gain_relative": self.gain_relative,
                "inputs": [c.to_dict() for c in self.inputs], "history": [h.to_dict() for h in self.history],
                "evaluations": self.evaluations, "cache_hits": self.cache_hits}


def _stats(generation: int, population: list[Candidate]) -> GenerationStats:
    scores = [c.score for c in population]
    best = max(population, key=lambda c: c.score)
    return GenerationStats(generation, best.score, statistics.fmean(scores), statistics.pstdev(scores),
                           len({c.recipe.operator for c in population}), best.recipe.to_dict())


def _fresh(make: Callable[[], Recipe], seen: set, tries: int = 5) -> Recipe:
    """A recipe from `make` not in `seen` when one turns up within `tries` (else the last one)."""
    for _ in range(tries):
        recipe = make()
        if recipe.key() not in seen:
            break
    seen.add(recipe.key())
    return recipe


def next_generation(population: list[Candidate], evaluate: Callable[[Recipe], Candidate], cfg: EvolutionConfig,
                    shape: _Shape, rng: random.Random) -> list[Candidate]:
    """Elites kept; mutants of the elites; crossovers of the losers' recipes, worst pairs first."""
    ranked = sorted(population, key=lambda c: c.score, reverse=True)
    elites, losers = ranked[:cfg.elite_count], ranked[cfg.elite_count:]
    n_new = cfg.population_size - len(elites)
    n_cross = n_new // 3 if len(losers) >= 2 else 0
    seen = {c.recipe.key() for c in elites}
    children = []
    for i in range(n_new - n_cross):
        parent = elites[i % len(elites)].recipe
        children.append(_fresh(lambda: mutate(parent, cfg.mutation_strength, shape, rng), seen))
    worst_first = losers[::-1]
    for i in range(n_cross):
        a, b = worst_first[(2 * i) % len(losers)].recipe, worst_first[(2 * i + 1) % len(losers)].recipe
        children.append(_fresh(lambda: crossover(a, b, shape, rng), seen))
    return elites + [evaluate(r) for r in children]


def _check_operators_fit(operators: Sequence[str], base, n_layers: int) -> None:
    if base is None and any(op in _BASE_OPERATORS for op in operators):
        raise ValueError(f"operators {[op for op in operators if op in _BASE_OPERATORS]} need base "
                         "(the shared initialization); pass it or drop them from operators")
    if n_layers == 0 and any(op in _LAYER_OPERATORS for op in operators):
        raise ValueError("frankenmerge/dfs need layer parameters, but layer_key_fn finds none in the states")


def evolve(states: Sequence[StateDict], base: StateDict | None, fitness_fn: FitnessFn, config,
           progress: Callable[[float, str], None] | None = None, layer_key_fn: LayerKeyFn = block_index,
           rename_fn: RenameFn = rename_block) -> EvolutionResult:
    """Evolve merge recipes of `states` (see the module docstring); returns the champion and the record.

    `config` has the phase-2 fields of `EvolutionConfig`; `generations` counts the generations after
    generation 0. Reproducible for a seed when fitness_fn is deterministic (measured seconds are not:
    set fitness_weights.speed to 0, or pass a deterministic speed proxy, for bitwise repeats).
    """
    cfg = read_config(config)
    states = check_states(states, base)
    shape = _Shape(len(states), count_layers(states[0], layer_key_fn))
    _check_operators_fit(cfg.operators, base, shape.n_layers)
    rng = random.Random(cfg.seed)
    evaluate = _Evaluator(states, base, fitness_fn, dict(cfg.fitness_weights), layer_key_fn, rename_fn)
    inputs = evaluate.inputs(shape.n_layers)
    baseline_index = max(range(len(inputs)), key=lambda i: inputs[i].score)
    population = [evaluate(r) for r in initial_population(cfg.operators, cfg.population_size, shape, rng)]
    history = [_stats(0, population)]
    for generation in range(1, cfg.generations + 1):
        if progress is not None:
            progress(generation / (cfg.generations + 1), f"generation {generation}: best {history[-1].best:.4f}")
        population = next_generation(population, evaluate, cfg, shape, rng)
        history.append(_stats(generation, population))
    population.sort(key=lambda c: c.score, reverse=True)
    champion_state, _ = apply_recipe(population[0].recipe, states, base, layer_key_fn, rename_fn)
    if progress is not None:
        progress(1.0, f"champion {population[0].recipe.operator}: {population[0].score:.4f}")
    return EvolutionResult(population[0], champion_state, inputs[baseline_index], baseline_index, inputs,
                           population, history, evaluate.evaluations, evaluate.cache_hits,
                           list(evaluate.cache.values()))
