"""Quiet-STaR's training step (Zelikman et al. 2024, arXiv 2403.09629) and the reasoning-prompt bake before it.

One step: for each of `batch_size` inputs of one prompt length, sample `num_thoughts` thoughts with the
key/value cache; then, in one teacher-forced pass per format,

    loss = policy_weight * REINFORCE(thoughts; r - mean r)  +  NLL(answer | thought)
           +  plain_weight * NLL(answer | no thought)
           +  KL(baked || model) on the thought sequences   (forge.nn.KLRegularizer, optimizer.kl_coefficient)

NLL(answer | no thought) trains the plain format as much as the thought format, so accuracy with thoughts
can only beat accuracy without them through what the thoughts carry, not through extra training.
"""
from __future__ import annotations

import contextlib
import math
import random

import torch

from forge.distributed import all_sum, parallel_training, world
from forge.pipeline.devices import training_autocast
from forge.pipeline.prompt_bake import bake_task_prompt
from forge.pipeline.training import batch_rows, forward_together, rank_share_nll
from forge.pipeline.phases.phase3_quietstar.thoughts import (ThoughtIds, build_rows, by_length, example_ids,
                                                             reinforce_loss, sample_thoughts, target_logprobs)

TERMS = ("policy_loss", "answer_nll_thought", "answer_nll_plain", "kl")


class ThoughtTrainer:
    """Runs RL steps on `examples`; batches are drawn from one prompt-length group at a time (seeded). On several
    ranks (forge.distributed) every rank draws the same batch, samples its share of the thoughts (sample_thoughts'
    split: together the thoughts one process draws, gathered to every rank), then trains on its share of the
    batch's inputs, each with all its thoughts, through DistributedDataParallel, or inside `training()` with
    hardware.distributed.fsdp an FSDP2 copy; every loss term is scaled so that the ranks' average is the whole
    batch's loss."""

    def __init__(self, model, optimizer, kl, examples, tokenizer, ids: ThoughtIds, cfg, seed: int):
        self.model, self.optimizer, self.kl, self.ids, self.cfg = model, optimizer, kl, ids, cfg
        self.prefixes, self.answers = example_ids(examples, tokenizer)
        self.groups = list(by_length(self.prefixes).values())
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.device = next(model.parameters()).device
        self.mine, self.net, self._sync = batch_rows(cfg.batch_size, "phase 3 RL"), None, None

    @contextlib.contextmanager
    def training(self):
        """The block the steps run in (forge.distributed.parallel_training): the model itself in one process, DDP
        around it on several ranks, or with hardware.distributed.fsdp an FSDP2 copy, whose weights the model gets
        before each step samples its thoughts (the sampling runs on the model) and at the end of the block."""
        with parallel_training(self.model, self.optimizer) as (self.net, self._sync):
            try:
                yield self
            finally:
                self.net = self._sync = None

    def _batch(self) -> list[int]:
        group = self.rng.choices(self.groups, weights=[len(g) for g in self.groups])[0]
        return [self.rng.choice(group) for _ in range(self.cfg.batch_size)]

    def step(self) -> dict:
        """One optimizer step; returns its losses and the mean reward of the sampled thoughts (the whole batch's,
        the same on every rank)."""
        if self.net is None:
            raise RuntimeError("ThoughtTrainer.step() runs inside `with trainer.training():`")
        k, rows = self.cfg.num_thoughts, self._batch()
        prefixes = [self.prefixes[i] for i in rows for _ in range(k)]
        answers = [self.answers[i] for i in rows for _ in range(k)]
        self._sync()
        self.model.eval()
        batch = torch.tensor([p + [self.ids.think] for p in prefixes], dtype=torch.long, device=self.device)
        thoughts, closed = sample_thoughts(self.model, batch, self.ids, self.cfg.thought_length,
                                           self.cfg.temperature, self.generator, split=True)
        self.model.train()
        with_t = build_rows(prefixes, answers, self.ids, thoughts, closed)
        plain = build_rows(prefixes[::k], answers[::k], self.ids)
        with training_autocast(self.model):   # bf16 where hardware.precision says so (forge.pipeline.devices)
            terms = self._losses(with_t, plain, k)
        loss = (self.cfg.policy_weight * terms["policy_loss"] + terms["answer_nll_thought"]
                + self.cfg.plain_answer_weight * terms["answer_nll_plain"] + terms["kl"])
        values = all_sum([loss.item(), *(terms[key].item() for key in TERMS), terms["reward_sum"].item()])
        stats = {key: value / world().size for key, value in zip(("loss", *TERMS), values)}
        if not math.isfinite(stats["loss"]):
            raise FloatingPointError(f"phase 3 loss became {stats['loss']}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {**stats, "reward": values[-1] / len(prefixes), "closed": sum(closed) / len(closed)}

    def _losses(self, with_t, plain, k: int) -> dict:
        """This rank's share of each loss term (the term itself in one process) and its rows' summed reward."""
        mine, device, ranks = self.mine, self.device, world().size
        thought_rows = slice(mine.start * k, mine.stop * k)      # the thoughts of this rank's inputs
        tokens_t, tokens_p = with_t.tokens[thought_rows].to(device), plain.tokens[mine].to(device)
        if ranks == 1:
            logits_t, logits_p = self.net(tokens_t), self.net(tokens_p)
        else:   # one forward before each backward (DDP)
            logits_t, logits_p = forward_together(self.net, self.ids.pad, tokens_t, tokens_p)
        answer_t, plain_t = with_t.answer_targets.to(device), plain.answer_targets.to(device)
        gain = (target_logprobs(logits_t, answer_t[thought_rows])
                - target_logprobs(logits_p, plain_t[mine]).repeat_interleave(k))
        share = (mine.stop - mine.start) / self.cfg.batch_size * ranks     # of the means over the batch's rows
        policy = reinforce_loss(target_logprobs(logits_t, with_t.thought_targets[thought_rows].to(device)), gain, k)
        return {"policy_loss": policy * share, "answer_nll_thought": rank_share_nll(logits_t, answer_t, thought_rows),
                "answer_nll_plain": rank_share_nll(logits_p, plain_t, mine), "kl": self.kl(tokens_t, logits_t) * share,
                "reward_sum": gain.detach().sum()}


def bake_reasoning_prompt(model, examples, tokenizer, cfg, seed: int):
    """Bake the phase-3 reasoning prompt ("think, then say:") into `model` (forge.pipeline.prompt_bake)."""
    return bake_task_prompt(model, "phase3_reasoning", examples, tokenizer, lr=cfg.baking_lr, steps=cfg.baking_steps,
                            traj_len=cfg.baking_traj_len, seed=seed)
