"""Training an expert's z-vectors: REINFORCE as Transformer² does (arXiv 2501.06252, section 3.1), or
cross-entropy on the true answers.

REINFORCE. A batch of the cluster's training questions is answered by sampling (temperature 1) from the SVF
model, with the calculator answering its calls; reward r = +1 for a correct answer, -1 otherwise; the baseline
is the batch's mean reward (the paper uses none; the baseline only lowers the variance). The loss is

    L = -(1/B) Σ_i (r_i - mean r) · Σ_t log π(y_i,t | y_i,<t)  +  kl_coefficient · KL(π_base || π)

over the tokens the model wrote (not the tool's <result> ... </result>), the KL per token against the frozen
incoming model. Cross-entropy: L = mean NLL of the true answer rows + the same KL term. Only the z-vectors' p
train, through MuonGrokfast with the phase's settings: they are 1-D, so they take its AdamW path. As the
paper does, the expert kept is the one with the best validation accuracy seen (checked every `eval_every`
steps; the base itself, z = 1, counts as step 0). On several ranks (forge.distributed) each rank samples its slice
of the answers (generate's split: together what one process draws, gathered to every rank) and trains its slice
of each batch through DistributedDataParallel, each loss term scaled so that the averaged gradient is the
one-process gradient of the whole batch.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from forge.data import IGNORE_INDEX
from forge.data.batching import prompt_ids
from forge.data.evaluate import mean
from forge.data.tools import CALL_ERROR, END_RESULT, RESULT, encode_rows, generate
from forge.distributed import data_parallel, rank_share_mean, ranks_mean, world
from forge.nn.losses import kl_to_teacher
from forge.nn.svf import expert_of, set_expert, svf_layers
from forge.pipeline.devices import model_device
from forge.pipeline.phases.phase7_experts.discovery import correct_flags
from forge.pipeline.training import make_optimizer, rank_share_nll


def svf_optimizer(model: nn.Module, settings, lr: float):
    """MuonGrokfast over the p vectors of `model`'s SVF layers alone (1-D: the AdamW path), from a phase's
    `optimizer:` block; the frozen base weights are not handed to it, so QK-clip never touches them."""
    holder = nn.ParameterList([layer.p for layer in svf_layers(model).values()])
    return make_optimizer(holder, settings, lr)


def written_rows(prefixes: list[list[int]], outputs, tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Rows (ids, trained) of sampled answers: the prefix is never trained, nor what the tool wrote
    (<result> ... </result>, <calc_error>); <eos> ends a closed answer and is trained."""
    tool_ids = {tokenizer.token_id(t) for t in (RESULT, END_RESULT, CALL_ERROR)}
    rows = []
    for prefix, out in zip(prefixes, outputs):
        body = list(out.ids) + ([tokenizer.eos_id] if out.closed else [])
        trained, inside = [], False
        for tok in body:
            inside = inside or tok in (tokenizer.token_id(RESULT), tokenizer.token_id(CALL_ERROR))
            trained.append(not inside and tok not in tool_ids)
            inside = inside and tok not in (tokenizer.token_id(END_RESULT), tokenizer.token_id(CALL_ERROR))
        rows.append((list(prefix) + body, [False] * len(prefix) + trained))
    return rows


def kl_term(logits: torch.Tensor, base, tokens: torch.Tensor, targets: torch.Tensor, coefficient: float,
            positions: int | None = None):
    """coefficient · KL(π_base || π) per trained position (0 without a coefficient). On several ranks `logits`,
    `tokens` and `targets` are this rank's rows of a batch with `positions` trained positions in all: the term is
    then this rank's share, scaled so that the mean over the ranks (what DDP averages) is the batch's term."""
    if coefficient == 0:
        return logits.new_zeros(())
    mask = targets != IGNORE_INDEX
    with torch.no_grad():
        base_logits = base(tokens).float()
    term = coefficient * kl_to_teacher(logits[mask], base_logits[mask])
    return term if positions is None else rank_share_mean(term, int(mask.sum()), positions)


def reinforce_step_loss(model, base, examples, tokenizer, max_len: int, kl_coefficient: float,
                        generator: torch.Generator, net=None) -> tuple[torch.Tensor, float]:
    """(REINFORCE loss of one sampled batch, its mean reward); see the module. On several ranks each rank samples
    its share of the answers (all gathered) and returns its rows' share of the loss (forward through `net`, the
    DDP wrapper)."""
    prefixes = [prompt_ids(ex, tokenizer) for ex in examples]
    outputs = generate(model, prefixes, tokenizer, max_len, temperature=1.0, generator=generator, split=True)
    device, here = model_device(model), world()
    rewards = torch.tensor([1.0 if o.correct(ex, tokenizer) else -1.0 for o, ex in zip(outputs, examples)],
                           device=device)
    tokens, targets = (t.to(device) for t in encode_rows(written_rows(prefixes, outputs, tokenizer),
                                                         tokenizer.pad_id, max_len))
    mine = here.slice_of(len(examples))
    logits = (net or model)(tokens[mine]).float()
    logp = -F.cross_entropy(logits.transpose(1, 2), targets[mine], ignore_index=IGNORE_INDEX, reduction="none").sum(1)
    advantage = rewards - rewards.mean()
    policy = -(advantage[mine] * logp).sum() * (here.size / len(examples))
    positions = int((targets != IGNORE_INDEX).sum())
    return policy + kl_term(logits, base, tokens[mine], targets[mine], kl_coefficient, positions), float(rewards.mean())


def ce_step_loss(model, base, examples, true_rows, kl_coefficient: float, net=None) -> tuple[torch.Tensor, float]:
    """(cross-entropy of the true answer rows `true_rows(examples)` + the KL term, nan: no reward); on several
    ranks this rank's share of it, as `reinforce_step_loss`."""
    tokens, targets = (t.to(model_device(model)) for t in true_rows(examples))
    mine = world().slice_of(len(examples))
    logits = (net or model)(tokens[mine]).float()
    positions = int((targets != IGNORE_INDEX).sum())
    return (rank_share_nll(logits, targets, mine)
            + kl_term(logits, base, tokens[mine], targets[mine], kl_coefficient, positions), float("nan"))


def train_expert(model, base, train, val, tokenizer, cfg, *, method: str, true_rows, seed: int,
                 on_step=None) -> dict:
    """Train `model`'s z-vectors (an SVF copy of `base`, z = 1) by `method` ("reinforce" | "cross_entropy") for
    cfg.svf_steps steps of cfg.svf_batch_size questions from `train`; returns {"expert": best z by accuracy on
    `val`, "val_accuracy", "base_val_accuracy", "best_step", "rewards": mean reward per step}."""
    if method not in ("reinforce", "cross_entropy"):
        raise ValueError(f"Invalid phases.phase7.method: {method!r}; expected 'reinforce' or 'cross_entropy'")
    max_len = model.config.max_len
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    optimizer = svf_optimizer(model, cfg.optimizer, cfg.svf_lr)
    params, net = [layer.p for layer in svf_layers(model).values()], data_parallel(model)
    best = {"val_accuracy": _accuracy(model, val, tokenizer, max_len), "best_step": 0, "expert": expert_of(model)}
    base_val, rewards = best["val_accuracy"], []
    for step in range(1, cfg.svf_steps + 1):
        batch = [rng.choice(train) for _ in range(cfg.svf_batch_size)]
        model.train()
        if method == "reinforce":
            loss, reward = reinforce_step_loss(model, base, batch, tokenizer, max_len, cfg.optimizer.kl_coefficient,
                                               generator, net)
        else:
            loss, reward = ce_step_loss(model, base, batch, true_rows, cfg.optimizer.kl_coefficient, net)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        rewards.append(reward)
        if on_step is not None:    # the batch's loss: the mean of the ranks' shares
            on_step(step, ranks_mean(loss), reward)
        if step % cfg.eval_every == 0 or step == cfg.svf_steps:
            accuracy = _accuracy(model, val, tokenizer, max_len)
            if accuracy > best["val_accuracy"]:
                best = {"val_accuracy": accuracy, "best_step": step, "expert": expert_of(model)}
    model.eval()
    return {**best, "base_val_accuracy": base_val, "rewards": rewards}


def _accuracy(model, examples, tokenizer, max_len: int) -> float:
    set_expert(model, None)
    return mean(correct_flags(model, examples, tokenizer, max_len))
