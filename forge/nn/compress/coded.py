"""Compressed models that run from their codes: a Transformer whose Linear layers are `CodedLinear`s.

A CodedLinear keeps its codes' stored bytes (the sections of forge.nn.compress.formats) as uint8 buffers, so the
model's state_dict *is* the compressed file: seeds, mantissas, exponents, codebooks, scales and index streams, bit-
packed or entropy-coded, plus one `codec_table` buffer (the JSON naming each layer's codec and parameters) and the
float tensors kept whole (embeddings, norms, the head). A safetensors checkpoint of it counts every byte, and
`coded_model_from_state` rebuilds the model from those bytes alone. Its forward runs the fused kernels
(seedlm_linear, vq_linear: the weight is never materialized); codes without a fused linear (hyper codes of raw
weights) decode their weight once. Inference only.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from forge.nn.compress.formats import decode_codes, encode_codes

CODEC_TABLE = "codec_table"     # the state-dict key of the JSON table {layer: {"codec", "params", "sections"}}


class CodedLinear(nn.Module):
    """y = x W^T with W held as codes; `sections` (the stored bytes) are this module's buffers."""

    def __init__(self, codes, codec: str, params: dict, sections: dict[str, bytes], in_features: int,
                 out_features: int):
        super().__init__()
        self.codes, self.codec, self.params = codes, codec, params
        self.in_features, self.out_features = in_features, out_features
        self._weight = None
        for name, data in sections.items():
            self.register_buffer(name, torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else
                                 torch.zeros(0, dtype=torch.uint8))

    @classmethod
    def from_codes(cls, name: str, codes, in_features: int, out_features: int) -> CodedLinear:
        return cls.from_stored(*encode_codes(name, codes), in_features, out_features)

    @classmethod
    def from_stored(cls, codec: str, params: dict, sections: dict[str, bytes], in_features: int,
                    out_features: int) -> CodedLinear:
        """The layer of `encode_codes`'s (codec, params, sections): what its file holds."""
        return cls(decode_codes(codec, params, sections), codec, params, sections, in_features, out_features)

    def stored_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers())

    def decoded_weight(self) -> torch.Tensor:
        """W (out_features, in_features), float32."""
        if self._weight is None:
            self._weight = self.codes.decode().reshape(self.out_features, self.in_features)
        return self._weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.codes, "linear"):
            return self.codes.linear(x)
        return F.linear(x, self.decoded_weight().to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, codec={self.codec}, {self.stored_bytes()} bytes"


def coded_layers(model: nn.Module) -> dict[str, CodedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, CodedLinear)}


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def write_codec_table(model: nn.Module) -> None:
    """(Re)writes the model's `codec_table` buffer from its CodedLinear layers."""
    table = {name: {"codec": m.codec, "params": m.params, "in": m.in_features, "out": m.out_features,
                    "sections": [n for n, _ in m.named_buffers()]} for name, m in coded_layers(model).items()}
    data = json.dumps(table, sort_keys=True, separators=(",", ":")).encode()
    model.register_buffer(CODEC_TABLE, torch.frombuffer(bytearray(data), dtype=torch.uint8))


def is_coded_state(state_dict: dict) -> bool:
    return CODEC_TABLE in state_dict


def coded_model_from_state(model: nn.Module, state_dict: dict) -> nn.Module:
    """`model` (the uncompressed architecture, e.g. from build_model) with each layer of the state's codec table
    replaced by a CodedLinear decoded from the state's bytes; load the state_dict into it afterwards."""
    table = json.loads(bytes(state_dict[CODEC_TABLE].numpy().tobytes()).decode())
    for name, entry in table.items():
        sections = {s: state_dict[f"{name}.{s}"].numpy().tobytes() for s in entry["sections"]}
        codes = decode_codes(entry["codec"], entry["params"], sections)
        set_module(model, name, CodedLinear(codes, entry["codec"], entry["params"], sections, entry["in"],
                                            entry["out"]))
    write_codec_table(model)
    return model


def compressible_linears(model: nn.Module, preserve: list[str]) -> dict[str, nn.Module]:
    """The Linear and CodedLinear layers outside the `preserve` module names (e.g. embed, norm, head)."""
    keep = lambda name: any(part in preserve for part in name.split("."))
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, CodedLinear)) and not keep(name)}


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a Linear holds or a CodedLinear decodes to."""
    return module.decoded_weight() if isinstance(module, CodedLinear) else module.weight.detach().float()
