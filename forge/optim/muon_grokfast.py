"""MuonGrokfast: Grokfast gradient filtering, then Muon for hidden matrices and AdamW for the rest.

A drop-in `torch.optim.Optimizer`. Muon groups carry torch.optim.Muon's keys (lr, weight_decay,
momentum, nesterov, ns_coefficients, ns_steps, eps, adjust_lr_fn) and AdamW groups torch.optim.AdamW's
(lr, betas, eps, weight_decay); both carry the Grokfast keys. State uses torch's names
(`momentum_buffer`, `exp_avg`, `exp_avg_sq`, `step`) plus `grokfast_ema` or `grokfast_ring`/`grokfast_sum`.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.optim import Optimizer

from forge.ops import grokfast_ema_, grokfast_ma_
from forge.ops._validate import check_finite_number
from forge.ops.grokfast import grokfast_ema_init, grokfast_ma_init
from forge.ops.newton_schulz import resolve_coefficients
from forge.ops.precision import auto_ns_dtype
from forge.optim import functional as F
from forge.optim import sharding
from forge.optim.qk_clip import qk_clip_, qk_clip_sharded_, qk_logit_recorders

GROKFAST_MODES = ("ema", "ma", None)
_MUON_KEYS = ("momentum", "nesterov", "ns_coefficients", "ns_steps", "eps", "adjust_lr_fn")


class MuonGrokfast(Optimizer):
    """Muon + AdamW + Grokfast + QK-clip in one optimizer.

    Args (Muon keywords mean what they mean in torch.optim.Muon):
        params: parameters, named parameters, or groups; a group may set `use_muon`, otherwise it is
            split by dimension (see `muon_param_groups` for a split by module type).
        lr, weight_decay, momentum, nesterov, ns_coefficients, ns_steps, eps, adjust_lr_fn: Muon groups.
        adamw_lr, adamw_betas, adamw_eps: defaults of the AdamW groups (weight_decay is shared).
        grokfast: "ema" (g + lamb * ema), "ma" (g + lamb * mean of the last `grokfast_window`) or None.
        qk_clip_threshold: tau of MuonClip for the modules given to `register_attention`.
        ste_mode: the parameters are BitNet latent weights; the straight-through estimator lives in the
            layer, so the update is the ordinary one on the float latents; integer (packed) weights are refused.
        skip_nonfinite: skip a step with NaN/Inf gradients instead of raising.
        distributed: "auto" works with the other ranks when torch.distributed is initialized (Newton-Schulz shared out
            as `share_newton_schulz` says, QK-clip's per-head maxima all-reduced); False: no collective at all.
        share_newton_schulz: under torch.distributed, split the orthogonalizations over the ranks (True) or let every
            rank do all of them (False: no Newton-Schulz collective; the gradients DDP averaged are the same on every
            rank, so are the steps). QK-clip's maxima are all-reduced either way (each rank saw its own batch).
        foreach: multi-tensor kernels (True) or the per-parameter reference loop (False).
        ns_dtype: dtype of the Newton-Schulz iteration. "auto" (default): torch.bfloat16 where bf16 matrix
            products are fast (CUDA; CPUs with native bf16 dot products, found by a one-time probe,
            forge.ops.precision, shown by `forge backends`), torch.float32 elsewhere. None: the parameter's dtype;
            torch.float32 / torch.bfloat16 / torch.float16 force one. torch.optim.Muon and Keller Jordan's Muon
            always use bf16; Newton-Schulz is approximate by design, so its precision is a speed choice.
    """

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, ns_coefficients="muon",
                 ns_steps=5, eps=1e-7, adjust_lr_fn="original", adamw_lr=3e-4, adamw_betas=(0.9, 0.95),
                 adamw_eps=1e-8, grokfast="ema", grokfast_alpha=0.98, grokfast_lamb=2.0, grokfast_window=100,
                 qk_clip_threshold=None, ste_mode=False, skip_nonfinite=False, distributed="auto", foreach=True,
                 ns_dtype="auto", share_newton_schulz=True):
        self._adamw_defaults = dict(lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, ns_steps=ns_steps, eps=eps, adjust_lr_fn=adjust_lr_fn,
                        ns_dtype=ns_dtype, grokfast=grokfast, grokfast_alpha=grokfast_alpha, grokfast_lamb=grokfast_lamb,
                        grokfast_window=grokfast_window)
        self._validate_group(dict(defaults, use_muon=True), "defaults")
        self._validate_group(dict(defaults, use_muon=False, **self._adamw_defaults), "AdamW defaults (adamw_*)")
        if qk_clip_threshold is not None:
            check_finite_number("qk_clip_threshold", qk_clip_threshold, low=0.0, low_open=True)
        if distributed not in ("auto", True, False):
            raise ValueError(f"Invalid distributed: {distributed!r}; expected 'auto', True or False")
        self.qk_clip_threshold = qk_clip_threshold
        self.ste_mode = bool(ste_mode)
        self.skip_nonfinite = bool(skip_nonfinite)
        self.distributed = distributed
        self.share_newton_schulz = bool(share_newton_schulz)
        self.foreach = bool(foreach)
        self.skipped_steps = 0
        self._qk_clip_count = 0
        self._attention_modules: list = []
        super().__init__(params, defaults)

    # -- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """Groups without `use_muon` are split: matrices (2-D and up) to Muon, the rest to AdamW."""
        params, names = _split_named(param_group["params"], param_group.get("param_names"))
        param_group = dict(param_group, params=params)
        if names is not None:
            param_group["param_names"] = names
        if "use_muon" not in param_group:
            for use_muon in (True, False):
                keep = [i for i, p in enumerate(params) if (_tensor_of(p, i).dim() >= 2) == use_muon]
                if keep:
                    part = dict(param_group, use_muon=use_muon, params=[params[i] for i in keep])
                    if names is not None:
                        part["param_names"] = [names[i] for i in keep]
                    self.add_param_group(part)
            return
        group = dict(param_group)
        if not group["use_muon"]:
            for key, value in self._adamw_defaults.items():
                group.setdefault(key, value)
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        where = f"param_groups[{len(self.param_groups)}]"
        self._validate_group(group, where)
        _check_params(group, self.param_groups, where)
        super().add_param_group(group)

    @staticmethod
    def _validate_group(group: dict, where: str) -> None:
        check_finite_number(f"lr ({where})", group["lr"], low=0.0)
        check_finite_number(f"weight_decay ({where})", group["weight_decay"], low=0.0)
        if group.get("use_muon"):
            check_finite_number(f"momentum ({where})", group["momentum"], low=0.0, high=1.0, high_open=True)
            if not isinstance(group["ns_steps"], int) or not 1 <= group["ns_steps"] < 100:
                raise ValueError(f"Invalid ns_steps ({where}): {group['ns_steps']!r}; expected an integer in [1, 100)")
            resolve_coefficients(group["ns_coefficients"], group["ns_steps"])
            check_finite_number(f"eps ({where})", group["eps"], low=0.0)
            if group["ns_dtype"] not in ("auto", None, torch.float32, torch.bfloat16, torch.float16):
                raise ValueError(f"Invalid ns_dtype ({where}): {group['ns_dtype']!r}; expected 'auto', None, "
                                 "torch.float32, torch.bfloat16 or torch.float16")
            if group["adjust_lr_fn"] not in F.ADJUST_LR_FNS:
                raise ValueError(f"Invalid adjust_lr_fn ({where}): {group['adjust_lr_fn']!r}; expected one of {F.ADJUST_LR_FNS}")
            for i, p in enumerate(group.get("params", [])):
                if _tensor_of(p, i).dim() < 2:
                    raise ValueError(f"use_muon=True needs parameters of 2 or more dimensions; got {_label(group, where, i)} "
                                     f"of shape {tuple(p.shape)}")
        else:
            betas = group["betas"]
            if len(betas) != 2:
                raise ValueError(f"Invalid betas ({where}): {betas!r}; expected two values in [0, 1)")
            for i, b in enumerate(betas):
                check_finite_number(f"betas[{i}] ({where})", b, low=0.0, high=1.0, high_open=True)
            check_finite_number(f"eps ({where})", group["eps"], low=0.0)
        if group["grokfast"] not in GROKFAST_MODES:
            raise ValueError(f"Invalid grokfast ({where}): {group['grokfast']!r}; expected 'ema', 'ma' or None")
        check_finite_number(f"grokfast_alpha ({where})", group["grokfast_alpha"], low=0.0, high=1.0, high_open=True)
        check_finite_number(f"grokfast_lamb ({where})", group["grokfast_lamb"])
        if not isinstance(group["grokfast_window"], int) or group["grokfast_window"] < 1:
            raise ValueError(f"Invalid grokfast_window ({where}): {group['grokfast_window']!r}; expected an integer >= 1")

    # -- state --------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, after checking that the saved state fits these parameters: a state dict of another
        model would otherwise be accepted and fail at the next step with a bare shape error."""
        groups, state = state_dict.get("param_groups", []), state_dict.get("state", {})
        if len(groups) == len(self.param_groups):  # else torch's load_state_dict says what differs
            for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
                if len(saved["params"]) == len(group["params"]):
                    _check_saved_state(saved, state, group, f"param_groups[{gi}]")
        super().load_state_dict(state_dict)

    # -- step ---------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient. Returns the closure's loss, if any. DTensor
        parameters (FSDP2) are updated on their local parts, Newton-Schulz on whole matrices (forge.optim.sharding)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gathered = [self._gather(group, gi) for gi, group in enumerate(self.param_groups)]
        sharded = [bool(params) and sharding.is_sharded(params) for params, _, _ in gathered]
        if not self._all_finite(gathered, sharded):
            self.skipped_steps += 1
            return loss
        for group, (params, grads, _), shards in zip(self.param_groups, gathered, sharded):
            if params:
                self._update(group, params, grads, params if shards else None)
        if self.qk_clip_threshold is not None:
            self._apply_qk_clip()
        return loss

    def _update(self, group, params, grads, shards) -> None:
        """Grokfast, then Muon or AdamW, on the group's parameters with a gradient; with `shards` (the DTensor
        parameters themselves) on their local parts, state created as DTensors laid out like them."""
        self._init_state(group, params, grads, shards)
        states = [self.state[p] for p in params]
        view = _same if shards is None else sharding.local
        params, grads = view(params), view(grads)
        self._grokfast(group, grads, states, view)
        (self._muon if group["use_muon"] else self._adamw)(group, params, grads, states, view, shards)

    def _gather(self, group: dict, gi: int):
        """(params, grads, indices in the group) of the group's parameters that have a gradient (zero-size ones
        have nothing to update and are skipped: Newton-Schulz has no result for an empty matrix). Names are
        formatted only for an error: this runs every step."""
        params, grads, indices = [], [], []
        for i, p in enumerate(group["params"]):
            if p.grad is None or p.numel() == 0:
                continue
            if p.grad.is_sparse:
                raise ValueError(f"MuonGrokfast does not support sparse gradients ({_shaped_label(group, gi, i)})")
            if self.ste_mode and not p.is_floating_point():
                raise TypeError(f"ste_mode updates float latent weights; {_shaped_label(group, gi, i)} is {p.dtype} "
                                "(frozen/packed?)")
            params.append(p)
            grads.append(p.grad)
            indices.append(i)
        return params, grads, indices

    def _all_finite(self, gathered, sharded) -> bool:
        """One fused norm over all gradients; on NaN/Inf raise naming the parameters, or skip. A non-finite
        norm is confirmed value by value: the norm of finite gradients above about 1e19 overflows float32. Sharded
        gradients are checked on each rank's part, and the verdicts all-reduced (every rank skips or raises alike)."""
        grads = [g for (_, gs, _), shards in zip(gathered, sharded) for g in (sharding.local(gs) if shards else gs)]
        if not grads:
            return True
        norms = torch.stack([n.float() for n in torch._foreach_norm(grads)])
        finite = torch.isfinite(norms)
        if not any(sharded) and bool(finite.all()):
            return True
        bad = (~finite).to(torch.int32)
        for i in torch.nonzero(bad).flatten().tolist():
            bad[i] = int(not bool(torch.isfinite(grads[i]).all()))
        if any(sharded):
            first = next(params for (params, _, _), shards in zip(gathered, sharded) if shards)[0]
            dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=sharding.process_group(first))
        if not bool(bad.any()):
            return True
        if self.skip_nonfinite:
            return False
        labels = [_shaped_label(group, gi, i) for gi, (group, (_, _, indices)) in
                  enumerate(zip(self.param_groups, gathered)) for i in indices]
        bad_names = ", ".join(label for label, flag in zip(labels, bad.tolist()) if flag)
        raise ValueError(f"non-finite gradient (NaN or Inf) in {bad_names}; no parameter was changed "
                         "(pass skip_nonfinite=True to skip such steps instead)")

    def _init_state(self, group, params, grads, shards) -> None:
        """The state of parameters stepped for the first time: Grokfast's (EMA started at the first gradient, or
        an empty ring), Muon's momentum buffer or AdamW's moments, in the parameters' layout."""
        lift = _same_one if shards is None else sharding.as_shard_of
        part = _same_one if shards is None else (lambda t: t.to_local())
        for p, g in zip(params, grads):
            state = self.state[p]
            if group["grokfast"] == "ema" and "grokfast_ema" not in state:
                state["grokfast_ema"] = lift(grokfast_ema_init([part(g)])[0], p)
            if group["grokfast"] == "ma" and "grokfast_ring" not in state:
                rings, sums = grokfast_ma_init([part(g)], group["grokfast_window"])
                state.update(grokfast_ring=lift(rings[0], p), grokfast_sum=lift(sums[0], p), grokfast_step=0)
            if group["use_muon"] and "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not group["use_muon"] and "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _grokfast(self, group, grads, states, view) -> None:
        mode = group["grokfast"]
        if mode is None:
            return
        if mode == "ema":
            grokfast_ema_(grads, view([s["grokfast_ema"] for s in states]), alpha=group["grokfast_alpha"],
                          lamb=group["grokfast_lamb"])
            return
        by_step: dict[int, list[int]] = {}
        for i, s in enumerate(states):
            by_step.setdefault(s["grokfast_step"], []).append(i)
        for step, idx in by_step.items():
            chosen = [states[i] for i in idx]
            grokfast_ma_([grads[i] for i in idx], view([s["grokfast_ring"] for s in chosen]),
                         view([s["grokfast_sum"] for s in chosen]), step, lamb=group["grokfast_lamb"])
            for s in chosen:
                s["grokfast_step"] = step + 1

    def _muon(self, group, params, grads, states, view, shards) -> None:
        fn = F.muon_multi_tensor if self.foreach else F.muon_single_tensor
        fn(params, grads, view([s["momentum_buffer"] for s in states]), lr=group["lr"],
           weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
           ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"], eps=group["eps"],
           adjust_lr_fn=group["adjust_lr_fn"], ns_dtype=_ns_dtype(group["ns_dtype"], params),
           process_group=self._process_group() if self.share_newton_schulz else False, shards=shards)

    def _adamw(self, group, params, grads, states, view, shards) -> None:
        fn = F.adamw_multi_tensor if self.foreach else F.adamw_single_tensor
        beta1, beta2 = group["betas"]
        fn(params, grads, view([s["exp_avg"] for s in states]), view([s["exp_avg_sq"] for s in states]),
           [s["step"] for s in states], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
           weight_decay=group["weight_decay"])

    def _process_group(self):
        """False for single-process work; None (the default group) when several ranks work together."""
        if self.distributed is False or not (dist.is_available() and dist.is_initialized()):
            if self.distributed is True:
                raise RuntimeError("distributed=True but torch.distributed is not initialized")
            return False
        return None if dist.get_world_size() > 1 else False

    # -- QK-clip and the original system's helpers --------------------------------------------

    def register_attention(self, *modules) -> None:
        """Attention modules to QK-clip after each step: modules implementing `forge.optim.qk_clip.QKLogitRecorder`
        (a `max_logits` tensor and `qk_head_slices`), or models holding them (all of them are registered)."""
        for module in modules:
            found = qk_logit_recorders(module)
            if not found:
                raise ValueError(f"no module in {type(module).__name__} implements QKLogitRecorder (a max_logits "
                                 "tensor and qk_head_slices, as e.g. CausalSelfAttention has)")
            self._attention_modules.extend(m for m in found if m not in self._attention_modules)

    def replace_attention(self, mapping: dict) -> None:
        """Point QK-clip at other modules: each registered module that is a key of `mapping` is replaced by its
        value (forge.distributed trains an FSDP-sharded copy of a model for a while, then the model again)."""
        self._attention_modules = [mapping.get(m, m) for m in self._attention_modules]

    def _apply_qk_clip(self) -> None:
        """Clip each registered module's heads; under torch.distributed the per-head maxima are first
        reduced across ranks (each saw its own batch), so every replica clips alike. A module with DTensor
        parameters (FSDP2) is always reduced over its mesh: each rank scales its part of the same matrix."""
        group = self._process_group()
        dtensor = sharding.dtensor_class()
        for module in self._attention_modules:
            if dtensor is not None and isinstance(first := next(module.parameters(), None), dtensor):
                dist.all_reduce(module.max_logits, op=dist.ReduceOp.MAX, group=sharding.process_group(first))
                self._qk_clip_count += qk_clip_sharded_(module, self.qk_clip_threshold)
                continue
            if group is not False:
                dist.all_reduce(module.max_logits, op=dist.ReduceOp.MAX, group=group)
            self._qk_clip_count += qk_clip_(module, self.qk_clip_threshold)

    def get_qk_clip_count(self) -> int:
        """Heads rescaled by QK-clip since construction or the last `reset_qk_clip_count()`."""
        return self._qk_clip_count

    def reset_qk_clip_count(self) -> None:
        self._qk_clip_count = 0

    def get_muon_lr(self) -> float:
        """The learning rate of the first Muon group (what a scheduler has set it to)."""
        return next(g["lr"] for g in self.param_groups if g["use_muon"])

    def get_mu_norm(self) -> float:
        """L2 norm of all Grokfast EMA (or moving-average sum) state: how much slow gradient is being amplified."""
        bufs = [s[k] for s in self.state.values() for k in ("grokfast_ema", "grokfast_sum") if k in s]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b.float()) for b in bufs]))) if bufs else 0.0


def _same(tensors):
    return tensors


def _same_one(tensor, _like=None):
    return tensor


def _split_named(params, names):
    """Tensors and their names from a list of tensors or of (name, tensor) pairs."""
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    if params and isinstance(params[0], tuple):
        names = [n for n, _ in params]
        params = [p for _, p in params]
    return params, names


def _tensor_of(p, i: int):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"params must be tensors; params[{i}] is a {type(p).__name__}")
    return p


def _label(group: dict, where: str, i: int) -> str:
    """How an error names the group's i-th parameter: its name where the group has `param_names`."""
    names = group.get("param_names")
    return names[i] if names else f"{where}['params'][{i}]"


def _shaped_label(group: dict, gi: int, i: int) -> str:
    return f"{_label(group, f'param_groups[{gi}]', i)} of shape {tuple(group['params'][i].shape)}"


def _check_params(group: dict, existing: list[dict], where: str) -> None:
    """torch.optim's refusals, naming the parameter: one listed twice (in this group or an earlier one;
    an error, not a warning), or one that is not a leaf of the autograd graph."""
    seen = {id(p) for g in existing for p in g["params"]}
    for i, p in enumerate(group["params"]):
        if id(p) in seen:
            raise ValueError(f"{_label(group, where, i)} of shape {tuple(p.shape)} is listed more than once")
        if not (p.is_leaf or p.retains_grad):
            raise ValueError(f"can't optimize a non-leaf Tensor: {_label(group, where, i)} of shape {tuple(p.shape)} "
                             "(pass the leaf parameter, or call .detach().requires_grad_() on it)")
        seen.add(id(p))


_PARAM_SHAPED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "grokfast_ema", "grokfast_sum")


def _check_saved_state(saved: dict, state: dict, group: dict, where: str) -> None:
    """Each saved state tensor of a group has its parameter's shape (the ring buffer: (window, *shape)),
    and a saved Muon group holds only matrices."""
    for i, (key, p) in enumerate(zip(saved["params"], group["params"])):
        if saved.get("use_muon") and p.dim() < 2:
            raise ValueError(f"state_dict does not fit this optimizer (saved from another model?): its {where} is a "
                             f"Muon group, but {_label(group, where, i)} has shape {tuple(p.shape)}")
        for name, value in state.get(key, {}).items():
            if not isinstance(value, torch.Tensor) or name not in _PARAM_SHAPED_STATE + ("grokfast_ring",):
                continue
            shape = tuple(value.shape[1:] if name == "grokfast_ring" else value.shape)
            if shape != tuple(p.shape):
                raise ValueError(f"state_dict does not fit this optimizer (saved from another model?): state "
                                 f"{name!r} of {_label(group, where, i)} has shape {tuple(value.shape)}, but the "
                                 f"parameter has shape {tuple(p.shape)}")


def _ns_dtype(choice, params) -> torch.dtype | None:
    """A group's Newton-Schulz dtype: "auto" decided for the device its parameters live on."""
    if choice != "auto" or not params:
        return None if choice == "auto" else choice
    return auto_ns_dtype(params[0].device)
