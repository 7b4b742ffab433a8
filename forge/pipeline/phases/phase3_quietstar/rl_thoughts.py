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

import random

import torch

from forge.pipeline.prompt_bake import bake_task_prompt
from forge.pipeline.training import answer_nll
from forge.pipeline.phases.phase3_quietstar.thoughts import (ThoughtIds, build_rows, by_length, example_ids, reinforce_loss, sample_thoughts,
                                     target_logprobs)


class ThoughtTrainer:
    """Runs RL steps on `examples`; batches are drawn from one prompt-length group at a time (seeded)."""

    def __init__(self, model, optimizer, kl, examples, tokenizer, ids: ThoughtIds, cfg, seed: int):
        self.model, self.optimizer, self.kl, self.ids, self.cfg = model, optimizer, kl, ids, cfg
        self.prefixes, self.answers = example_ids(examples, tokenizer)
        self.groups = list(by_length(self.prefixes).values())
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.device = next(model.parameters()).device

    def _batch(self) -> list[int]:
        group = self.rng.choices(self.groups, weights=[len(g) for g in self.groups])[0]
        return [self.rng.choice(group) for _ in range(self.cfg.batch_size)]

    def step(self) -> dict:
        """One optimizer step; returns its losses and the mean reward of the sampled thoughts."""
        k, rows = self.cfg.num_thoughts, self._batch()
        prefixes = [self.prefixes[i] for i in rows for _ in range(k)]
        answers = [self.answers[i] for i in rows for _ in range(k)]
        self.model.eval()
        batch = torch.tensor([p + [self.ids.think] for p in prefixes], dtype=torch.long, device=self.device)
        thoughts, closed = sample_thoughts(self.model, batch, self.ids, self.cfg.thought_length,
                                           self.cfg.temperature, self.generator)
        self.model.train()
        with_t = build_rows(prefixes, answers, self.ids, thoughts, closed)
        plain = build_rows(prefixes[::k], answers[::k], self.ids)
        logits_t = self.model(with_t.tokens.to(self.device))
        logits_p = self.model(plain.tokens.to(self.device))
        answer_t = with_t.answer_targets.to(self.device)
        gain = target_logprobs(logits_t, answer_t) - target_logprobs(logits_p, plain.answer_targets.to(self.device)
                                                                     ).repeat_interleave(k)
        policy = reinforce_loss(target_logprobs(logits_t, with_t.thought_targets.to(self.device)), gain, k)
        nll_t, nll_p = answer_nll(logits_t, answer_t), answer_nll(logits_p, plain.answer_targets.to(self.device))
        kl = self.kl(with_t.tokens.to(self.device), logits_t)
        loss = self.cfg.policy_weight * policy + nll_t + self.cfg.plain_answer_weight * nll_p + kl
        if not torch.isfinite(loss):
            raise FloatingPointError(f"phase 3 loss became {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item(), "policy_loss": policy.item(), "answer_nll_thought": nll_t.item(),
                "answer_nll_plain": nll_p.item(), "kl": kl.item(), "reward": gain.detach().mean().item(),
                "closed": sum(closed) / len(closed)}


def bake_reasoning_prompt(model, examples, tokenizer, cfg, seed: int):
    """Bake the phase-3 reasoning prompt ("think, then say:") into `model` (forge.pipeline.prompt_bake)."""
    return bake_task_prompt(model, "phase3_reasoning", examples, tokenizer, lr=cfg.baking_lr, steps=cfg.baking_steps,
                            traj_len=cfg.baking_traj_len, seed=seed)
