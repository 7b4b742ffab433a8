"""The two ways Phase 5 spends the same number of optimizer steps: climbing the levels from each task's edge
(`Climber`), and plain training on questions drawn uniformly from every level (`train_uniform`)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from forge.data.levels import level_examples
from forge.distributed import parallel_training
from forge.pipeline.phases.phase5_curriculum.curriculum import LevelPool, train_step
from forge.pipeline.phases.phase5_curriculum.dreams import Dreams, dream
from forge.data import exact_matches


@dataclass
class TaskClimb:
    """One task's way up: the level it started at (already mastered), the level it trains now, and the
    levels it passed with the step at which each was passed."""
    task: str
    start: int
    level: int
    passed: list[tuple[int, int]] = field(default_factory=list)
    pool: LevelPool | None = None
    last_accuracy: float | None = None      # validation accuracy at the last check of the current level

    @property
    def final(self) -> int:
        return self.passed[-1][0] if self.passed else self.start


@dataclass
class ClimbLog:
    losses: list[float] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)     # {step, task, level, accuracy, passed}
    dreams: list[dict] = field(default_factory=list)     # {step, task, level, generated, kept, correct}


EDGE_FLOOR = 0.1       # the edge sampler's weight of a level answered always or never right (0.5 weighs 1.1)
EDGE_RATE = 0.05       # the running accuracy's update per answer (an exponential mean over about 20 answers)
EDGE_PRIOR = 0.5       # the running accuracy before a level's first answer: every level weighs the same


def edge_weights(accuracies: list[float], floor: float = EDGE_FLOOR) -> list[float]:
    """Sampling weights of levels by accuracy: floor + 4a(1-a), highest for a level answered right half the time,
    lowest (floor, never zero: mastered levels are still rehearsed) for one always or never right."""
    return [floor + 4 * a * (1 - a) for a in accuracies]


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


class Climber:
    """Trains `model` at every task's edge for `cfg.steps` optimizer steps (dream steps included).

    Each batch gives every task an equal share: `mix_fraction` of it drawn uniformly from all the task's levels
    (so nothing is forgotten and what lies ahead is seen: the "combined" curriculum of Zaremba & Sutskever
    2014, arXiv 1410.4615, where it beat both a plain curriculum and none), the rest from its current level's
    pool; a task past the top level only mixes. With `level_sampling: edge` the mixed share's levels are drawn
    by `edge_weights` of each level's running accuracy on its mixed training answers (before each step: the
    greedy-exact flags of `train_step`), so the levels neither mastered nor hopeless get most of it (a
    learning-progress teacher in the spirit of Matiisen et al. 2017, arXiv 1707.00183). Every `eval_every`
    steps each climbing task answers
    `val_questions` held-out questions of its level; at `advance_accuracy` the level is passed, dreams
    consolidate it and the next level's pool opens.
    """

    def __init__(self, model, optimizer, tokenizer, max_len: int, starts: dict[str, int], cfg, seed: int,
                 on_step: Callable[[int, float, str], None] | None = None,
                 on_check: Callable[[dict], None] | None = None):
        self.model, self.optimizer, self.tokenizer, self.max_len = model, optimizer, tokenizer, max_len
        self.net = None     # what the steps train, inside run(): forge.distributed.parallel_training
        self.cfg, self.seed, self.on_step, self.on_check = cfg, seed, on_step, on_check
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.climbs = {t: TaskClimb(t, s, s + 1) for t, s in sorted(starts.items())}
        self.pools: list[LevelPool] = []       # every pool opened, in order
        for climb in self.climbs.values():
            self._open(climb)
        self._mix_cache: dict = {}
        self.mix_accuracy = {(t, lv): EDGE_PRIOR for t in self.climbs for lv in range(1, cfg.num_levels + 1)}
        self.log, self.step = ClimbLog(), 0

    def _open(self, climb: TaskClimb) -> None:
        climb.pool = (LevelPool(climb.task, climb.level, self.cfg.questions_per_level, self.seed)
                      if climb.level <= self.cfg.num_levels else None)
        if climb.pool is not None:
            self.pools.append(climb.pool)

    def mix_level(self, task: str) -> int:
        """The level of one mixed question of `task`: uniform over all levels, or by `edge_weights`."""
        levels = range(1, self.cfg.num_levels + 1)
        if self.cfg.level_sampling == "uniform":
            return self.rng.randint(1, self.cfg.num_levels)
        weights = edge_weights([self.mix_accuracy[task, lv] for lv in levels])
        return self.rng.choices(levels, weights)[0]

    def _mixed(self, task: str):
        """A training question of `task` from a level drawn by mix_level, and that level."""
        level = self.mix_level(task)
        if (task, level) not in self._mix_cache:
            self._mix_cache[task, level] = level_examples(task, level, self.cfg.questions_per_level, "train", self.seed)
        return self.rng.choice(self._mix_cache[task, level]), level

    def _batch(self) -> tuple[list, list, list]:
        """Every task an equal share of the batch: mix_fraction of it (all of it once the task is past the top)
        from all its levels, the rest from its current level's pool. Also (index, task, level) per mixed one."""
        examples, asked, mixes = [], [], []
        for climb, share in zip(self.climbs.values(), _split(self.cfg.batch_size, len(self.climbs))):
            mixed = share if climb.pool is None else round(share * self.cfg.mix_fraction)
            for _ in range(mixed):
                example, level = self._mixed(climb.task)
                mixes.append((len(examples), climb.task, level))
                examples.append(example)
            if climb.pool is not None:
                for question in climb.pool.draw(self.rng, share - mixed):
                    asked.append((len(examples), climb.pool, question))
                    examples.append(question.prompt())
        return examples, asked, mixes

    def run(self) -> ClimbLog:
        """The climb. On several ranks with hardware.distributed.fsdp the steps train an FSDP2 copy of the model,
        whose weights the model gets before every level check (the checks and dreams run on the model)."""
        with parallel_training(self.model, self.optimizer) as (self.net, sync):
            try:
                while self.step < self.cfg.steps:
                    self._step()
                    if self.step % self.cfg.eval_every == 0:
                        sync()
                        self._check_levels()
            finally:
                self.net = None
        return self.log

    def _step(self) -> None:
        examples, asked, mixes = self._batch()
        loss, right = train_step(self.model, self.optimizer, examples, self.tokenizer, self.max_len, self.net)
        self.step += 1
        self.log.losses.append(loss)
        for index, pool, question in asked:
            pool.record(question, right[index], self.cfg.consecutive_for_mastery, self.cfg.max_hint)
        for index, task, level in mixes:
            self.mix_accuracy[task, level] += EDGE_RATE * (right[index] - self.mix_accuracy[task, level])
        if self.on_step is not None:
            self.on_step(self.step, loss, self.status())

    def status(self) -> str:
        """Per task: the level it climbs, its pool's questions left and the last validation accuracy there."""
        def one(c: TaskClimb) -> str:
            if c.pool is None:
                return f"{c.task} done"
            seen = "" if c.last_accuracy is None else f", acc {c.last_accuracy:.2f}"
            return f"{c.task} L{c.level} ({len(c.pool.active)} left{seen})"
        return "; ".join(one(c) for c in self.climbs.values())

    def _check_levels(self) -> None:
        for climb in self.climbs.values():
            if climb.pool is None:
                continue
            held_out = level_examples(climb.task, climb.level, self.cfg.val_questions, "val", self.seed)
            accuracy = sum(exact_matches(self.model, held_out, self.tokenizer, self.max_len)) / len(held_out)
            passed = accuracy >= self.cfg.advance_accuracy
            climb.last_accuracy = None if passed else accuracy
            self.log.checks.append({"step": self.step, "task": climb.task, "level": climb.level,
                                    "accuracy": accuracy, "passed": passed})
            if self.on_check is not None:
                self.on_check(self.log.checks[-1])
            if passed:
                climb.passed.append((climb.level, self.step))
                self._consolidate(climb)
                climb.level += 1
                self._open(climb)

    def _consolidate(self, climb: TaskClimb) -> None:
        """Dreams on prompts of the levels `climb` has passed, then dream_epochs_per_level passes over them, trained
        through run()'s net (called inside run)."""
        if self.cfg.dream_epochs_per_level == 0 or self.cfg.dream_questions == 0:
            return
        levels = list(range(1, climb.level + 1))
        prompts = [ex for lv in levels for ex in level_examples(
            climb.task, lv, max(1, self.cfg.dream_questions // len(levels)), "train", self.seed + 1 + self.step)]
        dreams: Dreams = dream(self.model, prompts, self.tokenizer, self.max_len,
                               temperature=self.cfg.dream_temperature,
                               min_confidence=self.cfg.dream_min_confidence, generator=self.generator)
        self.log.dreams.append({"step": self.step, "task": climb.task, "level": climb.level,
                                "generated": dreams.generated, "kept": dreams.kept, "correct": dreams.correct})
        for _ in range(self.cfg.dream_epochs_per_level):
            order = self.rng.sample(dreams.examples, len(dreams.examples))
            for lo in range(0, len(order), self.cfg.batch_size):
                if self.step >= self.cfg.steps:
                    return
                loss, _ = train_step(self.model, self.optimizer, order[lo: lo + self.cfg.batch_size],
                                     self.tokenizer, self.max_len, self.net)
                self.step += 1
                self.log.losses.append(loss)


def train_uniform(model, optimizer, tokenizer, max_len: int, tasks: list[str], cfg, seed: int, steps: int,
                  on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Plain training, the curriculum's control: `steps` optimizer steps on batches whose questions are drawn
    uniformly over tasks and all levels (from pools of questions_per_level training questions). Through DDP or, with
    hardware.distributed.fsdp, an FSDP2 copy, as the climb."""
    rng = random.Random(seed)
    pools = {(t, lv): level_examples(t, lv, cfg.questions_per_level, "train", seed)
             for t in tasks for lv in range(1, cfg.num_levels + 1)}
    keys, losses = sorted(pools), []
    with parallel_training(model, optimizer) as (net, _):
        for step in range(1, steps + 1):
            examples = [rng.choice(pools[rng.choice(keys)]) for _ in range(cfg.batch_size)]
            losses.append(train_step(model, optimizer, examples, tokenizer, max_len, net)[0])
            if on_step is not None:
                on_step(step, losses[-1])
    return losses
