"""Compressed models that run from their codes: CodedLinear against the decoded weight in float64, the hyper-coded
VQ codec, and a coded Transformer saved as a checkpoint and rebuilt from its bytes alone."""
import math

import pytest
import torch
import torch.nn.functional as F

from forge.nn import build_model
from forge.nn.compress.coded import (
    CodedLinear,
    coded_layers,
    compressible_linears,
    set_module,
    write_codec_table,
)
from forge.nn.compress.formats import decode_codes, encode_codes, load_codes, save_codes
from forge.nn.compress.hyper import (
    HyperVQCodes,
    hyper_encode,
    hyper_vq,
    index_code,
    index_decode,
)
from forge.nn.compress.seedlm import seedlm_encode
from forge.nn.compress.vptq import hessian_from_inputs, vptq_quantize
from forge.pipeline.models import build_from_metadata
from forge.registry.checkpoint import load_checkpoint, save_checkpoint

SHAPES = [(1, 24), (24, 1), (17, 9), (40, 33)]


def _codes(kind: str, w: torch.Tensor):
    if kind == "seedlm":
        return seedlm_encode(w, C=8, P=3, K=8)
    if kind == "hyper":
        return hyper_encode(w, dims=2, bits=10)
    vq = vptq_quantize(w, hessian_from_inputs(torch.randn(64, w.shape[1])), v=4, k=8, k_res=4 if kind == "hvq" else 0)
    return hyper_vq(vq, dims=2, bits=10) if kind == "hvq" else vq


@pytest.mark.parametrize("kind", ["seedlm", "vq", "hvq", "hyper"])
@pytest.mark.parametrize("shape", SHAPES)
def test_coded_linear_is_x_times_the_decoded_weight(kind, shape):
    w = torch.randn(*shape)
    layer = CodedLinear.from_codes("w", _codes(kind, w), shape[1], shape[0])
    weight = layer.decoded_weight().double()
    for batch in ((1,), (3,), (2, 5)):
        x = torch.randn(*batch, shape[1] * 2)[..., ::2]            # a non-contiguous view
        assert torch.allclose(layer(x).double(), F.linear(x.double(), weight), rtol=1e-5, atol=1e-5)
    assert layer.stored_bytes() == sum(len(b) for b in encode_codes("w", layer.codes)[2].values())


@pytest.mark.parametrize("k", [5, 256, 300])
def test_index_coding_round_trips(k):
    idx = torch.randint(0, k, (7, 13), dtype=torch.int32)
    assert torch.equal(index_decode(index_code(idx, k), k, (7, 13)), idx)


def test_hyper_vq_keeps_indices_and_codes_the_codebooks(tmp_path):
    w = torch.randn(32, 16)
    vq = vptq_quantize(w, hessian_from_inputs(torch.randn(128, 16)), v=4, k=16, k_res=4)
    coded = hyper_vq(vq, dims=2, bits=12)
    assert torch.equal(coded.vq.idx, vq.idx) and torch.equal(coded.vq.res_idx, vq.res_idx)
    error = (coded.vq.codebook - vq.codebook).norm() / vq.codebook.norm()
    assert 0 < error < 0.1                                          # 12-bit points for pairs of values
    save_codes(tmp_path / "h.fgc", {"w": coded})
    back = load_codes(tmp_path / "h.fgc")["w"]
    assert isinstance(back, HyperVQCodes) and torch.equal(back.decode(), coded.decode())
    codec, params, sections = encode_codes("w", coded)
    assert codec == "hvq" and torch.equal(decode_codes(codec, params, sections).decode(), coded.decode())
    # the codebook sections are smaller than the float16 codebooks they replace
    assert len(sections["codebook"]) < vq.codebook.numel() * 2


def _coded_transformer():
    torch.manual_seed(0)
    model = build_model({"vocab_size": 30, "dim": 32, "n_layers": 2, "n_heads": 4, "max_len": 16}).eval()
    kinds = ["seedlm", "vq", "hvq", "hyper"]
    for i, (name, layer) in enumerate(compressible_linears(model, ["embed", "norm", "head"]).items()):
        w = layer.weight.detach()
        set_module(model, name, CodedLinear.from_codes(name, _codes(kinds[i % 4], w), w.shape[1], w.shape[0]))
    write_codec_table(model)
    return model


def test_a_coded_transformer_is_rebuilt_from_its_checkpoint_bytes(tmp_path):
    model = _coded_transformer()
    assert {type(m.codes).__name__ for m in coded_layers(model).values()} == {
        "SeedLMCodes", "VQCodes", "HyperVQCodes", "HyperCodes"}
    info = save_checkpoint(model.state_dict(), tmp_path / "m.safetensors", {"model_config": model.config.to_dict()})
    state, meta = load_checkpoint(info.path, expected_sha256=info.sha256)
    assert all(t.dtype == torch.uint8 for k, t in state.items() if "proj" in k)      # codes only: no float weight
    back = build_from_metadata(meta, state)
    back.load_state_dict(state, strict=True)
    for name, layer in coded_layers(model).items():
        assert torch.equal(coded_layers(back)[name].decoded_weight(), layer.decoded_weight())
    tokens = torch.randint(0, 30, (3, 16))
    assert torch.equal(back(tokens), model(tokens))
    # every byte is in the file: the float tensors kept whole, the codes, the codec table, the header
    stored = sum(t.numel() * t.element_size() for t in state.values())
    assert stored < info.size_bytes < stored + 8192
    floats = sum(p.numel() for p in model.parameters())
    assert floats == sum(t.numel() for k, t in state.items() if t.dtype == torch.float32)


def test_a_plain_checkpoint_builds_a_plain_model():
    model = build_model({"vocab_size": 30, "dim": 32, "n_layers": 1, "n_heads": 4, "max_len": 16})
    rebuilt = build_from_metadata({"model_config": model.config.to_dict()}, model.state_dict())
    assert not coded_layers(rebuilt) and math.isclose(sum(p.numel() for p in rebuilt.parameters()),
                                                      sum(p.numel() for p in model.parameters()))
