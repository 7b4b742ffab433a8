"""Incremental decoding (forge.data.decoding, Transformer.forward_at): rows of different lengths fed in chunks of
different sizes at their own positions give the logits of the full forward (float64 reference), and every
generation loop answers exactly as it does when the whole batch is re-run each step."""
import copy
import random

import pytest
import torch

from forge.data import CharTokenizer, greedy_answers, make_examples, sample_answers
from forge.data.decoding import NextLogits
from forge.data.tools import add_tool_tokens, answer_with_tool
from forge.nn import build_model

SHAPES = [dict(vocab_size=23, dim=32, n_layers=2, n_heads=4, max_len=24),
          dict(vocab_size=7, dim=8, n_layers=1, n_heads=1, max_len=5),
          dict(vocab_size=41, dim=48, n_layers=3, n_heads=6, max_len=31)]


def model_of(cfg, seed, dtype=torch.float64):
    torch.manual_seed(seed)
    return build_model(cfg).to(dtype).eval()


def whole(model):
    """The same model behind a plain callable: NextLogits re-runs the whole batch for it."""
    return lambda tokens: model(tokens)


@pytest.mark.parametrize("cfg", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_rows_match_the_full_forward(cfg, dtype):
    rng = random.Random(cfg["dim"])
    model = model_of(cfg, rng.randrange(100), dtype)
    reference = build_model(cfg).double().eval()
    reference.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    batch, max_len = rng.randint(1, 5), cfg["max_len"]
    seqs = [[rng.randrange(cfg["vocab_size"]) for _ in range(rng.randint(1, max_len // 2))] for _ in range(batch)]
    step = NextLogits(model, seqs, 0, cfg["vocab_size"])
    for _ in range(6):
        rows = sorted(rng.sample(range(batch), rng.randint(1, batch)))
        for b in rows:            # each asked row grows by 0-3 tokens (a tool's reply is several at once)
            room = max_len - len(seqs[b])
            seqs[b].extend(rng.randrange(cfg["vocab_size"]) for _ in range(rng.randint(0, min(3, room))))
        got = step(rows)
        want = torch.stack([reference(torch.tensor([seqs[b]]))[0, -1] for b in rows])
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)


def test_incremental_and_whole_batch_agree_row_by_row():
    cfg = SHAPES[0]
    model = model_of(cfg, 3)
    seqs_a = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10]]
    seqs_b = [list(s) for s in seqs_a]
    a, b = NextLogits(model, seqs_a, 0, 23), NextLogits(whole(model), seqs_b, 0, 23)
    assert a.incremental and not b.incremental
    for rows, grow in [([0, 1, 2], [[], [], []]), ([2, 0], [[7], [], [8, 9]]), ([1], [[], [3, 3, 3, 3], []])]:
        for s, t, g in zip(seqs_a, seqs_b, grow):
            s.extend(g)
            t.extend(g)
        torch.testing.assert_close(a(rows), b(rows), rtol=1e-10, atol=1e-10)


def test_a_peft_wrapper_decodes_incrementally_through_its_adapters():
    """A LoRA-wrapped Transformer takes the cached path, and its adapters are in it:
    the same logits as the wrapper's own full forward, and not the bare model's."""
    from peft import LoraConfig, get_peft_model

    base = model_of(SHAPES[0], 5)
    wrapped = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False)).double().eval()
    seqs_a, seqs_b = [[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]
    a, b = NextLogits(wrapped, seqs_a, 0, 23), NextLogits(whole(wrapped), seqs_b, 0, 23)
    assert a.incremental
    for grow in ([7], [8, 9]):
        seqs_a[0].extend(grow)
        seqs_b[0].extend(grow)
        got = a([0, 1])
        torch.testing.assert_close(got, b([0, 1]), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, NextLogits(base, [list(s) for s in seqs_a], 0, 23)([0, 1]))


def test_a_row_past_max_len_is_refused():
    model = model_of(SHAPES[1], 0)
    seqs = [[1, 2, 3]]
    step = NextLogits(model, seqs, 0, 7)
    step([0])
    seqs[0].extend([1, 2, 3])
    with pytest.raises(ValueError, match="exceed max_len=5"):
        step([0])


@pytest.fixture(scope="module")
def char_setup():
    tokenizer = CharTokenizer()
    add_tool_tokens(tokenizer)
    cfg = dict(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=4, max_len=40)
    return model_of(cfg, 1), tokenizer, make_examples({"addition": 1.0, "copy": 1.0}, 24, "test", 5)


def test_generation_loops_answer_as_the_whole_batch_does(char_setup):
    """Greedy, sampled (same generator seed) and tool-using generation: same tokens whichever way the logits
    are computed (a float64 model, so no near-tie decides)."""
    model, tok, examples = char_setup
    for m in (model, whole(model)):
        assert NextLogits(m, [[1]], tok.pad_id, tok.vocab_size).incremental == (m is model)
    assert greedy_answers(model, examples, tok, 40) == greedy_answers(whole(model), examples, tok, 40)
    sampled = [sample_answers(m, examples, tok, 40, temperature=1.0, generator=torch.Generator().manual_seed(7))
               for m in (model, whole(model))]
    assert [(s.ids, s.closed) for s in sampled[0]] == [(s.ids, s.closed) for s in sampled[1]]
    assert all(abs(x.logprob - y.logprob) < 1e-9 for x, y in zip(*sampled))
    tooled = [answer_with_tool(m, examples, tok, 40) for m in (model, whole(model))]
    assert [(o.ids, o.closed, o.calls) for o in tooled[0]] == [(o.ids, o.closed, o.calls) for o in tooled[1]]
