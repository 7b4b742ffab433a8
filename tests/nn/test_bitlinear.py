"""BitLinear: the paper's forward, STE training on a real task, packed inference, a 16x smaller checkpoint."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from forge.data import modular_arithmetic_split
from forge.nn import BitLinear, convert_to_bitlinear
from forge.nn.models import TinyDecoder
from forge.ops.bitnet import act_quant_int8_reference, ste_act_int8_reference, ternary_quant_reference
from forge.optim import MuonGrokfast, muon_param_groups


def paper_forward(layer: BitLinear, x: torch.Tensor) -> torch.Tensor:
    """The Training Tips note's BitLinear, in float64: RMSNorm, then absmax int8 x and absmean ternary W."""
    xd = x.double()
    h = xd * torch.rsqrt(xd.square().mean(-1, keepdim=True) + layer.norm.eps) * layer.norm.weight.double()
    xs = 127.0 / h.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    xq = (h * xs).round().clamp(-127, 127) / xs
    w = layer.weight.double()
    ws = 1.0 / w.abs().mean().clamp(min=1e-5)
    wq = (w * ws).round().clamp(-1, 1) / ws
    return xq @ wq.T


@pytest.mark.parametrize("shape", [(1, 37), (4, 5, 37)], ids=str)
def test_forward_matches_the_paper_in_float64(shape):
    layer = BitLinear(37, 11)
    x = torch.randn(shape)
    torch.testing.assert_close(layer(x).double(), paper_forward(layer, x), rtol=1e-4, atol=1e-4)


def test_weight_gradient_is_the_straight_through_one():
    """dL/dW equals dL/dWq (identity STE): grad_out^T . x_q, with x_q the quantized normalized input."""
    layer = BitLinear(20, 7)
    x, g = torch.randn(6, 20), torch.randn(6, 7)
    layer(x).backward(g)
    xq = ste_act_int8_reference(layer.norm(x)).detach()
    torch.testing.assert_close(layer.weight.grad, g.T @ xq, rtol=1e-5, atol=1e-5)


def modular_mlp(p: int, width: int = 128) -> nn.Module:
    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(p + 2, 32)
            self.body = nn.Sequential(nn.Linear(4 * 32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
            self.head = nn.Linear(width, p)

        def forward(self, tokens):
            return self.head(self.body(self.embed(tokens).flatten(1)))

    return MLP()


def train(model, opt, x, y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_bitlinear_mlp_learns_modular_addition():
    torch.manual_seed(0)
    train_x, train_y, _, _ = modular_arithmetic_split(p=23, op="add", train_fraction=0.5, seed=0)
    model = convert_to_bitlinear(modular_mlp(23))
    assert isinstance(model.body[0], BitLinear) and type(model.head) is nn.Linear
    losses = train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), train_x, train_y, 200)
    assert losses[-1] < 0.2 * losses[0]
    with torch.no_grad():
        assert (model(train_x).argmax(-1) == train_y).float().mean() > 0.9
        for m in model.modules():
            if isinstance(m, BitLinear):
                m.freeze()
        assert (model(train_x).argmax(-1) == train_y).float().mean() > 0.9  # packed inference keeps it


def test_muon_grokfast_ste_mode_trains_a_bitlinear_model():
    torch.manual_seed(0)
    train_x, train_y, _, _ = modular_arithmetic_split(p=23, op="add", train_fraction=0.5, seed=0)
    model = convert_to_bitlinear(modular_mlp(23))
    opt = MuonGrokfast(muon_param_groups(model), lr=0.02, adamw_lr=3e-3, ste_mode=True, grokfast_lamb=0.3)
    latent = model.body[2].weight.detach().clone()
    losses = train(model, opt, train_x, train_y, 150)
    assert losses[-1] < 0.3 * losses[0]
    assert not torch.equal(model.body[2].weight, latent) and model.body[2].weight.dtype == torch.float32


def test_converted_tiny_decoder_trains():
    torch.manual_seed(0)
    train_x, train_y, _, _ = modular_arithmetic_split(p=11, op="add", train_fraction=0.6, seed=0)
    model = convert_to_bitlinear(TinyDecoder(vocab=13, dim=32, n_layers=1, n_heads=2, max_len=4))
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["head"] == "Linear" and kinds["embed"] == "Embedding" and kinds["norm"] == "LayerNorm"
    assert kinds["blocks.0.mlp.0"] == "BitLinear" and kinds["blocks.0.attn.q_proj"] == "BitLinear"
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        opt.zero_grad()
        loss = F.cross_entropy(model(train_x)[:, -1, :11], train_y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("in_features", [37, 64], ids=["odd", "multiple-of-4"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_frozen_matches_the_dequantized_float_computation(in_features, per_channel):
    layer = BitLinear(in_features, 19, bias=True, per_channel=per_channel)
    nn.init.normal_(layer.bias)
    x = torch.randn(3, 5, in_features)
    with torch.no_grad():
        fake_quant = layer(x)
        h = layer.norm(x)
        q, scale = ternary_quant_reference(layer.weight, per_channel)
        wq = q.double() * scale.double().reshape(-1, 1)
        exact = h.double() @ wq.T + layer.bias.double()  # float activations: only the int8 rounding differs
        layer.freeze()
        frozen = layer(x)
    assert layer.frozen and "weight" not in dict(layer.named_parameters())
    torch.testing.assert_close(frozen, fake_quant, rtol=1e-4, atol=1e-4)
    _, xs = act_quant_int8_reference(h)
    bound = wq.abs().sum(1) * xs.double()[..., None] / 2  # |sum_k w_k e_k| with |e_k| <= s_x / 2
    assert ((frozen.double() - exact).abs() <= bound * 1.001 + 1e-5).all()


def test_frozen_checkpoint_is_16x_smaller_on_disk_and_reloads(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(BitLinear(1024, 512), nn.ReLU(), BitLinear(512, 255))
    x = torch.randn(4, 1024)
    save_file(model.state_dict(), tmp_path / "latent.safetensors")
    for m in model:
        if isinstance(m, BitLinear):
            m.freeze()
    with torch.no_grad():
        y = model(x)
    state = model.state_dict()
    assert state["0.packed_weight"].dtype == torch.uint8 and state["0.packed_weight"].shape == (512, 256)
    save_file(state, tmp_path / "frozen.safetensors")
    ratio = (tmp_path / "latent.safetensors").stat().st_size / (tmp_path / "frozen.safetensors").stat().st_size
    assert ratio > 14  # 2 bits vs 32 a weight; the norm gains and scales stay float32
    fresh = nn.Sequential(BitLinear(1024, 512).freeze(), nn.ReLU(), BitLinear(512, 255).freeze())
    fresh.load_state_dict(load_file(tmp_path / "frozen.safetensors"))
    with torch.no_grad():
        assert torch.equal(fresh(x), y)


def test_unfreeze_restores_trainable_dequantized_weights():
    layer = BitLinear(10, 6)
    q, scale = ternary_quant_reference(layer.weight.detach())
    layer.freeze().unfreeze()
    assert not layer.frozen and layer.weight.requires_grad
    torch.testing.assert_close(layer.weight, q.float() * scale)


def test_frozen_layer_refuses_gradients():
    layer = BitLinear(8, 4).freeze()
    with pytest.raises(RuntimeError, match="inference-only"):
        layer(torch.randn(2, 8))  # the norm's gain still requires grad
    with torch.no_grad():
        assert layer(torch.randn(2, 8)).shape == (2, 4)


@pytest.mark.parametrize("call, error, words", [
    (lambda: BitLinear(0, 4), ValueError, "Invalid in_features"),
    (lambda: BitLinear(4, 2.5), ValueError, "Invalid out_features"),
    (lambda: BitLinear(4, 2)(torch.randn(3, 5)), ValueError, "in_features=4"),
    (lambda: BitLinear(4, 2)(torch.ones(3, 4, dtype=torch.long)), TypeError, "x must have dtype"),
    (lambda: convert_to_bitlinear("model"), TypeError, "nn.Module"),
    (lambda: convert_to_bitlinear(nn.Linear(2, 2), skip="head"), TypeError, "tuple of module names"),
])
def test_bad_input(call, error, words):
    with pytest.raises(error, match=words):
        call()


def test_convert_skips_named_modules_and_keeps_weights():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(6, 8, bias=True))
    model.add_module("out", nn.Linear(8, 3))
    weight = model.proj.weight.detach().clone()
    convert_to_bitlinear(model, skip=("out",))
    assert isinstance(model.proj, BitLinear) and type(model.out) is nn.Linear
    assert torch.equal(model.proj.weight, weight) and model.proj.bias is not None
