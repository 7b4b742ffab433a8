"""Dream consolidation: after a level is passed, the model answers prompts of the levels it has passed at
`dream_temperature`, keeps the answers it is itself confident in (its own probability of what it wrote, never
the true answer) and trains on them. How many kept dreams are actually right is measured, not used."""
from __future__ import annotations

import math
from dataclasses import dataclass

from forge.data import Example
from forge.data.sampling import sample_answers


@dataclass
class Dreams:
    examples: list[Example]      # the prompts with the model's own answers, as training examples
    generated: int
    correct: int                 # kept dreams whose answer equals the true one (measured after the choice)

    @property
    def kept(self) -> int:
        return len(self.examples)


def dream(model, prompts: list[Example], tokenizer, max_len: int, *, temperature: float, min_confidence: float,
          generator) -> Dreams:
    """Sample the model's answers to `prompts`; keep those it closed with <eos>, wrote in plain characters (no
    special token), and whose probability under the model, p(answer and <eos>), is at least `min_confidence`."""
    longest = max((len(tokenizer.encode(ex.answer)) for ex in prompts), default=0)
    sampled = sample_answers(model, prompts, tokenizer, max_len, temperature=temperature, max_new=longest + 2,
                             generator=generator, split=True)   # each rank its share, on several ranks
    kept, correct = [], 0
    for ex, answer in zip(prompts, sampled):
        if answer.closed and answer.ids and math.exp(answer.logprob) >= min_confidence:
            text = answer.text(tokenizer)
            if len(text) != len(answer.ids):     # a special token inside the answer
                continue
            kept.append(Example(ex.task, ex.prompt, text))
            correct += text == ex.answer
    return Dreams(kept, len(prompts), correct)
