"""Tool use for the char models: the call format, generation in which a tool really answers, and the
training sequences that teach it.

A call and its result, after `<bos> question <sep>`:

    <calc>48213*907</calc><result>43729191</result>43729191<eos>
    `------ model ------'`------- tool --------'`-- model --'

The model opens a call with <calc>, writes the expression and closes it with </calc>; generation then runs
the tool on the expression's text and writes <result> value </result> into the sequence itself (or
<calc_error> when the tool refuses the call: never a crash), and the model goes on to write its answer. The
answer is what the model writes after its last call; special tokens in it (persona markers) are not part of
the answer's text. Without a tool (`tool=None`) nothing is written for the model: whatever follows a call is
the model's own guess, which is how "the same model without the tool" is measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from forge.data.batching import IGNORE_INDEX, prompt_ids
from forge.data.calculator import CalculatorError, calculate
from forge.data.decoding import NextLogits
from forge.data.sampling import _check_temperature
from forge.data.tasks import Example
from forge.data.tokenizer import CharTokenizer
from forge.distributed import draw_split, gather_lists, world

CALL, END_CALL, RESULT, END_RESULT, CALL_ERROR = "<calc>", "</calc>", "<result>", "</result>", "<calc_error>"
TOOL_TOKENS = (CALL, END_CALL, RESULT, END_RESULT, CALL_ERROR)
MAX_CALLS = 2      # calls per answer; a further call gets <calc_error>

Tool = Callable[[str], int]


@dataclass
class ToolOutput:
    """What follows `<sep>`: ids written by the model and the tool (without <eos>); closed: <eos> was written
    within the budget; calls / errors: calls the tool answered / refused."""
    ids: list[int]
    closed: bool
    calls: int = 0
    errors: int = 0

    def answer(self, tokenizer: CharTokenizer) -> str:
        """The text written after the last call (special tokens left out)."""
        ends = [tokenizer.token_id(t) for t in (END_CALL, END_RESULT, CALL_ERROR) if t in tokenizer.special_tokens]
        last = max((i for i, tok in enumerate(self.ids) if tok in ends), default=-1)
        return tokenizer.decode(self.ids[last + 1:])

    def called(self, tokenizer: CharTokenizer) -> bool:
        return tokenizer.token_id(CALL) in self.ids

    def correct(self, example: Example, tokenizer: CharTokenizer) -> bool:
        return self.closed and self.answer(tokenizer) == example.answer


def add_tool_tokens(tokenizer: CharTokenizer) -> list[int]:
    """Add the call format's five tokens to `tokenizer` (ids of tokens it already has stay)."""
    return tokenizer.add_special_tokens(list(TOOL_TOKENS))


def tool_reply(expression_ids: list[int], tokenizer: CharTokenizer, tool: Tool) -> list[int]:
    """What the runtime writes after `<calc> expression </calc>`: <result> value </result>, or <calc_error>
    when the expression holds a special token or the tool refuses it (a ValueError)."""
    special = set(tokenizer.token_id(t) for t in tokenizer.special_tokens)
    try:
        if any(tok in special for tok in expression_ids):
            raise CalculatorError("a call holds a special token")
        value = tool(tokenizer.decode(expression_ids))
        return [tokenizer.token_id(RESULT), *tokenizer.encode(str(value)), tokenizer.token_id(END_RESULT)]
    except ValueError:
        return [tokenizer.token_id(CALL_ERROR)]


@torch.no_grad()
def generate(model, prefixes: Sequence[list[int]], tokenizer: CharTokenizer, max_len: int, *,
             tool: Tool | None = calculate, max_new: int | None = None, temperature: float = 0.0,
             generator: torch.Generator | None = None, split: bool = False) -> list[ToolOutput]:
    """Continue each prefix (ids ending in <sep>) until <eos>, `max_new` written tokens or max_len; with a
    `tool` (default: the calculator), every call the model closes is answered by the tool (see the module).
    With `split`, inside a phase run on several ranks (forge.distributed; every rank calls it with the same
    prefixes and generator state), each rank continues its `world().slice_of` share of the prefixes, draws with
    `draw_split` (what one process draws) and every rank gets all the outputs."""
    temperature = _check_temperature(temperature)
    was_training = isinstance(model, torch.nn.Module) and model.training
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        split = split and world().active
        mine = [list(p) for p in (prefixes[world().slice_of(len(prefixes))] if split else prefixes)]
        outputs = _generate(model, mine, tokenizer, max_len, tool, max_new, temperature, generator, split)
        return gather_lists(outputs) if split else outputs
    finally:
        if was_training:
            model.train()


def _pick(last: torch.Tensor | None, temperature: float, generator, split: bool) -> list[int] | None:
    """The next token of each live row (`last`: their logits; None: no live row here), greedy at temperature 0;
    None when the loop is over (no live row here, or, when drawing split over ranks, on any rank)."""
    if temperature == 0:
        return None if last is None else last.cpu().argmax(-1).tolist()
    drawn = draw_split(None if last is None else torch.softmax(last.cpu() / temperature, -1), generator, split)
    return None if drawn is None else drawn.squeeze(1).tolist()


def _generate(model, seqs, tokenizer, max_len, tool, max_new, temperature, generator, split) -> list[ToolOutput]:
    starts = [len(s) for s in seqs]
    limits = [max_len if max_new is None else min(max_len, n + max_new) for n in starts]
    outputs = [ToolOutput([], False) for _ in seqs]
    done = [len(s) >= lim for s, lim in zip(seqs, limits)]
    # without a tool the call tokens are never looked up: a plain vocabulary (before Phase 6) has none
    call, end_call = (tokenizer.token_id(CALL), tokenizer.token_id(END_CALL)) if tool is not None else (None, None)
    next_logits = NextLogits(model, seqs, tokenizer.pad_id, tokenizer.vocab_size)
    while True:
        live = [b for b in range(len(seqs)) if not done[b]]
        picks = _pick(next_logits(live) if live else None, temperature, generator, split)
        if picks is None:
            break
        for b, tok in zip(live, picks):
            out = outputs[b]
            if tok == tokenizer.eos_id:
                out.closed = done[b] = True
                continue
            written = [tok]
            if tok == end_call and tool is not None:
                opened = max((i for i, t in enumerate(out.ids) if t in (call, end_call)), default=-1)
                if opened < 0 or out.ids[opened] != call or out.calls + out.errors >= MAX_CALLS:
                    reply = [tokenizer.token_id(CALL_ERROR)]
                else:
                    reply = tool_reply(out.ids[opened + 1:], tokenizer, tool)
                out.errors += reply[0] == tokenizer.token_id(CALL_ERROR)
                out.calls += reply[0] != tokenizer.token_id(CALL_ERROR)
                written += reply
            written = written[: limits[b] - len(seqs[b])]
            seqs[b].extend(written)
            out.ids.extend(written)
            done[b] = len(seqs[b]) >= limits[b]
    return outputs


def calculator_for(tokenizer: CharTokenizer) -> Tool | None:
    """The calculator where the vocabulary has the call tokens (a model from Phase 6 on), else None."""
    return calculate if CALL in tokenizer.special_tokens else None


def answer_with_tool(model, examples: Sequence[Example], tokenizer: CharTokenizer, max_len: int, *,
                     tool: Tool | None = calculate, batch_size: int = 256) -> list[ToolOutput]:
    """Greedy answers to `<bos> prompt <sep>` with the tool (or without it: tool=None), in batches. Inside a phase
    run on several ranks (forge.distributed) each rank answers its share of `examples` and every rank gets all the
    answers."""
    out: list[ToolOutput] = []
    mine = examples[world().slice_of(len(examples))]
    for lo in range(0, len(mine), batch_size):
        prefixes = [prompt_ids(ex, tokenizer) for ex in mine[lo: lo + batch_size]]
        out.extend(generate(model, prefixes, tokenizer, max_len, tool=tool))
    return gather_lists(out)


def call_ids(expression: str, tokenizer: CharTokenizer, tool: Tool | None = calculate,
             with_result: bool = True) -> list[int]:
    """`<calc> expression </calc>` and, with_result, what the tool writes after it (an empty
    <result></result> without: Toolformer's "call without its result")."""
    ids = [tokenizer.token_id(CALL), *tokenizer.encode(expression), tokenizer.token_id(END_CALL)]
    if with_result:
        return ids + tool_reply(tokenizer.encode(expression), tokenizer, tool)
    return ids + [tokenizer.token_id(RESULT), tokenizer.token_id(END_RESULT)]


def sequence(example: Example, tokenizer: CharTokenizer, call: list[int] | None = None,
             before: Sequence[int] = (), after: Sequence[int] = ()) -> tuple[list[int], list[bool]]:
    """The training row `<bos> prompt <sep> [before] [call] answer [after] <eos>` and, per id, whether it is a
    target: everything the model writes after <sep>, not what the tool writes (<result> ... </result>,
    <calc_error>). `before` / `after`: marker tokens around the answer (a persona's format)."""
    tool_written = {tokenizer.token_id(t) for t in (RESULT, END_RESULT, CALL_ERROR)}
    head = prompt_ids(example, tokenizer)
    body = [*before, *(call or []), *tokenizer.encode(example.answer), *after, tokenizer.eos_id]
    trained, inside = [], False
    for tok in body:
        inside = inside or tok in (tokenizer.token_id(RESULT), tokenizer.token_id(CALL_ERROR))
        trained.append(not inside and tok not in tool_written)
        inside = inside and tok not in (tokenizer.token_id(END_RESULT), tokenizer.token_id(CALL_ERROR))
    return head + body, [False] * len(head) + trained


def encode_rows(rows: Sequence[tuple[list[int], list[bool]]], pad_id: int, max_len: int,
                prefix: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens [B, T] and shifted targets [B, T] (IGNORE_INDEX where not trained) of `rows`
    from `sequence`, each after the shared `prefix` ids (a prompt, never a target)."""
    if not rows:
        raise ValueError("rows is empty; expected at least one (ids, trained) row")
    full = [([*prefix, *ids], [False] * len(prefix) + list(trained)) for ids, trained in rows]
    for ids, _ in full:
        if len(ids) > max_len:
            raise ValueError(f"a row needs {len(ids)} tokens; max_len is {max_len}")
    width = max(len(ids) for ids, _ in full)
    tokens = torch.full((len(full), width), pad_id, dtype=torch.long)
    targets = torch.full((len(full), width), IGNORE_INDEX, dtype=torch.long)
    for b, (ids, trained) in enumerate(full):
        tokens[b, : len(ids)] = torch.tensor(ids)
        for t in range(1, len(ids)):
            if trained[t]:
                targets[b, t - 1] = ids[t]
    return tokens, targets
