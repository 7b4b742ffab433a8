"""MuonGrokfast against torch's own optimizers, the plain algorithm in fp32, and its own promises."""
import copy

import pytest
import torch
from torch import nn

from forge.ops.newton_schulz import newton_schulz_reference
from forge.optim import MuonGrokfast, muon_param_groups
from forge.optim.functional import adjusted_lr


class Net(nn.Module):
    """Embedding, hidden matrices of several shapes (two of one shape, a conv), norms and a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 12)
        self.conv = nn.Conv1d(12, 12, 3, padding=1)
        self.up = nn.Linear(12, 20)
        self.down = nn.Linear(20, 12, bias=False)
        self.mid1 = nn.Linear(12, 12)
        self.mid2 = nn.Linear(12, 12)
        self.norm = nn.LayerNorm(12)
        self.head = nn.Linear(12, 11)

    def forward(self, tokens):
        h = self.embed(tokens)
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.down(torch.relu(self.up(h)))
        h = self.mid2(torch.relu(self.mid1(h)))
        return self.head(self.norm(h))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 11, (8, 6), generator=g), torch.randint(0, 11, (8, 6), generator=g)


def train(model, optimizer, steps, start=0):
    for s in range(start, start + steps):
        x, y = batch(s)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        optimizer.step()


@pytest.mark.parametrize("foreach", [True, False])
def test_adamw_part_equals_torch_adamw(foreach):
    model = Net()
    twin = copy.deepcopy(model)
    ours = MuonGrokfast([{"params": model.parameters(), "use_muon": False}], adamw_lr=3e-3, adamw_betas=(0.8, 0.9),
                        adamw_eps=1e-6, weight_decay=0.1, grokfast=None, foreach=foreach)
    theirs = torch.optim.AdamW(twin.parameters(), lr=3e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    train(model, ours, 5)
    train(twin, theirs, 5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    state = ours.state[model.head.bias]
    assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["step"].item() == 5


def muon_fp32_reference(model, grads_fn, steps, lr, wd, momentum, nesterov, adjust):
    """torch.optim.Muon's algorithm written plainly, Newton-Schulz in float32, conv flattened."""
    bufs = {p: torch.zeros_like(p) for p in model.parameters()}
    for s in range(steps):
        for p, g in grads_fn(s):
            bufs[p].lerp_(g, 1 - momentum)
            update = g.lerp(bufs[p], momentum) if nesterov else bufs[p]
            ortho = newton_schulz_reference(update.reshape(update.shape[0], -1), 5)
            with torch.no_grad():
                p.mul_(1 - lr * wd).add_(ortho.view_as(p), alpha=-adjusted_lr(lr, adjust, p.shape))


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("nesterov, adjust", [(True, "original"), (False, "match_rms_adamw")])
def test_muon_part_equals_the_algorithm_in_fp32(foreach, nesterov, adjust):
    torch.manual_seed(3)
    model = nn.ModuleDict({"a": nn.Linear(16, 24, bias=False), "b": nn.Linear(16, 24, bias=False),
                           "c": nn.Linear(24, 7, bias=False), "conv": nn.Conv2d(3, 5, 3, bias=False)})
    twin = copy.deepcopy(model)
    grads = {s: [torch.randn_like(p) for p in model.parameters()] for s in range(4)}
    ours = MuonGrokfast(model.parameters(), lr=0.05, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust,
                        grokfast=None, foreach=foreach)
    for s in range(4):
        for p, g in zip(model.parameters(), grads[s]):
            p.grad = g.clone()
        ours.step()
    muon_fp32_reference(twin, lambda s: zip(twin.parameters(), grads[s]), 4, 0.05, 0.1, 0.95, nesterov, adjust)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-4, atol=2e-5)


def test_muon_part_matches_torch_muon_to_bf16_tolerance():
    """torch.optim.Muon runs Newton-Schulz in bf16; forge keeps fp32: same steps to bf16 precision."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False))
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    ours = MuonGrokfast(model.parameters(), lr=0.02, weight_decay=0.01, grokfast=None)
    theirs = torch.optim.Muon(twin.parameters(), lr=0.02, weight_decay=0.01)
    for s in range(3):
        g = [torch.randn_like(p) for p in model.parameters()]
        for p, q, gi in zip(model.parameters(), twin.parameters(), g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours.step()
        theirs.step()
    for p, q, p0 in zip(model.parameters(), twin.parameters(), start.parameters()):
        moved = (p - p0).norm()
        assert (p - q).norm() < 0.03 * moved  # bf16 Newton-Schulz is ~1-2% off the fp32 one
        assert not torch.equal(p, q)  # and forge did not just run torch's bf16 arithmetic


def test_ns_dtype_bfloat16_runs_newton_schulz_in_bf16():
    """ns_dtype=bfloat16 (as torch.optim.Muon does it): within bf16 error of the fp32 steps, not equal to them."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(16, 32, bias=False), nn.Linear(32, 16, bias=False))
    start, half, full = (copy.deepcopy(model) for _ in range(3))
    opts = [MuonGrokfast(half.parameters(), grokfast=None, ns_dtype=torch.bfloat16),
            MuonGrokfast(full.parameters(), grokfast=None)]
    for _ in range(3):
        grads = [torch.randn_like(p) for p in model.parameters()]
        for m, opt in zip((half, full), opts):
            for p, g in zip(m.parameters(), grads):
                p.grad = g.clone()
            opt.step()
    for p, q, p0 in zip(half.parameters(), full.parameters(), start.parameters()):
        assert p.dtype == torch.float32
        assert 0 < (p - q).norm() < 0.03 * (q - p0).norm()
    with pytest.raises(ValueError, match="Invalid ns_dtype"):
        MuonGrokfast(model.parameters(), ns_dtype=torch.int8)


def test_grokfast_is_applied_before_the_update():
    """Grokfast on = the filter applied to the gradients, then the same optimizer with Grokfast off."""
    model = Net()
    twin = copy.deepcopy(model)
    on = MuonGrokfast(muon_param_groups(model), grokfast="ema", grokfast_alpha=0.9, grokfast_lamb=1.5)
    off = MuonGrokfast(muon_param_groups(twin), grokfast=None)
    emas = {}
    for s in range(3):
        x, y = batch(s)
        for m, opt in ((model, on), (twin, off)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten()).backward()
        for q in twin.parameters():
            ema = emas.setdefault(q, q.grad.clone())
            ema.mul_(0.9).add_(q.grad, alpha=0.1)
            q.grad.add_(ema, alpha=1.5)
        on.step()
        off.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_param_groups_by_module_type():
    model = Net()
    groups = {g["use_muon"]: set(g["param_names"]) for g in muon_param_groups(model)}
    assert groups[True] == {"conv.weight", "up.weight", "down.weight", "mid1.weight", "mid2.weight"}
    assert {"embed.weight", "head.weight", "norm.weight", "up.bias"} <= groups[False]
    opt = MuonGrokfast(muon_param_groups(model), lr=0.03, adamw_lr=1e-3)
    assert [g["lr"] for g in opt.param_groups] == [0.03, 1e-3]


def test_plain_parameter_list_is_split_by_dimension():
    model = nn.Linear(5, 4)
    opt = MuonGrokfast(model.parameters())
    assert [(g["use_muon"], len(g["params"])) for g in opt.param_groups] == [(True, 1), (False, 1)]


def test_lr_scheduler_drives_every_group():
    model = Net()
    opt = MuonGrokfast(muon_param_groups(model), lr=0.02, adamw_lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(model, opt, 1)
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 5e-4])
    assert opt.get_muon_lr() == pytest.approx(0.01)


@pytest.mark.parametrize("grokfast", ["ema", "ma", None])
def test_state_dict_resume_is_exact(grokfast, tmp_path):
    """Train 6 steps straight, or 3 steps, save, load into fresh objects, 3 more: identical parameters."""
    model = Net()
    start = copy.deepcopy(model.state_dict())
    opt = MuonGrokfast(muon_param_groups(model), grokfast=grokfast, grokfast_window=2)
    train(model, opt, 6)

    resumed = Net()
    resumed.load_state_dict(start)
    first = MuonGrokfast(muon_param_groups(resumed), grokfast=grokfast, grokfast_window=2)
    train(resumed, first, 3)
    torch.save({"model": resumed.state_dict(), "optim": first.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    fresh = Net()
    fresh.load_state_dict(ckpt["model"])
    second = MuonGrokfast(muon_param_groups(fresh), grokfast=grokfast, grokfast_window=2)
    second.load_state_dict(ckpt["optim"])
    train(fresh, second, 3, start=3)
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)


def test_nonfinite_gradient_raises_with_the_name_and_changes_nothing():
    model = Net()
    opt = MuonGrokfast(muon_param_groups(model))
    train(model, opt, 1)
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict())
    x, y = batch(9)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    model.mid1.weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="mid1.weight"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert str(opt.state_dict()) == str(state_before)


def test_skip_nonfinite_skips_the_step():
    model = Net()
    opt = MuonGrokfast(muon_param_groups(model), skip_nonfinite=True)
    before = copy.deepcopy(model.state_dict())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("inf"))
    opt.step()
    assert opt.skipped_steps == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("skip_nonfinite", [False, True])
def test_huge_finite_gradients_take_the_same_muon_step(skip_nonfinite):
    """Gradients above ~1e19 overflow the fused fp32 norm (it read "non-finite gradient in ;", or skipped the
    step) and Newton-Schulz's: they are finite, and Muon's step is scale-free, so it equals the unscaled one."""
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.Linear(8, 5, bias=False))
    scaled, start = copy.deepcopy(model), copy.deepcopy(model)
    opts = [MuonGrokfast(m.parameters(), skip_nonfinite=skip_nonfinite) for m in (model, scaled)]
    for step in range(2):
        for m, opt, factor in zip((model, scaled), opts, (1.0, 1e25)):
            opt.zero_grad()
            m(torch.randn(4, 6, generator=torch.Generator().manual_seed(step))).square().sum().backward()
            for p in m.parameters():
                p.grad.mul_(factor)
            opt.step()
    assert opts[1].skipped_steps == 0
    for p, q, p0 in zip(model.parameters(), scaled.parameters(), start.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4)
        assert (q - p0).abs().max() > 1e-2  # the steps were taken


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_zero_size_parameters_are_skipped():
    model = nn.Sequential(nn.Linear(4, 0), nn.Linear(0, 3), nn.Linear(3, 3))
    opt = MuonGrokfast(muon_param_groups(model), weight_decay=0.1)
    before = copy.deepcopy(model.state_dict())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"2.weight", "1.bias", "2.bias"}  # 1.bias has a gradient though its fan-in is empty
    assert all(p.numel() for p in opt.state)


@pytest.mark.parametrize("grokfast", ["ema", "ma"])
def test_state_dict_of_another_model_is_refused_at_load(grokfast):
    wide, narrow = Net(), Net()
    narrow.up, narrow.down = nn.Linear(12, 16), nn.Linear(16, 12, bias=False)
    saved = MuonGrokfast(muon_param_groups(wide), grokfast=grokfast)
    train(wide, saved, 1)
    opt = MuonGrokfast(muon_param_groups(narrow), grokfast=grokfast)
    with pytest.raises(ValueError, match=r"another model.*of up\.weight has shape \((100, )?20, 12\).*\(16, 12\)"):
        opt.load_state_dict(saved.state_dict())
    assert not opt.state
    train(narrow, opt, 1)  # nothing was loaded: the optimizer still works


def test_refused_parameters_are_named():
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] of shape \(3, 3\) is listed more than once"):
        w = nn.Linear(3, 3).weight
        MuonGrokfast([w, w])
    with pytest.raises(ValueError, match="got bias of shape"):
        MuonGrokfast([{"params": [("bias", nn.Linear(3, 3).bias)], "use_muon": True}])
    with pytest.raises(ValueError, match=r"non-leaf Tensor: param_groups\[0\]\['params'\]\[0\]"):
        MuonGrokfast([torch.randn(3, 3, requires_grad=True) * 2])


@pytest.mark.parametrize("kwargs, words", [
    (dict(lr=-1.0), "Invalid lr"),
    (dict(momentum=1.0), "Invalid momentum"),
    (dict(momentum=-0.1), "Invalid momentum"),
    (dict(ns_steps=0), "Invalid ns_steps"),
    (dict(ns_coefficients="fastest"), "Invalid coefficients"),
    (dict(adjust_lr_fn="sqrt"), "Invalid adjust_lr_fn"),
    (dict(adamw_betas=(0.9, 1.0)), "Invalid betas[1]"),
    (dict(grokfast="kalman"), "Invalid grokfast"),
    (dict(grokfast_alpha=1.5), "Invalid grokfast_alpha"),
    (dict(qk_clip_threshold=0.0), "Invalid qk_clip_threshold"),
    (dict(distributed="yes"), "Invalid distributed"),
])
def test_bad_hyperparameters(kwargs, words):
    with pytest.raises(ValueError) as info:
        MuonGrokfast(nn.Linear(3, 3).parameters(), **kwargs)
    assert words in str(info.value)


def test_distributed_true_needs_an_initialized_process_group():
    model = nn.Linear(4, 4)
    opt = MuonGrokfast(model.parameters(), distributed=True)
    model(torch.randn(2, 4)).sum().backward()
    with pytest.raises(RuntimeError, match="not initialized"):
        opt.step()


def test_parameter_listed_twice_is_an_error():
    layer = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="more than once"):
        MuonGrokfast([layer.weight, layer.weight])
    with pytest.raises(ValueError, match="more than once"):
        MuonGrokfast([{"params": [layer.weight]}, {"params": [layer.weight]}])


def test_use_muon_on_a_vector_is_an_error():
    with pytest.raises(ValueError, match="2 or more dimensions"):
        MuonGrokfast([{"params": [nn.Linear(3, 3).bias], "use_muon": True}])


def test_sparse_gradient_is_an_error():
    embed = nn.Embedding(10, 4, sparse=True)
    opt = MuonGrokfast([{"params": embed.parameters(), "use_muon": False}])
    embed(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_trains_a_model():
    torch.manual_seed(0)
    model = Net()
    opt = MuonGrokfast(muon_param_groups(model), lr=0.02, adamw_lr=3e-3, grokfast_lamb=0.5)
    x, y = batch(0)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("grokfast", ["ema", "ma"])
def test_gpu_steps_match_cpu_steps(grokfast, monkeypatch):
    """The GPU kernels (Triton Newton-Schulz, CUDA Grokfast) take the same steps as the CPU ones."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # full fp32 convolutions, like the CPU
    model = Net()
    gpu_model = copy.deepcopy(model).cuda()
    # fp32 Newton-Schulz on both (ns_dtype="auto" would take bf16 on the GPU): the kernels are what is compared
    cpu_opt = MuonGrokfast(muon_param_groups(model), grokfast=grokfast, grokfast_window=2, ns_dtype=torch.float32)
    gpu_opt = MuonGrokfast(muon_param_groups(gpu_model), grokfast=grokfast, grokfast_window=2, ns_dtype=torch.float32)
    for s in range(3):
        x, y = batch(s)
        for m, opt, dev in ((model, cpu_opt, "cpu"), (gpu_model, gpu_opt, "cuda")):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x.to(dev)).flatten(0, 1), y.to(dev).flatten()).backward()
            opt.step()
    for p, q in zip(model.parameters(), gpu_model.parameters()):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-3, atol=1e-4)
