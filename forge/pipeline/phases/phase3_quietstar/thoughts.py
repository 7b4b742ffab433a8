"""Quiet-STaR's mechanics (Zelikman et al. 2024, "Quiet-STaR", arXiv 2403.09629) on forge's task format.

A thought is a run of tokens the model samples itself between `<think>` and `</think>`, placed after the
prompt's `<sep>`:  `<bos> prompt <sep> <think> t_1..t_k </think> answer <eos>`. Its reward is the paper's
signal, the gain in the answer's log-probability with the thought over without it:

    r = log p(answer | prompt, thought) - log p(answer | prompt)

and REINFORCE with the mean reward of the thoughts sampled for the same input as the baseline raises the
log-probability of the thoughts that helped more than their siblings (the paper's eq. 5 and 6).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forge.data.batching import IGNORE_INDEX, prompt_ids
from forge.data.tasks import TASKS, rationale
from forge.distributed import FixedRowDraws, gather_lists, world

THINK, END_THINK = "<think>", "</think>"
STRATEGY_TOKENS = ("<step>", "<carry>", "<check>", "<sort>", "<rev>", "<copy>", "<mod>", "<digit>", "<recall>",
                   "<answer>")


def thought_token_names(count: int) -> list[str]:
    """`<think>`, `</think>` and the first count - 2 strategy tokens (count in 2..12)."""
    if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 2 + len(STRATEGY_TOKENS):
        raise ValueError(f"thinking_tokens must be an int in 2..{2 + len(STRATEGY_TOKENS)}, got {count!r}")
    return [THINK, END_THINK, *STRATEGY_TOKENS[: count - 2]]


@dataclass
class ThoughtIds:
    """Token ids the thought machinery needs: the markers and the ids a thought may not contain."""
    think: int
    end: int
    banned: tuple[int, ...]    # pad, bos, eos, sep, <think>: they would break the sequence format
    pad: int
    eos: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "ThoughtIds":
        think, end = tokenizer.token_id(THINK), tokenizer.token_id(END_THINK)
        banned = (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.sep_id, think)
        return cls(think, end, banned, tokenizer.pad_id, tokenizer.eos_id)


@torch.no_grad()
def sample_thoughts(model, prefixes: torch.Tensor, ids: ThoughtIds, length: int, temperature: float,
                    generator: torch.Generator | None = None,
                    split: bool = False) -> tuple[list[list[int]], list[bool]]:
    """Sample one thought per row of `prefixes` (B, P), rows of one length ending in `<think>`, with the
    key/value cache: up to `length` tokens at `temperature` (0 = greedy), stopping a row at `</think>`.
    Returns the thoughts (without the markers) and whether each closed itself with `</think>`. With `split`,
    inside a phase run on several ranks (forge.distributed; every rank calls it with the same prefixes and
    generator state), each rank samples its `world().slice_of` share of the rows, draws with `FixedRowDraws` (what
    one process draws) and every rank gets all the thoughts."""
    split = split and world().active
    mine = prefixes[world().slice_of(prefixes.shape[0])] if split else prefixes
    logits, cache = model(mine, use_cache=True) if len(mine) else (None, None)
    steps, draw = [], FixedRowDraws(generator, split)      # every row drawn every step
    for step in range(length):
        last = None if logits is None else logits[:, -1].float()
        if last is not None:
            last[:, list(ids.banned)] = float("-inf")
        if temperature > 0:
            nxt = draw(None if last is None else torch.softmax(last / temperature, -1))
        else:
            nxt = None if last is None else last.argmax(-1, keepdim=True)
        if last is not None:
            steps.append(nxt)
            if step < length - 1:
                logits, cache = model(nxt, past_key_values=cache, use_cache=True)
    thoughts, closed = [], []
    for row in torch.cat(steps, 1).tolist() if steps else [[] for _ in range(len(mine))]:
        ended = ids.end in row
        thoughts.append(row[: row.index(ids.end)] if ended else row)
        closed.append(ended)
    return (gather_lists(thoughts), gather_lists(closed)) if split else (thoughts, closed)


@dataclass
class Rows:
    """Teacher-forced sequences: tokens (N, T); answer_targets / thought_targets (N, T) hold the next token
    at the answer (+ <eos>) positions and at the sampled thought positions, IGNORE_INDEX elsewhere."""
    tokens: torch.Tensor
    answer_targets: torch.Tensor
    thought_targets: torch.Tensor


def build_rows(prefixes: list[list[int]], answers: list[list[int]], ids: ThoughtIds,
               thoughts: list[list[int] | None] | None = None, closed: list[bool] | None = None) -> Rows:
    """`prefix [<think> thought </think>] answer <eos>` per row, right-padded. A row whose thought is None has
    no thought block (the plain format). `</think>` is a thought target only where the model closed it."""
    n = len(prefixes)
    thoughts = thoughts if thoughts is not None else [None] * n
    closed = closed if closed is not None else [False] * n
    seqs, spans = [], []
    for prefix, answer, thought, shut in zip(prefixes, answers, thoughts, closed):
        mid = [] if thought is None else [ids.think, *thought, ids.end]
        seqs.append(prefix + mid + answer + [ids.eos])
        sampled = 0 if thought is None else len(thought) + int(shut)
        spans.append((len(prefix), sampled, len(prefix) + len(mid)))
    width = max(len(s) for s in seqs)
    tokens = torch.full((n, width), ids.pad, dtype=torch.long)
    answer_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    thought_t = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for b, (seq, (think_at, sampled, answer_at)) in enumerate(zip(seqs, spans)):
        tokens[b, : len(seq)] = torch.tensor(seq)
        answer_t[b, answer_at - 1: len(seq) - 1] = torch.tensor(seq[answer_at:])
        if sampled:
            thought_t[b, think_at: think_at + sampled] = torch.tensor(seq[think_at + 1: think_at + 1 + sampled])
    return Rows(tokens, answer_t, thought_t)


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the summed log-probability of the target tokens (IGNORE_INDEX positions count 0)."""
    keep = targets != IGNORE_INDEX
    logp = F.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(keep, logp, 0.0).sum(1)


def exact_answers(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, whether greedy decoding after the fixed prefix reproduces the answer and <eos> exactly
    (teacher forcing is exact for this; see forge.data.evaluate)."""
    keep = targets != IGNORE_INDEX
    return ((logits.argmax(-1) == targets) | ~keep).all(1)


def thought_rewards(model, prefixes, answers, thoughts, ids: ThoughtIds) -> torch.Tensor:
    """The paper's reward per thought: log p(answer | prompt, thought) - log p(answer | prompt)."""
    with_thought = build_rows(prefixes, answers, ids, thoughts)
    plain = build_rows(prefixes, answers, ids)
    with torch.no_grad():
        gain = target_logprobs(model(with_thought.tokens), with_thought.answer_targets)
        base = target_logprobs(model(plain.tokens), plain.answer_targets)
    return gain - base


def reinforce_loss(thought_logp: torch.Tensor, rewards: torch.Tensor, num_thoughts: int) -> torch.Tensor:
    """REINFORCE with a baseline: -(r - mean r over the num_thoughts thoughts of the same input) * log p(thought),
    rows grouped as (input, thought) with the thoughts of one input adjacent."""
    grouped = rewards.detach().view(-1, num_thoughts)
    advantage = (grouped - grouped.mean(1, keepdim=True)).flatten()
    return -(advantage * thought_logp).mean()


def example_ids(examples, tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """(`<bos> prompt <sep>` ids, answer ids) of each example."""
    return ([prompt_ids(ex, tokenizer) for ex in examples], [tokenizer.encode(ex.answer) for ex in examples])


def by_length(prefixes: list[list[int]]) -> dict[int, list[int]]:
    """Row indices grouped by prefix length (a cached batch needs rows of one length)."""
    groups: dict[int, list[int]] = {}
    for i, prefix in enumerate(prefixes):
        groups.setdefault(len(prefix), []).append(i)
    return groups


def thoughts_for(model, prefixes: list[list[int]], ids: ThoughtIds, length: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> tuple[list[list[int]], list[bool]]:
    """A thought for every prefix (any lengths): sampled in groups of one prefix length, in input order."""
    device = next(model.parameters()).device
    thoughts: list = [None] * len(prefixes)
    closed: list = [False] * len(prefixes)
    for rows in by_length(prefixes).values():
        batch = torch.tensor([prefixes[i] + [ids.think] for i in rows], dtype=torch.long, device=device)
        got, shut = sample_thoughts(model, batch, ids, length, temperature, generator)
        for i, thought, flag in zip(rows, got, shut):
            thoughts[i], closed[i] = thought, flag
    return thoughts, closed


@torch.no_grad()
def _score(model, prefixes, answers, ids, thoughts=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exact-match flags, answer log-probs, logits) of the rows with the given thoughts (None: plain)."""
    rows = build_rows(prefixes, answers, ids, thoughts)
    logits = model(rows.tokens.to(next(model.parameters()).device)).float().cpu()
    return exact_answers(logits, rows.answer_targets), target_logprobs(logits, rows.answer_targets), rows


def _by_task(examples, flags: torch.Tensor) -> dict[str, float]:
    """Accuracy per task of the exact-match `flags` (one per example)."""
    seen: dict[str, list[int]] = {}
    for ex, ok in zip(examples, flags.tolist()):
        seen.setdefault(ex.task, []).append(int(ok))
    return {task: sum(v) / len(v) for task, v in sorted(seen.items())}


def accuracy_with_thoughts(model, examples, tokenizer, ids: ThoughtIds, length: int) -> float:
    """Exact-match accuracy when the model first writes its own greedy thought (at most `length` tokens)."""
    was_training = model.training
    model.eval()
    prefixes, answers = example_ids(examples, tokenizer)
    flags = _score(model, prefixes, answers, ids, thoughts_for(model, prefixes, ids, length)[0])[0]
    model.train(was_training)
    return float(flags.float().mean())


def ablation_eval(model, examples, tokenizer, ids: ThoughtIds, length: int) -> dict:
    """Accuracy with the model's own greedy thoughts against three ablations run on the same examples:
    no thought block (the plain format), an empty `<think></think>`, and the thought generated for another
    input (the next example's, cyclically). thought_gain = with - max(plain, empty); content_gain = with -
    shuffled. Also: accuracy with and without thoughts per task, the fraction of inputs given a non-empty
    thought (thinking_rate), distinct non-empty thoughts / non-empty thoughts (0 when none: a model that never
    thinks fails the distinctness check), on inputs whose built-in task has a rationale the fraction of
    thoughts equal to it (rationale_match: are the thoughts right?), the fraction closed by `</think>`
    (validity), the fraction with a positive reward (coherence), the mean reward, and how often the answer
    text is in the thought."""
    was_training = model.training
    model.eval()
    prefixes, answers = example_ids(examples, tokenizer)
    thoughts, closed = thoughts_for(model, prefixes, ids, length)
    own, own_logp, _ = _score(model, prefixes, answers, ids, thoughts)
    plain, plain_logp, _ = _score(model, prefixes, answers, ids)
    empty, _, _ = _score(model, prefixes, answers, ids, [[] for _ in thoughts])
    shuffled, _, _ = _score(model, prefixes, answers, ids, thoughts[1:] + thoughts[:1])
    model.train(was_training)
    acc = {name: float(flags.float().mean()) for name, flags in
           (("with", own), ("plain", plain), ("empty", empty), ("shuffled", shuffled))}
    reward = own_logp - plain_logp
    leaks = [ex.answer in tokenizer.decode(t) for ex, t in zip(examples, thoughts)]
    thinking = [tuple(t) for t in thoughts if t]
    expected = [rationale(ex) if ex.task in TASKS else "" for ex in examples]
    worked = [(tokenizer.decode(t), r) for t, r in zip(thoughts, expected) if r]
    return {"accuracy": acc["with"], "accuracy_no_thoughts": acc["plain"], "accuracy_empty_thought": acc["empty"],
            "per_task_accuracy": _by_task(examples, own), "per_task_accuracy_no_thoughts": _by_task(examples, plain),
            "accuracy_shuffled_thoughts": acc["shuffled"], "thought_gain": acc["with"] - max(acc["plain"], acc["empty"]),
            "content_gain": acc["with"] - acc["shuffled"],
            "distinct_thoughts": len(set(thinking)) / len(thinking) if thinking else 0.0,
            "thinking_rate": len(thinking) / len(thoughts),
            "rationale_match": sum(a == b for a, b in worked) / len(worked) if worked else 0.0,
            "validity_rate": sum(closed) / len(closed), "coherence_score": float((reward > 0).float().mean()),
            "mean_reward": float(reward.mean()), "answer_in_thought": sum(leaks) / len(leaks),
            "samples": [tokenizer.decode(t, skip_special=False) for t in thoughts[:5]]}
