"""Kernel benchmark cases, shared by `forge bench` (a quick summary) and `benchmarks/` (pytest-benchmark).

Every case times forge against the op's plain-PyTorch reference and its peers on the same inputs in
the same process, and reports ratios (reference time / implementation time), never a bare time as a
verdict: this machine's absolute speed varies several-fold between runs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from forge.ops import (
    available_backends,
    grokfast_ema_,
    newton_schulz,
    newton_schulz_reference,
    seedlm_decode,
    seedlm_linear,
    seedlm_search,
    vq_decode,
    vq_linear,
)
from forge.ops import seedlm as seedlm_ops
from forge.ops._dispatch import runs_on


@dataclass
class Case:
    """One benchmark: named implementations of one op on one input; `reference` names the baseline."""

    op: str
    name: str
    impls: dict[str, Callable[[], object]]
    reference: str
    quality: Callable[[object], dict] | None = None  # numbers on the result (accuracy, orthogonality)
    bytes_moved: int | None = None  # minimum memory traffic of one call, for bandwidth figures
    info: dict = field(default_factory=dict)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_interleaved(impls: dict[str, Callable], device: torch.device, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each implementation, taking turns round by round, so that drift in the
    machine's speed (large on a shared 2-core VM) hits every implementation alike."""
    for fn in impls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {label: [] for label in impls}
    for _ in range(rounds):
        for label, fn in impls.items():
            samples[label].append(_time_once(fn, device))
    return samples


def fast_backends(op: str, device: torch.device) -> list[str]:
    """The backends of `op` other than the torch reference that run tensors on `device` here (Triton only on
    a GPU: on the CPU it would time the interpreter)."""
    return [b for b in available_backends(op) if b != "torch" and runs_on(b, device)
            and (b != "triton" or device.type == "cuda")]


# ---------------------------------------------------------------------------------------------
# Newton-Schulz
# ---------------------------------------------------------------------------------------------

def ns_quality(G: torch.Tensor) -> Callable[[torch.Tensor], dict]:
    """Relative error against float64 of the same iteration, and ||X X^T - I||_F / sqrt(m) (short side)."""
    expected = newton_schulz_reference(G.double(), 5)

    def measure(out: torch.Tensor) -> dict:
        X = out.double()
        X = X.mT if X.shape[-2] > X.shape[-1] else X
        eye = torch.eye(X.shape[-2], dtype=torch.float64, device=X.device)
        orth = ((X @ X.mT - eye).norm(dim=(-2, -1)) / X.shape[-2] ** 0.5).max().item()
        err = ((out.double() - expected).norm() / expected.norm()).item()
        return {"rel_err_vs_fp64": err, "orth_err": orth}

    return measure


def _torch_muon_ns(G: torch.Tensor) -> Callable:
    from torch.optim._muon import _zeropower_via_newtonschulz

    return lambda: _zeropower_via_newtonschulz(G, (3.4445, -4.7750, 2.0315), 5, 1e-7)


def newton_schulz_cases(device: torch.device, dtype: torch.dtype, shapes) -> list[Case]:
    cases = []
    fast = "triton" if device.type == "cuda" else "cpu"
    for shape in shapes:
        G = torch.randn(*shape, device=device, dtype=dtype)
        impls = {"reference": lambda G=G: newton_schulz_reference(G)}
        if len(shape) == 2:
            impls["torch.optim.Muon"] = _torch_muon_ns(G)
        if fast in available_backends("newton_schulz"):
            impls[f"forge.{fast}"] = lambda G=G: newton_schulz(G, backend=fast, check_finite=False)
        name = "x".join(map(str, shape)) + f"-{str(dtype).replace('torch.', '')}"
        cases.append(Case("newton_schulz", name, impls, "reference", ns_quality(G)))
    return cases


# ---------------------------------------------------------------------------------------------
# Grokfast
# ---------------------------------------------------------------------------------------------

def transformer_shapes(layers: int = 12, width: int = 768) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style block stack (no embeddings): 7.08M values a 768-wide layer."""
    per_layer = [(3 * width, width), (3 * width,), (width, width), (width,), (4 * width, width), (4 * width,),
                 (width, 4 * width), (width,), (width,), (width,), (width,), (width,)]
    return per_layer * layers


def published_ema(grads, emas, alpha=0.98, lamb=2.0):
    """ironjr/grokfast's per-tensor form: new tensors every step (5 kernels a tensor)."""
    for i in range(len(grads)):
        emas[i] = emas[i] * alpha + grads[i] * (1 - alpha)
        grads[i] = grads[i] + emas[i] * lamb


def foreach_ema(grads, emas, alpha=0.98, lamb=2.0):
    """kozistr/pytorch_optimizer's multi-tensor form: two foreach kernels over the list."""
    torch._foreach_lerp_(emas, grads, 1 - alpha)
    torch._foreach_add_(grads, emas, alpha=lamb)


def grokfast_case(device: torch.device, shapes, name: str) -> Case:
    """The EMA filter over a parameter list, against the published form, the foreach form, and two
    bandwidth probes that move exactly the filter's minimum bytes (16 per value: read g and ema,
    write both): a copy into another buffer, and an in-place scale (read-modify-write, like the filter)."""
    grads = [torch.randn(s, device=device) for s in shapes]
    emas = [torch.zeros_like(g) for g in grads]
    numel = sum(g.numel() for g in grads)
    impls = {"published eager": lambda: published_ema(grads, emas), "torch foreach": lambda: foreach_ema(grads, emas)}
    for backend in fast_backends("grokfast_ema", device):
        impls[f"forge.{backend}"] = lambda b=backend: grokfast_ema_(grads, emas, backend=b)
    src = torch.rand(2 * numel, device=device)
    dst = torch.empty_like(src)
    impls["probe: copy"] = lambda: dst.copy_(src)
    impls["probe: in-place"] = lambda: src.mul_(1.0)
    return Case("grokfast_ema", name, impls, "published eager", bytes_moved=16 * numel,
                info={"values": numel, "tensors": len(grads)})


# ---------------------------------------------------------------------------------------------
# Optimizer step
# ---------------------------------------------------------------------------------------------

def decoder_params(layers: int, width: int, vocab: int, device, dtype) -> tuple[list, list]:
    """(matrices, others) shaped like a decoder's parameters: q, k, v, o, two MLP matrices a layer;
    the embedding, norms and biases go to AdamW."""
    matrices = [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
    make = lambda s: torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02)
    mats = [make(s) for _ in range(layers) for s in matrices]
    others = [make((vocab, width))] + [make((width,)) for _ in range(3 * layers)]
    for p in mats + others:
        p.grad = torch.randn_like(p) * 1e-3
    return mats, others


class PlainMuonGrokfast:
    """The same algorithm written plainly: the published eager Grokfast loop, then torch.optim.Muon's
    per-parameter math (Newton-Schulz via `ns`, fp32 or torch's own bf16) and torch.optim.AdamW."""

    def __init__(self, mats, others, ns, lr=0.02, adamw_lr=3e-4):
        self.mats, self.params, self.ns, self.lr = mats, mats + others, ns, lr
        self.emas = [p.grad.clone() for p in self.params]
        self.bufs = [torch.zeros_like(p) for p in mats]
        self.adamw = torch.optim.AdamW(others, lr=adamw_lr, betas=(0.9, 0.95))

    @torch.no_grad()
    def step(self):
        grads = [p.grad for p in self.params]
        published_ema(grads, self.emas)
        for p, g in zip(self.params, grads):
            p.grad = g
        for p, buf in zip(self.mats, self.bufs):
            buf.lerp_(p.grad, 0.05)
            update = self.ns(p.grad.lerp(buf, 0.95))
            p.add_(update, alpha=-self.lr * max(1, p.shape[0] / p.shape[1]) ** 0.5)
        self.adamw.step()


def optimizer_case(device: torch.device, layers: int, width: int, dtype: torch.dtype) -> Case:
    from torch.optim._muon import _zeropower_via_newtonschulz

    from forge.optim import MuonGrokfast

    mats, others = decoder_params(layers, width, 4 * width, device, dtype)
    forge_opt = MuonGrokfast([{"params": mats, "use_muon": True}, {"params": others, "use_muon": False}],
                             adamw_betas=(0.9, 0.95))
    plain = PlainMuonGrokfast(mats, others, lambda u: newton_schulz_reference(u.float()).to(u.dtype))
    torch_muon = PlainMuonGrokfast(mats, others, lambda u: _zeropower_via_newtonschulz(u, (3.4445, -4.7750, 2.0315), 5, 1e-7).to(u.dtype))
    forge_bf16 = MuonGrokfast([{"params": mats, "use_muon": True}, {"params": others, "use_muon": False}],
                              adamw_betas=(0.9, 0.95), ns_dtype=torch.bfloat16)
    impls = {"plain (fp32 NS)": plain.step, "torch.optim.Muon math (bf16 NS)": torch_muon.step,
             "forge MuonGrokfast": forge_opt.step, "forge, ns_dtype=bf16": forge_bf16.step}
    reference = "plain (fp32 NS)" if dtype == torch.float32 else "torch.optim.Muon math (bf16 NS)"
    name = f"{layers}x{width}-{str(dtype).replace('torch.', '')}"
    return Case("optimizer_step", name, impls, reference, info={"values": sum(p.numel() for p in mats + others)})


# ---------------------------------------------------------------------------------------------
# Compression codecs (Phase 8): SeedLM and VQ
# ---------------------------------------------------------------------------------------------

SEEDLM_K, SEEDLM_C, SEEDLM_P = 16, 8, 3  # the paper's 4-bit setting


def error_against(expected: torch.Tensor) -> Callable[[torch.Tensor], dict]:
    """Relative Frobenius distance (float64) of a result to `expected`."""
    expected = expected.double()

    def measure(out: torch.Tensor) -> dict:
        return {"rel_err_vs_dense": ((out.double() - expected).norm() / expected.norm()).item()}

    return measure


def seedlm_search_case(device: torch.device, n_blocks: int, num_seeds: int | None) -> Case:
    """The seed search over Gaussian blocks against the torch reference search (precomputed pseudo-inverses,
    batched matmuls; it computes on the CPU whatever the blocks' device). Quality: the summed squared error
    of the chosen codes over the blocks' energy (the same for every backend)."""
    K, C, P = SEEDLM_K, SEEDLM_C, SEEDLM_P
    seeds = num_seeds or (1 << K) - 1
    blocks = torch.randn(n_blocks, C, device=device)
    seedlm_ops._search_tables(K, C, P, seeds)  # built once per (K, C, P, seeds), not timed
    impls = {"torch reference": lambda: seedlm_search(blocks, K, P, num_seeds, backend="torch")}
    for b in fast_backends("seedlm_search", device):
        impls[f"forge.{b}"] = lambda b=b: seedlm_search(blocks, K, P, num_seeds, backend=b)
    energy = blocks.double().square().sum().item()
    return Case("seedlm_search", f"{n_blocks}blk-{seeds}seeds", impls, "torch reference",
                lambda out: {"rel_sq_err": out[3].double().sum().item() / energy},
                info={"blocks": n_blocks, "seeds": seeds})


def seedlm_linear_case(device: torch.device, n: int, batch: int) -> Case:
    """y = x W^T for an n x n SeedLM weight (random valid codes: the time does not depend on their values)
    against decoding W with the torch reference then F.linear, and a dense F.linear on the decoded W."""
    K, C, P = SEEDLM_K, SEEDLM_C, SEEDLM_P
    n_blocks = -(-n * n // C)
    codes = (torch.randint(1, 1 << K, (n_blocks,), dtype=torch.int32, device=device),
             torch.randint(-8, 8, (n_blocks, P), dtype=torch.int8, device=device),
             torch.randint(-8, -3, (n_blocks,), dtype=torch.int8, device=device))
    x = torch.randn(batch, n, device=device)
    decoded = lambda: seedlm_ops.blocks_to_weight(seedlm_decode(*codes, K, C, backend="torch"), (n, n))
    w = decoded()
    impls = {"decode + F.linear": lambda: F.linear(x, decoded()), "dense F.linear": lambda: F.linear(x, w)}
    for b in fast_backends("seedlm_linear", device):
        impls[f"forge.{b}"] = lambda b=b: seedlm_linear(x, *codes, n, K, C, backend=b)
    info = {"dense_weight_bytes": n * n * 4, "code_bytes": n_blocks * (K + 4 + 4 * P) // 8}
    return Case("seedlm_linear", f"{n}x{n}-batch{batch}", impls, "decode + F.linear", error_against(F.linear(x, w)),
                info=info)


def vq_codes(n: int, device: torch.device, v: int = 8, k: int = 256, k_res: int = 16) -> dict:
    """Random VQ codes of an n x n weight: vectors of v, a k-entry codebook and a k_res-entry residual one."""
    groups = -(-n // v)
    return {"idx": torch.randint(0, k, (groups, n), dtype=torch.int32, device=device),
            "codebook": torch.randn(k, v, device=device) * 0.02, "scale": torch.rand(n, device=device) + 0.5,
            "res_idx": torch.randint(0, k_res, (groups, n), dtype=torch.int32, device=device),
            "res_codebook": torch.randn(k_res, v, device=device) * 0.002}


def vq_linear_case(device: torch.device, n: int, batch: int) -> Case:
    """y = x W^T for an n x n VQ weight against decoding W with the torch reference then F.linear, and a
    dense F.linear on the decoded W."""
    codes = vq_codes(n, device)
    x = torch.randn(batch, n, device=device)
    w = vq_decode(out_features=n, backend="torch", **codes)
    impls = {"decode + F.linear": lambda: F.linear(x, vq_decode(out_features=n, backend="torch", **codes)),
             "dense F.linear": lambda: F.linear(x, w)}
    for b in fast_backends("vq_linear", device):
        impls[f"forge.{b}"] = lambda b=b: vq_linear(x, out_features=n, backend=b, **codes)
    return Case("vq_linear", f"{n}x{n}-batch{batch}", impls, "decode + F.linear", error_against(F.linear(x, w)),
                info={"dense_weight_bytes": n * n * 4})


def codec_groups(device: torch.device, quick: bool) -> dict[str, Callable[[], list[Case]]]:
    """The codec cases by op, built when called. The SeedLM torch references gather their bases on the CPU
    (the search computes there too, whatever the device), so their sizes keep a reference call to seconds."""
    cuda = device.type == "cuda"
    n_seedlm, n_vq = (512, 512) if quick else (2048, 4096 if cuda else 2048)
    if quick:
        searches = [(256, 4096)]
    else:
        searches = [(4096, 4096), (128, None)] if cuda else [(1024, 4096), (32, None)]
    return {"seedlm_search": lambda: [seedlm_search_case(device, b, s) for b, s in searches],
            "seedlm_linear": lambda: [seedlm_linear_case(device, n_seedlm, batch) for batch in (1, 8)],
            "vq_linear": lambda: [vq_linear_case(device, n_vq, batch) for batch in (1, 8)]}


# ---------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------

def run_case(case: Case, device: torch.device, rounds: int) -> list[dict]:
    samples = time_interleaved(case.impls, device, rounds)
    medians = {label: statistics.median(v) for label, v in samples.items()}
    rows = []
    for label, fn in case.impls.items():
        row = {"op": case.op, "case": case.name, "impl": label, "median_ms": medians[label] * 1e3,
               "speedup_vs_ref": medians[case.reference] / medians[label], **case.info}
        if case.quality is not None:
            row.update(case.quality(fn()))
        if case.bytes_moved:
            row["GB_per_s"] = case.bytes_moved / medians[label] / 1e9
            if "probe: copy" in medians:
                row["pct_of_copy"] = 100 * medians["probe: copy"] / medians[label]
                row["pct_of_inplace"] = 100 * medians["probe: in-place"] / medians[label]
        rows.append(row)
    return rows


def case_groups(device: torch.device, quick: bool) -> dict[str, Callable[[], list[Case]]]:
    """Every case of `forge bench` by op, in running order; a group's tensors are made when it is called."""
    if device.type == "cuda":
        values = 1 << 24
        groups = {
            "newton_schulz": lambda: newton_schulz_cases(device, torch.bfloat16,
                                                         [(4096, 4096), (1024, 4096), (24, 768, 3072)]),
            "grokfast_ema": lambda: [grokfast_case(device, [(values,)] * (16 if quick else 60),
                                                   "2.7e8-values" if quick else "1e9-values")],
            "optimizer_step": lambda: [optimizer_case(device, 12, 768, torch.bfloat16)]}
    else:
        shapes = [(512, 512), (256, 1024)] if quick else [(1024, 1024), (1024, 4096), (12, 768, 768)]
        layers = 2 if quick else 12
        groups = {
            "newton_schulz": lambda: newton_schulz_cases(device, torch.float32, shapes),
            "grokfast_ema": lambda: [grokfast_case(device, transformer_shapes(layers), f"transformer-{layers}x768")],
            "optimizer_step": lambda: [optimizer_case(device, 2 if quick else 6, 128 if quick else 384,
                                                      torch.float32)]}
    return {**groups, **codec_groups(device, quick)}


def default_cases(device: torch.device, quick: bool, only: list[str] | None = None) -> list[Case]:
    """The cases of `forge bench`; `only`: just the ops whose names start with one of these (e.g. `seedlm`)."""
    groups = case_groups(device, quick)
    unknown = [name for name in only or () if not any(op.startswith(name) for op in groups)]
    if unknown:
        raise ValueError(f"no benchmarked op starts with {unknown}; the ops: {', '.join(groups)}")
    chosen = [op for op in groups if only is None or any(op.startswith(name) for name in only)]
    return [case for op in chosen for case in groups[op]()]


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'op':<14} {'case':<22} {'impl':<18} {'median ms':>10} {'vs ref':>7}  extra"]
    for r in rows:
        extra = []
        if "rel_err_vs_fp64" in r:
            extra.append(f"err {r['rel_err_vs_fp64']:.1e} orth {r['orth_err']:.3f}")
        if "rel_err_vs_dense" in r:
            extra.append(f"err vs dense {r['rel_err_vs_dense']:.1e}")
        if "rel_sq_err" in r:
            extra.append(f"rel sq err {r['rel_sq_err']:.4f}")
        if "GB_per_s" in r:
            extra.append(f"{r['GB_per_s']:.1f} GB/s" + (f" ({r['pct_of_copy']:.0f}% of copy, {r['pct_of_inplace']:.0f}% of in-place)" if "pct_of_copy" in r else ""))
        lines.append(f"{r['op']:<14} {r['case']:<22} {r['impl']:<18} {r['median_ms']:>10.2f} {r['speedup_vs_ref']:>6.2f}x  {'; '.join(extra)}")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    from forge.ops.precision import cpu_bf16_probe, cpu_model, vector_flags

    info = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu_model(), "cpu_flags": " ".join(vector_flags()), "cpu_bf16_fast": cpu_bf16_probe()["fast"],
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forge bench", description="Time forge's kernels against their references and peers.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds (about a minute on 2 cores)")
    parser.add_argument("--rounds", type=int, default=None, help="timed calls per implementation (median reported)")
    parser.add_argument("--json", default=None, help="also write the rows and machine info to this file")
    parser.add_argument("--only", default=None, metavar="OPS",
                        help="comma-separated op names or name prefixes (e.g. seedlm,vq_linear): only their cases; "
                             "a name that matches no op lists the ops")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rounds = args.rounds or (3 if args.quick else 9)
    only = [name.strip() for name in (args.only or "").split(",") if name.strip()] or None
    print(f"forge bench on {device}: {machine_info(device)}", flush=True)
    try:
        cases = default_cases(device, args.quick, only)
    except ValueError as err:
        parser.error(str(err))
    rows = []
    for case in cases:
        print(f"  running {case.op} {case.name} ({', '.join(case.impls)}) ...", flush=True)
        rows += run_case(case, device, rounds)
        print(format_rows(rows[-len(case.impls):]), flush=True)
    print("\nall cases:\n" + format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine_info(device), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
