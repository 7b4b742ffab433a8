"""Prompt baking, proved on a tiny model that really obeys a prompt.

The module fixture trains a 2-layer Transformer on its own little vocabulary: "<bos> x <sep> x <eos>"
(copy) without a prompt, and "R : <bos> x <sep> reverse(x) <eos>" after the prompt "R:". Baking "R:" must
make the UNPROMPTED model reverse. Measured here (seeds as below, 100 LoRA steps, rank 4): KL(prompted
teacher || unprompted student) on 128 held-out inputs 4.49 -> 0.0065 (-99.9%); reverse accuracy without
the prompt 0.02 -> 1.00, the prompted original's 1.00; half-baking (0.5) stops after 5 steps at KL 1.98,
greedy accuracy still 0.02 but the reversed answer's log-likelihood between the original's and the bake's.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from forge.baking import (PROMPTS, BakeResult, PromptBaker, get_prompt, interpolate, prefix_cache, prompts_for_phase,
                          reprompt, sample_trajectories)
from forge.baking.prompts import MAX_PROMPT_CHARS
from forge.nn import Transformer, build_model

PAD, BOS, EOS, SEP, R, COLON = 0, 1, 2, 3, 4, 5
FIRST_DIGIT, N_DIGITS, LENGTH = 6, 8, 4
VOCAB = FIRST_DIGIT + N_DIGITS
PROMPT = torch.tensor([[R, COLON]])


def digits(n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_DIGIT, FIRST_DIGIT + N_DIGITS, (n, LENGTH), generator=generator)


def inputs_of(d: torch.Tensor) -> torch.Tensor:
    """<bos> x <sep>: what the model sees before it answers."""
    return torch.cat([torch.full((len(d), 1), BOS), d, torch.full((len(d), 1), SEP)], 1)


def answers(d: torch.Tensor, reverse: bool) -> torch.Tensor:
    return torch.cat([d.flip(1) if reverse else d, torch.full((len(d), 1), EOS)], 1)


def answer_loss(model, d: torch.Tensor, reverse: bool) -> torch.Tensor:
    seq = torch.cat([inputs_of(d), answers(d, reverse)], 1)
    if reverse:
        seq = torch.cat([PROMPT.expand(len(d), -1), seq], 1)
    logits = model(seq[:, :-1])[:, -(LENGTH + 1):]
    return F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, -(LENGTH + 1):].reshape(-1))


def train_tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = build_model(dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, max_len=24))
    steps = 200
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        loss = answer_loss(model, digits(64, 2 * step), False) + answer_loss(model, digits(64, 2 * step + 1), True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def greedy_accuracy(model, d: torch.Tensor, reverse: bool) -> float:
    """Exact-match rate of greedy answers (callable tokens -> logits; full re-forward per token)."""
    seq = inputs_of(d)
    for _ in range(LENGTH + 1):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return (seq[:, -(LENGTH + 1):] == answers(d, reverse)).all(1).float().mean().item()


@torch.no_grad()
def reverse_log_likelihood(model, d: torch.Tensor) -> float:
    """Mean log P(reverse(x) <eos> | <bos> x <sep>), teacher-forced: a continuous measure of the rule."""
    seq = torch.cat([inputs_of(d), answers(d, reverse=True)], 1)
    logits = model(seq[:, :-1])[:, -(LENGTH + 1):]
    return -F.cross_entropy(logits.reshape(-1, VOCAB), seq[:, -(LENGTH + 1):].reshape(-1)).item()


def baker_for(model, **overrides) -> PromptBaker:
    settings = dict(rank=4, alpha=8.0, lr=1e-2, steps=100, batch_size=32, traj_len=LENGTH + 1, stop_token=EOS,
                    eval_every=10, seed=0)
    return PromptBaker(model, **(settings | overrides))


@pytest.fixture(scope="module")
def tiny():
    """The trained model, held-out inputs, a training pool, and one full and one half bake of "R:"."""
    model = train_tiny_model()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    held_digits = digits(128, 10_001)
    pool = inputs_of(digits(512, 10_002))
    baker = baker_for(model)
    full = baker.bake(PROMPT, pool, eval_inputs=inputs_of(held_digits))
    half = baker.bake(PROMPT, pool, half_bake=0.5, eval_inputs=inputs_of(held_digits))
    return dict(model=model, snapshot=snapshot, d=held_digits, held=inputs_of(held_digits), pool=pool,
                baker=baker, full=full, half=half)


def test_the_tiny_model_obeys_the_prompt(tiny):
    model, d = tiny["model"], tiny["d"]
    assert greedy_accuracy(model, d, reverse=False) > 0.95
    assert greedy_accuracy(reprompt(model, PROMPT), d, reverse=True) > 0.95
    assert greedy_accuracy(model, d, reverse=True) < 0.1


def test_bake_cuts_held_out_kl_by_80_percent_and_the_unprompted_model_follows_the_rule(tiny):
    model, baker, full, held, d = tiny["model"], tiny["baker"], tiny["full"], tiny["held"], tiny["d"]
    assert isinstance(full, BakeResult) and type(full.model) is Transformer
    kl_before = baker.measure_kl(model, PROMPT, model, held)  # plain models, measured apart from the bake
    kl_after = baker.measure_kl(model, PROMPT, full.model, held)
    assert kl_before > 1.0  # the seed's baker compared a model with itself: this would be ~0
    assert kl_after <= 0.2 * kl_before
    assert full.kl_before == pytest.approx(kl_before, rel=1e-5)
    assert full.kl_after == pytest.approx(kl_after, rel=1e-5)
    assert full.steps == 100 and len(full.train_kl) == 100 and full.kl_curve[0] == (0, full.kl_before)
    prompted_acc = greedy_accuracy(reprompt(model, PROMPT), d, reverse=True)
    baked_acc = greedy_accuracy(full.model, d, reverse=True)
    assert baked_acc >= prompted_acc - 0.15
    assert baked_acc > greedy_accuracy(model, d, reverse=True) + 0.7


def test_bake_leaves_the_original_untouched(tiny):
    for name, value in tiny["model"].state_dict().items():
        assert torch.equal(value, tiny["snapshot"][name]), name
    assert any(not torch.equal(tiny["full"].model.state_dict()[k], v) for k, v in tiny["snapshot"].items())


def test_half_bake_lands_between_the_original_and_the_full_bake(tiny):
    model, full, half, d = tiny["model"], tiny["full"], tiny["half"], tiny["d"]
    assert half.steps < full.steps
    assert full.kl_after < half.kl_after < half.kl_before
    assert half.kl_curve[-1][1] <= 0.5 * half.kl_before < half.kl_curve[-2][1]  # stopped at the first crossing
    original_acc, full_acc = (greedy_accuracy(m, d, reverse=True) for m in (model, full.model))
    assert original_acc <= greedy_accuracy(half.model, d, reverse=True) <= full_acc
    lls = [reverse_log_likelihood(m, d) for m in (model, half.model, full.model)]
    assert lls[0] < lls[1] < lls[2]


def test_interpolated_strength_scales_the_prompt(tiny):
    model, baker, full, held = tiny["model"], tiny["baker"], tiny["full"], tiny["held"]
    kls = [baker.measure_kl(model, PROMPT, interpolate(model, full.model, s), held) for s in (0.0, 0.5, 1.0)]
    assert kls[0] == pytest.approx(full.kl_before, rel=1e-5) and kls[2] == pytest.approx(full.kl_after, rel=1e-5)
    assert kls[0] > kls[1] > kls[2]


def test_prompt_pursuit_uses_the_previous_baked_model_with_the_prompt_as_teacher(tiny):
    model, held = tiny["model"], tiny["held"]
    baker = baker_for(model, steps=4, eval_every=2)
    rounds = baker.prompt_pursuit(PROMPT, tiny["pool"], iterations=2, eval_inputs=held)
    assert len(rounds) == 2
    first = rounds[0].model
    assert rounds[0].kl_before == pytest.approx(baker.measure_kl(model, PROMPT, model, held), rel=1e-5)
    assert rounds[1].kl_before == pytest.approx(baker.measure_kl(first, PROMPT, first, held), rel=1e-5)
    assert rounds[1].kl_after == pytest.approx(baker.measure_kl(first, PROMPT, rounds[1].model, held), rel=1e-5)


def test_bake_sequence_chains_different_prompts(tiny):
    model, held = tiny["model"], tiny["held"]
    other = torch.tensor([[COLON, R, R]])
    baker = baker_for(model, steps=3, eval_every=3)
    first, second = baker.bake_sequence([PROMPT, other], tiny["pool"], eval_inputs=held)
    assert first.kl_before == pytest.approx(baker.measure_kl(model, PROMPT, model, held), rel=1e-5)
    assert second.kl_before == pytest.approx(baker.measure_kl(first.model, other, first.model, held), rel=1e-5)


def test_reprompt_prepends_the_prompt():
    torch.manual_seed(3)
    model = build_model(dict(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, max_len=20)).eval()
    x = torch.randint(0, VOCAB, (3, 6))
    full = model(torch.cat([PROMPT.expand(3, -1), x], 1))[:, PROMPT.shape[1]:]
    torch.testing.assert_close(reprompt(model, PROMPT)(x), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch, prompt_len, input_len, traj_len", [(1, 1, 1, 1), (5, 3, 4, 6), (2, 7, 1, 3)])
def test_teacher_logits_equal_a_full_forward_of_prompt_and_input(batch, prompt_len, input_len, traj_len):
    """The prompt's cache (batch 1) reused over the batch and every step gives the full forward's logits."""
    torch.manual_seed(batch + prompt_len)
    model = build_model(dict(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, max_len=20)).eval()
    prompt = torch.randint(0, VOCAB, (1, prompt_len))
    x = torch.randint(0, VOCAB, (batch, input_len))
    traj = sample_trajectories(model, prefix_cache(model, prompt), x, traj_len, 1.0, torch.Generator().manual_seed(0))
    assert traj.tokens.shape == (batch, traj_len) and traj.keep.all()
    full = torch.cat([prompt.expand(batch, -1), x, traj.tokens], 1)
    start = prompt_len + input_len - 1
    expected = model(full)[:, start:start + traj_len]
    torch.testing.assert_close(traj.teacher_logits, expected, rtol=1e-5, atol=1e-5)


def test_stop_token_limits_the_trajectory_positions():
    from forge.baking.trajectory import keep_until_stop

    tokens = torch.tensor([[7, EOS, 9, EOS], [EOS, 8, 8, 8], [6, 6, 6, 6]])
    expected = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(keep_until_stop(tokens, EOS), expected)


def test_prompt_keys_and_values_are_computed_once_per_bake(tiny):
    """Every forward the bake makes is recorded at the embedding: the prompt goes in exactly once, batch 1."""
    model = tiny["model"]
    calls = []
    hook = model.embed.register_forward_pre_hook(lambda _, args: calls.append(args[0].clone()))
    try:
        baker_for(model, steps=3, eval_every=3).bake(PROMPT, tiny["pool"], eval_inputs=tiny["held"])
    finally:
        hook.remove()
    with_prompt = [t for t in calls if t.shape[1] >= 2 and bool((t[:, :2] == PROMPT).all())]
    assert len(calls) > 10 and len(with_prompt) == 1 and with_prompt[0].shape == (1, 2)


def test_bake_result_model_matches_the_state_of_a_plain_model(tiny):
    merged = tiny["full"].model
    assert list(merged.state_dict()) == list(tiny["model"].state_dict())
    assert not any("lora" in name for name in merged.state_dict())


@pytest.mark.parametrize("prompt, match", [
    (torch.zeros((1, 0), dtype=torch.long), "empty"),
    (torch.zeros((1, 24), dtype=torch.long), "max_len"),
    (torch.zeros((2, 3), dtype=torch.long), r"\(1, P\)"),
    (torch.zeros((1, 3)), "int64"),
])
def test_bad_prompts_raise(prompt, match):
    baker = baker_for(build_model(dict(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, max_len=24)), steps=1)
    with pytest.raises(ValueError, match=match):
        baker.bake(prompt, inputs_of(digits(8, 0)))


@pytest.mark.parametrize("half_bake", [0.0, 1.0, 1.5, -0.2, math.nan])
def test_half_bake_outside_the_open_unit_interval_raises(half_bake):
    baker = baker_for(build_model(dict(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, max_len=24)), steps=1)
    with pytest.raises(ValueError, match="half_bake"):
        baker.bake(PROMPT, inputs_of(digits(8, 0)), half_bake=half_bake)


@pytest.mark.parametrize("overrides, match", [
    (dict(rank=0), "rank"), (dict(rank=-1), "rank"), (dict(alpha=-1.0), "alpha"), (dict(lr=0.0), "lr"),
    (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"), (dict(traj_len=0), "traj_len"),
    (dict(temperature=0.0), "temperature"), (dict(stop_token=VOCAB), "stop_token"), (dict(seed=1.5), "seed"),
])
def test_bad_baker_settings_raise(overrides, match):
    model = build_model(dict(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, max_len=24))
    with pytest.raises(ValueError, match=match):
        baker_for(model, **overrides)


def test_bad_samplers_raise():
    model = build_model(dict(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, max_len=24))
    baker = baker_for(model, steps=3, batch_size=4)
    with pytest.raises(TypeError, match="input_sampler"):
        baker.bake(PROMPT, 42)
    with pytest.raises(ValueError, match="ran out after 2 batches"):
        baker.bake(PROMPT, [inputs_of(digits(4, 0))] * 2, eval_inputs=inputs_of(digits(4, 1)))
    with pytest.raises(ValueError, match="iterations"):
        baker.prompt_pursuit(PROMPT, inputs_of(digits(8, 0)), iterations=0)
    with pytest.raises(ValueError, match="prompts"):
        baker.bake_sequence([], inputs_of(digits(8, 0)))


def test_callable_sampler_is_called_with_the_batch_size():
    model = build_model(dict(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, max_len=24))
    sizes = []

    def sampler(n):
        sizes.append(n)
        return inputs_of(digits(n, len(sizes)))

    result = baker_for(model, steps=2, batch_size=5, eval_size=7).bake(PROMPT, sampler)
    assert sizes == [7, 5, 5] and result.steps == 2


def test_the_thirteen_seed_prompts():
    assert len(PROMPTS) == 13 and len({p.id for p in PROMPTS}) == 13
    assert [len(prompts_for_phase(phase)) for phase in (3, 5, 6)] == [1, 2, 10]
    assert sum(p.id.startswith("phase6_") and p.id != "phase6_swe_bench" for p in PROMPTS) == 9
    for p in PROMPTS:
        assert 0 < len(p.text) <= MAX_PROMPT_CHARS and p.text.isascii() and p.seed_intent and p.tasks

    class Chars:
        def encode(self, text):
            return [ord(c) for c in text]

    personas = prompts_for_phase(6)
    assert all(p.markers and p.behaviour for p in personas) and not any(p.markers for p in PROMPTS if p.phase != 6)
    assert len({(p.before, p.after) for p in personas}) == len(personas)      # each behaviour tells its persona
    from forge.pipeline.config import PersonaId
    assert list(PersonaId.__args__) == [p.id for p in personas]                # the config names the same ten
    ids = get_prompt("phase6_swe_bench").ids(Chars())
    assert ids.dtype == torch.long and ids.shape == (1, len("read, test, fix:"))
    with pytest.raises(ValueError, match="phase"):
        prompts_for_phase(4)
    with pytest.raises(ValueError, match="unknown prompt"):
        get_prompt("nope")
