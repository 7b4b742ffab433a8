"""Next-token logits for rows that grow one step at a time: the shared inner step of every generation loop
(forge.data.tools.generate, forge.data.sampling.sample_answers, forge.data.evaluate.greedy_answers).

A forge Transformer decodes incrementally: each call feeds only the tokens a row gained since the last call,
at that row's own positions, against a padded key/value cache (`Transformer.new_cache`, `forward_at`), so
rows of different lengths, and rows that gained several tokens at once (a tool's reply), share one batch.
Work per step is one token a row instead of the whole sequence again. A peft wrapper of a Transformer forwards
`forward_at` and `new_cache` to it, so it decodes the same way, through its adapted layers. Any other model (a
plain callable) gets the whole right-padded batch again each call, which gives the same logits because the
model is causal: padding after a row's end never reaches its last position.

    next_logits = NextLogits(model, seqs, pad_id, vocab_size)
    logits = next_logits(live_rows)     # (len(live_rows), vocab), float32 or wider, at each row's last token
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


def _model_device(model) -> torch.device:
    if isinstance(model, torch.nn.Module):
        param = next(iter(model.parameters()), None)
        if param is not None:
            return param.device
    return torch.device("cpu")


def _logits(model: Callable, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    out = model(tokens)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a logits tensor [B, T, V], got {type(out).__name__}")
    if out.dim() != 3 or out.shape[:2] != tokens.shape or out.shape[2] < vocab_size:
        raise ValueError(f"model returned logits of shape {tuple(out.shape)}; expected "
                         f"({tokens.shape[0]}, {tokens.shape[1]}, >= {vocab_size})")
    return out


class NextLogits:
    """Logits at the last token of `seqs[b]` for the rows asked for; `seqs` is the caller's list of id lists,
    read again on every call (rows only ever grow)."""

    def __init__(self, model, seqs: Sequence[list[int]], pad_id: int, vocab_size: int):
        self.model, self.seqs, self.pad_id, self.vocab_size = model, seqs, pad_id, vocab_size
        self.device = _model_device(model)
        self.incremental = callable(getattr(model, "forward_at", None)) and callable(
            getattr(model, "new_cache", None))
        self.fed = [0] * len(seqs)          # tokens of each row already in the cache
        self.cache, self.last = None, None

    def __call__(self, rows: Sequence[int]) -> torch.Tensor:
        rows = list(rows)
        with torch.no_grad():
            if not self.incremental:
                return self._whole(rows)
            return self._step(rows)

    def _whole(self, rows: list[int]) -> torch.Tensor:
        seqs = [self.seqs[b] for b in rows]
        tokens = torch.full((len(seqs), max(len(s) for s in seqs)), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = torch.tensor(s)
        logits = _logits(self.model, tokens.to(self.device), self.vocab_size)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ends = torch.tensor([len(s) - 1 for s in seqs], device=logits.device)
        return logits[torch.arange(len(seqs), device=logits.device), ends]

    def _step(self, rows: list[int]) -> torch.Tensor:
        """Feeds every row's new tokens (rows not asked for get padding past their real length, which later
        steps overwrite) and keeps each asked row's last logits."""
        batch, max_len = len(self.seqs), self.model.config.max_len
        if self.cache is None:
            self.cache = self.model.new_cache(batch)
        new = {b: self.seqs[b][self.fed[b]:] for b in rows}
        width = max((len(t) for t in new.values()), default=0)
        if width:
            tokens = torch.full((batch, width), self.pad_id, dtype=torch.long)
            for b, ids in new.items():
                if self.fed[b] + len(ids) > max_len:
                    raise ValueError(f"{self.fed[b] + len(ids)} positions exceed max_len={max_len}")
                tokens[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            positions = torch.tensor(self.fed)[:, None] + torch.arange(width)[None, :]
            logits = self.model.forward_at(tokens.to(self.device), positions.to(self.device), self.cache)
            grown = [b for b in rows if new[b]]
            ends = torch.tensor([len(new[b]) - 1 for b in grown], device=self.device)
            index = torch.tensor(grown, device=self.device)
            if self.last is None:      # float32 at least (bf16 logits), float64 stays float64
                self.last = torch.zeros(batch, logits.shape[-1], device=self.device,
                                        dtype=torch.promote_types(logits.dtype, torch.float32))
            self.last[index] = logits[index, ends].to(self.last.dtype)
            for b in grown:
                self.fed[b] += len(new[b])
        return self.last[torch.tensor(rows, device=self.device)]
