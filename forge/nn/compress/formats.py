"""One byte-counted file format for every Phase 8 stage: bits per weight = file bytes * 8 / weights.

Layout: b"FGC1" | uint32 little-endian header length | header (UTF-8 JSON) | sections, back to back.
The header lists, per tensor, its codec parameters and its sections (name, offset, length); every stored number
is in a section, so nothing of the file goes uncounted:
- seedlm: seeds as K-bit fields, mantissas and exponents as 4-bit fields (two's complement), bit-packed;
- vq: indices (and residual indices) as ceil(log2 k)-bit fields, codebooks and scales as float16
  (the VPTQ encoder rounds them to float16 before its GPTQ loop, so the file holds exactly what was evaluated);
- hyper: the ergodic-trajectory indices through `hyper.entropy_code` (lzma); the scale as float32;
- hvq (Phase 8's hyper stage): a VQ weight whose codebooks are hyper codes (as above) and whose indices are
  bytes through lzma (`hyper.index_code`); the column scales float16;
- raw: float32 (tensors a stage keeps uncompressed: embeddings, norms, the head under preserve_layers).
`load_codes(save_codes(...))` gives back codes whose decode is bit-identical to the codes saved.
"""
from __future__ import annotations

import json
import math
import os
import struct

import numpy as np
import torch

from forge.nn.compress.hyper import (
    HyperCodes,
    HyperVQCodes,
    entropy_code,
    entropy_decode,
    index_code,
    index_decode,
    pack_bits,
    unpack_bits,
)
from forge.nn.compress.seedlm import SeedLMCodes
from forge.nn.compress.vptq import VQCodes

MAGIC = b"FGC1"


def _index_bits(k: int) -> int:
    return max(1, math.ceil(math.log2(k)))


def _signed4(t: torch.Tensor) -> np.ndarray:
    return (t.numpy().astype(np.int64).reshape(-1) & 0xF).astype(np.uint64)


def _from_signed4(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.int64)
    return np.where(v >= 8, v - 16, v).astype(np.int8)


def _half(t: torch.Tensor) -> bytes:
    return t.detach().to(torch.float16).numpy().tobytes()


def _encode_seedlm(c: SeedLMCodes):
    params = {"shape": list(c.shape), "K": c.K, "C": c.C, "P": c.P, "blocks": int(c.seeds.numel())}
    return params, {"seeds": pack_bits(c.seeds.numpy().astype(np.uint64), c.K),
                    "mantissas": pack_bits(_signed4(c.q), 4), "exponents": pack_bits(_signed4(c.e), 4)}


def _decode_seedlm(p, s) -> SeedLMCodes:
    n, P = p["blocks"], p["P"]
    seeds = torch.from_numpy(unpack_bits(s["seeds"], p["K"], n).astype(np.int32))
    q = torch.from_numpy(_from_signed4(unpack_bits(s["mantissas"], 4, n * P)).reshape(n, P))
    e = torch.from_numpy(_from_signed4(unpack_bits(s["exponents"], 4, n)))
    return SeedLMCodes(seeds, q, e, tuple(p["shape"]), p["K"], p["C"])


def _encode_vq(c: VQCodes):
    k, v = c.codebook.shape
    params = {"out": c.out_features, "in": int(c.idx.shape[1]), "k": k, "v": v,
              "k_res": 0 if c.res_codebook is None else int(c.res_codebook.shape[0])}
    sections = {"idx": pack_bits(c.idx.numpy().reshape(-1), _index_bits(k)), "codebook": _half(c.codebook),
                "scale": _half(c.scale)}
    if params["k_res"]:
        sections["res_idx"] = pack_bits(c.res_idx.numpy().reshape(-1), _index_bits(params["k_res"]))
        sections["res_codebook"] = _half(c.res_codebook)
    return params, sections


def _read_half(data: bytes, shape) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, dtype=np.float16).copy()).float().reshape(shape)


def _decode_vq(p, s) -> VQCodes:
    groups, inp, v = -(-p["out"] // p["v"]), p["in"], p["v"]
    idx = torch.from_numpy(unpack_bits(s["idx"], _index_bits(p["k"]), groups * inp).astype(np.int32))
    codes = VQCodes(idx.reshape(groups, inp), _read_half(s["codebook"], (p["k"], v)), _read_half(s["scale"], (inp,)),
                    p["out"])
    if p["k_res"]:
        res = unpack_bits(s["res_idx"], _index_bits(p["k_res"]), groups * inp).astype(np.int32)
        codes.res_idx = torch.from_numpy(res).reshape(groups, inp)
        codes.res_codebook = _read_half(s["res_codebook"], (p["k_res"], v))
    return codes


def _encode_hyper(c: HyperCodes):
    params = {"shape": list(c.shape), "dims": c.dims, "bits": c.bits, "groups": int(c.indices.numel())}
    return params, {"indices": entropy_code(c.indices, c.bits, c.dims), "scale": struct.pack("<f", c.scale)}


def _decode_hyper(p, s) -> HyperCodes:
    return HyperCodes(entropy_decode(s["indices"], p["bits"], p["dims"], p["groups"]), struct.unpack("<f", s["scale"])[0],
                      p["dims"], p["bits"], tuple(p["shape"]))


def _encode_hvq(c: HyperVQCodes):
    vq, (k, v) = c.vq, c.vq.codebook.shape
    params = {"out": vq.out_features, "in": int(vq.idx.shape[1]), "k": k, "v": v, "dims": c.codebook.dims,
              "bits": c.codebook.bits, "k_res": 0 if c.res_codebook is None else int(vq.res_codebook.shape[0])}
    sections = {"idx": index_code(vq.idx, k), "scale": _half(vq.scale)}
    for name, book in (("codebook", c.codebook), ("res_codebook", c.res_codebook)):
        if book is not None:
            sections[name] = entropy_code(book.indices, book.bits, book.dims)
            sections[f"{name}_scale"] = struct.pack("<f", book.scale)
    if params["k_res"]:
        sections["res_idx"] = index_code(vq.res_idx, params["k_res"])
    return params, sections


def _decode_hvq(p, s) -> HyperVQCodes:
    groups, inp, v = -(-p["out"] // p["v"]), p["in"], p["v"]
    books = {}
    for name, k in (("codebook", p["k"]), ("res_codebook", p["k_res"])):
        if k:
            indices = entropy_decode(s[name], p["bits"], p["dims"], -(-k * v // p["dims"]))
            books[name] = HyperCodes(indices, struct.unpack("<f", s[f"{name}_scale"])[0], p["dims"], p["bits"], (k, v))
    res = books.get("res_codebook")
    vq = VQCodes(index_decode(s["idx"], p["k"], (groups, inp)), books["codebook"].decode(),
                 _read_half(s["scale"], (inp,)), p["out"],
                 index_decode(s["res_idx"], p["k_res"], (groups, inp)) if res else None,
                 res.decode() if res else None)
    return HyperVQCodes(vq, books["codebook"], res)


def _encode_raw(t: torch.Tensor):
    return {"shape": list(t.shape)}, {"values": t.detach().float().contiguous().numpy().tobytes()}


def _decode_raw(p, s) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(s["values"], dtype=np.float32).copy()).reshape(p["shape"])


CODECS = {SeedLMCodes: ("seedlm", _encode_seedlm), VQCodes: ("vq", _encode_vq), HyperCodes: ("hyper", _encode_hyper),
          HyperVQCodes: ("hvq", _encode_hvq),
          torch.Tensor: ("raw", _encode_raw)}
DECODERS = {"seedlm": _decode_seedlm, "vq": _decode_vq, "hyper": _decode_hyper, "hvq": _decode_hvq,
            "raw": _decode_raw}


def encode_codes(name: str, codes) -> tuple[str, dict, dict[str, bytes]]:
    """(codec name, params, {section: bytes}) of one tensor's codes or float tensor."""
    kind = next((k for k in CODECS if isinstance(codes, k)), None)
    if kind is None:
        raise TypeError(f"tensors[{name!r}] must be {', '.join(k.__name__ for k in CODECS)}; "
                        f"got {type(codes).__name__}")
    codec, encode = CODECS[kind]
    params, sections = encode(codes)
    return codec, params, sections


def decode_codes(codec: str, params: dict, sections: dict[str, bytes]):
    """The codes (or float tensor) that `encode_codes` turned into (codec, params, sections)."""
    if codec not in DECODERS:
        raise ValueError(f"unknown codec {codec!r}; known: {sorted(DECODERS)}")
    return DECODERS[codec](params, sections)


def save_codes(path, tensors: dict) -> int:
    """Writes {name: codes or float tensor} to `path`; returns the file's size in bytes."""
    entries, blobs, offset = [], [], 0
    for name, codes in tensors.items():
        codec, params, sections = encode_codes(name, codes)
        table = []
        for section, data in sections.items():
            table.append([section, offset, len(data)])
            blobs.append(data)
            offset += len(data)
        entries.append({"name": name, "codec": codec, "params": params, "sections": table})
    header = json.dumps({"version": 1, "tensors": entries}, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs))
    return os.path.getsize(path)


def load_codes(path) -> dict:
    """{name: codes or float tensor} from a file written by `save_codes`."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != MAGIC:
        raise ValueError(f"{path} is not a forge codec file (magic {data[:4]!r}, expected {MAGIC!r})")
    (length,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8:8 + length])
    body = memoryview(data)[8 + length:]
    out = {}
    for entry in header["tensors"]:
        sections = {name: bytes(body[off:off + n]) for name, off, n in entry["sections"]}
        out[entry["name"]] = decode_codes(entry["codec"], entry["params"], sections)
    return out


def decode_all(codes: dict) -> dict:
    """{name: float32 weight} from loaded codes."""
    return {name: c if isinstance(c, torch.Tensor) else c.decode() for name, c in codes.items()}


def bits_per_weight(path, weights: int) -> float:
    """File bytes * 8 / weights: every header and section byte counted."""
    return os.path.getsize(path) * 8 / weights
