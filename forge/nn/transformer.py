"""The pipeline's decoder-only transformer: RMSNorm, rotary attention that records per-head max logits
(for QK-clip), SwiGLU MLPs, an untied bias-free head, and a key/value cache.

    x = embed(tokens)
    for each block:  x = x + attn(rms_norm(x));  x = x + down(silu(gate(rms_norm(x))) * up(rms_norm(x)))
    logits = head(rms_norm(x))

RMSNorm: Zhang & Sennrich 2019 (arXiv 1910.07467). SwiGLU: Shazeer 2020 (arXiv 2002.05202), hidden
width 8/3 * dim so the MLP has the parameter count of a 4x GELU MLP (LLaMA, arXiv 2302.13971).
Positions come only from RoPE (no learned position table), so `max_len` bounds training data and
generation, not the weights. The head is named `head` so `forge.optim.muon_param_groups` gives it to
AdamW, and the embedding `embed`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from forge.nn.attention import CausalSelfAttention
from forge.ops._validate import check_finite_number, check_positive_int

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TransformerConfig:
    """Shape of a `Transformer`; `to_dict()` travels with every checkpoint so the model can be rebuilt."""

    vocab_size: int
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    max_len: int = 64
    mlp_hidden: int | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_len"):
            check_positive_int(name, getattr(self, name))
        if self.mlp_hidden is not None:
            check_positive_int("mlp_hidden", self.mlp_hidden)
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"Invalid n_heads: {self.n_heads}; dim ({self.dim}) must split into heads "
                             "of even size (rotary positions rotate pairs)")
        check_finite_number("rope_base", self.rope_base, 1.0, float("inf"), low_open=True)
        check_finite_number("norm_eps", self.norm_eps, 0.0, 1.0, low_open=True)

    @property
    def hidden(self) -> int:
        """SwiGLU width: mlp_hidden, else 8/3 * dim rounded up to a multiple of 16."""
        return self.mlp_hidden or -(-(8 * self.dim // 3) // 16) * 16

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TransformerConfig":
        if not isinstance(data, dict):
            raise TypeError(f"model config must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; allowed: {sorted(known)}")
        return cls(**data)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Shazeer 2020)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = CausalSelfAttention(config.dim, config.n_heads, rotary=True, rope_base=config.rope_base)
        self.mlp_norm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = SwiGLU(config.dim, config.hidden)

    def forward(self, x, past_kv=None, packing=None):
        attn_out, kv = self.attn(self.attn_norm(x), past_kv=past_kv, use_cache=True, packing=packing)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x)), kv

    def forward_at(self, x, positions, cache):
        x = x + self.attn.forward_at(self.attn_norm(x), positions, cache)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only LM: tokens (batch, seq) int64 -> logits (batch, seq, vocab_size)."""

    supports_packing = True     # forward takes positions= and segments= (packed rows, forge.data.pack_batch)

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.apply(_init_weights)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight

    def num_parameters(self) -> int:
        """Distinct parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, tokens: torch.Tensor, past_key_values: KVCache | None = None, use_cache: bool = False,
                      positions: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        """The final-norm hidden states (batch, seq, dim) that the head maps to logits; with
        use_cache=True, (hidden, present_key_values) where the cache covers past + these tokens. `positions`
        and `segments` (both or neither, each shaped like tokens) run packed rows (forge.data.pack_batch):
        each segment is attended to, and positioned, as if it were alone."""
        self._check_tokens(tokens, past_key_values)
        packing = _packing(tokens, positions, segments)
        x = self.embed(tokens)
        present = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, None if past_key_values is None else past_key_values[i], packing)
            present.append(kv)
        hidden = self.norm(x)
        return (hidden, present) if use_cache else hidden

    def forward(self, tokens: torch.Tensor, past_key_values: KVCache | None = None, use_cache: bool = False,
                positions: torch.Tensor | None = None, segments: torch.Tensor | None = None):
        out = self.hidden_states(tokens, past_key_values, use_cache, positions, segments)
        if use_cache:
            return self.head(out[0]), out[1]
        return self.head(out)

    def new_cache(self, batch: int) -> KVCache:
        """An empty padded key/value cache for `forward_at`: per block (k, v) of shape (batch, n_heads,
        max_len + 1, head_dim) on the model's device and in its dtype (the last slot takes what falls past
        max_len)."""
        check_positive_int("batch", batch)
        weight, attn = self.embed.weight, self.blocks[0].attn
        shape = (batch, attn.n_heads, self.config.max_len + 1, attn.head_dim)
        return [(torch.zeros(shape, dtype=weight.dtype, device=weight.device),
                 torch.zeros(shape, dtype=weight.dtype, device=weight.device)) for _ in self.blocks]

    def forward_at(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (batch, n, vocab) of `tokens` (batch, n) placed at per-row `positions` (batch, n) of a padded
        cache from `new_cache`, which it updates: rows of different lengths decode in one batch, each step
        feeding only the tokens a row gained (forge.data.decoding). Positions at or past max_len are the
        caller's padding: their logits are meaningless."""
        self._check_tokens(tokens, None)
        if positions.shape != tokens.shape or len(cache) != self.config.n_layers:
            raise ValueError(f"positions must have the tokens' shape {tuple(tokens.shape)} and the cache "
                             f"{self.config.n_layers} layers; got {tuple(positions.shape)} and {len(cache)}")
        x = self.embed(tokens)
        for block, kv in zip(self.blocks, cache):
            x = block.forward_at(x, positions, kv)
        return self.head(self.norm(x))

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, stop_token: int | None = None) -> torch.Tensor:
        """Greedy continuation with the key/value cache: returns tokens followed by up to max_new_tokens
        new ones per row; once a row emits `stop_token` it keeps emitting it (rows stay aligned)."""
        check_positive_int("max_new_tokens", max_new_tokens)
        logits, cache = self(tokens, use_cache=True)
        out, done = [tokens], torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            if stop_token is not None:
                nxt = torch.where(done, torch.full_like(nxt, stop_token), nxt)
                done |= nxt == stop_token
            out.append(nxt[:, None])
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits, cache = self(nxt[:, None], past_key_values=cache, use_cache=True)
        return torch.cat(out, 1)

    def _check_tokens(self, tokens, past_key_values) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an int64 tensor of shape (batch, seq); got {got}")
        if past_key_values is not None and len(past_key_values) != self.config.n_layers:
            raise ValueError(f"past_key_values has {len(past_key_values)} layers; the model has "
                             f"{self.config.n_layers}")
        past = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        if past + tokens.shape[1] > self.config.max_len:
            raise ValueError(f"{past + tokens.shape[1]} positions exceed max_len={self.config.max_len}")


def _packing(tokens: torch.Tensor, positions, segments) -> tuple[torch.Tensor, torch.Tensor] | None:
    if positions is None and segments is None:
        return None
    if positions is None or segments is None or positions.shape != tokens.shape or segments.shape != tokens.shape:
        raise ValueError(f"positions and segments go together, each of the tokens' shape {tuple(tokens.shape)}; got "
                         f"{None if positions is None else tuple(positions.shape)} and "
                         f"{None if segments is None else tuple(segments.shape)}")
    return positions, segments


def _init_weights(module: nn.Module) -> None:
    """GPT-2 style: normal(0, 0.02) for linear and embedding weights."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)


def build_model(config: dict | TransformerConfig) -> Transformer:
    """A fresh `Transformer` from a config dict (as stored in checkpoint metadata) or object."""
    if isinstance(config, dict):
        config = TransformerConfig.from_dict(config)
    return Transformer(config)


def resize_vocab(model: Transformer, new_vocab: int, init_std: float = 0.02, seed: int = 0) -> Transformer:
    """A copy of `model` with `new_vocab` embedding and head rows: the old rows copied, the new ones drawn
    from N(0, init_std^2) (small, so the new tokens start unlikely). Logits of old tokens keep their values
    on inputs of old tokens."""
    old = model.config.vocab_size
    if isinstance(new_vocab, bool) or not isinstance(new_vocab, int) or new_vocab < old:
        raise ValueError(f"new_vocab must be an int >= the model's vocab_size {old}, got {new_vocab!r}")
    grown = Transformer(TransformerConfig.from_dict({**model.config.to_dict(), "vocab_size": new_vocab}))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    for key in ("embed.weight", "head.weight"):
        if key not in state:
            continue
        rows = torch.randn(new_vocab - old, state[key].shape[1], generator=generator) * init_std
        state[key] = torch.cat([state[key], rows.to(state[key].dtype)], 0)
    grown.load_state_dict(state)
    return grown.to(next(model.parameters()).device)
