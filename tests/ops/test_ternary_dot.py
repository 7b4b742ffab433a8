"""The two inner loops of the CPU ternary GEMV (csrc/cpu/bitnet.cpp) against a plain count, whatever CPU runs the
suite: forge._C takes the hand-written AVX2 loop on CPUs without AVX-512 and the compiler's clones elsewhere, so
one machine exercises only one of them through the op. A small driver includes the kernel source, runs both on
random codes and activations (row lengths around the 32-byte vector width, and the extreme values) and prints them
beside a scalar count."""
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from forge.ops.precision import cpu_flags

ROOT = Path(__file__).resolve().parents[2]

DRIVER = r"""
#include "cpu/bitnet.cpp"
#include <cstdio>
#include <random>

int main() {
  std::mt19937 rng(7);
  for (int64_t kb : {1, 2, 31, 32, 33, 63, 64, 65, 100, 1024, 1027}) {
    for (int extreme = 0; extreme < 2; ++extreme) {
      std::vector<uint8_t> p(kb);
      std::vector<int8_t> x(4 * kb);
      for (auto& b : p) {
        b = 0;
        for (int i = 0; i < 4; ++i) b |= static_cast<uint8_t>((extreme ? 2 : rng() % 3) << (2 * i));
      }
      for (auto& v : x) v = static_cast<int8_t>(extreme ? -127 : static_cast<int>(rng() % 255) - 127);
      int64_t count = 0;
      for (int64_t j = 0; j < kb; ++j)
        for (int i = 0; i < 4; ++i) count += ((p[j] >> (2 * i)) & 3) * x[i * kb + j];
      std::printf("%lld %lld %d %d\n", static_cast<long long>(kb), static_cast<long long>(count),
                  forge::dot_packed_compiled(p.data(), x.data(), kb), forge::dot_packed_avx2(p.data(), x.data(), kb));
    }
  }
}
"""

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                                reason="needs g++ on x86-64")


def test_both_inner_loops_count_exactly(tmp_path):
    if "avx2" not in cpu_flags():
        pytest.skip("this CPU has no AVX2, so the hand-written loop cannot run here")
    source, binary = tmp_path / "driver.cpp", tmp_path / "driver"
    source.write_text(DRIVER)
    subprocess.run(["g++", "-std=c++17", "-O2", f"-I{ROOT / 'csrc'}", str(source), "-o", str(binary), "-pthread"],
                   check=True, capture_output=True, text=True)
    rows = [line.split() for line in subprocess.run([str(binary)], check=True, capture_output=True,
                                                    text=True).stdout.splitlines()]
    assert len(rows) == 22
    for kb, count, compiled, avx2 in rows:
        assert compiled == count and avx2 == count, f"row of {kb} bytes: {count} counted, {compiled}, {avx2}"
