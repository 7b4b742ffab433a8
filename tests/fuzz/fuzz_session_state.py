"""Fuzz target: the session state / phase manifest reader (forge.pipeline.state.read_json) on any bytes."""
import atheris

with atheris.instrument_imports(include=["forge.pipeline.state"]):
    from forge.pipeline.state import read_json

from _harness import SCRATCH, run

PATH = SCRATCH / "session_state.json"


def check(data: bytes) -> None:
    PATH.write_bytes(data)
    result = read_json(PATH)
    assert isinstance(result, dict)


if __name__ == "__main__":
    run(check, (ValueError,))
