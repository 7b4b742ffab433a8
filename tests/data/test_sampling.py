"""forge.data.sample_answers: the model's own answers, greedy or sampled, and their log-probability."""
import pytest
import torch

from forge.data import CharTokenizer, greedy_answers, make_examples
from forge.data.sampling import sample_answers
from forge.distributed import draw_rows
from forge.nn import TransformerConfig, build_model


@pytest.fixture(scope="module")
def setup():
    tokenizer = CharTokenizer()
    torch.manual_seed(0)
    model = build_model(TransformerConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1, n_heads=2, max_len=32))
    with torch.no_grad():     # a sharp random model, so that greedy answers end with <eos> now and then
        model.head.weight.mul_(30)
        model.head.weight[tokenizer.eos_id] += 0.5
    return model.eval(), tokenizer, make_examples({"copy": 1.0, "addition": 1.0}, 24, "test", 0)


def test_greedy_sampling_is_greedy_decoding_and_its_logprob_is_the_models(setup):
    model, tokenizer, examples = setup
    answers = sample_answers(model, examples, tokenizer, 32, temperature=0.0,
                             max_new=max(len(ex.answer) for ex in examples) + 1)
    for ex, answer, greedy in zip(examples, answers, greedy_answers(model, examples, tokenizer, 32)):
        if answer.closed and len(answer.ids) <= len(ex.answer):
            assert answer.ids == greedy
        prefix = [tokenizer.bos_id, *tokenizer.encode(ex.prompt), tokenizer.sep_id]
        written = answer.ids + ([tokenizer.eos_id] if answer.closed else [])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prefix + written])).double(), -1)[0]
        expected = sum(float(logp[len(prefix) - 1 + i, tok]) for i, tok in enumerate(written))
        assert answer.logprob == pytest.approx(expected, abs=1e-4)
    assert any(a.closed for a in answers) and not all(a.closed for a in answers)


def test_temperature_sampling_is_seeded_and_varies(setup):
    model, tokenizer, examples = setup
    run = lambda seed: [a.ids for a in sample_answers(model, examples * 4, tokenizer, 32, temperature=2.0,   # noqa: E731
                                                      max_new=6, generator=torch.Generator().manual_seed(seed))]
    assert run(1) == run(1) and run(1) != run(2)
    assert len({tuple(ids) for ids in run(1)[:24]} | {tuple(ids) for ids in run(1)[24:48]}) > 24
    with pytest.raises(ValueError, match="temperature"):
        sample_answers(model, examples, tokenizer, 32, temperature=-1.0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 37), (9, 1), (64, 50), (7, 13)])
def test_draw_rows_draws_what_torch_multinomial_draws_row_by_row_share(shape):
    """draw_rows is torch.multinomial(probs, 1) (same tokens, same generator state after) for the whole batch, and
    any contiguous share of the rows drawn with the whole batch's size gives those rows' tokens (what ranks
    holding a split batch rely on); rows with zero-probability tokens never draw them."""
    for seed in range(20):
        probs = torch.softmax(torch.randn(shape) * 3, -1)
        if shape[1] > 2:
            probs[:, : shape[1] // 2] = 0.0
        expected_gen, got_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = torch.multinomial(probs, 1, generator=expected_gen)
        assert torch.equal(draw_rows(probs, got_gen), expected)
        assert torch.equal(got_gen.get_state(), expected_gen.get_state())
        lo, hi = shape[0] // 3, shape[0] - shape[0] // 4
        share = draw_rows(probs[lo:hi], torch.Generator().manual_seed(seed), lo, shape[0])
        assert torch.equal(share, expected[lo:hi])
        if shape[1] > 2:
            assert bool((expected >= shape[1] // 2).all())
