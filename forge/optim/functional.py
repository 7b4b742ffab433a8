"""The math of MuonGrokfast as plain functions (the class in muon_grokfast.py only keeps books).

Muon (Jordan et al. 2024; torch.optim.Muon), for a matrix parameter p with gradient g:
    buf <- lerp(buf, g, 1 - mu);  u = lerp(g, buf, mu) if nesterov else buf
    O = NewtonSchulz(u as a matrix: conv weights flattened to (out, in*kh*kw))
    p <- p * (1 - lr * wd) - lr * f(rows, cols) * O,   f = max(1, rows/cols)^0.5 ("original")
                                                       or 0.2 * max(rows, cols)^0.5 ("match_rms_adamw",
                                                       Liu et al. 2025, "Muon is Scalable for LLM Training")
AdamW (Loshchilov and Hutter 2019), exactly as torch.optim.AdamW:
    p <- p * (1 - lr * wd);  m <- lerp(m, g, 1 - b1);  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

Each update has two implementations with one signature: `single_tensor` (a plain per-parameter loop,
the reference) and `multi_tensor` (foreach kernels over the list; matrices of one shape stacked and
orthogonalized in one batched Newton-Schulz call, shared out across ranks under torch.distributed).
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist

from forge.ops import newton_schulz
from forge.optim import sharding

ADJUST_LR_FNS = ("original", "match_rms_adamw")


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The 2-D view Muon orthogonalizes: (out, in * kernel...) for conv-like weights."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def adjusted_lr(lr: float, adjust_lr_fn: str, shape: torch.Size) -> float:
    """Muon's shape-aware learning rate, on the matrix view (so conv fan-in counts the kernel)."""
    rows, cols = shape[0], math.prod(shape[1:])
    if adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    raise ValueError(f"Invalid adjust_lr_fn: {adjust_lr_fn!r}; expected one of {ADJUST_LR_FNS}")


# ---------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------

def muon_single_tensor(params, grads, bufs, *, lr, weight_decay, momentum, nesterov, ns_coefficients,
                       ns_steps, eps, adjust_lr_fn, ns_dtype=None, ns_backend="auto", process_group=None,
                       shards=None) -> None:
    """The reference: one parameter at a time, as torch.optim.Muon writes it (NS in the parameter's
    dtype, or `ns_dtype`; torch.optim.Muon always uses bfloat16). `shards`: as in `muon_multi_tensor`."""
    for i, (p, g, buf) in enumerate(zip(params, grads, bufs)):
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum) if nesterov else buf
        shape = p.shape if shards is None else shards[i].shape
        if shards is not None:
            update = sharding.full_tensor(update, shards[i])
        ortho = newton_schulz(as_matrix(update).to(ns_dtype or update.dtype), ns_steps, ns_coefficients, eps,
                              backend=ns_backend, check_finite=False).to(p.dtype).view(shape)
        if shards is not None:
            ortho = sharding.local_part(ortho, shards[i])
        p.mul_(1 - lr * weight_decay)
        p.add_(ortho, alpha=-adjusted_lr(lr, adjust_lr_fn, shape))


def _world_size(process_group) -> int:
    return 1 if process_group is False else dist.get_world_size(process_group)


def _orthogonalize_stack(stack: torch.Tensor, ns_steps, ns_coefficients, eps, ns_backend, process_group,
                         owner: int = 0) -> torch.Tensor:
    """NS of a (k, rows, cols) stack. Under torch.distributed the work is shared: a stack of at least
    `world` matrices is split evenly and all-gathered; a smaller one is done by rank `owner % world`
    alone and broadcast (the caller rotates `owner`, so lone matrices spread over the ranks too)."""
    world = _world_size(process_group)
    if world == 1:
        return newton_schulz(stack, ns_steps, ns_coefficients, eps, backend=ns_backend, check_finite=False)
    rank = dist.get_rank(process_group)
    if stack.shape[0] < world:
        src = owner % world
        result = (newton_schulz(stack, ns_steps, ns_coefficients, eps, backend=ns_backend, check_finite=False)
                  if rank == src else torch.empty_like(stack)).contiguous()
        dist.broadcast(result, src=dist.get_global_rank(process_group, src) if process_group else src,
                       group=process_group)
        return result
    per_rank = -(-stack.shape[0] // world)
    padded = torch.cat([stack, stack.new_zeros(per_rank * world - stack.shape[0], *stack.shape[1:])])
    mine = padded[rank * per_rank:(rank + 1) * per_rank]
    local = newton_schulz(mine, ns_steps, ns_coefficients, eps, backend=ns_backend, check_finite=False)
    gathered = torch.empty_like(padded)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12+
    all_gather(gathered, local.contiguous(), group=process_group)
    return gathered[:stack.shape[0]]


def muon_multi_tensor(params, grads, bufs, *, lr, weight_decay, momentum, nesterov, ns_coefficients,
                      ns_steps, eps, adjust_lr_fn, ns_dtype=None, ns_backend="auto", process_group=False,
                      shards=None) -> None:
    """Foreach momentum and update; one batched NS call per (shape, dtype, device) stack.

    process_group: False for single-process, else the torch.distributed group to share NS across.
    shards: None for plain parameters; for FSDP2's, the DTensor parameters of which `params`, `grads` and `bufs`
        are this rank's local parts: each update is all-gathered to its whole matrix, orthogonalized (by every rank
        alike, or shared out by `process_group`), and each rank applies its own part of the result.
    """
    if not params:
        return
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    updates = torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs
    if shards is not None:
        updates = [sharding.full_tensor(u, s) for u, s in zip(updates, shards)]
    stacks: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, u) in enumerate(zip(params, updates)):
        stacks[(tuple(u.shape), p.dtype, p.device)].append(i)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    world = _world_size(process_group)
    lone = 0  # stacks smaller than the world, handed to the ranks in turn
    for (shape, _, _), idx in stacks.items():
        stack = torch.stack([as_matrix(updates[i]) for i in idx]).to(ns_dtype or updates[idx[0]].dtype)
        ortho = _orthogonalize_stack(stack, ns_steps, ns_coefficients, eps, ns_backend, process_group, lone)
        ortho = [o.view(shape) for o in ortho.to(params[idx[0]].dtype).unbind(0)]
        if shards is not None:
            ortho = [sharding.local_part(o, shards[i]) for o, i in zip(ortho, idx)]
        lone += len(idx) < world
        torch._foreach_add_([params[i] for i in idx], ortho, alpha=-adjusted_lr(lr, adjust_lr_fn, torch.Size(shape)))


# ---------------------------------------------------------------------------------------------
# AdamW
# ---------------------------------------------------------------------------------------------

def _bias_corrections(step: float, beta1: float, beta2: float) -> tuple[float, float]:
    return 1 - beta1**step, math.sqrt(1 - beta2**step)


def adamw_single_tensor(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    """The reference AdamW, one parameter at a time (steps: float32 CPU tensors, as torch keeps them)."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        step += 1
        bc1, bc2_sqrt = _bias_corrections(step.item(), beta1, beta2)
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-lr / bc1)


def adamw_multi_tensor(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay) -> None:
    """Foreach AdamW; parameters sharing a step count (all of them, normally) go in one set of kernels."""
    if not params:
        return
    torch._foreach_add_(steps, 1)
    by_step: dict[float, list[int]] = defaultdict(list)
    for i, s in enumerate(steps):
        by_step[s.item()].append(i)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    for step, idx in by_step.items():
        bc1, bc2_sqrt = _bias_corrections(step, beta1, beta2)
        denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in idx])
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_([params[i] for i in idx], [exp_avgs[i] for i in idx], denom, value=-lr / bc1)
