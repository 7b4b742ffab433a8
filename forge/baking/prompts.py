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
    """id, pipeline phase, the prompt text, the original system's intent (`seed_intent`), and the tasks
    it is meant for."""

    id: str
    phase: int
    text: str
    seed_intent: str
    tasks: tuple[str, ...]

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
    # Phase 6 (tool & persona baking): the nine PHASE6_PERSONAS.
    BakingPrompt("phase6_reasoning_specialist", 6, "reason:",
                 "reasoning specialist: logical, systematic problem solving", ARITHMETIC),
    BakingPrompt("phase6_creative_thinker", 6, "vary:",
                 "creative thinker: unusual, divergent solutions", ("word_problems",)),
    BakingPrompt("phase6_technical_expert", 6, "precise:",
                 "technical expert: precise, domain-correct answers", ("multiplication", "modular")),
    BakingPrompt("phase6_educator", 6, "explain:",
                 "educator: clear explanations a learner can follow", ("word_problems",)),
    BakingPrompt("phase6_code_specialist", 6, "code:",
                 "code specialist: writing and reviewing code; here, exact symbol manipulation",
                 ("copy", "reversal")),
    BakingPrompt("phase6_data_analyst", 6, "sort:",
                 "data analyst: organising and summarising data; here, ordering it", ("sorting",)),
    BakingPrompt("phase6_researcher", 6, "check:",
                 "researcher: careful, verified, sourced answers", ALL_TASKS),
    BakingPrompt("phase6_debugger", 6, "fix:",
                 "debugger: find and correct errors", ("addition", "copy")),
    BakingPrompt("phase6_system_designer", 6, "plan:",
                 "system designer: structure before detail", ("word_problems",)),
    # Phase 6: PHASE6_SWE_BENCH, the GitHub-issue workflow (read files, search code, run tests, fix).
    BakingPrompt("phase6_swe_bench", 6, "read, test, fix:",
                 "SWE-Bench workflow: read the issue and files, search the code, run the tests, patch, "
                 "re-run the tests", ALL_TASKS),
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
