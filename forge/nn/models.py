"""Small reference models built from forge.nn blocks, for tests and benchmarks.

`TinyDecoder` follows the transformer of the Grokfast code (Lee et al. 2024, arXiv 2405.20233;
github.com/ironjr/grokfast, model.py): token + learned position embeddings, pre-norm blocks
x + attn(norm(x)), x + mlp(norm(x)) with a 4x GELU MLP, a final norm and an untied, bias-free `head`.
The head is named `head` so that `forge.optim.muon_param_groups` gives it to AdamW, not Muon.
"""
from __future__ import annotations

import torch
from torch import nn

from forge.nn.attention import CausalSelfAttention
from forge.ops._validate import check_positive_int


class DecoderBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), mlp = Linear(4x) -> GELU -> Linear."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, n_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyDecoder(nn.Module):
    """Decoder-only transformer: tokens (batch, seq) int64 -> logits (batch, seq, vocab)."""

    def __init__(self, vocab: int, dim: int = 128, n_layers: int = 2, n_heads: int = 4, max_len: int = 16):
        super().__init__()
        for name, value in (("vocab", vocab), ("dim", dim), ("n_layers", n_layers), ("max_len", max_len)):
            check_positive_int(name, value)
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(DecoderBlock(dim, n_heads) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype != torch.long:
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an int64 tensor of shape (batch, seq); got {got}")
        if tokens.shape[1] > self.pos.num_embeddings:
            raise ValueError(f"tokens has {tokens.shape[1]} positions; max_len is {self.pos.num_embeddings}")
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))
