"""A build check: every C++ kernel loop that GCC vectorizes for AVX-512 (x86-64-v4) is vectorized for AVX2
(x86-64-v3) too, with the compile options CMakeLists.txt gives forge._C.

The kernels are built as target_clones (v4, v3, default); a loop the v3 clone leaves scalar runs several times
slower on a CPU without AVX-512 (kl_div.cpp without -fno-trapping-math: its conditional selects vectorized only
with AVX-512 masks). Each source is compiled once per level with the clones off (-DFORGE_NO_CLONES) and the
compiler's own report of the loops it vectorized is compared, line by line.
"""
import platform
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_SOURCES = ["bitnet.cpp", "grokfast.cpp", "kl_div.cpp", "newton_schulz.cpp", "seedlm.cpp", "vq.cpp"]

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("g++") is None,
                                reason="needs g++ on x86-64 (the clones are GCC target_clones)")


def _cmake_options(source: str) -> list[str]:
    """forge._C's target options plus the source's own COMPILE_OPTIONS, as CMakeLists.txt states them."""
    text = (ROOT / "CMakeLists.txt").read_text()
    options = re.search(r"target_compile_options\(_C PRIVATE ([^)]*)\)", text).group(1).split()
    for files, extra in re.findall(r"set_source_files_properties\(([^)]*?) PROPERTIES COMPILE_OPTIONS \"([^\"]*)\"\)", text):
        if f"csrc/cpu/{source}" in files.split():
            options += extra.split()
    return options


def vectorized_lines(source: str, arch: str, options: list[str] | None = None) -> set[int]:
    """Source lines of the loops GCC reports vectorized when `source` is compiled for `arch` (with the build's
    options unless `options` are given)."""
    options = _cmake_options(source) if options is None else options
    command = ["g++", "-std=c++17", f"-march={arch}", "-DFORGE_NO_CLONES", *options, f"-I{ROOT / 'csrc'}",
               "-fopt-info-vec-optimized", "-c", str(ROOT / "csrc" / "cpu" / source), "-o", "/dev/null"]
    report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    return {int(m) for m in re.findall(rf"{re.escape(source)}:(\d+):\d+: optimized: loop vectorized", report)}


def test_the_build_turns_off_trapping_math():
    assert "-fno-trapping-math" in _cmake_options("kl_div.cpp")


@pytest.mark.parametrize("source", CPU_SOURCES)
def test_the_avx2_clone_vectorizes_every_loop_the_avx512_clone_does(source):
    v3, v4 = vectorized_lines(source, "x86-64-v3"), vectorized_lines(source, "x86-64-v4")
    assert v4, f"{source}: no loop vectorized even for AVX-512"
    assert v4 <= v3, f"{source}: lines {sorted(v4 - v3)} are vectorized for AVX-512 only (scalar on AVX2 CPUs)"


def test_the_check_sees_the_difference_trapping_math_makes():
    """Without -fno-trapping-math GCC 12 leaves loops of kl_div.cpp scalar for AVX2: the check above must see
    that (it failed before the flag). A compiler that vectorizes them anyway makes this test moot, not wrong."""
    options = [o for o in _cmake_options("kl_div.cpp") if o != "-fno-trapping-math"]
    v3, v4 = (vectorized_lines("kl_div.cpp", arch, options) for arch in ("x86-64-v3", "x86-64-v4"))
    if v4 <= v3:
        pytest.skip("this compiler vectorizes kl_div.cpp's selects for AVX2 even with trapping math")
    assert v4 - v3


def marked_lines(source: str) -> set[int]:
    """Lines marked `// [simd]` in a source: hot loops that must vectorize (an omp simd loop is marked on its pragma,
    the line GCC reports)."""
    lines = (ROOT / "csrc" / "cpu" / source).read_text().splitlines()
    return {number for number, line in enumerate(lines, start=1) if "// [simd]" in line}


def test_bitnet_marks_its_per_value_loops():
    """The quantization passes' four per-value loops (abs sum, abs max, quantize, dequantize) are marked."""
    assert len(marked_lines("bitnet.cpp")) >= 4


@pytest.mark.parametrize("arch", ["x86-64-v3", "x86-64-v4"])
@pytest.mark.parametrize("source", CPU_SOURCES)
def test_the_marked_loops_vectorize(source, arch):
    """A loop scalar on both clones escapes the comparison above: bitnet.cpp's abs max (its `||` select) ran at
    4 ns a value on AVX2 and AVX-512 alike, 12x slower than now, until it was rewritten as an omp simd reduction."""
    missing = marked_lines(source) - vectorized_lines(source, arch)
    assert not missing, f"{source}: loops on lines {sorted(missing)} are not vectorized for {arch}"
