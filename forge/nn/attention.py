"""Causal multi-head self-attention that records each head's largest pre-softmax logit.

    S = (x W_q^T)(x W_k^T)^T / sqrt(d_head)   per head, causal mask, softmax, @ V, output projection

QK-clip (MuonClip, Kimi K2 report, arXiv 2507.20534, section 2.1) rescales a head's query and key
weights when its maximum logit S_max^h = max over batch, query i and key j <= i of S_ij exceeds a
threshold tau. The forward pass already holds S, so the module keeps S_max per head in the
`max_logits` buffer (one reduction of the scores, no extra pass over the data) and exposes each head's
q/k rows through `qk_head_slices`: together they are `forge.optim.qk_clip.QKLogitRecorder`, which QK-clip
reads. The attention is written out explicitly (not fused SDPA) precisely so S is available.

Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer", arXiv 2104.09864) are optional. The
logit stays bilinear in (W_q x, W_k x) under RoPE, so QK-clip's scaling argument still holds.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn

from forge.ops._validate import check_positive_int


def apply_rotary(x: torch.Tensor, base: float = 10000.0, offset: int | torch.Tensor = 0) -> torch.Tensor:
    """RoPE over the last dim of x, shape (..., seq, head_dim), positions offset..offset+seq-1
    (RoFormer eq. 34; the offset places new tokens after a key/value cache). An `offset` tensor of shape
    (batch, seq) gives every row its own positions instead (x then has shape (batch, heads, seq, head_dim)).

    Each pair (x_{2i}, x_{2i+1}) at position m is rotated by the angle m * theta_i with
    theta_i = base^(-2i / head_dim), so <R_m q, R_n k> depends on m - n only. The angles are computed
    in at least float32 whatever x's dtype, then the result is cast back to x's dtype. Written out in reals on
    purpose: a complex multiply over a complex view of the pairs was 4% faster on a Phase 1 step
    (`python benchmarks/train_step.py`) but changed the rounding enough that data-parallel training drifted past
    tests/test_data_parallel.py's tolerance against one process and a default run's Phase 8 took another path
    (RESULTS "Training step").
    """
    seq, head_dim = x.shape[-2], x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rotary: x's last dim (head_dim) must be even, got {head_dim}")
    dtype = torch.promote_types(x.dtype, torch.float32)
    theta = base ** (-torch.arange(0, head_dim, 2, device=x.device, dtype=dtype) / head_dim)
    if isinstance(offset, torch.Tensor):
        angles = offset.to(dtype)[:, None, :, None] * theta     # (batch, 1, seq, head_dim/2)
    else:
        angles = torch.arange(offset, offset + seq, device=x.device, dtype=dtype)[:, None] * theta  # (seq, head_dim/2)
    cos, sin = angles.cos(), angles.sin()
    even, odd = x[..., 0::2].to(dtype), x[..., 1::2].to(dtype)
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def causal_mask(seq: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(seq, past + seq): 0 where query i (at position past + i) may see key j, -inf where j is in its future.
    Added to the scores in place: x + 0 = x and x + -inf = -inf exactly, so the result equals a masked_fill, and
    the backward passes the gradient through instead of masking it again (a Phase 1 forward + backward 3.3-3.5 ms
    less than with masked_fill, 1 thread, AVX2 EPYC; `python benchmarks/train_step.py`). Eager calls share one cached
    tensor per shape (read-only, never written); torch.compile traces the plain function."""
    if torch.compiler.is_compiling():
        return _causal_mask(seq, past, dtype, device)
    return _cached_causal_mask(seq, past, dtype, device)


def _causal_mask(seq: int, past: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    future = torch.ones(seq, past + seq, dtype=torch.bool, device=device).triu(past + 1)
    return torch.zeros(seq, past + seq, dtype=dtype, device=device).masked_fill_(future, -math.inf)


_cached_causal_mask = functools.lru_cache(maxsize=64)(_causal_mask)


def packed_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, 1, seq, seq) additive mask of packed rows: 0 where query i may see key j (j <= i, same segment id in
    `segments`, (batch, seq)), else -inf. Padding (any shared id, e.g. -1) sees padding, so no row is all -inf."""
    seq = segments.shape[1]
    allowed = (segments[:, :, None] == segments[:, None, :]) & torch.ones(
        seq, seq, dtype=torch.bool, device=segments.device).tril()
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill_(~allowed, -math.inf)
    return mask[:, None]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections (dim -> dim each).

    After every forward, `max_logits` (float32, shape (n_heads,), not saved in state_dict) holds each
    head's largest unmasked pre-softmax logit over the whole batch; -inf until the first forward.
    With `qk_head_slices(head)` it implements the QK-clip protocol `forge.optim.qk_clip.QKLogitRecorder`,
    so `MuonGrokfast.register_attention` and `qk_clip_` accept it (and any model holding it).
    """

    def __init__(self, dim: int, n_heads: int, bias: bool = False, rotary: bool = False, rope_base: float = 10000.0):
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("n_heads", n_heads)
        if dim % n_heads:
            raise ValueError(f"Invalid n_heads: {n_heads}; dim ({dim}) must be divisible by n_heads")
        self.dim, self.n_heads, self.head_dim, self.rotary = dim, n_heads, dim // n_heads, bool(rotary)
        self.rope_base = float(rope_base)
        if self.rotary and self.head_dim % 2:
            raise ValueError(f"rotary=True needs an even head_dim; dim // n_heads = {self.head_dim}")
        self.q_proj = nn.Linear(dim, dim, bias=bias)
        self.k_proj = nn.Linear(dim, dim, bias=bias)
        self.v_proj = nn.Linear(dim, dim, bias=bias)
        self.o_proj = nn.Linear(dim, dim, bias=bias)
        self.register_buffer("max_logits", torch.full((n_heads,), -math.inf), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_heads={self.n_heads}, rotary={self.rotary}"

    def qkv_heads(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of shape (batch, n_heads, seq, head_dim), RoPE (positions from `offset`) applied to q, k."""
        batch, seq, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        if self.rotary:
            q, k = apply_rotary(q, self.rope_base, offset), apply_rotary(k, self.rope_base, offset)
        return q, k, v

    def forward(self, x: torch.Tensor, past_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                use_cache: bool = False, packing: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Attention over x (batch, seq, dim). With `past_kv` = (k, v) of earlier positions (batch,
        n_heads, past, head_dim), x holds the positions after them; `use_cache=True` returns
        (out, (k, v)) with the cache extended by x's keys and values. `packing` = (positions, segments), each
        (batch, seq), runs rows that hold several sequences end to end (forge.data.pack_batch): RoPE at each
        token's own position, and a token sees only the earlier tokens of its own segment."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (batch, seq, {self.dim}); got {tuple(x.shape)}")
        batch, seq, _ = x.shape
        past = 0 if past_kv is None else past_kv[0].shape[2]
        if packing is not None and past:
            raise ValueError("packing and past_kv cannot be combined: packed rows are whole sequences")
        q, k, v = self.qkv_heads(x, offset=past if packing is None else packing[0])
        if past_kv is not None:
            k, v = torch.cat((past_kv[0].expand(batch, -1, -1, -1), k), 2), torch.cat(
                (past_kv[1].expand(batch, -1, -1, -1), v), 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        mask = causal_mask(seq, past, scores.dtype, scores.device) if packing is None else packed_mask(
            packing[1], scores.dtype)
        scores = scores.add_(mask)   # keys in the future (or of another segment) -> -inf
        self._record_max_logits(scores)
        probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
        out = self.o_proj((probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, seq, self.dim))
        return (out, (k, v)) if use_cache else out

    def forward_at(self, x: torch.Tensor, positions: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor]):
        """Attention of x (batch, n, dim) at per-row `positions` (batch, n) against a padded cache (k, v), each
        (batch, n_heads, slots, head_dim), updated in place: x's keys and values are written at their positions
        (positions from slots - 1 on all go to the last slot, which no query at a lower position sees) and each
        query sees the slots at or before its own position. Slots past a row's real length hold stale values
        that no real query reaches before they are overwritten. The step of incremental decoding
        (forge.data.decoding); it leaves `max_logits` as it was (inference only)."""
        batch, n, _ = x.shape
        k_cache, v_cache = cache
        slots = k_cache.shape[2]
        q, k, v = self.qkv_heads(x, offset=positions)
        index = positions.clamp(max=slots - 1)[:, None, :, None].expand(-1, self.n_heads, -1, self.head_dim)
        k_cache.scatter_(2, index, k.to(k_cache.dtype))
        v_cache.scatter_(2, index, v.to(v_cache.dtype))
        scores = (q @ k_cache.transpose(-2, -1)) / math.sqrt(self.head_dim)          # (batch, heads, n, slots)
        later = torch.arange(slots, device=x.device)[None, None, None, :] > positions[:, None, :, None]
        probs = torch.softmax(scores.masked_fill(later, -math.inf), dim=-1,
                              dtype=torch.promote_types(scores.dtype, torch.float32))
        return self.o_proj((probs.to(v_cache.dtype) @ v_cache).transpose(1, 2).reshape(batch, n, self.dim))

    def _record_max_logits(self, scores: torch.Tensor) -> None:
        """max over batch, queries and keys of the masked scores (masked entries are -inf), per head."""
        if scores.numel() == 0:
            return
        peak = scores.detach().amax(dim=(0, 2, 3)).float()
        if self.max_logits.dtype != torch.float32 or self.max_logits.device != peak.device:
            self.max_logits = peak  # .half()/.to() converted the buffer; keep it float32 (no overflow)
        else:
            self.max_logits.copy_(peak)

    def qk_head_slices(self, head: int) -> list[torch.Tensor]:
        """Views (sharing storage, detached) of the q_proj and k_proj rows that produce `head`:
        rows head*head_dim:(head+1)*head_dim of each weight, then of each bias when present."""
        if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < self.n_heads:
            raise ValueError(f"Invalid head: {head!r}; expected an integer in [0, {self.n_heads})")
        rows = slice(head * self.head_dim, (head + 1) * self.head_dim)
        params = [self.q_proj.weight, self.k_proj.weight, self.q_proj.bias, self.k_proj.bias]
        return [p.detach()[rows] for p in params if p is not None]
