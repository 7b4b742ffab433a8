"""The VPTQ encoder: weighted k-means against closed forms, GPTQ error feedback and the residual codebook
against their absence on a layer with correlated calibration inputs, and the codes' decode."""
import pytest
import torch

from forge.nn.compress.vptq import (
    hessian_from_inputs,
    nearest,
    vptq_quantize,
    weighted_kmeans,
)


def test_one_cluster_is_the_weighted_mean():
    x, w = torch.randn(50, 3), torch.rand(50)
    center = weighted_kmeans(x, w, 1, iters=3)
    torch.testing.assert_close(center[0].double(), (x.double() * w.double()[:, None]).sum(0) / w.double().sum(),
                               rtol=1e-6, atol=1e-6)


def test_kmeans_recovers_distinct_prototypes():
    protos = torch.randn(6, 4) * 5
    x = protos[torch.randint(0, 6, (300,))] + 1e-3 * torch.randn(300, 4)
    book = weighted_kmeans(x, torch.ones(300), 6, generator=torch.Generator().manual_seed(0))
    assert (x - book[nearest(x, book)]).abs().max() < 0.05


def test_weights_pull_the_codeword():
    """Two points, one codeword: the codeword sits at the weighted mean, near the heavy point."""
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    book = weighted_kmeans(x, torch.tensor([9.0, 1.0]), 1)
    torch.testing.assert_close(book[0], torch.tensor([0.1, 0.1]))


def test_hessian_is_two_x_transpose_x_over_n():
    x = torch.randn(4, 7, 5)
    flat = x.reshape(-1, 5).double()
    torch.testing.assert_close(hessian_from_inputs(x), 2 * flat.T @ flat / 28)


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator().manual_seed(0)
    inp, out = 48, 30                                          # 30 rows: the last vector group is partial
    mix = torch.randn(inp, inp, generator=g) * 0.3 + torch.eye(inp)
    x = (torch.randn(384, inp, generator=g) @ mix) * torch.linspace(0.2, 3, inp)
    return x, torch.randn(out, inp, generator=g)


def output_error(x, w, codes):
    w_hat = codes.decode(backend="torch")
    return ((x @ (w_hat - w).T).norm() / (x @ w.T).norm()).item()


def test_error_feedback_and_residual_codebook_lower_the_output_error(layer):
    x, w = layer
    h = hessian_from_inputs(x)
    plain = output_error(x, w, vptq_quantize(w, h, v=4, k=32, error_feedback=False))
    gptq = output_error(x, w, vptq_quantize(w, h, v=4, k=32))
    residual = output_error(x, w, vptq_quantize(w, h, v=4, k=32, k_res=16))
    assert gptq < 0.9 * plain and residual < 0.9 * gptq


def test_codes_have_the_vq_op_layout(layer):
    x, w = layer
    codes = vptq_quantize(w, hessian_from_inputs(x), v=4, k=16, k_res=4)
    assert codes.idx.shape == (8, 48) and codes.idx.dtype == torch.int32 and codes.res_idx.shape == (8, 48)
    assert codes.codebook.shape == (16, 4) and codes.res_codebook.shape == (4, 4) and codes.scale.shape == (48,)
    torch.testing.assert_close(codes.linear(x[:3], backend="torch"), x[:3] @ codes.decode().T, rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="hessian"):
        vptq_quantize(torch.randn(4, 6), torch.eye(5))
