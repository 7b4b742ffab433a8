"""Shared by the fuzz targets: run `check(data)` under atheris; an exception of the documented `allowed` types
is a refusal (fine), any other escapes and atheris reports it as a crash with its input."""
import sys
import tempfile
from pathlib import Path

import atheris

SCRATCH = Path(tempfile.mkdtemp(prefix="forge-fuzz-"))


def run(check, allowed: tuple[type[BaseException], ...]) -> None:
    def one_input(data: bytes) -> None:
        try:
            check(data)
        except allowed:
            pass
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
