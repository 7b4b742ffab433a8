"""Self-modeling: after its own answer and <eos> the model writes `<right>` or `<wrong>`, its prediction of
whether that answer is correct, trained on its own outcomes:

    <bos> prompt <sep> a_1..a_k <eos> <right>|<wrong>      (a_1..a_k: the model's greedy answer)

The confidence is P(<right>) / (P(<right>) + P(<wrong>)) at the <eos> position. Only the head rows of the two
verdict tokens learn (a probe of the model's own hidden state), so judging cannot change how it answers. Judged on held-out questions
by AUROC against correctness (with the Hanley-McNeil standard error) and the expected calibration error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forge.data import Example
from forge.data.batching import prompt_ids
from forge.data.sampling import sample_answers

RIGHT, WRONG = "<right>", "<wrong>"
KEEP_MARGIN = 5.0   # logits by which a verdict stays below the token the model writes while it answers


@dataclass
class SelfRows:
    """Sequences ending in the model's own answer and <eos>; `correct[i]`: that answer is right."""
    tokens: torch.Tensor          # [N, T] padded
    eos_at: torch.Tensor          # [N] position of the <eos> whose next token is the verdict
    answer_at: torch.Tensor       # [N] position of the answer's first token (after <sep>)
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
    answer_at = torch.tensor([len(prompt_ids(ex, tokenizer)) for ex in examples])
    return SelfRows(tokens, torch.tensor([len(r) - 1 for r in rows]), answer_at, torch.tensor(correct), list(examples))


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


@torch.no_grad()
def _features(model, rows: SelfRows, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden state at each row's <eos> [N, D]; hidden states at the answer positions [M, D] with the logits
    the head gives there [M, V] and the token the model wrote next [M])."""
    at_eos, answer_h, written = [], [], []
    for lo in range(0, len(rows.tokens), batch_size):
        tokens, eos_at = rows.tokens[lo: lo + batch_size], rows.eos_at[lo: lo + batch_size]
        device = next(model.parameters()).device
        hidden = model.hidden_states(tokens.to(device)).float().cpu()
        at_eos.append(hidden[torch.arange(len(tokens)), eos_at])
        for i, start in enumerate(rows.answer_at[lo: lo + batch_size].tolist()):
            end = int(eos_at[i])                     # positions start-1 .. end-1 predict the answer and <eos>
            answer_h.append(hidden[i, start - 1: end])
            written.append(tokens[i, start: end + 1])
    answer_h = torch.cat(answer_h)
    answer_logits = answer_h @ model.head.weight.detach().float().cpu().T
    return torch.cat(at_eos), answer_h, answer_logits, torch.cat(written)


def train_self_model(model, rows: SelfRows, verdict_ids: tuple[int, int], *, steps: int, lr: float) -> list[float]:
    """Teach the verdict as a probe of what the model already computes: only the head rows of `<right>` and
    `<wrong>` are trained (AdamW, full batch, on the hidden states at each row's <eos>), so the model's answers
    do not change; a hinge keeps the verdict logits KEEP_MARGIN below the token the model writes at every
    answer position of the training rows (measured on a small model: 1 of 480 held-out answers changed with a
    cross-entropy term or a margin of 2 instead, none with 5). (Weighting the verdicts by inverse frequency raised a mostly-right model's AUROC from 0.66 to
    0.69 but its calibration error from 0.01 to 0.34, so the loss is plain cross-entropy.) Returns the losses; the rows are written into model.head."""
    at_eos, answer_h, answer_logits, written = _features(model, rows)
    ids = list(verdict_ids)
    weight = model.head.weight.detach()[ids].float().cpu().clone().requires_grad_(True)
    labels = (~rows.correct).long()        # 0 = <right>, 1 = <wrong>
    written_logit = answer_logits[torch.arange(len(written)), written]
    optimizer, losses = torch.optim.AdamW([weight], lr=lr, weight_decay=0.0), []
    for _ in range(steps):
        verdict = F.cross_entropy(at_eos @ weight.T, labels)
        above = (answer_h @ weight.T).max(dim=1).values - written_logit + KEEP_MARGIN
        loss = verdict + F.relu(above).mean() if len(written) else verdict
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        model.head.weight[ids] = weight.detach().to(model.head.weight.dtype).to(model.head.weight.device)
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
