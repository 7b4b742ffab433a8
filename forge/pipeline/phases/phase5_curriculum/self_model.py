"""Self-modeling: after its own answer and <eos> the model writes `<right>` or `<wrong>`, its prediction of
whether that answer is correct, trained on its own outcomes:

    <bos> prompt <sep> a_1..a_k <eos> <right>|<wrong>      (a_1..a_k: the model's greedy answer)

The confidence is P(<right>) / (P(<right>) + P(<wrong>)) at the <eos> position. Judged on held-out questions
by AUROC against correctness (with the Hanley-McNeil standard error) and the expected calibration error.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forge.data import Example, encode_batch
from forge.data.batching import prompt_ids
from forge.data.sampling import sample_answers
from forge.pipeline.training import answer_nll

RIGHT, WRONG = "<right>", "<wrong>"


@dataclass
class SelfRows:
    """Sequences ending in the model's own answer and <eos>; `correct[i]`: that answer is right."""
    tokens: torch.Tensor          # [N, T] padded
    eos_at: torch.Tensor          # [N] position of the <eos> whose next token is the verdict
    correct: torch.Tensor         # [N] bool
    examples: list[Example]


def own_answer_rows(model, examples: list[Example], tokenizer, max_len: int) -> SelfRows:
    """The model's greedy answers to `examples` (at most len(answer) + 1 tokens, as greedy evaluation
    decodes) as rows ending in <eos>, and whether each is right."""
    budget = max(len(tokenizer.encode(ex.answer)) for ex in examples) + 1
    answers = sample_answers(model, examples, tokenizer, max_len - 2, temperature=0.0, max_new=budget)
    rows, correct = [], []
    for ex, answer in zip(examples, answers):
        ids = answer.ids[: max_len - 2 - len(prompt_ids(ex, tokenizer))]
        rows.append(prompt_ids(ex, tokenizer) + ids + [tokenizer.eos_id])
        correct.append(answer.closed and ids == tokenizer.encode(ex.answer))
    tokens = torch.full((len(rows), max(map(len, rows))), tokenizer.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
    return SelfRows(tokens, torch.tensor([len(r) - 1 for r in rows]), torch.tensor(correct), list(examples))


def verdict_logits(model, tokens: torch.Tensor, eos_at: torch.Tensor, verdict_ids: tuple[int, int]) -> torch.Tensor:
    """[N, 2] logits of (<right>, <wrong>) at each row's <eos>."""
    device = next(model.parameters()).device
    logits = model(tokens.to(device))
    at = logits[torch.arange(len(tokens), device=device), eos_at.to(device)]
    return at[:, list(verdict_ids)].float()


@torch.no_grad()
def confidence(model, rows: SelfRows, verdict_ids: tuple[int, int], batch_size: int = 256) -> torch.Tensor:
    """P(right) of each row's own answer, as the model predicts it."""
    model.eval()
    out = [verdict_logits(model, rows.tokens[lo: lo + batch_size], rows.eos_at[lo: lo + batch_size],
                          verdict_ids).softmax(-1)[:, 0].cpu() for lo in range(0, len(rows.tokens), batch_size)]
    return torch.cat(out)


def train_self_model(model, optimizer, rows: SelfRows, tokenizer, max_len: int, verdict_ids: tuple[int, int], *,
                     steps: int, batch_size: int, seed: int) -> list[float]:
    """`steps` steps of cross-entropy on the verdicts (each verdict weighted by the inverse of its frequency, so
    a mostly-right model still learns what its wrong answers look like), plus the answer loss of the same
    questions' true answers so that learning to judge does not unlearn answering. Returns the losses."""
    rng, losses = random.Random(seed), []
    labels = (~rows.correct).long()        # 0 = <right>, 1 = <wrong>
    counts = torch.bincount(labels, minlength=2).clamp(min=1).float()
    balance = (counts.sum() / (2 * counts)).to(next(model.parameters()).device)   # the rarer verdict weighs more
    for _ in range(steps):
        idx = [rng.randrange(len(rows.examples)) for _ in range(batch_size)]
        model.train()
        verdict = F.cross_entropy(verdict_logits(model, rows.tokens[idx], rows.eos_at[idx], verdict_ids),
                                  labels[idx].to(next(model.parameters()).device), weight=balance)
        batch = encode_batch([rows.examples[i] for i in idx], tokenizer, max_len)
        device = next(model.parameters()).device
        loss = verdict + answer_nll(model(batch.tokens.to(device)), batch.targets.to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"self-model loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(AUROC, its standard error by Hanley & McNeil 1982) of `scores` for the positive `labels`; ties
    count one half. (0.5, 0.5) when one class is empty (nothing to rank)."""
    pos, neg = scores[labels.bool()].double(), scores[~labels.bool()].double()
    if len(pos) == 0 or len(neg) == 0:
        return 0.5, 0.5
    greater = (pos[:, None] > neg[None, :]).double().mean()
    ties = (pos[:, None] == neg[None, :]).double().mean()
    a = float(greater + 0.5 * ties)
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (len(pos) - 1) * (q1 - a * a) + (len(neg) - 1) * (q2 - a * a)) / (len(pos) * len(neg))
    return a, math.sqrt(max(var, 0.0))


def calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error: the bin-size-weighted mean |accuracy - mean confidence| over `bins`
    equal-width confidence bins."""
    probs, labels = probs.double(), labels.double()
    which = torch.clamp((probs * bins).long(), max=bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += float(mask.sum()) * abs(float(labels[mask].mean() - probs[mask].mean()))
    return total / len(probs)
