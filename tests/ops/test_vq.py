"""VQ decode and the fused VQ linear layer against float64 and the reference: odd shapes, batch 1,
residual codebooks, poisoned outputs, non-contiguous inputs, bad input."""
import pytest
import torch
from conftest import cpu_backends, gpu_backends

from forge.ops import last_backend, vq_decode, vq_linear
from forge.ops import vq as V


def random_codes(out, inp, v, k, k_res):
    groups = -(-out // v)
    codes = {"idx": torch.randint(0, k, (groups, inp), dtype=torch.int32), "codebook": torch.randn(k, v),
             "scale": torch.rand(inp) + 0.5}
    if k_res:
        codes.update(res_idx=torch.randint(0, k_res, (groups, inp), dtype=torch.int32),
                     res_codebook=torch.randn(k_res, v) * 0.1)
    return codes


def decode_float64(out, idx, codebook, scale, res_idx=None, res_codebook=None):
    """W[g v + r, j] = scale[j] (C[idx[g, j]][r] + C_res[res_idx[g, j]][r]), element by element."""
    v = codebook.shape[1]
    w = torch.zeros(out, idx.shape[1], dtype=torch.float64)
    for g in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            vec = codebook[idx[g, j]].double()
            if res_idx is not None:
                vec = vec + res_codebook[res_idx[g, j]].double()
            rows = min(v, out - g * v)
            w[g * v:g * v + rows, j] = scale[j].double() * vec[:rows]
    return w


def interpreter_sized(backend, work, limit=512):
    """Triton's CPU interpreter runs every program in Python: only small cases there."""
    if backend == "triton" and work > limit:
        pytest.skip("Triton interpreter: small cases only")


def poison(monkeypatch):
    monkeypatch.setattr(V, "_new_output", lambda shape, dtype, device: torch.full(shape, float("nan")))


SHAPES = [(1, 5, 4, 16, 0), (13, 1, 4, 16, 8), (29, 33, 8, 256, 0), (64, 48, 8, 64, 16), (7, 9, 3, 5, 3)]


@pytest.mark.parametrize("backend", cpu_backends("vq_decode"))
@pytest.mark.parametrize("out, inp, v, k, k_res", SHAPES)
def test_decode_matches_float64(backend, out, inp, v, k, k_res, monkeypatch):
    interpreter_sized(backend, out * inp)
    poison(monkeypatch)
    codes = random_codes(out, inp, v, k, k_res)
    w = vq_decode(out_features=out, backend=backend, **codes)
    assert w.shape == (out, inp) and last_backend("vq_decode") == backend
    torch.testing.assert_close(w.double(), decode_float64(out, **codes), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("vq_linear"))
@pytest.mark.parametrize("x_lead", [(1,), (3,), (2, 5)], ids=str)
@pytest.mark.parametrize("out, inp, v, k, k_res", SHAPES)
def test_linear_matches_float64(backend, x_lead, out, inp, v, k, k_res, monkeypatch):
    interpreter_sized(backend, out * inp * int(torch.tensor(x_lead).prod()), 1000)
    poison(monkeypatch)
    codes = random_codes(out, inp, v, k, k_res)
    x = torch.randn(*x_lead, inp)
    y = vq_linear(x, out_features=out, backend=backend, **codes)
    assert y.shape == (*x_lead, out) and last_backend("vq_linear") == backend
    want = x.double() @ decode_float64(out, **codes).T
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend", cpu_backends("vq_linear"))
def test_linear_takes_non_contiguous_and_half_inputs(backend):
    codes = random_codes(10, 16, 4, 8, 4)
    codes["idx"] = codes["idx"].T.contiguous().T                 # non-contiguous indices
    x = torch.randn(16, 3).T
    ref = V.vq_linear_reference(x.contiguous(), out_features=10, **codes)
    torch.testing.assert_close(vq_linear(x, out_features=10, backend=backend, **codes), ref, rtol=1e-5, atol=1e-5)
    assert vq_linear(x.half(), out_features=10, backend=backend, **codes).dtype == torch.float16


@pytest.mark.parametrize("change, error, words", [
    (lambda c: c.update(idx=c["idx"].long()), TypeError, "idx must be"),
    (lambda c: c["idx"].__setitem__((0, 0), 16), ValueError, "idx holds indices outside"),
    (lambda c: c.update(res_codebook=None), ValueError, "come together"),
    (lambda c: c.update(scale=torch.ones(3)), ValueError, "scale must"),
    (lambda c: c.update(res_codebook=torch.randn(4, 5)), ValueError, "res_codebook vectors"),
    (lambda c: c.update(codebook=torch.randn(16, 65)), ValueError, "at most 64"),
])
def test_bad_input(change, error, words):
    codes = random_codes(8, 6, 4, 16, 4)
    change(codes)
    with pytest.raises(error, match=words):
        vq_decode(out_features=8, **codes)


def test_wrong_group_count_is_refused():
    with pytest.raises(ValueError, match="row groups"):
        vq_decode(out_features=9, **random_codes(4, 6, 4, 16, 0))


def test_opcheck():
    c = random_codes(9, 7, 4, 16, 4)
    args = (c["idx"], c["codebook"], c["scale"], 9, c["res_idx"], c["res_codebook"], "auto")
    torch.library.opcheck(torch.ops.forge.vq_decode.default, args)
    torch.library.opcheck(torch.ops.forge.vq_linear.default, (torch.randn(2, 7), *args))


@pytest.mark.parametrize("backend", gpu_backends("vq_linear"))
def test_gpu_backends_match_float64(backend):
    codes = random_codes(29, 33, 8, 64, 16)
    w = vq_decode(out_features=29, backend=backend, **{k: t.cuda() for k, t in codes.items()})
    torch.testing.assert_close(w.cpu().double(), decode_float64(29, **codes), rtol=1e-6, atol=1e-6)
    x = torch.randn(3, 33)
    y = vq_linear(x.cuda(), out_features=29, backend=backend, **{k: t.cuda() for k, t in codes.items()})
    torch.testing.assert_close(y.cpu().double(), x.double() @ decode_float64(29, **codes).T, rtol=1e-5, atol=1e-4)
