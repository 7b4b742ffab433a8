"""Tool use: the call format's training rows, generation in which the calculator really answers (a small model
fine-tuned here on a few hundred questions multiplies 3-digit numbers with the tool and not without it, and
copies whatever the tool says), malformed calls, and Toolformer's filter on constructed cases."""
import copy

import pytest
import torch

from forge.data import CharTokenizer, Example, make_examples
from forge.data.evaluate import exact_matches
from forge.data.batching import IGNORE_INDEX, prompt_ids
from forge.data.calculator import calculate
from forge.data.levels import level_examples
from forge.data.tools import (CALL, CALL_ERROR, END_CALL, END_RESULT, MAX_CALLS, RESULT, add_tool_tokens,
                              answer_with_tool, call_ids, encode_rows, generate, sequence)
from forge.nn import TransformerConfig, build_model
from forge.optim import create_optimizer_from_phase
from forge.pipeline.config import load_config
from forge.pipeline.phases.phase6_baking.toolformer import candidate_calls, filter_calls, train_rows
from forge.pipeline.training import make_optimizer, train_on_examples

PRETRAIN = {"copy": 1.0, "addition": 1.0}


@pytest.fixture(scope="module")
def tool_model():
    """A dim-64 two-layer model trained on copy and addition, then 1000 steps on 420 multiplication questions
    (levels 1-7) each written with its own calculator call, mixed with 140 plain copy and addition ones."""
    tokenizer = CharTokenizer()
    add_tool_tokens(tokenizer)
    torch.manual_seed(0)
    model = build_model(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, max_len=48))
    train_on_examples(model, create_optimizer_from_phase(model, 1, lr=0.004, adamw_lr=0.004),
                      make_examples(PRETRAIN, 3000, "train", 0), tokenizer, steps=600, batch_size=32, max_len=48,
                      seed=0)
    questions = [ex for lv in range(1, 8) for ex in level_examples("multiplication", lv, 60, "train", 0)]
    rows = [sequence(ex, tokenizer, call_ids(ex.prompt, tokenizer)) for ex in questions]
    rows += [sequence(ex, tokenizer) for ex in make_examples(PRETRAIN, 140, "train", 1)]
    train_rows(model, make_optimizer(model, load_config().phases.phase6.optimizer, 1e-3), rows, tokenizer, 48,
               steps=1000, batch_size=64, seed=0, what="test")
    return model.eval(), tokenizer


def _six_digit_products(n: int = 40) -> list[Example]:
    found = [ex for ex in level_examples("multiplication", 5, 400, "test", 0) if len(ex.answer) == 6]
    return found[:n]


def test_a_training_row_trains_what_the_model_writes_not_what_the_tool_writes():
    tokenizer = CharTokenizer()
    add_tool_tokens(tokenizer)
    ex = Example("multiplication", "12*34", "408")
    ids, trained = sequence(ex, tokenizer, call_ids("12*34", tokenizer))
    text = tokenizer.decode(ids, skip_special=False)
    assert text == "<bos>12*34<sep><calc>12*34</calc><result>408</result>408<eos>"
    written = [tokenizer.decode([i], skip_special=False) for i, t in zip(ids, trained) if t]
    assert "".join(written) == "<calc>12*34</calc>408<eos>"
    tokens, targets = encode_rows([(ids, trained)], tokenizer.pad_id, 48)
    assert tokens[0].tolist() == ids
    assert [t for t in targets[0].tolist() if t != IGNORE_INDEX] == [i for i, t in zip(ids, trained) if t]
    assert targets[0, len(prompt_ids(ex, tokenizer)) - 1] == tokenizer.token_id(CALL)   # <sep> predicts the call
    empty = call_ids("12*34", tokenizer, with_result=False)
    assert tokenizer.decode(empty, skip_special=False) == "<calc>12*34</calc><result></result>"
    assert tokenizer.decode(call_ids("1%0", tokenizer), skip_special=False) == "<calc>1%0</calc><calc_error>"
    with pytest.raises(ValueError, match="max_len is 10"):
        encode_rows([(ids, trained)], tokenizer.pad_id, 10)


def test_the_model_multiplies_six_digit_products_with_the_tool_and_not_without(tool_model):
    model, tokenizer = tool_model
    questions = _six_digit_products()
    with_tool = answer_with_tool(model, questions, tokenizer, 48)
    without = answer_with_tool(model, questions, tokenizer, 48, tool=None)
    right = sum(o.correct(ex, tokenizer) for o, ex in zip(with_tool, questions)) / len(questions)
    alone = sum(o.correct(ex, tokenizer) for o, ex in zip(without, questions)) / len(questions)
    assert right >= 0.8 and alone <= 0.1, (right, alone)
    assert all(o.calls == 1 and o.errors == 0 for o in with_tool if o.correct)
    assert all(o.calls == 0 for o in without)     # nothing was answered for it


def test_the_answer_comes_from_the_tool(tool_model):
    """A calculator that is off by 1234: the model's answers follow it, so they are read from the tool's
    result, not computed by the model."""
    model, tokenizer = tool_model
    questions = _six_digit_products()
    lying = answer_with_tool(model, questions, tokenizer, 48, tool=lambda text: calculate(text) + 1234)
    follows = [o.closed and o.answer(tokenizer) == str(int(ex.answer) + 1234) for o, ex in zip(lying, questions)]
    assert sum(follows) / len(questions) >= 0.8, [o.answer(tokenizer) for o in lying[:5]]


def test_cached_generation_answers_as_the_whole_batch_does(tool_model):
    """The tool's replies (several tokens at once) enter the key/value cache at the right positions: the same
    answers, calls included, as when the whole batch is re-run each step (float64 copies: no near-tie decides)."""
    model, tokenizer = tool_model
    double = copy.deepcopy(model).double()
    questions = _six_digit_products()
    cached = answer_with_tool(double, questions, tokenizer, 48)
    rerun = answer_with_tool(lambda tokens: double(tokens), questions, tokenizer, 48)
    assert sum(o.calls for o in cached) >= len(questions) // 2
    assert [(o.ids, o.closed, o.calls, o.errors) for o in cached] == [(o.ids, o.closed, o.calls, o.errors)
                                                                     for o in rerun]


class Scripted(torch.nn.Module):
    """A stand-in language model that writes `script` (token ids), one per call, whatever it is fed: the
    runtime's replies land in between and the script goes on."""

    def __init__(self, script: list[int], vocab: int):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.calls = 0

    def forward(self, tokens):
        logits = torch.zeros(tokens.shape[0], tokens.shape[1], self.vocab)
        logits[:, -1, self.script[min(self.calls, len(self.script) - 1)]] = 1.0
        self.calls += 1
        return logits


@pytest.mark.parametrize("written, calls, errors", [
    ("<calc>1+</calc>7<eos>", 0, 1),                  # the calculator refuses "1+"
    ("</calc>7<eos>", 0, 1),                          # closed without an open call
    ("<calc>1<sep>2</calc>7<eos>", 0, 1),             # a special token inside the call
    ("<calc>2*3</calc>6<eos>", 1, 0),
    ("<calc>2*3</calc><calc>1</calc><calc>2</calc>6<eos>", MAX_CALLS, 1),
])
def test_malformed_calls_get_an_error_token_not_a_crash(written, calls, errors):
    tokenizer = CharTokenizer()
    add_tool_tokens(tokenizer)
    prefix = prompt_ids(Example("multiplication", "2*3", "6"), tokenizer)
    model = Scripted(tokenizer.encode(written), tokenizer.vocab_size)
    (out,) = generate(model, [prefix], tokenizer, 48)
    assert out.closed and out.calls == calls and out.errors == errors
    text = tokenizer.decode(out.ids, skip_special=False)
    assert text.count(CALL_ERROR) == errors and text.count(END_RESULT) == calls
    if calls == 1 and not errors:
        assert text == f"{CALL}2*3{END_CALL}{RESULT}6{END_RESULT}6"
    script = Scripted(tokenizer.encode(written), tokenizer.vocab_size)
    (bounded,) = generate(script, [prefix], tokenizer, len(prefix) + 3)
    assert not bounded.closed and len(bounded.ids) == 3


def test_toolformer_keeps_calls_that_help_and_drops_those_that_do_not(tool_model):
    model, tokenizer = tool_model
    hard = _six_digit_products(20)
    a, b = hard[0].prompt.split("*")
    assert candidate_calls(hard[0]) == [hard[0].prompt, f"{a}+{b}", f"{a}-{b}", a, b]
    easy = [Example("copy", f"copy:{n}", str(n)) for n in (48213, 907, 5521, 30)]   # the model copies most itself
    assert all(candidate_calls(ex) == [str(ex.answer)] for ex in easy)   # each call's result IS the answer
    kept = filter_calls(model, hard + easy, tokenizer, 48, tau=1.0)
    assert kept.considered == 5 * len(hard) + len(easy)
    assert sum(c == ex.prompt for c, ex in zip(kept.calls, hard)) >= 0.9 * len(hard), kept.calls
    assert all(c in (None, ex.prompt) for c, ex in zip(kept.calls, hard))   # a wrong call never helps
    # a call whose result the model already writes itself never helps; which short numbers the small model copies
    # depends on the CPU's rounding in its training (an AVX2 EPYC's model missed "30", the Xeon's did not)
    copied = exact_matches(model, easy, tokenizer, 48)
    assert sum(copied) >= 3, copied
    assert [c for c, ok in zip(kept.calls[len(hard):], copied) if ok] == [None] * sum(copied), kept.gains[len(hard):]
    assert kept.kept_rate("copy") <= 1 / len(easy) and kept.kept_rate("multiplication") >= 0.9
