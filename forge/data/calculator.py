"""The calculator tool: integer expressions with + - * % and brackets, parsed by hand (never `eval`).

Grammar (the usual precedence, left-associative, Python's integer semantics: `%` takes the sign of the
divisor, so `(3-5)%97` is 95 as the modular task writes it):

    expression := term (("+" | "-") term)*
    term       := factor (("*" | "%") factor)*
    factor     := "-" factor | number | "(" expression ")"
    number     := digit+

Spaces are allowed between tokens. Everything else is refused with a `CalculatorError` (a ValueError) that
says what and where: names, attributes, `**`, `/`, floats, non-ASCII, unbalanced brackets, an empty input,
inputs longer than MAX_CHARS, numbers with more than MAX_DIGITS digits, nesting deeper than MAX_DEPTH, and
any intermediate value beyond MAX_MAGNITUDE in size (so no input can make the work or the memory grow).
"""
from __future__ import annotations

MAX_CHARS = 64           # longest expression accepted
MAX_DIGITS = 18          # longest number literal
MAX_MAGNITUDE = 10 ** 24  # largest |value| of any intermediate result
MAX_DEPTH = 16           # deepest nesting of brackets and unary minus


class CalculatorError(ValueError):
    """An expression the calculator refuses; the message names the problem and its position."""


def calculate(expression: str) -> int:
    """The integer value of `expression` (see the module's grammar), or CalculatorError."""
    if not isinstance(expression, str):
        raise CalculatorError(f"expected a str expression, got {type(expression).__name__}")
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression has {len(expression)} characters; at most {MAX_CHARS} are accepted")
    bad = next((i for i, ch in enumerate(expression) if ch not in "0123456789+-*%() "), None)
    if bad is not None:
        ch = expression[bad]
        what = "'**' (power) is not supported" if expression.startswith("**", bad) else f"unexpected {ch!r}"
        raise CalculatorError(f"{what} at position {bad}; only digits, + - * % ( ) and spaces are accepted")
    if "**" in expression.replace(" ", ""):
        raise CalculatorError("'**' (power) is not supported")
    parser = _Parser(expression)
    value = parser.expression(0)
    parser.skip_spaces()
    if parser.pos != len(expression):
        raise CalculatorError(f"unexpected {expression[parser.pos]!r} at position {parser.pos}"
                              + (" (unbalanced ')')" if expression[parser.pos] == ")" else ""))
    return value


def _checked(value: int) -> int:
    if abs(value) > MAX_MAGNITUDE:
        raise CalculatorError("a value exceeds the calculator's magnitude limit of 10^24")
    return value


class _Parser:
    """Recursive descent over the characters; `depth` bounds the recursion."""

    def __init__(self, text: str):
        self.text, self.pos = text, 0

    def skip_spaces(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == " ":
            self.pos += 1

    def peek(self) -> str:
        self.skip_spaces()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expression(self, depth: int) -> int:
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            op = self.text[self.pos]
            self.pos += 1
            right = self.term(depth)
            value = _checked(value + right if op == "+" else value - right)
        return value

    def term(self, depth: int) -> int:
        value = self.factor(depth)
        while self.peek() in ("*", "%"):
            op, at = self.text[self.pos], self.pos
            self.pos += 1
            right = self.factor(depth)
            if op == "%" and right == 0:
                raise CalculatorError(f"modulo by zero at position {at}")
            value = _checked(value * right if op == "*" else value % right)
        return value

    def factor(self, depth: int) -> int:
        if depth >= MAX_DEPTH:
            raise CalculatorError(f"nesting deeper than {MAX_DEPTH} at position {self.pos}")
        ch = self.peek()
        if ch == "-":
            self.pos += 1
            return -self.factor(depth + 1)
        if ch == "(":
            self.pos += 1
            value = self.expression(depth + 1)
            if self.peek() != ")":
                raise CalculatorError(f"unbalanced '(': expected ')' at position {self.pos}")
            self.pos += 1
            return value
        if ch.isdigit():
            return self.number()
        where = "end of input" if not ch else f"{ch!r} at position {self.pos}"
        raise CalculatorError(f"expected a number, '(' or '-' but found {where}")

    def number(self) -> int:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos].isdigit():
            self.pos += 1
        digits = self.text[start:self.pos]
        if len(digits) > MAX_DIGITS:
            raise CalculatorError(f"number at position {start} has {len(digits)} digits; at most {MAX_DIGITS}")
        return int(digits)
