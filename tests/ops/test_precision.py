"""ns_dtype="auto": the bf16 probe (real, and overridden by FORGE_CPU_BF16), and MuonGrokfast following its answer.
The rest of the suite runs with FORGE_CPU_BF16=0 (tests/conftest.py), so it compares fp32 steps on every CPU."""
import pytest
import torch
from torch import nn

from forge.ops import precision
from forge.optim import MuonGrokfast


@pytest.fixture
def probe_env(monkeypatch):
    """Set FORGE_CPU_BF16 (None: unset) for one test; the cached probe answer is dropped before and after."""
    def use(value):
        if value is None:
            monkeypatch.delenv(precision.ENV, raising=False)
        else:
            monkeypatch.setenv(precision.ENV, value)
        precision.cpu_bf16_probe.cache_clear()

    yield use
    precision.cpu_bf16_probe.cache_clear()


def test_the_real_probe_times_both_dtypes_and_decides_by_them(probe_env):
    probe_env(None)
    probe = precision.cpu_bf16_probe()
    assert probe["source"] == "probe" and probe["fp32_ms"] > 0 and probe["bf16_ms"] > 0
    assert probe["fast"] == (probe["bf16_ms"] < probe["fp32_ms"])
    assert precision.cpu_bf16_probe() is probe   # one probe per process
    line = precision.describe_cpu()
    assert f"bf16 matmul {'fast' if probe['fast'] else 'slow'}" in line and "ms" in line
    # AVX-512 BF16 or AMX present means native bf16 dot products; the probe should then find bf16 fast
    flags = precision.cpu_flags()
    if not flags & {"avx512_bf16", "amx_bf16"} and flags:
        assert not probe["fast"], probe   # emulated bf16 GEMMs are many times slower than fp32 ones


@pytest.mark.parametrize("value, dtype", [("1", torch.bfloat16), ("0", torch.float32)])
def test_auto_follows_the_answer_on_the_cpu_and_is_bf16_on_cuda(probe_env, value, dtype):
    probe_env(value)
    assert precision.cpu_bf16_probe()["source"] == f"FORGE_CPU_BF16={value}"
    assert precision.auto_ns_dtype(torch.device("cpu")) == dtype
    assert precision.auto_ns_dtype(torch.device("cuda")) == torch.bfloat16


def _steps(ns_dtype, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.Linear(24, 5))
    opt = MuonGrokfast([{"params": [model[0].weight, model[2].weight], "use_muon": True},
                        {"params": [model[0].bias, model[2].bias], "use_muon": False}], grokfast=None,
                       ns_dtype=ns_dtype)
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("value, forced", [("1", torch.bfloat16), ("0", torch.float32)])
def test_muon_grokfast_auto_steps_as_the_dtype_the_probe_picks(probe_env, value, forced):
    probe_env(value)
    auto, same, other = _steps("auto"), _steps(forced), _steps(torch.float32 if value == "1" else torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(auto, same))
    assert not all(torch.equal(a, b) for a, b in zip(auto, other))   # the choice is visible in the weights
    assert MuonGrokfast(nn.Linear(4, 4).parameters()).defaults["ns_dtype"] == "auto"
