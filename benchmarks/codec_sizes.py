"""Bits per weight (from file bytes) and relative errors of each Phase 8 codec on one sample layer:
256 x 256 Gaussian weights (std 0.02); the VPTQ Hessian from 2048 correlated Gaussian inputs.
`python benchmarks/codec_sizes.py` prints the markdown table in benchmarks/RESULTS.md ("Compression codecs")."""
import os
import tempfile
import time

import torch

from forge.nn.compress.formats import (
    bits_per_weight,
    decode_all,
    load_codes,
    save_codes,
)
from forge.nn.compress.hyper import hyper_encode
from forge.nn.compress.seedlm import seedlm_encode
from forge.nn.compress.vptq import hessian_from_inputs, vptq_quantize

torch.manual_seed(0)
out, inp = 256, 256
w = torch.randn(out, inp) * 0.02
mix = torch.randn(inp, inp) * 0.2 + torch.eye(inp)
x = torch.randn(2048, inp) @ mix
H = hessian_from_inputs(x)
d = tempfile.mkdtemp()
def report(name, codes):
    path = os.path.join(d, name + ".fgc")
    size = save_codes(path, {"w": codes})
    wh = decode_all(load_codes(path))["w"]
    rel = ((wh - w).norm() / w.norm()).item()
    orel = ((x @ (wh - w).T).norm() / (x @ w.T).norm()).item()
    print(f"| {name} | {size} | {bits_per_weight(path, w.numel()):.3f} | {rel:.4f} | {orel:.4f} |")
print("| codec | file bytes | bits/weight | rel. Frobenius error | rel. output error |")
print("|---|---|---|---|---|")
t = time.time(); report("SeedLM (C,P,K)=(8,3,16), all 65535 seeds", seedlm_encode(w, 8, 3, 16)); t1 = time.time() - t
report("SeedLM (12,4,16), all seeds", seedlm_encode(w, 12, 4, 16))
report("SeedLM (8,3,16), 256 seeds", seedlm_encode(w, 8, 3, 16, num_seeds=256))
report("VPTQ v=8 k=256 (GPTQ feedback)", vptq_quantize(w, H, v=8, k=256))
report("VPTQ v=8 k=256 + residual k=16", vptq_quantize(w, H, v=8, k=256, k_res=16))
report("VPTQ v=4 k=256", vptq_quantize(w, H, v=4, k=256))
report("hyper d=2, 12-bit index + lzma", hyper_encode(w, 2, 12))
report("hyper d=2, 16-bit index + lzma", hyper_encode(w, 2, 16))
report("float32 raw", w)
print("seedlm full search time for 65536 weights:", round(t1, 2), "s")
