"""Self-guided expert discovery: the model's own errors decide the experts (Transformer² trains one expert per
known category; here no category list is given, so the categories come from what the model gets wrong).

Every (task, level) cell of the incoming tasks is asked `discovery_questions` held-out questions (val split),
answered with the calculator (forge.data.tools.answer_with_tool: calls answered, persona markers left out).
Each question is described by what the model gets wrong where it sits: the error rate of its cell, the error
rate of its task, and 1 - exp(-mean per-token loss) of the cell's true answers (teacher-forced, the row format
the model was trained on). Cells the model already solves (error rate <= 1 - `solved_accuracy`) stay with the base
model. The questions of the other cells are clustered by k-means (k-means++ start, Lloyd iterations) on those
features (each in [0, 1]) for every k in [min_experts, max_experts] (capped by the number of such cells); the k
with the highest silhouette (Rousseeuw 1987) wins, ties to the smaller k. Questions of one cell share their
features, so a cluster is a set of cells; it is named by its dominant tasks (those holding >= 25 % of its
questions). The number and content of the clusters follow the errors: a model that fails nowhere has no
expert, one that fails at two tasks has clusters of those two tasks only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from forge.data.tools import answer_with_tool
from forge.pipeline.devices import model_device

DOMINANT_SHARE = 0.25      # a task names its cluster when it holds at least this share of the cluster's questions


@dataclass
class Cell:
    """One (task, level) cell: its held-out questions, which the model answered correctly, and the mean
    per-token loss of the true answers."""
    task: str
    level: int
    questions: list
    correct: list[bool]
    answer_loss: float

    @property
    def error_rate(self) -> float:
        return 1.0 - sum(self.correct) / max(1, len(self.correct))


@dataclass
class Cluster:
    """A discovered expert's domain: its name, its cells ((task, level) pairs) and its questions' count."""
    name: str
    cells: list[tuple[str, int]]
    size: int
    error_rate: float
    tasks: list[str] = field(default_factory=list)


def correct_flags(model, examples, tokenizer, max_len: int) -> list[bool]:
    """Whether the model's greedy answer, with the calculator, is the true answer (markers left out)."""
    outs = answer_with_tool(model, examples, tokenizer, max_len)
    return [o.correct(ex, tokenizer) for o, ex in zip(outs, examples)]


def error_features(cells: list[Cell], every_cell: list[Cell]) -> np.ndarray:
    """One row per cell, each value in [0, 1]: [cell error rate, its task's error rate over `every_cell`,
    1 - exp(-mean answer loss)] (the last: one minus the geometric-mean probability of the true answer's
    tokens). Unscaled, so cells that fail alike stay together however small their differences."""
    task_error = {}
    for task in {c.task for c in cells}:
        flags = [f for c in every_cell if c.task == task for f in c.correct]
        task_error[task] = 1.0 - sum(flags) / max(1, len(flags))
    return np.array([[c.error_rate, task_error[c.task], 1.0 - math.exp(-c.answer_loss)] for c in cells],
                    dtype=np.float64)


def kmeans(points: np.ndarray, k: int, seed: int, iterations: int = 50) -> np.ndarray:
    """Labels of Lloyd's k-means with a k-means++ start (Arthur & Vassilvitskii 2007); deterministic per seed."""
    rng = np.random.default_rng(seed)
    centers = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = np.min([((points - c) ** 2).sum(1) for c in centers], axis=0)
        total = d2.sum()
        pick = rng.choice(len(points), p=d2 / total) if total > 0 else rng.integers(len(points))
        centers.append(points[pick])
    centers = np.array(centers)
    labels = np.zeros(len(points), dtype=int)
    for _ in range(iterations):
        labels = ((points[:, None, :] - centers[None]) ** 2).sum(-1).argmin(1)
        moved = np.array([points[labels == j].mean(0) if (labels == j).any() else centers[j] for j in range(k)])
        if np.allclose(moved, centers):
            break
        centers = moved
    return labels


def silhouette(points: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette s = (b - a) / max(a, b) (a: mean distance within the point's cluster, b: to the nearest
    other cluster; 0 for a point alone in its cluster); -1 when fewer than two clusters are used."""
    used = np.unique(labels)
    if len(used) < 2:
        return -1.0
    dist = np.sqrt(((points[:, None, :] - points[None]) ** 2).sum(-1))
    scores = []
    for i, label in enumerate(labels):
        same = labels == label
        if same.sum() == 1:
            scores.append(0.0)
            continue
        a = dist[i, same].sum() / (same.sum() - 1)
        b = min(dist[i, labels == other].mean() for other in used if other != label)
        scores.append(0.0 if max(a, b) == 0 else (b - a) / max(a, b))
    return float(np.mean(scores))


def cluster_cells(cells: list[Cell], min_experts: int, max_experts: int, solved_accuracy: float,
                  seed: int) -> tuple[list[Cluster], list[Cell]]:
    """(clusters of the unsolved cells, the solved cells); see the module for the rule."""
    unsolved = [c for c in cells if c.error_rate > 1.0 - solved_accuracy + 1e-12]
    solved = [c for c in cells if c not in unsolved]
    if not unsolved:
        return [], solved
    points = np.repeat(error_features(unsolved, cells), [len(c.questions) for c in unsolved], axis=0)
    owner = np.repeat(np.arange(len(unsolved)), [len(c.questions) for c in unsolved])
    distinct = len({tuple(row) for row in points.round(9)})
    low, high = min(min_experts, distinct), min(max_experts, distinct)
    best = (-math.inf, None)
    for k in range(max(1, low), max(1, high) + 1):
        labels = kmeans(points, k, seed) if k > 1 else np.zeros(len(points), dtype=int)
        score = silhouette(points, labels) if k > 1 else -1.0
        if score > best[0] + 1e-9 or best[1] is None:
            best = (score, labels)
    labels = best[1]
    groups = [sorted({int(owner[i]) for i in np.flatnonzero(labels == j)}) for j in np.unique(labels)]
    return _named([[unsolved[i] for i in g] for g in groups if g]), solved


def _named(groups: list[list[Cell]]) -> list[Cluster]:
    """Clusters named by their dominant tasks (largest share first), made unique with a suffix."""
    out, seen = [], {}
    for cells in sorted(groups, key=lambda cs: -sum(len(c.questions) for c in cs)):
        size = sum(len(c.questions) for c in cells)
        share = {}
        for c in cells:
            share[c.task] = share.get(c.task, 0) + len(c.questions) / size
        tasks = sorted((t for t, s in share.items() if s >= DOMINANT_SHARE), key=lambda t: (-share[t], t))
        name = "+".join(tasks) or max(share, key=share.get)
        seen[name] = seen.get(name, 0) + 1
        wrong = sum(len(c.questions) * c.error_rate for c in cells)
        out.append(Cluster(name if seen[name] == 1 else f"{name}-{seen[name]}",
                           sorted((c.task, c.level) for c in cells), size, wrong / size, sorted(share)))
    return out


@torch.no_grad()
def measure_cells(model, questions: dict[tuple[str, int], list], tokenizer, max_len: int, loss_rows) -> list[Cell]:
    """A Cell per (task, level) of `questions`: correctness with the calculator and the mean per-token loss of
    the true-answer rows `loss_rows(examples)` returns (tokens, targets)."""
    from forge.pipeline.training import answer_nll

    keys = sorted(questions)
    flat = [ex for key in keys for ex in questions[key]]
    flags = correct_flags(model, flat, tokenizer, max_len)
    cells, at = [], 0
    for task, level in keys:
        examples = questions[(task, level)]
        tokens, targets = (t.to(model_device(model)) for t in loss_rows(examples))
        loss = float(answer_nll(model(tokens).float(), targets))
        cells.append(Cell(task, level, examples, flags[at: at + len(examples)], loss))
        at += len(examples)
    return cells
