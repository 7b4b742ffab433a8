"""BitNet b1.58: the STE forward+backward against the paper's eager formula, and ternary_linear at batch 1
and 8 against a dense F.linear (fp32 on the CPU, bf16 on a GPU), on a 4096x4096 weight.

`python benchmarks/test_bitnet.py` prints the same cases timed interleaved (forge.bench.run_case).
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, QUICK, run_benchmark
from forge.bench import Case, format_rows, run_case
from forge.ops import available_backends, pack_ternary, ste_act_int8, ste_ternary, ternary_linear, ternary_quant
from forge.ops._dispatch import runs_on


def fast_backends(op: str, device: torch.device) -> list[str]:
    """The compiled backends that run on `device` (the interpreted Triton never counts on the CPU)."""
    return [b for b in available_backends(op) if b != "torch" and runs_on(b, device)
            and (b != "triton" or device.type == "cuda")]


def paper_ste(w: torch.Tensor, x: torch.Tensor):
    """The Training Tips note's code: per-tensor absmean weights, per-token absmax activations, STE by detach."""
    ws = 1.0 / w.abs().mean().clamp_(min=1e-5)
    wq = w + ((w * ws).round().clamp_(-1, 1) / ws - w).detach()
    xs = 127.0 / x.abs().max(dim=-1, keepdim=True).values.clamp_(min=1e-5)
    xq = x + ((x * xs).round().clamp_(-128, 127) / xs - x).detach()
    return wq, xq


def ste_case(device, dtype, n: int, tokens: int) -> Case:
    w = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)
    x = torch.randn(tokens, n, device=device, dtype=dtype, requires_grad=True)
    gw, gx = torch.randn_like(w), torch.randn_like(x)

    def step(quantize):
        torch.autograd.backward(list(quantize()), [gw, gx])
        w.grad = x.grad = None

    impls = {"eager formula": lambda: step(lambda: paper_ste(w, x))}
    for b in fast_backends("ste_ternary", device):
        impls[f"forge.{b}"] = lambda b=b: step(lambda: (ste_ternary(w, backend=b), ste_act_int8(x, backend=b)))
    name = f"ste-w{n}x{n}-x{tokens}x{n}-{str(dtype).replace('torch.', '')}"
    return Case("ste_fwd_bwd", name, impls, "eager formula")


def linear_case(device, dtype, n: int, batch: int) -> Case:
    w = torch.randn(n, n, device=device, dtype=dtype)
    q, scale = ternary_quant(w)
    packed = pack_ternary(q)
    x = torch.randn(batch, n, device=device, dtype=dtype)
    impls = {f"F.linear {str(dtype).replace('torch.', '')}": lambda: F.linear(x, w)}
    for b in fast_backends("ternary_linear", device):
        impls[f"forge.{b}"] = lambda b=b: ternary_linear(x, packed, scale, n, backend=b)
    info = {"dense_weight_bytes": w.numel() * w.element_size(), "packed_weight_bytes": packed.numel() + 4}
    return Case("ternary_linear", f"{n}x{n}-batch{batch}", impls, next(iter(impls)), info=info)


def bitnet_cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n, tokens = (1024, 256) if quick else (4096, 2048)
    return [ste_case(device, dtype, n, tokens), linear_case(device, dtype, n, 1), linear_case(device, dtype, n, 8)]


CASES = bitnet_cases(DEVICE, QUICK)
PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_bitnet(benchmark, record, case, impl):
    benchmark.group = f"{case.op} {case.name}"
    benchmark.extra_info.update(case.info)
    run_benchmark(benchmark, case.impls[impl], DEVICE, rounds=5 if case.op == "ste_fwd_bwd" else 20)
    record(case, impl, benchmark)


if __name__ == "__main__":
    rows = []
    for case in CASES:
        rows += run_case(case, DEVICE, rounds=7 if case.op == "ste_fwd_bwd" else 30)
        print(format_rows(rows[-len(case.impls):]), case.info, flush=True)
