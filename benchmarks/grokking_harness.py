"""Grokking experiments: steps until validation accuracy reaches a target, per optimizer variant.

The task is Grokfast's (Lee et al. 2024, arXiv 2405.20233, section 3.1; github.com/ironjr/grokfast):
a small decoder reads [x, op, y, =] and is trained with cross-entropy on the answer only (the
logits at the last position), on half of all pairs of x * y mod p. Grokfast-EMA amplifies the slow
component of the gradient, g <- g + lamb * ema(g) (paper's Algorithm 2), which the paper reports
makes Adam reach 95% validation accuracy about 44x sooner.

An experiment harness, not part of the library. `benchmarks/grokking.py` and tests/optim/test_grokking.py
both import it as `grokking_harness`: a script's own folder is on sys.path, and pyproject.toml puts
benchmarks/ on pytest's pythonpath.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from forge.ops import grokfast_ema_
from forge.ops.grokfast import grokfast_ema_init
from forge.optim import MuonGrokfast, muon_param_groups

#: The four compared optimizers: MuonGrokfast with/without Grokfast, AdamW with/without Grokfast.
VARIANTS = ("muon+grokfast", "muon", "adamw+grokfast", "adamw")
#: The paper's own optimizer: torch.optim.Adam with coupled (L2) weight decay, as in the official code.
PAPER_VARIANTS = ("adam+grokfast", "adam")
ALL_VARIANTS = VARIANTS + PAPER_VARIANTS


def answer_logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits predicting the answer: the model's output at the last input position ('=')."""
    return model(inputs)[:, -1]


@torch.no_grad()
def answer_accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, chunk: int = 8192) -> float:
    """Fraction of `inputs` whose answer token is predicted exactly (argmax of the last-position logits)."""
    was_training = model.training
    model.eval()
    correct = sum(int((answer_logits(model, inputs[i:i + chunk]).argmax(-1) == targets[i:i + chunk]).sum())
                  for i in range(0, len(inputs), chunk))
    model.train(was_training)
    return correct / max(len(inputs), 1)


def with_grokfast(optimizer: torch.optim.Optimizer, alpha: float = 0.98, lamb: float = 2.0) -> torch.optim.Optimizer:
    """`optimizer`, whose gradients now pass through Grokfast-EMA before every step; returns it.

    A step pre-hook runs `forge.ops.grokfast_ema_` (ema <- alpha*ema + (1-alpha)*g; g <- g + lamb*ema,
    arXiv 2405.20233 Algorithm 2) on every parameter with a gradient. A parameter's EMA starts at its
    first gradient, as in the paper's code, and lives in `optimizer.grokfast_ema` (keyed by parameter),
    not in `optimizer.state`, whose emptiness torch's optimizers use to initialise their own state.
    """
    optimizer.grokfast_ema = {}

    def filter_grads(opt, args, kwargs):
        params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
        fresh = [p for p in params if p not in opt.grokfast_ema]
        opt.grokfast_ema.update(zip(fresh, grokfast_ema_init([p.grad for p in fresh])))
        with torch.no_grad():
            grokfast_ema_([p.grad for p in params], [opt.grokfast_ema[p] for p in params], alpha=alpha, lamb=lamb)

    optimizer.register_step_pre_hook(filter_grads)
    return optimizer


def make_optimizer(variant: str, model: nn.Module, lr: float = 1e-3, muon_lr: float = 0.02,
                   betas=(0.9, 0.98), weight_decay: float = 0.005, alpha: float = 0.98,
                   lamb: float = 2.0) -> torch.optim.Optimizer:
    """One of `ALL_VARIANTS` for `model`; a "+grokfast" variant filters gradients with Grokfast-EMA.

    lr, betas: of AdamW/Adam (the paper's Adam settings by default). muon_lr: of the Muon groups;
    MuonGrokfast splits `model` with `muon_param_groups` (hidden matrices to Muon; embeddings, `head`
    and 1-D parameters to AdamW at `lr`), and weight_decay is decoupled everywhere except in "adam",
    which adds weight_decay * w to the gradient (L2) like the official Grokfast code.
    """
    base, _, filtered = variant.partition("+")
    if variant not in ALL_VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r}; expected one of {ALL_VARIANTS}")
    if base == "muon":
        return MuonGrokfast(muon_param_groups(model), lr=muon_lr, weight_decay=weight_decay, adamw_lr=lr,
                            adamw_betas=betas, grokfast="ema" if filtered else None,
                            grokfast_alpha=alpha, grokfast_lamb=lamb)
    adam = torch.optim.AdamW if base == "adamw" else torch.optim.Adam
    optimizer = adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    return with_grokfast(optimizer, alpha=alpha, lamb=lamb) if filtered else optimizer


def optimizer_factory(variant: str, **settings) -> Callable[[nn.Module], torch.optim.Optimizer]:
    """`model -> make_optimizer(variant, model, **settings)`, checked now rather than at the first call."""
    if variant not in ALL_VARIANTS:
        raise ValueError(f"Invalid variant: {variant!r}; expected one of {ALL_VARIANTS}")
    return lambda model: make_optimizer(variant, model, **settings)


def _check_train_args(data, max_steps, target_acc, batch_size, eval_every, warmup_steps) -> None:
    if not (isinstance(data, (tuple, list)) and len(data) == 4):
        raise ValueError("Invalid data: expected (train_x, train_y, val_x, val_y)")
    for name, value in (("max_steps", max_steps), ("eval_every", eval_every)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid {name}: {value!r}; expected an integer >= 1")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"Invalid batch_size: {batch_size!r}; expected None (full batch) or an integer >= 1")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps!r}; expected an integer >= 0")
    if not isinstance(target_acc, (int, float)) or not 0.0 < target_acc <= 1.0:
        raise ValueError(f"Invalid target_acc: {target_acc!r}; expected a value in (0, 1]")


def train_until(model_fn: Callable[[], nn.Module], optimizer_fn: Callable[[nn.Module], torch.optim.Optimizer],
                data, max_steps: int, target_acc: float = 0.95, batch_size: int | None = 512,
                eval_every: int = 10, seed: int = 0, warmup_steps: int = 10) -> dict:
    """Train on the answer-token cross-entropy until validation accuracy >= `target_acc` or `max_steps`.

    data: (train_x, train_y, val_x, val_y) as from `forge.data.modular_arithmetic_split`.
    batch_size: minibatch drawn uniformly with replacement each step (the paper uses 512); None, or a
        size >= the training set, trains full-batch. The lr ramps linearly over `warmup_steps` steps
        (the paper's code: factor min(step / 10, 1)). Model init and batches are seeded by `seed`.
    Returns dict(steps_to_target (None if never reached), best_val_acc, final_val_acc, seconds, steps,
    history = [dict(step, train_loss, val_acc), ...] at every evaluation).
    """
    _check_train_args(data, max_steps, target_acc, batch_size, eval_every, warmup_steps)
    train_x, train_y, val_x, val_y = data
    torch.manual_seed(seed)
    model = model_fn()
    optimizer = optimizer_fn(model)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / max(warmup_steps, 1), 1.0))
    batches = torch.Generator().manual_seed(seed)
    full_batch = batch_size is None or batch_size >= len(train_x)
    history, reached, start, step = [], None, time.perf_counter(), 0
    model.train()
    while step < max_steps and reached is None:
        step += 1
        idx = None if full_batch else torch.randint(len(train_x), (batch_size,), generator=batches)
        x, y = (train_x, train_y) if idx is None else (train_x[idx], train_y[idx])
        loss = nn.functional.cross_entropy(answer_logits(model, x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        warmup.step()
        if step % eval_every == 0 or step == max_steps:
            val_acc = answer_accuracy(model, val_x, val_y)
            history.append(dict(step=step, train_loss=float(loss.detach()), val_acc=val_acc))
            if val_acc >= target_acc:
                reached = step
    accs = [h["val_acc"] for h in history]
    return dict(steps_to_target=reached, best_val_acc=max(accs, default=0.0), final_val_acc=accs[-1] if accs else 0.0,
                seconds=time.perf_counter() - start, steps=step, history=history)
