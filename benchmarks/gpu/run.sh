#!/usr/bin/env bash
# One script for a GPU machine: install forge (the carried cp312 wheel in .whl/, else build it),
# run the GPU tests and the GPU benchmarks, and print a short table. Results go to $OUT (or ./gpu-out).
#   bash benchmarks/gpu/run.sh            # tests and kernel benchmarks
#   bash benchmarks/gpu/run.sh pipeline   # the test-size eight-phase run on the GPU (bf16 autocast), then
#                                         # `forge run` on the default config: each phase's wall time
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-$REPO/gpu-out}"
mkdir -p "$OUT"
SITE=/tmp/forge-site
export PYTHONUNBUFFERED=1

python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

WHEEL=$(ls "$REPO"/.whl/forge-*cp312*.whl 2>/dev/null | head -1)
if [ -z "$WHEEL" ]; then
  echo "no carried wheel: building (needs cmake, ninja, pybind11, scikit-build-core)"
  python3 -m pip wheel --no-build-isolation --no-deps -w /tmp/forge-wheel "$REPO" > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  WHEEL=$(ls /tmp/forge-wheel/forge-*.whl | head -1)
fi
python3 -m pip install -q --no-deps --no-index --target "$SITE" "$WHEEL" || exit 1
export PYTHONPATH="$SITE"
cd /tmp  # so that the repository's source folder does not shadow the installed package
python3 -c "import forge.ops as F, forge._native as N; print('backends', F.available_backends()); print('load errors', N.load_errors())"

if [ "${1:-}" = "pipeline" ]; then
  echo "== the test-size eight-phase run on CUDA (tests/pipeline/test_devices.py, marker gpu)"
  FORGE_TEST_GPU=1 timeout 400 python3 -m pytest "$REPO/tests/pipeline/test_devices.py" -m gpu -q -rs \
    -p no:cacheprovider --rootdir="$REPO" -o addopts="" 2>&1 | tail -25 | tee "$OUT/pipeline_tests_gpu.txt"
  echo "== forge run, default config, hardware.device=auto (the GPU), precision auto (bf16 autocast)"
  timeout "${PIPELINE_TIMEOUT:-540}" python3 -m forge run --set run_root=/tmp/forge-gpu-runs --set wandb.mode=disabled \
    > "$OUT/forge_run_gpu.txt" 2>&1
  echo "exit $?"
  grep -E "done in|final models|Error|error" "$OUT/forge_run_gpu.txt" | tail -20
  exit 0
fi

echo "== GPU tests"
FORGE_TEST_GPU=1 timeout 300 python3 -m pytest "$REPO/tests" -m gpu -q -p no:cacheprovider --rootdir="$REPO" \
  -o addopts="" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
echo "== Codec GPU tests (SeedLM, VQ: the triton and cuda backends against the references, one line each;"
echo "   also in the run above, whose tail may hide them)"
FORGE_TEST_GPU=1 timeout 300 python3 -m pytest "$REPO/tests/ops/test_seedlm.py" "$REPO/tests/ops/test_vq.py" -m gpu -v -rs \
  -p no:cacheprovider --rootdir="$REPO" -o addopts="" 2>&1 | tail -25 | tee "$OUT/gpu_tests_codecs.txt"

if [ -z "${SKIP_SWEEP:-}" ]; then
  echo "== Triton symmetric-product tile sweep"
  timeout 120 python3 "$REPO/benchmarks/gpu/sweep_ns.py" 2>&1 | tee "$OUT/sweep_ns.txt"
fi

echo "== GPU benchmarks (forge bench: Newton-Schulz, Grokfast, optimizer step, SeedLM search and linear, VQ linear)"
timeout 420 python3 -m forge.bench --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench_gpu.txt"

echo "== BitNet GPU benchmarks (bf16)"
timeout 300 python3 -m pytest "$REPO/benchmarks/test_bitnet.py" --benchmark-only -q -p no:cacheprovider \
  --rootdir="$REPO" -o addopts="" 2>&1 | tail -30 | tee "$OUT/bench_bitnet.txt"
echo "== KL baking loss benchmarks (bf16: kl_div_logits and fused_linear_kl, time and peak memory)"
timeout 300 python3 -m pytest "$REPO/benchmarks/test_kl_div.py" --benchmark-only -q -p no:cacheprovider \
  --rootdir="$REPO" -o addopts="" --benchmark-columns=median,rounds 2>&1 | tail -30 | tee "$OUT/bench_kl_gpu.txt"
echo "== Codec GPU benchmarks (SeedLM search and linear, VQ decode and linear: fused backends against the torch references)"
timeout 300 python3 -m pytest "$REPO/benchmarks/test_seedlm.py" "$REPO/benchmarks/test_vq.py" --benchmark-only -q \
  -p no:cacheprovider --rootdir="$REPO" -o addopts="" --benchmark-columns=median,rounds 2>&1 | tail -60 \
  | tee "$OUT/bench_codecs_gpu.txt"
