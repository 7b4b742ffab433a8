"""The original system's 13 baking prompts (phase 3: 1, phase 5: 2, phase 6: 9 personas + the SWE-Bench
workflow), rewritten for what a tiny character-level model on forge's built-in tasks (addition, modular
arithmetic, multiplication, sorting, copy, reversal, word problems) can be asked to do.

The original system's prompts were paragraphs for a 25M-parameter LLM (a step-by-step reasoning assistant,
four virtues, tool descriptions, nine personas, a GitHub-issue workflow). A char-level model with max_len
~48 cannot read a paragraph, and a prompt must leave room for the task input, so each prompt here is a
short instruction (<= MAX_PROMPT_CHARS characters, plain lowercase ASCII) naming a behaviour that can be
checked on the tasks; `seed_intent` keeps what the original system's prompt asked for, and `tasks` says
where the effect shows.
A prompt only changes behaviour the model has learned to tie to it; baking then moves that behaviour
into the weights (Bhargava et al. 2024, arXiv 2409.13697).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_PROMPT_CHARS = 16


@dataclass(frozen=True)
class BakingPrompt:
    """id, pipeline phase, the prompt text, the original system's intent (`seed_intent`), the tasks it is
    meant for, and for a persona the behaviour it asks for: marker tokens written `before` and `after` the
    answer (a format, an order, a check step, a verification suffix), described in `behaviour`."""

    id: str
    phase: int
    text: str
    seed_intent: str
    tasks: tuple[str, ...]
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    behaviour: str = ""

    @property
    def markers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.before + self.after))

    def ids(self, tokenizer) -> torch.Tensor:
        """The prompt as a (1, P) int64 tensor, through any tokenizer with encode(str) -> list[int]."""
        ids = tokenizer.encode(self.text)
        if not ids:
            raise ValueError(f"prompt {self.id!r} encodes to no tokens with {type(tokenizer).__name__}")
        return torch.tensor([ids], dtype=torch.long)


ALL_TASKS = ("addition", "modular", "multiplication", "sorting", "copy", "reversal", "word_problems")
ARITHMETIC = ("addition", "modular", "multiplication", "word_problems")

PROMPTS: tuple[BakingPrompt, ...] = (
    # Phase 3 (Quiet-STaR): PHASE3_COT_REASONING.
    BakingPrompt("phase3_reasoning", 3, "think, then say:",
                 "step-by-step reasoning assistant: break the problem down, show the thinking, verify each "
                 "step, state the final answer", ARITHMETIC),
    # Phase 5 (curriculum): PHASE5_EUDAIMONIA and PHASE5_TOOL_USE.
    BakingPrompt("phase5_eudaimonia", 5, "be exact:",
                 "four virtue rules (honesty, empathy, growth, respect); for a task model honesty means an "
                 "exact answer, no guess", ALL_TASKS),
    BakingPrompt("phase5_tool_use", 5, "calc:",
                 "tools: code execution, web search, calculation; the calculator is the one a char model "
                 "has (arithmetic answers)", ARITHMETIC),
    # Phase 6 (tool & persona baking): the nine PHASE6_PERSONAS. A persona's behaviour is a format of the
    # answer a char model can learn and a checker can see: marker tokens before and after it.
    BakingPrompt("phase6_reasoning_specialist", 6, "reason:",
                 "reasoning specialist: logical, systematic problem solving", ARITHMETIC,
                 ("<step>",), (), "a step marker before the answer"),
    BakingPrompt("phase6_creative_thinker", 6, "vary:",
                 "creative thinker: unusual, divergent solutions", ("word_problems",),
                 ("<idea>",), (), "an idea marker before the answer"),
    BakingPrompt("phase6_technical_expert", 6, "precise:",
                 "technical expert: precise, domain-correct answers", ("multiplication", "modular"),
                 (), ("<exact>",), "an exactness mark after the answer"),
    BakingPrompt("phase6_educator", 6, "explain:",
                 "educator: clear explanations a learner can follow", ("word_problems",),
                 ("<note>",), ("<note>",), "the answer between two note markers"),
    BakingPrompt("phase6_code_specialist", 6, "code:",
                 "code specialist: writing and reviewing code; here, exact symbol manipulation",
                 ("copy", "reversal"), ("<code>",), ("</code>",), "the answer in a code fence"),
    BakingPrompt("phase6_data_analyst", 6, "sort:",
                 "data analyst: organising and summarising data; here, ordering it", ("sorting",),
                 ("<data>",), (), "a data marker before the answer"),
    BakingPrompt("phase6_researcher", 6, "check:",
                 "researcher: careful, verified, sourced answers", ALL_TASKS,
                 (), ("<check>",), "a verification suffix: <check> after the answer"),
    BakingPrompt("phase6_debugger", 6, "fix:",
                 "debugger: find and correct errors", ("addition", "copy"),
                 ("<fix>",), ("<check>",), "a fix marker before the answer and a check after it"),
    BakingPrompt("phase6_system_designer", 6, "plan:",
                 "system designer: structure before detail", ("word_problems",),
                 ("<plan>", "<step>"), (), "an order: a plan marker, then a step marker, then the answer"),
    # Phase 6: PHASE6_SWE_BENCH, the GitHub-issue workflow (read files, search code, run tests, fix).
    BakingPrompt("phase6_swe_bench", 6, "read, test, fix:",
                 "SWE-Bench workflow: read the issue and files, search the code, run the tests, patch, "
                 "re-run the tests", ALL_TASKS,
                 ("<read>",), ("<test>", "<fix>"), "the workflow's order: <read> before the answer, <test> "
                 "then <fix> after it"),
)


def prompts_for_phase(phase: int) -> list[BakingPrompt]:
    """The prompts one phase bakes, in the original system's order; phases without prompts raise."""
    found = [p for p in PROMPTS if p.phase == phase]
    if not found:
        phases = sorted({p.phase for p in PROMPTS})
        raise ValueError(f"Invalid phase: {phase!r}; prompts exist for phases {phases}")
    return found


def get_prompt(prompt_id: str) -> BakingPrompt:
    """One prompt by id."""
    for prompt in PROMPTS:
        if prompt.id == prompt_id:
            return prompt
    raise ValueError(f"unknown prompt id {prompt_id!r}; known: {[p.id for p in PROMPTS]}")


def persona_markers() -> list[str]:
    """Every marker token the personas write, in table order (for tokenizer.add_special_tokens)."""
    return list(dict.fromkeys(m for p in PROMPTS for m in p.markers))


def adheres(output_ids, persona: BakingPrompt, marker_ids: dict[str, int]) -> bool:
    """Whether the ids a model wrote after <sep> (without <eos>) show `persona`'s behaviour: they start with
    its `before` markers and end with its `after` markers, and no other marker of it sits in between.
    `marker_ids` maps the persona's marker tokens to ids; other personas' markers are ignored."""
    ids = [int(i) for i in output_ids]
    own = {marker_ids[m] for m in persona.markers}
    head, tail = [marker_ids[m] for m in persona.before], [marker_ids[m] for m in persona.after]
    others = set(marker_ids.values()) - own
    ids = [i for i in ids if i not in others]
    if ids[:len(head)] != head or (tail and ids[len(ids) - len(tail):] != tail) or len(ids) < len(head) + len(tail):
        return False
    return not any(i in own for i in ids[len(head): len(ids) - len(tail)])
