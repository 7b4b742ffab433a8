"""Fuzz target: the calculator tool on any text (forge.data.calculator)."""
import atheris

with atheris.instrument_imports(include=["forge.data.calculator"]):
    from forge.data.calculator import MAX_MAGNITUDE, CalculatorError, calculate

from _harness import run


def check(data: bytes) -> None:
    text = atheris.FuzzedDataProvider(data).ConsumeUnicodeNoSurrogates(96)
    value = calculate(text)
    assert isinstance(value, int) and abs(value) <= MAX_MAGNITUDE, (text, value)


if __name__ == "__main__":
    run(check, (CalculatorError,))
