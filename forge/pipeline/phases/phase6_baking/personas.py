"""The B-cycle: a persona prompt's behaviour (forge.baking.prompts: marker tokens before and after the answer)
is taught to the model as a prompt it follows, then baked into the weights with PromptBaker (peft LoRA, the
frozen prompted model as teacher, KL) so that the model shows it without the prompt.

Teaching. A char model does not follow "check:" by itself: its prompted self would be no teacher. So first
(when the prompted model's adherence is below `min_teacher_adherence`) it is fine-tuned on the same questions
prompted (persona prompt in front of <bos>: the answer in the persona's format) and unprompted (the answer in
the model's current format), each with the calculator call Toolformer's filter keeps for it under the current
model (or none), so the prompt decides the markers and nothing else: a teacher that stopped calling the tool
would bake that in too (measured: tool accuracy 0.81 -> 0.01 when the prompted rows had no calls).
Formats add up: a baked persona's markers become the model's unprompted format, and later rows use it.
Adherence: the share of greedy outputs (with the calculator) that are closed and show the behaviour
(forge.baking.prompts.adheres); base accuracy: the answers' text (markers and calls left out) is right.
"""
from __future__ import annotations

from dataclasses import dataclass

from forge.baking import get_prompt, interpolate
from forge.baking.prompts import adheres
from forge.data.batching import prompt_ids
from forge.data.tools import call_ids, generate, sequence
from forge.pipeline.phases.phase6_baking.toolformer import train_rows
from forge.pipeline.prompt_bake import bake_task_prompt


@dataclass(frozen=True)
class Format:
    """Marker tokens the model writes before and after every answer without a prompt."""
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    def plus(self, persona) -> "Format":
        return Format(tuple(persona.before) + self.before, self.after + tuple(persona.after))

    def ids(self, tokenizer) -> tuple[list[int], list[int]]:
        return [tokenizer.token_id(t) for t in self.before], [tokenizer.token_id(t) for t in self.after]


def formatted(example, tokenizer, fmt: Format, call=None, prompt: list[int] | None = None):
    """(ids, trained) of `example` in format `fmt`, after `prompt` ids when given (never a target)."""
    before, after = fmt.ids(tokenizer)
    ids, trained = sequence(example, tokenizer, call, before, after)
    if prompt:
        return prompt + ids, [False] * len(prompt) + trained
    return ids, trained


def teaching_rows(persona_id: str, examples, calls, tokenizer, fmt: Format, max_len: int):
    """Each example (with its call, or none) unprompted in `fmt` and prompted in fmt + persona: the same
    answers, calls where the model would call, the persona's markers only where its prompt is."""
    persona = get_prompt(persona_id)
    prompt = persona.ids(tokenizer)[0].tolist()
    rows = []
    for ex, call in zip(examples, calls):
        ids = None if call is None else call_ids(call, tokenizer)
        rows += [formatted(ex, tokenizer, fmt, ids), formatted(ex, tokenizer, fmt.plus(persona), ids, prompt)]
    return [row for row in rows if len(row[0]) <= max_len]


def teach(model, optimizer, persona_id: str, examples, calls, tokenizer, fmt: Format, *, steps: int,
          batch_size: int, seed: int) -> list[float]:
    """Fine-tune `model` in place to follow the persona's prompt (see the module); returns the losses."""
    rows = teaching_rows(persona_id, examples, calls, tokenizer, fmt, model.config.max_len)
    return train_rows(model, optimizer, rows, tokenizer, model.config.max_len, steps=steps, batch_size=batch_size,
                      seed=seed, what=f"phase 6 teaching {persona_id}")


def outputs(model, examples, tokenizer, persona_id: str | None = None):
    """Greedy outputs with the calculator, each after the persona's prompt when `persona_id` is given."""
    prompt = [] if persona_id is None else get_prompt(persona_id).ids(tokenizer)[0].tolist()
    return generate(model, [prompt + prompt_ids(ex, tokenizer) for ex in examples], tokenizer,
                    model.config.max_len)


def _adherence_of(outs, persona_id: str, tokenizer) -> float:
    persona = get_prompt(persona_id)
    marker_ids = {m: tokenizer.token_id(m) for m in persona.markers}
    return sum(o.closed and adheres(o.ids, persona, marker_ids) for o in outs) / max(1, len(outs))


def adherence(model, persona_id: str, examples, tokenizer, prompted: bool) -> float:
    """Share of closed greedy outputs showing the persona's behaviour, with or without its prompt."""
    return _adherence_of(outputs(model, examples, tokenizer, persona_id if prompted else None), persona_id, tokenizer)


def accuracy(model, examples, tokenizer) -> float:
    """Share of right answers (calculator on, markers and calls left out of the answer's text)."""
    return _accuracy_of(outputs(model, examples, tokenizer), examples, tokenizer)


def _accuracy_of(outs, examples, tokenizer) -> float:
    return sum(o.correct(ex, tokenizer) for o, ex in zip(outs, examples)) / max(1, len(examples))


def unprompted_scores(model, persona_id: str, examples, tokenizer) -> tuple[float, float]:
    """(adherence, accuracy) without the prompt, from one generation over `examples`."""
    outs = outputs(model, examples, tokenizer)
    return _adherence_of(outs, persona_id, tokenizer), _accuracy_of(outs, examples, tokenizer)


def bake(model, persona_id: str, examples, tokenizer, cfg, seed: int):
    """PromptBaker on the persona's prompt (LoRA lora_r / lora_alpha, KL to the frozen prompted model);
    returns the BakeResult (its .model is the fully baked model)."""
    return bake_task_prompt(model, persona_id, examples, tokenizer, lr=cfg.baking_lr, steps=cfg.baking_steps,
                            traj_len=cfg.baking_traj_len, seed=seed, rank=cfg.lora_r, alpha=cfg.lora_alpha)


def persona_cycle(model, make_opt, persona_id: str, data: dict, tokenizer, fmt: Format, cfg, seed: int) -> dict:
    """One B-cycle on `model`: teach when needed, bake, interpolate. data: "train" (teaching and baking
    questions), "held_out", "calls" (examples -> the call kept for each, or None). Returns {"model": the model
    to go on with (baked at half_baking_strength), "format": the new format, "metrics": per-persona numbers}."""
    train, held = data["train"], data["held_out"]
    m = {"prompted_adherence_before": adherence(model, persona_id, held, tokenizer, prompted=True)}
    m["adherence_before"], m["accuracy_before"] = unprompted_scores(model, persona_id, held, tokenizer)
    m["taught"] = m["prompted_adherence_before"] < cfg.min_teacher_adherence
    if m["taught"]:
        teach(model, make_opt(model), persona_id, train, data["calls"](model, train), tokenizer, fmt,
              steps=cfg.teach_steps, batch_size=cfg.batch_size, seed=seed)
        m["adherence_taught"] = adherence(model, persona_id, held, tokenizer, prompted=False)
    m["prompted_adherence"] = adherence(model, persona_id, held, tokenizer, prompted=True)
    result = bake(model, persona_id, train, tokenizer, cfg, seed)
    half = interpolate(model, result.model, 0.5).eval()
    fully = cfg.half_baking_strength == 1.0
    handed = result.model.eval() if fully else interpolate(model, result.model, cfg.half_baking_strength).eval()
    handed_adherence, accuracy_after = unprompted_scores(handed, persona_id, held, tokenizer)
    m.update(kl_before=result.kl_before, kl_after=result.kl_after, kl_reduction=result.kl_reduction,
             adherence=handed_adherence if fully else adherence(result.model, persona_id, held, tokenizer, False),
             half_baked_adherence=adherence(half, persona_id, held, tokenizer, prompted=False),
             accuracy_after=accuracy_after)
    m["adherence_gap"] = m["prompted_adherence"] - m["adherence"]
    return {"model": handed, "format": fmt.plus(get_prompt(persona_id)), "metrics": m}
