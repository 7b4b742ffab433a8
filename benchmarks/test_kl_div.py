"""KL baking loss: kl_div_logits forward+backward at (4096, 32000) against the eager F.kl_div path, and
fused_linear_kl (rows 4096, hidden 1024, vocab 32000, shared head) against the unfused head + KL.

Besides the times, each implementation's peak memory during one forward+backward is measured once
(CPU: torch's allocation events via the profiler, forge.ops._memory; GPU: max_memory_allocated) and
reported at the end of the run against one rows x vocab logits tensor. Targets (issue 3): kl_div >= 2x
eager with peak extra memory <= 10% of one logits tensor besides the gradient; fused <= 1/4 of the
unfused peak at no loss of speed. On a GPU the inputs are bf16. FORGE_BENCH_QUICK=1 shrinks the shapes.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, QUICK, run_benchmark
from forge.bench import Case
from forge.ops import available_backends, fused_linear_kl, kl_div_logits
from forge.ops._dispatch import runs_on
from forge.ops._memory import peak_allocated_bytes

DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ROWS, VOCAB, HIDDEN = (512, 32000, 256) if QUICK else (4096, 32000, 1024)
_memory: dict[tuple[str, str], tuple[int, int]] = {}  # (case, impl) -> (peak bytes, one logits tensor's bytes)


def peak_bytes(fn) -> int:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        fn()
        torch.cuda.synchronize(DEVICE)
        return torch.cuda.max_memory_allocated(DEVICE) - base
    return peak_allocated_bytes(fn)


def forge_backends() -> list[str]:
    return [b for b in available_backends("kl_div_logits")
            if b != "torch" and runs_on(b, DEVICE) and (b != "triton" or DEVICE.type == "cuda")]


def eager_kl(s, t, temperature=1.0):
    """The plain path: log_softmax of both at T, then F.kl_div (what a training loop writes)."""
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                    reduction="batchmean")


def kl_case() -> Case:
    s = torch.randn(ROWS, VOCAB, device=DEVICE, dtype=DTYPE).requires_grad_()
    t = torch.randn(ROWS, VOCAB, device=DEVICE, dtype=DTYPE)

    def step(loss_fn):
        def run():
            loss_fn(s, t).backward()
            s.grad = None
        return run

    impls = {"eager F.kl_div": step(eager_kl)}
    for b in forge_backends():
        impls[f"forge.{b}"] = step(lambda a, c, b=b: kl_div_logits(a, c, backend=b))
    return Case("kl_div_logits", f"{ROWS}x{VOCAB}-{str(DTYPE)[6:]}", impls, "eager F.kl_div",
                info={"logits_bytes": s.numel() * s.element_size()})


def fused_case() -> Case:
    h = (torch.randn(ROWS, HIDDEN, device=DEVICE, dtype=DTYPE)).requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, device=DEVICE, dtype=DTYPE) * HIDDEN ** -0.5).requires_grad_()
    th = torch.randn(ROWS, HIDDEN, device=DEVICE, dtype=DTYPE)

    def step(loss_fn):
        def run():
            loss_fn().backward()
            h.grad = w.grad = None
        return run

    def unfused(kl):
        with torch.no_grad():
            teacher = th @ w.T
        return kl(h @ w.T, teacher)

    impls = {"unfused eager": step(lambda: unfused(eager_kl)),
             "unfused + forge kl_div": step(lambda: unfused(kl_div_logits))}
    for b in forge_backends():
        impls[f"forge fused ({b})"] = step(lambda b=b: fused_linear_kl(h, w, teacher_hidden=th, backend=b))
    return Case("fused_linear_kl", f"{ROWS}x{HIDDEN}x{VOCAB}-{str(DTYPE)[6:]}", impls, "unfused eager",
                info={"logits_bytes": ROWS * VOCAB * h.element_size()})


CASES = [kl_case(), fused_case()]
PARAMS = [pytest.param(case, impl, id=f"{case.op}-{case.name}-{impl}") for case in CASES for impl in case.impls]


@pytest.fixture(scope="module", autouse=True)
def memory_report(request):
    yield
    plugins = request.config.pluginmanager
    write = plugins.get_plugin("terminalreporter").write_line
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        write("")
        write(f"peak memory of one forward+backward, in logits tensors ({DEVICE}, {DTYPE}):")
        for (case, impl), (peak, logits) in _memory.items():
            write(f"  {case:<34} {impl:<26} {peak / logits:8.4f}  ({peak / 2**20:8.1f} MiB)")


@pytest.mark.parametrize("case, impl", PARAMS)
def test_kl_div(benchmark, record, case, impl):
    fn = case.impls[impl]
    fn()  # warm up (and first-touch the allocator) before measuring memory
    logits = case.info["logits_bytes"]
    peak = peak_bytes(fn)
    _memory[(f"{case.op} {case.name}", impl)] = (peak, logits)
    benchmark.group = f"{case.op} {case.name}"
    benchmark.extra_info.update(case.info, peak_bytes=peak, peak_in_logits=peak / logits)
    run_benchmark(benchmark, fn, DEVICE, rounds=3 if case.op == "fused_linear_kl" else 7)
    record(case, impl, benchmark)
