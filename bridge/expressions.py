"""Expressions of time for keyframed schedules: a small, safe arithmetic language and Deforum keyframe strings.

`Expression.parse("0.5 + 0.25*sin(t)")` reads a performer's formula with `ast.parse(mode="eval")` and walks
a whitelist (numbers, the variables t, beat, frame, bpm, the constants pi, e, tau, arithmetic, comparisons,
`a if c else b` and the functions in `FUNCTIONS`), refusing everything else with an ExpressionError that
names what and where. Nothing the user writes is ever passed to eval, exec or compile: the whitelisted
tree is turned once, at parse time, into a tree of Python closures over floats (constant parts folded), so
evaluating it per frame costs a few closure calls and never re-walks the syntax tree. Every number is a
float, so no expression can build a huge integer; text length, node count and nesting depth are bounded;
a result that is NaN or infinite, a division by zero or a math domain error is an ExpressionError at
evaluate time, never another exception.

`parse_keyframes("0:(0.4), 30:(0.6 + 0.1*sin(t))")` reads Deforum's keyframe strings into `Keyframes`:
positions with expressions, interpolated linearly between keyframes and held before the first and after
the last. This module knows nothing of parameters, clocks or the daemon.
"""
from __future__ import annotations

import ast
import bisect
import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

MAX_LENGTH = 1000  # characters of one expression
MAX_NODES = 400  # parts (numbers, names, operations, calls) of one expression
MAX_DEPTH = 64  # nesting of one expression: far beyond any formula, far below Python's recursion limit
MAX_ARGS = 16  # arguments of one call (min and max take any number)
MAX_KEYFRAMES = 1000  # keyframes of one keyframe string
MAX_KEYFRAMES_LENGTH = 200_000  # characters of one keyframe string

VARIABLES: tuple[str, ...] = ("t", "beat", "frame", "bpm")
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e, "tau": math.tau}


class ExpressionError(ValueError):
    """An expression refused when parsed (what is not allowed, and where) or a value it could not give
    when evaluated (division by zero, NaN, a math domain error); the message quotes the expression."""


# ---------------------------------------------------------------------------------------- functions
def _clamp(x: float, lo: float, hi: float) -> float:
    return lo if x < lo else hi if x > hi else x


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def _smoothstep(*args: float) -> float:
    """smoothstep(x): 3x^2 - 2x^3 of x clamped to 0..1; smoothstep(edge0, edge1, x) as GLSL has it."""
    if len(args) == 3:
        edge0, edge1, x = args
        if edge1 == edge0:
            raise ZeroDivisionError("smoothstep edges are equal")
        x = (x - edge0) / (edge1 - edge0)
    else:
        (x,) = args
    x = _clamp(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _fract(x: float) -> float:
    return x - math.floor(x)


def _sign(x: float) -> float:
    return 1.0 if x > 0 else -1.0 if x < 0 else 0.0


def _round(x: float, digits: float = 0.0) -> float:
    """Half away from zero (2.5 -> 3, -2.5 -> -3), as performers expect, not Python's half to even."""
    scale = 10.0 ** int(digits)
    return math.copysign(math.floor(abs(x) * scale + 0.5), x) / scale


def round_half_away(x: float) -> int:
    """`x` rounded to the nearest whole number, halves away from zero: how schedules round for ints."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


_MASK64 = (1 << 64) - 1


def _lattice(i: int, seed: int) -> float:
    """A fixed pseudo-random value in -1..1 for the whole number i (splitmix64's finaliser)."""
    z = (i * 0x9E3779B97F4A7C15 + seed * 0xD1B54A32D192ED69 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return (z >> 11) * (2.0 / (1 << 53)) - 1.0


def _noise(x: float, seed: float = 0.0) -> float:
    """Smooth 1-D value noise in -1..1: random values at whole x, eased between (quintic, so the slope is
    continuous too). The same x and seed give the same value in every run; another seed, another curve."""
    i = math.floor(x)
    f = x - i
    s = int(seed) & _MASK64
    a, b = _lattice(i & _MASK64, s), _lattice((i + 1) & _MASK64, s)
    u = f * f * f * (f * (f * 6.0 - 15.0) + 10.0)
    return a + (b - a) * u


def _saw(x: float) -> float:
    return _fract(x)


def _triangle(x: float) -> float:
    return 1.0 - abs(2.0 * _fract(x) - 1.0)


def _square(x: float, duty: float = 0.5) -> float:
    return 1.0 if _fract(x) < duty else 0.0


def _pulse(x: float, width: float = 0.25) -> float:
    if width <= 0:
        raise ValueError("pulse width must be above 0")
    return max(0.0, 1.0 - _fract(x) / width)


def _minimum(*args: float) -> float:
    return min(args)


def _maximum(*args: float) -> float:
    return max(args)


def _log(x: float, base: float | None = None) -> float:
    return math.log(x) if base is None else math.log(x, base)


@dataclass(frozen=True)
class Function:
    """One function expressions may call: the Python callable, how many arguments it takes, its doc."""

    call: Callable[..., float]
    min_args: int
    max_args: int
    doc: str


FUNCTIONS: dict[str, Function] = {
    "sin": Function(math.sin, 1, 1, "sine of x radians, -1..1"),
    "cos": Function(math.cos, 1, 1, "cosine of x radians, -1..1"),
    "tan": Function(math.tan, 1, 1, "tangent of x radians"),
    "asin": Function(math.asin, 1, 1, "arc sine (x in -1..1), radians"),
    "acos": Function(math.acos, 1, 1, "arc cosine (x in -1..1), radians"),
    "atan": Function(math.atan, 1, 1, "arc tangent, radians"),
    "atan2": Function(math.atan2, 2, 2, "atan2(y, x): the angle of the point (x, y), radians"),
    "sqrt": Function(math.sqrt, 1, 1, "square root (x at least 0)"),
    "exp": Function(math.exp, 1, 1, "e to the power x"),
    "log": Function(_log, 1, 2, "log(x): natural logarithm; log(x, base)"),
    "log10": Function(math.log10, 1, 1, "base-10 logarithm"),
    "abs": Function(abs, 1, 1, "absolute value"),
    "min": Function(_minimum, 2, MAX_ARGS, "the smallest of its arguments"),
    "max": Function(_maximum, 2, MAX_ARGS, "the largest of its arguments"),
    "floor": Function(math.floor, 1, 1, "the whole number at or below x"),
    "ceil": Function(math.ceil, 1, 1, "the whole number at or above x"),
    "round": Function(_round, 1, 2, "round(x): nearest whole number, halves away from zero; round(x, digits)"),
    "clamp": Function(_clamp, 3, 3, "clamp(x, lo, hi): x kept within lo..hi"),
    "lerp": Function(_lerp, 3, 3, "lerp(a, b, t): a + (b - a)*t, a at t=0, b at t=1"),
    "smoothstep": Function(_smoothstep, 1, 3, "smoothstep(x): 0..1 S-curve of x clamped to 0..1; "
                           "smoothstep(edge0, edge1, x) as in GLSL"),
    "fract": Function(_fract, 1, 1, "fractional part, x - floor(x), 0..1"),
    "sign": Function(_sign, 1, 1, "-1, 0 or 1"),
    "noise": Function(_noise, 1, 2, "noise(x): smooth value noise in -1..1, a new random value at each whole "
                      "x, the same in every run; noise(x, seed) another curve per whole-number seed"),
    "saw": Function(_saw, 1, 1, "saw(phase): ramp 0..1 once per whole phase (same as fract)"),
    "triangle": Function(_triangle, 1, 1, "triangle(phase): 0 up to 1 at half a phase, back to 0"),
    "square": Function(_square, 1, 2, "square(phase): 1 for the first half of each phase, then 0; "
                       "square(phase, duty) 1 for that fraction"),
    "pulse": Function(_pulse, 1, 2, "pulse(phase): 1 at each whole phase, fading linearly to 0 over a quarter "
                      "of it (a flash on every beat with pulse(beat)); pulse(phase, width) fades over width"),
}

_BINARY: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: math.pow,
}
_BINARY_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
                  ast.Pow: "**"}
_COMPARE: dict[type, Callable[[float, float], bool]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}

# What a refused node is, in the words of the error message.
_REFUSED_NAMES: dict[type, str] = {
    ast.Attribute: "attribute access (.name)", ast.Subscript: "subscripts ([...])", ast.Lambda: "lambda",
    ast.ListComp: "comprehensions", ast.SetComp: "comprehensions", ast.DictComp: "comprehensions",
    ast.GeneratorExp: "generator expressions", ast.List: "lists", ast.Tuple: "tuples", ast.Set: "sets",
    ast.Dict: "dicts", ast.Starred: "starred arguments (*x)", ast.NamedExpr: "assignment (:=)",
    ast.JoinedStr: "strings", ast.FormattedValue: "strings", ast.Await: "await", ast.Yield: "yield",
    ast.YieldFrom: "yield", ast.Slice: "slices",
}

Evaluator = Callable[[Mapping[str, float]], float]


class _Refused(Exception):
    """Internal: what was refused and the node where, turned into an ExpressionError with the text."""

    def __init__(self, what: str, node: ast.AST | None = None):
        super().__init__(what)
        self.what = what
        self.node = node


# ---------------------------------------------------------------------------------------- expression
class Expression:
    """A parsed, whitelisted formula of the variables t, beat, frame and bpm.

    `Expression.parse(text)` or ExpressionError; `expression.evaluate(variables)` gives a finite float or
    raises ExpressionError. Immutable and safe to share between threads.
    """

    __slots__ = ("text", "names", "constant", "_evaluate")

    def __init__(self, text: str, evaluate: Evaluator, names: frozenset[str], constant: float | None):
        self.text = text
        self.names = names  # the variables it reads
        self.constant = constant  # its value when it reads no variable (folded at parse time), else None
        self._evaluate = evaluate

    @classmethod
    def parse(cls, text: Any, variables: tuple[str, ...] = VARIABLES) -> "Expression":
        """The expression `text` (a number also passes), or ExpressionError naming what is refused and where.
        `variables` are the names it may read besides the constants pi, e and tau."""
        if isinstance(text, bool) or not isinstance(text, (str, int, float)):
            raise ExpressionError(f"an expression is a number or text, got {type(text).__name__}")
        if not isinstance(text, str):
            return cls.number(text)
        if len(text) > MAX_LENGTH:
            raise ExpressionError(f"expression of {len(text)} characters; at most {MAX_LENGTH}")
        source = text.strip()
        if not source:
            raise ExpressionError("empty expression")
        try:
            tree = ast.parse(source, mode="eval")
        except SyntaxError as e:
            where = f" at column {e.offset}" if e.offset else ""
            raise ExpressionError(f"{_quote(source)}: {e.msg}{where}") from None
        except (ValueError, MemoryError, RecursionError, OverflowError) as e:  # null bytes, absurd nesting
            raise ExpressionError(f"{_quote(source)}: cannot be read ({type(e).__name__})") from None
        count = 0
        for node in ast.walk(tree):  # iterative: safe on any depth the parser produced
            count += isinstance(node, ast.expr)
            if count > MAX_NODES:
                raise ExpressionError(f"{_quote(source)}: more than {MAX_NODES} parts; simplify it")
        compiler = _Compiler(frozenset(variables))
        try:
            evaluate, constant = compiler.compile(tree.body, 0)
        except _Refused as e:
            column = getattr(e.node, "col_offset", None)
            where = f" at column {column + 1}" if column is not None else ""
            raise ExpressionError(f"{_quote(source)}: {e.what}{where}") from None
        return cls(source, evaluate, frozenset(compiler.names), constant)

    @classmethod
    def number(cls, value: float) -> "Expression":
        """A constant: `value` whatever the time."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ExpressionError(f"expected a number, got {type(value).__name__}")
        try:
            number = float(value)
        except OverflowError:
            raise ExpressionError(f"{value!r:.40} is too large") from None
        if not math.isfinite(number):
            raise ExpressionError(f"{number} is not a finite number")
        return cls(repr(value), lambda variables: number, frozenset(), number)

    def evaluate(self, variables: Mapping[str, float]) -> float:
        """The value for these variables (t, beat, frame, bpm: floats): a finite float, or ExpressionError
        for a division by zero, a math domain error, an overflow or a NaN/infinite result."""
        try:
            value = self._evaluate(variables)
        except ZeroDivisionError:
            raise ExpressionError(f"{_quote(self.text)}: division by zero") from None
        except OverflowError:
            raise ExpressionError(f"{_quote(self.text)}: a number grew too large") from None
        except KeyError as e:
            raise ExpressionError(f"{_quote(self.text)}: no value for {e.args[0]}") from None
        except (ValueError, TypeError, ArithmeticError) as e:  # math domain errors: sqrt(-1), log(0), ...
            raise ExpressionError(f"{_quote(self.text)}: {e}") from None
        if not math.isfinite(value):
            raise ExpressionError(f"{_quote(self.text)}: the result is {value}, not a finite number")
        return value

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def _quote(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


class _Compiler:
    """Turns a whitelisted syntax tree into closures over floats; refuses everything else."""

    def __init__(self, variables: frozenset[str]):
        self.variables = variables
        self.names: set[str] = set()

    def compile(self, node: ast.AST, depth: int) -> tuple[Evaluator, float | None]:
        """(closure, constant value or None). Constant subtrees are evaluated now: `9**9**9` or `1/0` is
        refused when parsed, and a constant costs nothing per frame."""
        if depth > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} deep; simplify it", node)
        evaluate, constant = self._compile(node, depth + 1)
        if constant is None:
            return evaluate, None
        return (lambda variables: constant), constant

    def _fold(self, node: ast.AST, evaluate: Evaluator) -> tuple[Evaluator, float | None]:
        try:
            value = evaluate({})
        except ZeroDivisionError:
            raise _Refused("division by zero", node) from None
        except OverflowError:
            raise _Refused("a number too large to compute", node) from None
        except (ValueError, TypeError, ArithmeticError) as e:
            raise _Refused(str(e), node) from None
        if not math.isfinite(value):
            raise _Refused(f"a result of {value}", node)
        return evaluate, value

    def _compile(self, node: ast.AST, depth: int) -> tuple[Evaluator, float | None]:
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if isinstance(value, (str, bytes)):
                    raise _Refused("strings are not allowed", node)
                raise _Refused(f"the constant {str(value)[:20]} is not allowed", node)
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):  # 1e999 reads as infinity
                raise _Refused("a number too large to compute", node)
            return (lambda variables: number), number
        if isinstance(node, ast.Name):
            if node.id in CONSTANTS:
                number = CONSTANTS[node.id]
                return (lambda variables: number), number
            if node.id not in self.variables:
                known = ", ".join(sorted(self.variables) + sorted(CONSTANTS))
                raise _Refused(f"unknown name {node.id!r} (names are {known}; functions must be called)", node)
            self.names.add(node.id)
            name = node.id
            return (lambda variables: variables[name]), None
        if isinstance(node, ast.UnaryOp):
            operand, constant = self.compile(node.operand, depth)
            if isinstance(node.op, ast.USub):
                evaluate: Evaluator = lambda variables: -operand(variables)  # noqa: E731
            elif isinstance(node.op, ast.UAdd):
                evaluate = operand
            elif isinstance(node.op, ast.Not):
                evaluate = lambda variables: 0.0 if operand(variables) else 1.0  # noqa: E731
            else:
                raise _Refused("bitwise operators (~) are not allowed", node)
            return self._fold(node, evaluate) if constant is not None else (evaluate, None)
        if isinstance(node, ast.BinOp):
            function = _BINARY.get(type(node.op))
            if function is None:
                raise _Refused("bitwise operators and @ are not allowed", node)
            left, left_constant = self.compile(node.left, depth)
            right, right_constant = self.compile(node.right, depth)
            evaluate = _binary(function, left, right)
            if left_constant is not None and right_constant is not None:
                return self._fold(node, evaluate)
            return evaluate, None
        if isinstance(node, ast.BoolOp):
            parts = [self.compile(value, depth) for value in node.values]
            closures = tuple(p[0] for p in parts)
            if isinstance(node.op, ast.And):
                evaluate = lambda variables: 1.0 if all(c(variables) for c in closures) else 0.0  # noqa: E731
            else:
                evaluate = lambda variables: 1.0 if any(c(variables) for c in closures) else 0.0  # noqa: E731
            if all(p[1] is not None for p in parts):
                return self._fold(node, evaluate)
            return evaluate, None
        if isinstance(node, ast.Compare):
            if isinstance(node.ops[0], (ast.Is, ast.IsNot, ast.In, ast.NotIn)) or \
                    any(type(op) not in _COMPARE for op in node.ops):
                raise _Refused("is / in are not allowed (compare with < <= > >= == !=)", node)
            first = self.compile(node.left, depth)
            rest = [self.compile(c, depth) for c in node.comparators]
            evaluate = _compare(first[0], tuple(_COMPARE[type(op)] for op in node.ops), tuple(r[0] for r in rest))
            if first[1] is not None and all(r[1] is not None for r in rest):
                return self._fold(node, evaluate)
            return evaluate, None
        if isinstance(node, ast.IfExp):
            test, test_constant = self.compile(node.test, depth)
            body, body_constant = self.compile(node.body, depth)
            orelse, orelse_constant = self.compile(node.orelse, depth)
            if test_constant is not None:  # the branch is known now: the other is never evaluated
                return (body, body_constant) if test_constant else (orelse, orelse_constant)
            return (lambda variables: body(variables) if test(variables) else orelse(variables)), None
        if isinstance(node, ast.Call):
            return self._call(node, depth)
        raise _Refused(f"not allowed: {_REFUSED_NAMES.get(type(node), type(node).__name__)}", node)

    def _call(self, node: ast.Call, depth: int) -> tuple[Evaluator, float | None]:
        if not isinstance(node.func, ast.Name):
            raise _Refused("only the listed functions can be called, by name", node)
        name = node.func.id
        function = FUNCTIONS.get(name)
        if function is None:
            raise _Refused(f"unknown function {name!r} (functions are {', '.join(sorted(FUNCTIONS))})", node)
        if node.keywords:
            raise _Refused(f"keyword arguments are not allowed ({name})", node)
        if any(isinstance(a, ast.Starred) for a in node.args):
            raise _Refused("starred arguments (*x) are not allowed", node)
        count = len(node.args)
        if not function.min_args <= count <= function.max_args:
            wanted = str(function.min_args) if function.min_args == function.max_args else \
                f"{function.min_args} to {function.max_args}"
            raise _Refused(f"{name} takes {wanted} argument(s), got {count}", node)
        parts = [self.compile(a, depth) for a in node.args]
        closures = tuple(p[0] for p in parts)
        call = function.call
        if count == 1:
            (only,) = closures
            evaluate: Evaluator = lambda variables: float(call(only(variables)))  # noqa: E731
        elif count == 2:
            first, second = closures
            evaluate = lambda variables: float(call(first(variables), second(variables)))  # noqa: E731
        else:
            evaluate = lambda variables: float(call(*[c(variables) for c in closures]))  # noqa: E731
        if all(p[1] is not None for p in parts):
            return self._fold(node, evaluate)
        return evaluate, None


def _binary(function: Callable[[float, float], float], left: Evaluator, right: Evaluator) -> Evaluator:
    return lambda variables: function(left(variables), right(variables))


def _compare(first: Evaluator, operators: tuple[Callable[[float, float], bool], ...],
             rest: tuple[Evaluator, ...]) -> Evaluator:
    if len(operators) == 1:
        (op,), (second,) = operators, rest

        def single(variables: Mapping[str, float]) -> float:
            return 1.0 if op(first(variables), second(variables)) else 0.0
        return single

    def chained(variables: Mapping[str, float]) -> float:  # 0 < t < 4: each side evaluated once, like Python
        left = first(variables)
        for op, right_of in zip(operators, rest):
            right = right_of(variables)
            if not op(left, right):
                return 0.0
            left = right
        return 1.0
    return chained


# ---------------------------------------------------------------------------------------- keyframes
@dataclass(frozen=True)
class Keyframe:
    """A value at a position (a frame, beat or second, whatever the schedule counts)."""

    position: float
    expression: Expression


class Keyframes:
    """Expressions at positions, interpolated linearly between neighbours and held outside them.

    Between keyframes a and b, both expressions are evaluated for the same variables and mixed by how far
    the position is from a to b, so two numbers make a straight line and a value never jumps at a
    keyframe. Before the first keyframe its expression holds; after the last, the last one's does.
    """

    __slots__ = ("keyframes", "_positions")

    def __init__(self, keyframes: list[Keyframe] | tuple[Keyframe, ...]):
        ordered = tuple(sorted(keyframes, key=lambda k: k.position))
        if not ordered:
            raise ExpressionError("no keyframes")
        for a, b in zip(ordered, ordered[1:]):
            if a.position == b.position:
                raise ExpressionError(f"two keyframes at {_position_text(a.position)}")
        self.keyframes = ordered
        self._positions = [k.position for k in ordered]

    @property
    def constant(self) -> bool:
        return all(k.expression.constant is not None for k in self.keyframes)

    def at(self, position: float, variables: Mapping[str, float]) -> float:
        """The value at `position` with these variables; ExpressionError as Expression.evaluate."""
        index = bisect.bisect_right(self._positions, position)
        if index == 0:
            return self.keyframes[0].expression.evaluate(variables)
        if index == len(self.keyframes):
            return self.keyframes[-1].expression.evaluate(variables)
        a, b = self.keyframes[index - 1], self.keyframes[index]
        fraction = (position - a.position) / (b.position - a.position)
        start = a.expression.evaluate(variables)
        if fraction == 0.0:
            return start
        return start + (b.expression.evaluate(variables) - start) * fraction

    def __len__(self) -> int:
        return len(self.keyframes)


def _position_text(position: float) -> str:
    return str(int(position)) if position.is_integer() else str(position)


def parse_position(key: Any) -> float:
    """A keyframe position: a number at or above 0, or text that reads as one ("30", "7.5")."""
    if isinstance(key, bool):
        raise ExpressionError(f"keyframe {key!r}: expected a number at or above 0")
    if isinstance(key, str):
        text = key.strip()
        try:
            position = float(text) if text and len(text) <= 32 else None
        except ValueError:
            position = None
        if position is None or text.lower().lstrip("+").startswith(("inf", "nan")):
            raise ExpressionError(f"keyframe {text[:40]!r}: expected a number at or above 0 (a frame, beat or second)")
    elif isinstance(key, (int, float)):
        try:
            position = float(key)
        except OverflowError:
            position = math.inf
    else:
        raise ExpressionError(f"keyframe {key!r:.40}: expected a number at or above 0")
    if not math.isfinite(position) or position < 0:
        raise ExpressionError(f"keyframe {str(key)[:40]!r}: expected a finite number at or above 0")
    return position


def parse_keyframes(text: str, variables: tuple[str, ...] = VARIABLES) -> Keyframes:
    """Deforum's keyframe string, `"0:(0.4), 30:(0.6 + 0.1*sin(t))"`: `position:(expression)` pairs
    separated by commas (the parentheses may be left out around a plain value). ExpressionError naming the
    bad keyframe."""
    if not isinstance(text, str):
        raise ExpressionError(f"keyframes are text like \"0:(0.4), 30:(0.6)\", got {type(text).__name__}")
    if len(text) > MAX_KEYFRAMES_LENGTH:
        raise ExpressionError(f"keyframe string of {len(text)} characters; at most {MAX_KEYFRAMES_LENGTH}")
    keyframes: list[Keyframe] = []
    for key, value in _split_keyframes(text):
        if len(keyframes) >= MAX_KEYFRAMES:
            raise ExpressionError(f"more than {MAX_KEYFRAMES} keyframes")
        position = parse_position(key)
        try:
            expression = Expression.parse(value, variables)
        except ExpressionError as e:
            raise ExpressionError(f"keyframe {_position_text(position)}: {e}") from None
        keyframes.append(Keyframe(position, expression))
    return Keyframes(keyframes)


def _split_keyframes(text: str) -> list[tuple[str, str]]:
    """`key: value` pairs split at the commas outside parentheses."""
    pairs: list[tuple[str, str]] = []
    start, depth = 0, 0
    pieces: list[str] = []
    for i, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
            if depth < 0:
                raise ExpressionError(f"keyframes: unmatched ')' at column {i + 1}")
        elif char == "," and depth == 0:
            pieces.append(text[start:i])
            start = i + 1
    if depth:
        raise ExpressionError("keyframes: a '(' is not closed")
    pieces.append(text[start:])
    for number, piece in enumerate(pieces, 1):
        if not piece.strip():
            if number == len(pieces) and number > 1:  # a trailing comma
                continue
            raise ExpressionError(f"keyframes: entry {number} is empty; write position:(value), ...")
        key, colon, value = piece.partition(":")
        if not colon or not value.strip():
            raise ExpressionError(f"keyframes: entry {number} {piece.strip()[:40]!r} is not position:(value)")
        pairs.append((key, value))
    return pairs


def looks_like_keyframes(text: str) -> bool:
    """True for a keyframe string ("0:(0.4), ..."), False for a plain expression: no expression has a colon."""
    return ":" in text
