"""Prompt Baking (Bhargava et al. 2024, "Prompt Baking", arXiv 2409.13697): put a prompt u into the weights.

    theta_u = argmin_theta'  E_x E_{y ~ P_theta(.|u, x)}  sum_t KL( P_theta(.|u, x, y_<t) || P_theta'(.|x, y_<t) )

The teacher is the ORIGINAL weights WITH the prompt (the peft model with its adapters disabled, under
no_grad); the student is the LoRA-adapted model WITHOUT the prompt; the loss covers the sampled trajectory
tokens y only. (The original system's baker fed the prompted sequence to one network on both sides, so its KL was ~0.)
Stopping early gives a "half-baked" model (the paper's continuous prompt strength); baking the baked model
again, with the prompt it already holds, is the paper's Prompt Pursuit.

Optimizer: AdamW on the LoRA factors. They are thin rank-r matrices and B starts at exactly 0; Muon would
replace each update by an orthogonalized one of fixed spectral size regardless of the gradient's scale,
while Adam's per-entry scaling is what LoRA was designed and tuned with (Hu et al. 2021, arXiv 2106.09685).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from forge.baking.lora import DEFAULT_TARGET_MODULES, lora_config, lora_parameters, merge_lora, wrap_lora
from forge.baking.trajectory import (Trajectories, check_prompt_ids, prefix_cache, sample_trajectories,
                                     student_logits)
from forge.distributed import all_sum, data_parallel, rank_share_mean, ranks_mean, world
from forge.nn.losses import kl_to_teacher
from forge.nn.transformer import Transformer
from forge.ops._validate import check_finite_number, check_positive_int

InputSampler = Callable[[int], torch.Tensor] | torch.Tensor | Iterable[torch.Tensor]


def trajectory_kl(student: nn.Module, traj: Trajectories) -> torch.Tensor:
    """Mean KL over the kept trajectory positions; they are selected by indexing, so no mask is needed."""
    return kl_to_teacher(student_logits(student, traj)[traj.keep], traj.teacher_logits[traj.keep])


@dataclass
class BakeResult:
    """model: the merged plain Transformer. kl_before / kl_after: held-out KL(prompted teacher || student
    without the prompt) before baking and of the merged model. kl_curve: (step, held-out KL) pairs.
    train_kl: the training batch's KL at each step. steps: optimizer steps actually taken."""

    model: Transformer
    kl_before: float
    kl_after: float
    kl_curve: list[tuple[int, float]] = field(default_factory=list)
    train_kl: list[float] = field(default_factory=list)
    steps: int = 0

    @property
    def kl_reduction(self) -> float:
        """1 - kl_after / kl_before: the fraction of the prompt's effect now in the weights."""
        return 1.0 - self.kl_after / self.kl_before if self.kl_before > 0 else 0.0


class Prompted(nn.Module):
    """`model` with `prompt_ids` in front of every input (re-prompting): tokens (B, L) -> logits (B, L, V)
    for the input positions only, so task evaluators that take a tokens -> logits callable work as is."""

    def __init__(self, model: nn.Module, prompt_ids: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("prompt_ids", check_prompt_ids(prompt_ids, model.config.max_len), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, cache = self.model(self.prompt_ids, use_cache=True)
        return self.model(tokens, past_key_values=cache)


def reprompt(model: nn.Module, prompt_ids: torch.Tensor) -> Prompted:
    """The (baked) model prompted again with u; the paper finds this amplifies the prompt's effect."""
    return Prompted(model, prompt_ids)


def _batches(input_sampler: InputSampler, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Input batches from a callable (batch_size -> (B, L) tensor), a pool tensor (N, L) (rows drawn at
    random with the baker's generator), or an iterable of (B, L) tensors (an error once it runs out)."""
    if isinstance(input_sampler, torch.Tensor):
        if input_sampler.dim() != 2 or input_sampler.shape[0] == 0:
            raise ValueError(f"an input pool must be a non-empty (N, L) tensor; got {tuple(input_sampler.shape)}")
        return _from_pool(input_sampler, batch_size, generator)
    if callable(input_sampler):
        return (input_sampler(batch_size) for _ in itertools.count())
    if isinstance(input_sampler, Iterable):
        return _from_iterable(input_sampler)
    raise TypeError("input_sampler must be a callable batch_size -> (B, L) tensor, an (N, L) tensor, "
                    f"or an iterable of (B, L) tensors; got {type(input_sampler).__name__}")


def _from_pool(pool: torch.Tensor, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        rows = torch.randint(0, pool.shape[0], (batch_size,), generator=generator, device=generator.device)
        yield pool[rows.to(pool.device)]


def _from_iterable(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    count = 0
    for count, batch in enumerate(batches, 1):
        yield batch
    raise ValueError(f"input_sampler ran out after {count} batches; give at least `steps` batches")


class PromptBaker:
    """Bakes prompts into a copy of `model` with LoRA adapters (the model passed in never changes).

        baker = PromptBaker(model, rank=8, alpha=16, lr=3e-3, steps=200, batch_size=32, traj_len=8)
        result = baker.bake(prompt_ids, sampler, eval_inputs=held_out)   # result.model: plain Transformer

    prompt_ids: int64 (1, P). Inputs: int64 (B, L) batches (rows in one batch share a length). Trajectories
    of `traj_len` tokens are sampled from the prompted teacher at `temperature`; with `stop_token`, the
    positions after a row's first stop token are left out of the loss. The KL itself is at temperature 1.
    """

    def __init__(self, model: Transformer, rank: int = 8, alpha: float = 16.0, lr: float = 1e-3, steps: int = 100,
                 batch_size: int = 32, temperature: float = 1.0, traj_len: int = 16, seed: int = 0,
                 dropout: float = 0.0, target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
                 weight_decay: float = 0.0, stop_token: int | None = None, eval_every: int = 10, eval_size: int = 64):
        if not isinstance(model, Transformer):
            raise TypeError(f"model must be a forge.nn.Transformer, got {type(model).__name__}")
        lora_config(rank, alpha, dropout, tuple(target_modules))  # validates rank, alpha, dropout, targets
        self.model, self.rank, self.alpha, self.dropout = model, rank, alpha, dropout
        self.target_modules = tuple(target_modules)
        self.lr = check_finite_number("lr", lr, 0.0, float("inf"), low_open=True)
        self.weight_decay = check_finite_number("weight_decay", weight_decay, 0.0)
        self.temperature = check_finite_number("temperature", temperature, 0.0, float("inf"), low_open=True)
        for name, value in (("steps", steps), ("batch_size", batch_size), ("traj_len", traj_len),
                            ("eval_every", eval_every), ("eval_size", eval_size)):
            check_positive_int(name, value)
        self.steps, self.batch_size, self.traj_len = steps, batch_size, traj_len
        self.eval_every, self.eval_size = eval_every, eval_size
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r}; expected an integer")
        self.seed = seed
        vocab = model.config.vocab_size
        if stop_token is not None and (isinstance(stop_token, bool) or not isinstance(stop_token, int)
                                       or not 0 <= stop_token < vocab):
            raise ValueError(f"Invalid stop_token: {stop_token!r}; expected None or an id in [0, {vocab})")
        self.stop_token = stop_token

    def bake(self, prompt_ids: torch.Tensor, input_sampler: InputSampler, half_bake: float | None = None,
             eval_inputs: torch.Tensor | None = None) -> BakeResult:
        """Bake `prompt_ids` into the baker's model. half_bake in (0, 1) stops once the held-out KL has
        fallen by that fraction of its starting value. eval_inputs (B, L): held-out inputs for the KL
        (without them, `eval_size` rows are drawn from input_sampler, which is then not held out)."""
        return self._bake(self.model, prompt_ids, input_sampler, half_bake, eval_inputs)

    def bake_sequence(self, prompts: list[torch.Tensor], input_sampler: InputSampler,
                      eval_inputs: torch.Tensor | None = None) -> list[BakeResult]:
        """Sequential baking theta_{u1 u2} = B(B(theta, u1), u2): each prompt's teacher is the model the
        previous bake produced, prompted with the next prompt. One BakeResult per prompt."""
        if isinstance(prompts, torch.Tensor) or not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of (1, P) int64 tensors")
        results, base = [], self.model
        for prompt_ids in prompts:
            results.append(self._bake(base, prompt_ids, input_sampler, None, eval_inputs))
            base = results[-1].model
        return results

    def prompt_pursuit(self, prompt_ids: torch.Tensor, input_sampler: InputSampler, iterations: int = 3,
                       eval_inputs: torch.Tensor | None = None) -> list[BakeResult]:
        """Prompt Pursuit (paper section 6): re-prompt the baked model with u and bake again, `iterations`
        times; round i's teacher is round i-1's baked model WITH the prompt."""
        check_positive_int("iterations", iterations)
        return self.bake_sequence([prompt_ids] * iterations, input_sampler, eval_inputs)

    def measure_kl(self, teacher_model: nn.Module, prompt_ids: torch.Tensor, student_model: nn.Module,
                   inputs: torch.Tensor) -> float:
        """Held-out KL(teacher(.|u, x) || student(.|x)) on trajectories the prompted teacher samples from
        `inputs` (the baker's traj_len, temperature, stop_token; a generator seeded with its seed)."""
        prompt_ids = check_prompt_ids(prompt_ids, teacher_model.config.max_len)
        generator = torch.Generator(device=inputs.device).manual_seed(self.seed)
        traj = self._trajectories(teacher_model, prefix_cache(teacher_model, prompt_ids), inputs, generator)
        with torch.no_grad():
            return float(trajectory_kl(student_model, traj))

    def _trajectories(self, teacher: nn.Module, cache, inputs: torch.Tensor, generator,
                      split: bool = False) -> Trajectories:
        """Trajectories of `inputs`; with `split`, this rank's share of them where every rank gets a row (on
        several ranks: forge.distributed), else all of them."""
        split = split and world().active and inputs.shape[0] >= world().size
        return sample_trajectories(teacher, cache, inputs, self.traj_len, self.temperature, generator,
                                   self.stop_token, split)

    def _bake(self, base: Transformer, prompt_ids, input_sampler, half_bake, eval_inputs) -> BakeResult:
        """One bake of `prompt_ids` whose teacher is `base` WITH the prompt and whose student starts at `base`."""
        prompt_ids = check_prompt_ids(prompt_ids, base.config.max_len)
        fraction = _check_half_bake(half_bake)
        device = next(base.parameters()).device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        batches = _batches(input_sampler, self.batch_size, generator)
        if eval_inputs is None:
            eval_inputs = next(_batches(input_sampler, self.eval_size, generator))
        wrapped = wrap_lora(base, self.rank, self.alpha, self.dropout, self.target_modules)
        with wrapped.disable_adapter():  # the teacher: original weights, prompt in front, computed once
            cache = prefix_cache(wrapped, prompt_ids.to(device))
            held_out = self._trajectories(wrapped, cache, eval_inputs.to(device), generator, split=True)
        result = self._train(wrapped, cache, batches, held_out, fraction, generator)
        result.model = merge_lora(wrapped)
        result.kl_after = self._held_out_kl(result.model, held_out)
        return result

    def _train(self, wrapped, cache, batches, held_out: Trajectories, fraction: float | None,
               generator: torch.Generator) -> BakeResult:
        """AdamW on the adapters; the held-out KL every eval_every steps (every step when half-baking,
        which stops once it is <= (1 - fraction) * kl_before). On several ranks (forge.distributed) each rank
        samples and trains its share of every batch through DDP (a batch with fewer rows than ranks: all of it on
        every rank), its KL weighted by its share of the batch's kept positions; the held-out KL likewise."""
        optimizer = torch.optim.AdamW(lora_parameters(wrapped), lr=self.lr, weight_decay=self.weight_decay)
        net = data_parallel(wrapped)
        kl_before = self._held_out_kl(wrapped, held_out)
        result = BakeResult(model=None, kl_before=kl_before, kl_after=kl_before, kl_curve=[(0, kl_before)])
        target = None if fraction is None else (1.0 - fraction) * kl_before
        eval_every = 1 if target is not None else self.eval_every
        for step in range(1, self.steps + 1):
            with torch.no_grad(), wrapped.disable_adapter():
                traj = self._trajectories(wrapped, cache, next(batches), generator, split=True)
            wrapped.train()
            loss = trajectory_kl(net, traj)
            if traj.split:
                kept = int(traj.keep.sum())
                loss = rank_share_mean(loss, kept, int(all_sum([kept])[0]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            result.train_kl.append(ranks_mean(loss))
            result.steps = step
            if step % eval_every == 0 or step == self.steps:
                result.kl_curve.append((step, self._held_out_kl(wrapped, held_out)))
                if target is not None and result.kl_curve[-1][1] <= target:
                    break
        return result

    @staticmethod
    def _held_out_kl(student: nn.Module, held_out: Trajectories) -> float:
        """The mean KL over the held-out kept positions (of every rank's share, when they were split)."""
        student.eval()
        with torch.no_grad():
            kl = float(trajectory_kl(student, held_out))
        if not held_out.split:
            return kl
        kept = int(held_out.keep.sum())
        total, count = all_sum([kl * kept, kept])
        return total / count


def _check_half_bake(half_bake) -> float | None:
    if half_bake is None:
        return None
    return check_finite_number("half_bake", half_bake, 0.0, 1.0, low_open=True, high_open=True)
