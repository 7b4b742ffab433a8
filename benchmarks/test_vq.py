"""VQ: vq_linear at batch 1 and 8 (v = 8, k = 256, a 16-entry residual codebook) against decode-then-F.linear
with the torch reference and a dense F.linear; vq_decode against the reference.
`python benchmarks/test_vq.py` prints the same cases timed interleaved."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, QUICK, run_benchmark

from forge.bench import Case, format_rows, run_case
from forge.ops import available_backends, vq_decode, vq_linear
from forge.ops._dispatch import runs_on


def fast_backends(op: str, device: torch.device) -> list[str]:
    return [b for b in available_backends(op) if b != "torch" and runs_on(b, device)
            and (b != "triton" or device.type == "cuda")]


def random_codes(n: int, v: int = 8, k: int = 256, k_res: int = 16) -> dict:
    groups = n // v
    return {"idx": torch.randint(0, k, (groups, n), dtype=torch.int32), "codebook": torch.randn(k, v) * 0.02,
            "scale": torch.rand(n) + 0.5, "res_idx": torch.randint(0, k_res, (groups, n), dtype=torch.int32),
            "res_codebook": torch.randn(k_res, v) * 0.002}


def linear_case(n: int, batch: int) -> Case:
    codes = random_codes(n)
    x = torch.randn(batch, n)
    w = vq_decode(out_features=n, **codes)
    impls = {"decode + F.linear": lambda: F.linear(x, vq_decode(out_features=n, backend="torch", **codes)),
             "dense F.linear fp32": lambda: F.linear(x, w)}
    for b in fast_backends("vq_linear", DEVICE):
        impls[f"forge.{b}"] = lambda b=b: vq_linear(x, out_features=n, backend=b, **codes)
    return Case("vq_linear", f"{n}x{n}-batch{batch}", impls, "decode + F.linear", info={"dense_weight_bytes": n * n * 4})


def decode_case(n: int) -> Case:
    codes = random_codes(n)
    impls = {"torch reference": lambda: vq_decode(out_features=n, backend="torch", **codes)}
    for b in fast_backends("vq_decode", DEVICE):
        impls[f"forge.{b}"] = lambda b=b: vq_decode(out_features=n, backend=b, **codes)
    return Case("vq_decode", f"{n}x{n}", impls, "torch reference")


def vq_cases(quick: bool) -> list[Case]:
    n = 512 if quick else 2048
    return [decode_case(n), linear_case(n, 1), linear_case(n, 8)]


CASES = vq_cases(QUICK) if DEVICE.type == "cpu" else []
PARAMS = [pytest.param(case, impl, id=f"{case.name}-{impl}") for case in CASES for impl in case.impls]


@pytest.mark.parametrize("case, impl", PARAMS)
def test_vq(benchmark, record, case, impl):
    benchmark.group = f"{case.op} {case.name}"
    run_benchmark(benchmark, case.impls[impl], DEVICE, rounds=20)
    record(case, impl, benchmark)


if __name__ == "__main__":
    rows = []
    for case in CASES:
        rows += run_case(case, DEVICE, rounds=30)
        print(format_rows(rows[-len(case.impls):]), case.info, flush=True)
