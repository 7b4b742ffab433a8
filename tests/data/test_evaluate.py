import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from forge.data import TASKS, CharTokenizer, Example, evaluate, greedy_answers, make_examples, trivial_baseline

MAX_LEN = 48


class LookupModel(nn.Module):
    """Knows the answers: at each position it reads the prefix and puts `scale` on the right next token.

    `mangle(answer) -> str` changes what it says (to test wrong-but-close outputs); `emit_eos=False`
    makes it keep talking after the answer.
    """

    def __init__(self, examples, tok, scale=30.0, mangle=None, emit_eos=True, tasks=None):
        super().__init__()
        self.tok, self.scale, self.emit_eos = tok, scale, emit_eos
        self.answers = {e.prompt: (mangle(e.answer) if mangle else e.answer) for e in examples
                        if tasks is None or e.task in tasks}
        self.dummy = nn.Parameter(torch.zeros(()))

    def next_id(self, prefix):
        if self.tok.sep_id not in prefix:
            return self.tok.pad_id
        sep = prefix.index(self.tok.sep_id)
        prompt = self.tok.decode(prefix[1:sep])
        if prompt not in self.answers:
            return self.tok.token_id("7")
        answer = self.tok.encode(self.answers[prompt])
        k = len(prefix) - sep - 1
        if k < len(answer):
            return answer[k]
        return self.tok.eos_id if self.emit_eos else self.tok.token_id("0")

    def forward(self, tokens):
        out = torch.zeros(*tokens.shape, self.tok.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                out[b, t, self.next_id(row[: t + 1])] = self.scale
        return out + self.dummy


class TinyCausal(nn.Module):
    """Random causal model: running mean of embeddings, then a linear head (depends on the prefix only)."""

    def __init__(self, vocab, dim=16):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens).cumsum(1) / torch.arange(1, tokens.shape[1] + 1).view(1, -1, 1)
        return self.head(torch.tanh(x)) * 4


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="module")
def examples():
    return make_examples({name: 1 for name in TASKS}, 70, "val", seed=0)


def test_lookup_model_scores_one(tok, examples):
    result = evaluate(LookupModel(examples, tok), examples, tok, MAX_LEN, batch_size=16)
    assert result["accuracy"] == 1.0
    assert result["per_task_accuracy"] == {name: 1.0 for name in TASKS}
    assert result["n"] == 70
    assert 0 <= result["loss"] < 1e-6 and result["perplexity"] == pytest.approx(1.0, abs=1e-6)


def test_constant_model_scores_zero(tok, examples):
    class Constant(nn.Module):
        def forward(self, tokens):
            out = torch.zeros(*tokens.shape, tok.vocab_size)
            out[..., tok.token_id("1")] = 5.0
            return out

    result = evaluate(Constant(), examples, tok, MAX_LEN)
    assert result["accuracy"] == 0.0
    assert result["loss"] > 3 and math.isfinite(result["loss"])


@pytest.mark.parametrize("kwargs", [
    dict(mangle=lambda a: a + "1"),          # one extra character
    dict(mangle=lambda a: a[:-1]),           # one character short
    dict(emit_eos=False),                    # right answer but never stops
])
def test_near_misses_are_wrong(tok, examples, kwargs):
    result = evaluate(LookupModel(examples, tok, **kwargs), examples, tok, MAX_LEN)
    assert result["accuracy"] == 0.0


def test_per_task_accuracy(tok, examples):
    model = LookupModel(examples, tok, tasks={"addition", "copy"})
    result = evaluate(model, examples, tok, MAX_LEN, batch_size=7)
    known = {"addition", "copy"}   # the model says "7" forever for the others: never right
    assert result["per_task_accuracy"] == {name: float(name in known) for name in TASKS}
    assert result["accuracy"] == pytest.approx(sum(e.task in known for e in examples) / len(examples))


def test_loss_matches_manual_cross_entropy(tok, examples):
    torch.manual_seed(0)
    model = TinyCausal(tok.vocab_size).double()
    result = evaluate(model, examples, tok, MAX_LEN, batch_size=9)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:   # one example at a time: no padding involved
            seq = [tok.bos_id, *tok.encode(e.prompt), tok.sep_id, *tok.encode(e.answer), tok.eos_id]
            p = len(e.prompt) + 2
            logits = model(torch.tensor([seq]))[0]
            targets = torch.tensor(seq[p:])
            total += F.cross_entropy(logits[p - 1 : len(seq) - 1], targets, reduction="sum").item()
            count += len(targets)
    assert result["loss"] == pytest.approx(total / count, rel=1e-9)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-9)


def test_batched_greedy_matches_one_by_one(tok, examples):
    torch.manual_seed(1)
    model = TinyCausal(tok.vocab_size)
    model.head.bias.data[tok.eos_id] += 1.0   # some rows stop early, others run to the budget
    batched = greedy_answers(model, examples, tok, MAX_LEN)
    for e, got in zip(examples, batched):
        seq = [tok.bos_id, *tok.encode(e.prompt), tok.sep_id]
        out = []
        for _ in range(len(e.answer) + 1):
            nxt = int(model(torch.tensor([seq]))[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            seq.append(nxt)
            out.append(nxt)
        else:
            out.append(-1)
        assert got == out
    assert any(g and g[-1] == -1 for g in batched) and any(-1 not in g for g in batched)


def test_mode_restored_and_bad_model_output(tok, examples):
    model = TinyCausal(tok.vocab_size)
    model.train()
    evaluate(model, examples[:4], tok, MAX_LEN)
    assert model.training
    with pytest.raises(ValueError, match="logits of shape"):
        evaluate(lambda t: torch.zeros(t.shape[0], t.shape[1], 3), examples[:2], tok, MAX_LEN)
    with pytest.raises(TypeError, match="logits tensor"):
        evaluate(lambda t: (torch.zeros(*t.shape, tok.vocab_size),), examples[:2], tok, MAX_LEN)
    with pytest.raises(ValueError, match="empty"):
        evaluate(model, [], tok, MAX_LEN)


def test_trivial_baseline():
    train = [Example("a", "1+1", "2"), Example("a", "2+0", "2"), Example("a", "0+1", "1"),
             Example("c", "copy:xy", "xy")]
    evals = [Example("a", "5+5", "2"), Example("a", "3+3", "6"), Example("c", "copy:ab", "ab"),
             Example("c", "copy:zz", "zz"), Example("b", "9*9", "81")]
    result = trivial_baseline(train, evals)
    assert result["most_frequent_answer"] == pytest.approx(1 / 5)
    assert result["copy_prompt"] == pytest.approx(2 / 5)
    assert result["accuracy"] == pytest.approx(2 / 5) and result["strategy"] == "copy_prompt"
    with pytest.raises(ValueError):
        trivial_baseline([], evals)


class NoisyLookup(LookupModel):
    """LookupModel plus noise that is a fixed function of the prefix: right on some examples,
    wrong at various positions on others, so exact-match is non-trivial."""

    def forward(self, tokens):
        out = super().forward(tokens)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                g = torch.Generator().manual_seed(hash(tuple(row[: t + 1])) % 2**31)
                out[b, t] += 12.0 * torch.rand(self.tok.vocab_size, generator=g)
        return out


def test_accuracy_equals_explicit_greedy_decoding(tok, examples):
    model = NoisyLookup(examples, tok, scale=10.0)
    decoded = greedy_answers(model, examples, tok, MAX_LEN)
    right = [ids == tok.encode(e.answer) for e, ids in zip(examples, decoded)]
    assert 0.2 < sum(right) / len(right) < 0.8    # the check below means something
    result = evaluate(model, examples, tok, MAX_LEN, batch_size=32)
    assert result["accuracy"] == pytest.approx(sum(right) / len(right))
    for name in TASKS:
        subset = [r for e, r in zip(examples, right) if e.task == name]
        assert result["per_task_accuracy"][name] == pytest.approx(sum(subset) / len(subset))
