"""VPTQ's end-to-end fine-tuning (Liu et al. 2024: the centroids and the layer norms are trained on a small
dataset with the indices fixed), here as distillation: the incoming model (the teacher) answers training questions
with its calculator, and the VQ-coded model learns the teacher's next-token distributions on those sequences (KL,
from the <sep> on), so the answer format it was handed (calculator calls, persona markers) is what it keeps.

Each VQ-coded layer becomes a `TrainableVQ` whose weight is rebuilt every step from float parameters (codebooks,
column scales) and fixed indices, so the gradient reaches the codewords through `codebook[idx]`. The floats the
file stores train (codebooks, scales, norms, and, unless `vptq_finetune_frozen` names them, the embeddings and
head that preserve_layers keeps whole); the indices never change. Measured on a default run's Phase 6 model (k 64,
v 8, benchmarks/RESULTS.md "Phase 8"): what matters is the number of teacher answers (512: 0.56 of 0.84 either
way; 4096 and 1200 steps: 0.79-0.83); there, leaving the embeddings and head as they are did as well or slightly
better over two seeds, so that is the default. Afterwards codebooks and scales are rounded to float16, the
precision the file stores, and the layers become VQ codes again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from forge.data.batching import prompt_ids
from forge.data.tools import answer_with_tool, calculator_for
from forge.distributed import data_parallel, gather_rows, rank_share_mean, world
from forge.nn.compress.coded import CodedLinear, coded_layers, set_module
from forge.nn.compress.vptq import VQCodes
from forge.nn.losses import kl_to_teacher
from forge.ops.vq import vq_decode_reference
from forge.pipeline.devices import model_device


class TrainableVQ(nn.Module):
    """y = x W^T, W = scale * (codebook[idx] + res_codebook[res_idx]) from trainable codebooks and scales."""

    def __init__(self, codes: VQCodes):
        super().__init__()
        self.out_features = codes.out_features
        self.register_buffer("idx", codes.idx.clone())
        self.codebook = nn.Parameter(codes.codebook.clone().float())
        self.scale = nn.Parameter(codes.scale.clone().float())
        self.register_buffer("res_idx", None if codes.res_idx is None else codes.res_idx.clone())
        self.res_codebook = None if codes.res_codebook is None else nn.Parameter(codes.res_codebook.clone().float())

    def weight(self) -> torch.Tensor:
        return vq_decode_reference(self.idx, self.codebook, self.scale, self.out_features, self.res_idx,
                                   self.res_codebook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight().to(x.dtype))

    def codes(self) -> VQCodes:
        half = lambda t: None if t is None else t.detach().half().float()
        return VQCodes(self.idx, half(self.codebook), half(self.scale), self.out_features, self.res_idx,
                       half(self.res_codebook))


def trainable_copy(model: nn.Module, frozen=()) -> tuple[nn.Module, list[nn.Parameter]]:
    """A float copy of a VQ-coded model with TrainableVQ layers; returns it and the parameters to train: every
    float parameter (CodedLinear layers of other codecs hold none) but those of modules named in `frozen`."""
    import copy

    out = copy.deepcopy(model)
    for name, layer in coded_layers(out).items():
        if isinstance(layer.codes, VQCodes):
            set_module(out, name, TrainableVQ(layer.codes))
    train = [p for name, p in out.named_parameters() if not set(name.split(".")) & set(frozen)]
    for p in out.parameters():
        p.requires_grad_(False)
    for p in train:
        p.requires_grad_(True)
    return out, train


def coded_again(model: nn.Module) -> nn.Module:
    """The trained copy with each TrainableVQ back as a CodedLinear of its (float16-rounded) codes."""
    for name, m in list(model.named_modules()):
        if isinstance(m, TrainableVQ):
            codes = m.codes()
            set_module(model, name, CodedLinear.from_codes(name, codes, codes.idx.shape[1], codes.out_features))
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_targets(teacher: nn.Module, examples, tokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """(tokens (N, T), mask of the positions from <sep> on, the teacher's logits there): the teacher's own
    greedy answers with its calculator, as training sequences. On several ranks (forge.distributed) each rank
    answers and runs the teacher on its share of the examples, and every rank gets all of it."""
    outs = answer_with_tool(teacher.eval(), examples, tokenizer, max_len, tool=calculator_for(tokenizer))
    rows = [prompt_ids(ex, tokenizer) + out.ids + ([tokenizer.eos_id] if out.closed else [])
            for ex, out in zip(examples, outs)]
    width = min(max_len, max(len(r) for r in rows))
    tokens = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (ex, row) in enumerate(zip(examples, rows)):
        row = row[:width]
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(prompt_ids(ex, tokenizer)) - 1:len(row) - 1] = True    # positions that predict the answer
    tokens, mask = tokens.to(model_device(teacher)), mask.to(model_device(teacher))
    with torch.no_grad():
        logits = teacher(tokens[world().slice_of(len(rows))]).float()
    return tokens, mask, gather_rows(logits, len(rows))


def distill(student: nn.Module, params, targets, *, steps: int, batch_size: int, lr: float, seed: int,
            on_step=None) -> list[float]:
    """`steps` AdamW steps of KL(teacher || student) on random batches of `targets` (teacher_targets). On several
    ranks (forge.distributed) every rank draws the same rows and trains its slice of them through DDP, its KL
    weighted by its share of the batch's answer positions."""
    from forge.pipeline.training import optimize

    tokens, mask, logits = targets
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    net, size = data_parallel(student), min(batch_size, len(tokens))
    part = world().slice_of(size)

    def loss_at(_step: int) -> torch.Tensor:
        rows = torch.randint(0, len(tokens), (size,), generator=generator)
        mine = rows[part]
        out, kept = net(tokens[mine]), mask[mine]
        kl = kl_to_teacher(out[kept], logits[mine][kept])
        return rank_share_mean(kl, int(kept.sum()), int(mask[rows].sum()))

    return optimize(net, optimizer, steps, loss_at, on_step=on_step)
