"""The byte-counted codec files: every stage's file decodes to exactly the weights its codes decode to, the
bytes are the header plus the packed fields and nothing else; hyper-compression and its entropy coding."""
import math

import numpy as np
import pytest
import torch

from forge.nn.compress.formats import (
    bits_per_weight,
    decode_all,
    load_codes,
    save_codes,
)
from forge.nn.compress.hyper import (
    entropy_code,
    entropy_decode,
    hyper_encode,
    pack_bits,
    trajectory,
    unpack_bits,
)
from forge.nn.compress.seedlm import seedlm_encode
from forge.nn.compress.vptq import hessian_from_inputs, vptq_quantize


def header_bytes(path):
    with open(path, "rb") as f:
        data = f.read(8)
    return 8 + int.from_bytes(data[4:8], "little")


def test_bit_packing_round_trips_any_width():
    for width in (1, 3, 4, 10, 16, 21):
        values = np.random.randint(0, 1 << width, size=37).astype(np.uint64)
        data = pack_bits(values, width)
        assert len(data) == math.ceil(37 * width / 8)
        assert np.array_equal(unpack_bits(data, width, 37), values)


def test_seedlm_file_round_trip_and_byte_count(tmp_path):
    w = torch.randn(33, 20)                                    # 660 weights: the last block is padded
    codes = seedlm_encode(w, C=8, P=3, K=10)
    size = save_codes(tmp_path / "s.fgc", {"layer.weight": codes})
    back = load_codes(tmp_path / "s.fgc")["layer.weight"]
    assert torch.equal(back.decode(), codes.decode())
    n = codes.seeds.numel()
    assert size - header_bytes(tmp_path / "s.fgc") == math.ceil(n * 10 / 8) + math.ceil(n * 3 / 2) + math.ceil(n / 2)
    assert bits_per_weight(tmp_path / "s.fgc", w.numel()) == size * 8 / 660


def test_vq_file_round_trip_counts_codebooks(tmp_path):
    x, w = torch.randn(200, 24), torch.randn(18, 24)
    codes = vptq_quantize(w, hessian_from_inputs(x), v=4, k=16, k_res=8, iters=5)
    size = save_codes(tmp_path / "v.fgc", {"w": codes})
    back = load_codes(tmp_path / "v.fgc")["w"]
    assert torch.equal(back.decode(), codes.decode())
    groups = 5
    fields = math.ceil(groups * 24 * 4 / 8) + math.ceil(groups * 24 * 3 / 8) + 2 * (16 * 4 + 8 * 4 + 24)
    assert size - header_bytes(tmp_path / "v.fgc") == fields


def test_hyper_picks_the_nearest_trajectory_point():
    w = torch.randn(41, 3)                                     # 123 weights: one padded pair
    codes = hyper_encode(w, dims=2, bits=8)
    flat = torch.cat([w.double().reshape(-1), torch.zeros(1, dtype=torch.float64)]).reshape(-1, 2)
    points = flat / (2 * codes.scale) + 0.5
    d = ((points[:, None, :] - trajectory(torch.arange(256), 2)[None]) ** 2).sum(-1)
    chosen = d.gather(1, codes.indices[:, None])[:, 0]
    torch.testing.assert_close(chosen, d.min(dim=1).values, rtol=1e-9, atol=1e-12)
    assert codes.decode().shape == w.shape


def test_trajectory_is_dense_and_more_points_lower_the_error():
    w = torch.randn(32, 32)
    errors = [((hyper_encode(w, 2, bits).decode() - w).norm() / w.norm()).item() for bits in (6, 10, 14)]
    # 2^bits points spread over the unit square: spacing ~ 2^(-bits/2), so each 4 bits should about quarter it.
    assert errors[0] > 2.5 * errors[1] > 6 * errors[2] and errors[2] < 0.03


def test_hyper_file_round_trip_and_entropy_coding(tmp_path):
    w = torch.randn(96, 80)
    codes = hyper_encode(w, dims=2, bits=12)
    packed = len(pack_bits(codes.indices.numpy(), 12))
    coded = entropy_code(codes.indices, 12, 2)
    assert torch.equal(entropy_decode(coded, 12, 2, codes.indices.numel()), codes.indices)
    assert len(coded) < 0.95 * packed                          # Gaussian weights: uneven index use
    save_codes(tmp_path / "h.fgc", {"w": codes, "norm": torch.ones(80)})
    back = decode_all(load_codes(tmp_path / "h.fgc"))
    assert torch.equal(back["w"], codes.decode()) and torch.equal(back["norm"], torch.ones(80))


def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="tensors\\['x'\\]"):
        save_codes(tmp_path / "x.fgc", {"x": [1, 2]})
    (tmp_path / "bad.fgc").write_bytes(b"NOPE")
    with pytest.raises(ValueError, match="not a forge codec file"):
        load_codes(tmp_path / "bad.fgc")
    with pytest.raises(ValueError, match="dims"):
        hyper_encode(torch.randn(4), dims=0)
