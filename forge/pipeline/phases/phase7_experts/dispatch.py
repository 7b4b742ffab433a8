"""Dispatch at inference, Transformer²'s three ways (arXiv 2501.06252, section 3.2), and the search over mixtures.

(a) Prompt route: a small classifier (softmax regression) on the base model's final hidden state at the
    question's last prompt token (<sep>) picks the expert of the question's cluster (or the base, for a question
    of a solved cell). The paper asks the model itself to classify the prompt; a probe on its hidden state is the
    same signal without generation.
(b) Few-shot mixing: z' = Σ_k α_k z_k, α ∈ [0, 1]^K found by the cross-entropy method (Rubinstein 1999) on a
    handful of examples of the target task: sample a population from N(μ, σ²) clipped to [0, 1], keep the elite
    fraction, refit μ, σ to the elites; start μ = 1/K, σ = 0.5 (the paper's settings).
(c) The architecture search the original called ADAS: NSGA-II (Deb et al. 2002, pymoo's NSGA2) over mixing weights
    per layer group, minimizing (1 - accuracy on validation questions, parameters of the experts it uses: z values of
    the (group, expert) pairs with α > `ACTIVE_ALPHA`). Every point of the front is a real evaluation, logged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from forge.data.batching import prompt_ids
from forge.pipeline.devices import model_device

ACTIVE_ALPHA = 0.05        # a mixing weight at or below this counts as an expert not used (its parameters not needed)


@torch.no_grad()
def prompt_features(model, examples, tokenizer) -> torch.Tensor:
    """[N, dim]: the base model's final-norm hidden state at each question's last prompt token (<sep>)."""
    rows = [prompt_ids(ex, tokenizer) for ex in examples]
    tokens = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_id, dtype=torch.long)
    for b, ids in enumerate(rows):
        tokens[b, : len(ids)] = torch.tensor(ids)
    hidden = model.eval().hidden_states(tokens.to(model_device(model))).float().cpu()   # the router runs on the CPU
    return hidden[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]


class Router:
    """Softmax regression from prompt features to a class (an expert's index; the last class is the base)."""

    def __init__(self, features: torch.Tensor, labels: list[int], classes: int, steps: int = 300, seed: int = 0):
        if not 0 <= min(labels) <= max(labels) < classes:
            raise ValueError(f"labels must lie in 0..{classes - 1}")
        torch.manual_seed(seed)
        self.mean, self.std = features.mean(0), features.std(0) + 1e-6
        x, y = (features - self.mean) / self.std, torch.tensor(labels)
        self.linear = torch.nn.Linear(x.shape[1], classes)
        opt = torch.optim.AdamW(self.linear.parameters(), lr=0.05, weight_decay=1e-3)
        for _ in range(steps):
            loss = F.cross_entropy(self.linear(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> list[int]:
        return self.linear((features - self.mean) / self.std).argmax(-1).tolist()


def cem(objective, dim: int, *, population: int, elites: int, iterations: int, seed: int,
        init_std: float = 0.5) -> dict:
    """Maximize `objective(alpha)` over alpha ∈ [0, 1]^dim by the cross-entropy method (see the module).
    Returns {"alpha": best point evaluated, "score": its value, "history": best score per iteration}."""
    if not 1 <= elites <= population:
        raise ValueError(f"Invalid cem_elites: {elites}; expected 1..cem_population ({population})")
    rng = np.random.default_rng(seed)
    mean, std = np.full(dim, 1.0 / dim), np.full(dim, init_std)
    best_alpha, best_score, history = mean.copy(), float(objective(mean.copy())), []
    for _ in range(iterations):
        samples = np.clip(rng.normal(mean, std, size=(population, dim)), 0.0, 1.0)
        scores = np.array([float(objective(s)) for s in samples])
        order = np.argsort(-scores, kind="stable")[:elites]
        if scores[order[0]] > best_score:
            best_alpha, best_score = samples[order[0]].copy(), float(scores[order[0]])
        mean, std = samples[order].mean(0), samples[order].std(0) + 1e-3
        history.append(best_score)
    return {"alpha": best_alpha, "score": best_score, "history": history}


def group_weights(x: np.ndarray, groups: list[list[str]], experts: int) -> dict[str, list[float]]:
    """Per-layer mixing weights from a search point x (groups × experts, row-major)."""
    table = np.asarray(x, dtype=float).reshape(len(groups), experts)
    return {name: table[g].tolist() for g, names in enumerate(groups) for name in names}


def parameters_used(x: np.ndarray, group_sizes: list[int], experts: int) -> int:
    """z values an expert mixture needs: Σ over (group, expert) with α > ACTIVE_ALPHA of the group's z size."""
    table = np.asarray(x, dtype=float).reshape(len(group_sizes), experts)
    return int(sum(size * int((table[g] > ACTIVE_ALPHA).sum()) for g, size in enumerate(group_sizes)))


def nsga2_search(accuracy, group_sizes: list[int], experts: int, *, population: int, generations: int,
                 crossover_rate: float, mutation_rate: float, seed: int) -> dict:
    """NSGA-II over per-group mixing weights (see the module). `accuracy(x)` evaluates point x. Returns
    {"front": [{"x", "accuracy", "parameters"}] non-dominated, "evaluations": every point evaluated}."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.problem import ElementwiseProblem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.optimize import minimize

    log: list[dict] = []
    n_var = len(group_sizes) * experts

    class _Mixing(ElementwiseProblem):
        def __init__(self):
            super().__init__(n_var=n_var, n_obj=2, xl=np.zeros(n_var), xu=np.ones(n_var))

        def _evaluate(self, x, out, *args, **kwargs):
            acc, used = float(accuracy(x)), parameters_used(x, group_sizes, experts)
            log.append({"x": np.array(x, dtype=float).tolist(), "accuracy": acc, "parameters": used})
            out["F"] = [1.0 - acc, float(used)]

    algorithm = NSGA2(pop_size=population, crossover=SBX(prob=crossover_rate, eta=15),
                      mutation=PM(prob=mutation_rate, eta=20), eliminate_duplicates=True)
    result = minimize(_Mixing(), algorithm, ("n_gen", generations), seed=seed, verbose=False)
    logged = {tuple(e["x"]): e for e in log}
    front = [logged[tuple(np.array(x, dtype=float).tolist())] for x in np.atleast_2d(result.X)]
    return {"front": front, "evaluations": log}


def dominates(a: dict, b: dict) -> bool:
    """Point a is at least as good as b on both objectives (accuracy up, parameters down) and better on one."""
    no_worse = a["accuracy"] >= b["accuracy"] and a["parameters"] <= b["parameters"]
    return no_worse and (a["accuracy"] > b["accuracy"] or a["parameters"] < b["parameters"])
