"""Grokfast's effect inside MuonGrokfast on Grokfast's own task (x * y mod p, half the pairs for
training, loss and accuracy on the answer token; Lee et al. 2024, arXiv 2405.20233), test-sized.

Setting, chosen by hand: p = 59, a 1-layer, width-32, 4-head TinyDecoder, minibatches of 256, AdamW
lr 1e-3 betas (0.9, 0.98) for embeddings/head/norms, Muon lr 0.02 for hidden matrices, decoupled weight
decay 1.0, Grokfast-EMA alpha 0.98 lamb 2.0, validation accuracy every 25 steps. Steps to 90%
validation accuracy, seeds 0..4 (one thread): Grokfast on 775, 975, 975, 1025, 1075; off 2575, > 3000,
> 3000, 2325, 3000 (2.3x to > 3.1x); with two threads the test's check held for all five seeds. Without
the filter Muon stays near chance for longer. This is a small, strongly decayed model: at the paper's
full size (p = 97, width 128, 2 layers, weight decay 0.005) the filter slows Muon down instead (steps to
95%, seeds 0, 1, 2: on 1700, > 4000, 3600; off 1600, 2080, 1460; see benchmarks/grokking.py).
"""
import pytest
import torch

from forge.data import modular_arithmetic_split
from forge.nn.models import TinyDecoder
from grokking_harness import ALL_VARIANTS, make_optimizer, optimizer_factory, train_until, with_grokfast

P, DIM, LAYERS, HEADS, BATCH = 59, 32, 1, 4, 256
SETTINGS = dict(lr=1e-3, muon_lr=0.02, betas=(0.9, 0.98), weight_decay=1.0, alpha=0.98, lamb=2.0)


def tiny_decoder():
    return TinyDecoder(P + 2, dim=DIM, n_layers=LAYERS, n_heads=HEADS, max_len=4)


def steps_to(variant, max_steps, seed=0):
    data = modular_arithmetic_split(P, "mul", 0.5, seed=seed)
    return train_until(tiny_decoder, optimizer_factory(variant, **SETTINGS), data, max_steps=max_steps,
                       target_acc=0.9, batch_size=BATCH, eval_every=25, seed=seed)


def test_grokfast_makes_muon_reach_90_percent_in_under_half_the_steps():
    on = steps_to("muon+grokfast", max_steps=1500)
    assert on["steps_to_target"] is not None, f"Grokfast on never reached 90%: {on['best_val_acc']:.3f}"
    off = steps_to("muon", max_steps=2 * on["steps_to_target"])
    assert off["steps_to_target"] is None, (
        f"Grokfast off reached 90% in {off['steps_to_target']} steps, on in {on['steps_to_target']}: "
        "not the 2x gap expected")


def test_modular_split_is_deterministic_complete_and_correct():
    tx, ty, vx, vy = modular_arithmetic_split(7, "mul", 0.5, seed=3)
    again = modular_arithmetic_split(7, "mul", 0.5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((tx, ty, vx, vy), again))
    assert not torch.equal(tx, modular_arithmetic_split(7, "mul", 0.5, seed=4)[0])
    inputs, targets = torch.cat([tx, vx]), torch.cat([ty, vy])
    assert len(tx) == 21 and len(inputs) == 7 * 6 and inputs.dtype == targets.dtype == torch.int64
    assert len({tuple(row) for row in inputs.tolist()}) == 42
    assert (inputs[:, 1] == 7).all() and (inputs[:, 3] == 8).all() and (inputs[:, 2] >= 1).all()
    assert torch.equal(targets, inputs[:, 0] * inputs[:, 2] % 7)
    _, ay, _, _ = modular_arithmetic_split(5, "add", 0.6)
    assert len(ay) == 15


@pytest.mark.parametrize("kwargs, field", [(dict(p=1), "p"), (dict(op="div"), "op"),
                                           (dict(train_fraction=1.0), "train_fraction"),
                                           (dict(seed="0"), "seed")])
def test_modular_split_rejects_bad_arguments(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        modular_arithmetic_split(**kwargs)


def test_tiny_decoder_head_goes_to_adamw_and_shapes():
    model = tiny_decoder()
    assert model(torch.zeros(3, 4, dtype=torch.long)).shape == (3, 4, P + 2)
    muon = make_optimizer("muon", model)
    muon_names = [n for g in muon.param_groups if g["use_muon"] for n in g["param_names"]]
    assert muon_names and not any(n.startswith(("embed", "pos", "head")) for n in muon_names)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_with_grokfast_filters_like_the_paper_code():
    """AdamW + hook == AdamW stepped on gradients filtered by the official gradfilter_ema by hand."""
    torch.manual_seed(0)
    a = torch.nn.Linear(4, 3)
    b = torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    hooked = with_grokfast(torch.optim.AdamW(a.parameters(), lr=0.1), alpha=0.9, lamb=2.0)
    plain, emas = torch.optim.AdamW(b.parameters(), lr=0.1), None
    for _ in range(4):
        x = torch.randn(5, 4)
        for model in (a, b):
            model.zero_grad()
            model(x).square().sum().backward()
        if emas is None:
            emas = [p.grad.clone() for p in b.parameters()]  # the paper's code starts at the first grad
        for p, e in zip(b.parameters(), emas):
            e.mul_(0.9).add_(p.grad, alpha=0.1)
            p.grad.add_(e, alpha=2.0)
        hooked.step()
        plain.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_make_optimizer_and_train_until_reject_bad_arguments():
    with pytest.raises(ValueError, match="variant"):
        make_optimizer("sgd", tiny_decoder())
    with pytest.raises(ValueError, match="variant"):
        optimizer_factory("muon-grokfast")
    assert set(ALL_VARIANTS) >= {"muon+grokfast", "muon", "adamw+grokfast", "adamw"}
    data = modular_arithmetic_split(5)
    with pytest.raises(ValueError, match="max_steps"):
        train_until(tiny_decoder, optimizer_factory("adamw"), data, max_steps=0)
    with pytest.raises(ValueError, match="batch_size"):
        train_until(tiny_decoder, optimizer_factory("adamw"), data, max_steps=1, batch_size=0)
