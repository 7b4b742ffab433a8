"""Phase 3 (Quiet-STaR) on a small trained model: the vocabulary growth, the paper's reward, the REINFORCE
direction, the ablation checks (really run in every mode) and the honest failure when thoughts do not help."""
from types import SimpleNamespace

import pytest
import torch

from forge.data import make_examples
from forge.nn import Transformer, TransformerConfig
from forge.nn import KLRegularizer, resize_vocab
from forge.optim import create_optimizer_from_phase
from forge.pipeline.config import Phase3Config
from forge.pipeline.controller import HandoffError, ModelOutput, PhaseResult
from forge.pipeline.phases import is_implemented
from forge.pipeline.phases.phase3_quietstar import QuietStarPhase, check_thought_gain
from forge.pipeline.phases.phase3_quietstar.rl_thoughts import ThoughtTrainer
from forge.pipeline.phases.phase3_quietstar.thoughts import (ThoughtIds, ablation_eval, build_rows, example_ids, reinforce_loss,
                                     target_logprobs, thought_rewards, thought_token_names,
                                     thoughts_for)

from _small_model import small_trained_model

TASKS = {"reversal": 1.0, "sorting": 1.0}


@pytest.fixture(scope="module")
def trained():
    """(model with the grown vocabulary, tokenizer with the thought tokens, ids, held-out examples)."""
    model, tokenizer = small_trained_model(TASKS, examples=1000, steps=150, max_len=40)
    tokenizer.add_special_tokens(thought_token_names(6))
    grown = resize_vocab(model, tokenizer.vocab_size)
    grown.eval()
    return grown, model, tokenizer, ThoughtIds.from_tokenizer(tokenizer), make_examples(TASKS, 48, "test", 0)


def test_resize_vocab_keeps_old_logits_and_adds_small_rows(trained):
    grown, original, tokenizer, _, _ = trained
    old = original.config.vocab_size
    assert grown.config.vocab_size == tokenizer.vocab_size == old + 6
    tokens = torch.randint(0, old, (3, 11))
    with torch.no_grad():
        torch.testing.assert_close(grown(tokens)[..., :old], original(tokens), rtol=0, atol=1e-5)
        assert grown.head.weight[old:].abs().max() < 0.2
    with pytest.raises(ValueError, match="new_vocab"):
        resize_vocab(original, old - 1)


def test_reward_is_the_log_prob_gain_of_the_answer(trained):
    grown, _, tokenizer, ids, test = trained
    prefixes, answers = example_ids(test[:2], tokenizer)
    thoughts = [tokenizer.encode("12"), tokenizer.encode("ab<step>")]
    rewards = thought_rewards(grown, prefixes, answers, thoughts, ids)
    for b in range(2):
        answer = answers[b] + [tokenizer.eos_id]
        expected = []
        for middle in ([ids.think, *thoughts[b], ids.end], []):
            seq = torch.tensor([prefixes[b] + middle + answer])
            with torch.no_grad():
                logp = torch.log_softmax(grown(seq)[0].double(), -1)
            start = len(prefixes[b]) + len(middle)
            expected.append(sum(logp[start - 1 + i, tok] for i, tok in enumerate(answer)))
        assert rewards[b].item() == pytest.approx((expected[0] - expected[1]).item(), abs=1e-4)


def test_reinforce_step_makes_the_better_thought_more_likely(trained):
    grown, _, tokenizer, ids, test = trained
    model = resize_vocab(grown, grown.config.vocab_size)   # a copy
    prefixes, answers = example_ids(test[:1] * 2, tokenizer)
    thoughts, closed = [tokenizer.encode("3a"), tokenizer.encode("x9")], [True, False]
    rewards = thought_rewards(model, prefixes, answers, thoughts, ids)
    rows = build_rows(prefixes, answers, ids, thoughts, closed)
    before = target_logprobs(model(rows.tokens), rows.thought_targets).detach()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    reinforce_loss(target_logprobs(model(rows.tokens), rows.thought_targets), rewards, 2).backward()
    optimizer.step()
    after = target_logprobs(model(rows.tokens), rows.thought_targets).detach()
    better = int(rewards.argmax())
    assert rewards[better] > rewards[1 - better]
    # to first order the step moves log p(better) - log p(worse) up by lr * advantage * |grad difference|^2
    assert after[better] - after[1 - better] > before[better] - before[1 - better] + 1e-3


def test_ablation_runs_every_mode(trained):
    grown, _, tokenizer, ids, test = trained
    result = ablation_eval(grown, test, tokenizer, ids, 6)
    prefixes, answers = example_ids(test, tokenizer)
    thoughts, _ = thoughts_for(grown, prefixes, ids, 6)
    from forge.data import evaluate
    assert result["accuracy_no_thoughts"] == pytest.approx(evaluate(grown, test, tokenizer, 40)["accuracy"])
    shuffled = thoughts[1:] + thoughts[:1]
    rows = build_rows(prefixes, answers, ids, shuffled)
    with torch.no_grad():
        logits = grown(rows.tokens)
    from forge.pipeline.phases.phase3_quietstar.thoughts import exact_answers
    assert result["accuracy_shuffled_thoughts"] == pytest.approx(float(exact_answers(logits, rows.answer_targets)
                                                                        .float().mean()))
    assert result["thought_gain"] == pytest.approx(result["accuracy"] - max(result["accuracy_no_thoughts"],
                                                                             result["accuracy_empty_thought"]))


def test_sampled_thoughts_differ_across_inputs(trained):
    grown, _, tokenizer, ids, test = trained
    prefixes, _ = example_ids(test, tokenizer)
    generator = torch.Generator().manual_seed(0)
    thoughts, _ = thoughts_for(grown, prefixes, ids, 6, temperature=1.0, generator=generator)
    assert len({tuple(t) for t in thoughts}) > len(thoughts) // 2
    banned = set(ids.banned)
    assert all(not banned & set(t) and ids.end not in t for t in thoughts)


def _metrics(**changes) -> dict:
    base = {"accuracy": 0.6, "accuracy_no_thoughts": 0.5, "accuracy_empty_thought": 0.4,
            "accuracy_shuffled_thoughts": 0.3, "thought_gain": 0.1, "content_gain": 0.3, "distinct_thoughts": 0.9,
            "thinking_rate": 0.5, "input_accuracy": 0.55, "gain_over_input": 0.05}
    return {**base, **changes}


@pytest.mark.parametrize("changes, reason", [
    ({"accuracy": 0.5, "thought_gain": 0.0}, "thoughts do not help"),
    ({"thought_gain": -0.1}, "thoughts do not help"),
    ({"input_accuracy": 0.6, "gain_over_input": 0.0}, "no better than the model that came in"),
    ({"content_gain": 0.0}, "content does not matter"),
    ({"distinct_thoughts": 0.1}, "barely differ")])
def test_validate_output_refuses_thoughts_that_do_not_help(changes, reason):
    cfg = Phase3Config()
    check_thought_gain(_metrics(), cfg)
    with pytest.raises(HandoffError, match=reason):
        check_thought_gain(_metrics(**changes), cfg)
    model = Transformer(TransformerConfig(vocab_size=8, dim=16, n_layers=1, n_heads=2, max_len=8))
    result = PhaseResult(True, [ModelOutput("q", model, {"model_config": {}, "tokenizer": {}}, {})], _metrics(**changes))
    with pytest.raises(HandoffError, match=reason):
        QuietStarPhase().validate_output(result, SimpleNamespace(phase_config=cfg))


def test_phase3_is_listed_as_implemented():
    assert is_implemented(3)


@pytest.mark.parametrize("policy_weight", [0.0, 1.0])
def test_rl_step_loss_is_its_terms_with_the_policy_weight(trained, policy_weight):
    """One ThoughtTrainer step: the loss it optimizes is policy_weight * REINFORCE + both answer NLLs + KL."""
    grown, _, tokenizer, ids, test = trained
    model = resize_vocab(grown, grown.config.vocab_size)   # a copy
    cfg = SimpleNamespace(batch_size=4, num_thoughts=2, thought_length=4, temperature=1.0, plain_answer_weight=1.0,
                          policy_weight=policy_weight)
    optimizer = create_optimizer_from_phase(model, 3, lr=1e-4, adamw_lr=1e-4)
    trainer = ThoughtTrainer(model, optimizer, KLRegularizer(grown, 0.1), make_examples(TASKS, 64, "train", 0),
                             tokenizer, ids, cfg, seed=0)
    with trainer.training():
        s = trainer.step()
    assert s["policy_loss"] != 0.0
    expected = policy_weight * s["policy_loss"] + s["answer_nll_thought"] + s["answer_nll_plain"] + s["kl"]
    assert s["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
