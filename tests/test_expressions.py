"""Schedule expressions: the safe formula language and Deforum keyframe strings (bridge/expressions)."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.expressions import (FUNCTIONS, MAX_DEPTH, MAX_LENGTH, Expression, ExpressionError, parse_keyframes)

AT = {"t": 2.5, "beat": 5.0, "frame": 75.0, "bpm": 120.0}


def value(text: str, **variables: float) -> float:
    return Expression.parse(text).evaluate({**AT, **variables})


@pytest.mark.parametrize("text, expected", [
    ("1 + 2*3 - 4/8", 6.5),
    ("7 // 2 + 7 % 2", 4.0),
    ("-2**2", -4.0),
    ("2**0.5", math.sqrt(2)),
    ("+t", 2.5),
    ("t + beat + frame + bpm", 2.5 + 5 + 75 + 120),
    ("pi + e + tau", math.pi + math.e + math.tau),
    ("0.5 + 0.25*sin(t)", 0.5 + 0.25 * math.sin(2.5)),
    ("atan2(1, 1)", math.pi / 4),
    ("log(e**2) + log(8, 2) + log10(1000)", 2 + 3 + 3),
    ("min(3, t, 9) + max(1, 2, 3, 4)", 2.5 + 4),
    ("floor(t) + ceil(t) + abs(-t)", 2 + 3 + 2.5),
    ("clamp(t, 0, 1) + lerp(10, 20, 0.25)", 1 + 12.5),
])
def test_arithmetic_functions_and_variables_evaluate_as_written(text, expected):
    assert value(text) == pytest.approx(expected)


def test_comparisons_and_conditionals_give_1_or_0_and_choose_a_branch():
    assert value("t > 2") == 1.0 and value("t < 2") == 0.0
    assert value("0 < t < 3") == 1.0 and value("0 < t < 2") == 0.0  # chained, as Python reads it
    assert value("1 if t > 2 and not beat > 9 else -1") == 1.0
    assert value("1 if t > 9 or beat == 6 else -1") == -1.0
    assert value("1/(t - 2.5) if t != 2.5 else 0") == 0.0  # the branch not taken is not evaluated


def test_rounding_and_phase_functions():
    assert (value("round(2.5)"), value("round(-2.5)"), value("round(2.345, 2)")) == (3.0, -3.0, 2.35)
    assert (value("fract(-0.25)"), value("sign(-3)"), value("sign(0)")) == (0.75, -1.0, 0.0)
    assert (value("smoothstep(-1)"), value("smoothstep(0.5)"), value("smoothstep(2)")) == (0.0, 0.5, 1.0)
    assert value("smoothstep(10, 20, 15)") == 0.5
    assert (value("saw(3.25)"), value("triangle(0.5)"), value("triangle(1.25)")) == (0.25, 1.0, 0.5)
    assert (value("square(0.25)"), value("square(0.75)"), value("square(0.3, 0.25)")) == (1.0, 0.0, 0.0)
    assert (value("pulse(4)"), value("pulse(4.125)"), value("pulse(4.5)")) == (1.0, 0.5, 0.0)


def test_noise_is_smooth_deterministic_and_within_minus_one_to_one():
    xs = [i * 0.01 for i in range(-500, 500)]
    noise = Expression.parse("noise(t)")
    values = [noise.evaluate({**AT, "t": x}) for x in xs]
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert values == [noise.evaluate({**AT, "t": x}) for x in xs]  # the same curve every time
    assert max(abs(b - a) for a, b in zip(values, values[1:])) < 0.05  # no jumps between close inputs
    assert len({round(v, 6) for v in values[::100]}) > 5  # and it does move
    assert value("noise(t, 1)") != value("noise(t, 2)")  # another seed, another curve


def test_constant_parts_are_computed_once_when_parsed():
    assert Expression.parse("2*pi").constant == pytest.approx(math.tau)
    assert Expression.parse(0.4).constant == 0.4
    assert Expression.parse("t*2").constant is None
    assert Expression.parse("sin(t) + beat").names == {"t", "beat"}


@pytest.mark.parametrize("text, says", [
    ("__import__('os')", "unknown function '__import__'"),
    ("().__class__", "attribute"),
    ("(1, 2)", "tuples"),
    ("t.real", "attribute"),
    ("open('x')", "unknown function 'open'"),
    ("sin.__globals__", "attribute"),
    ("9**9**9", "too large"),
    ("1e999", "too large"),  # reads as infinity
    ("(lambda: 1)()", "only the listed functions"),
    ("[x for x in range(9)]", "comprehensions"),
    ("(x for x in t)", "generator"),
    ('"a"*9', "strings"),
    ("b'a'", "strings"),
    ("f'{t}'", "strings"),
    ("x", "unknown name 'x'"),
    ("sin(x=1)", "keyword"),
    ("max(*[1, 2])", "starred"),
    ("(y := 3)", "assignment"),
    ("[1]", "lists"),
    ("t[0]", "subscripts"),
    ("{1: 2}", "dicts"),
    ("t is t", "is / in"),
    ("t in t", "is / in"),
    ("t & 1", "bitwise"),
    ("~t", "bitwise"),
    ("True", "True"),
    ("None", "None"),
    ("1j", "1j"),
    ("sin(t, 2)", "sin takes 1"),
    ("sin", "unknown name 'sin'"),
    ("import os", "invalid syntax"),
    ("t; 1", "invalid syntax"),
    ("1/0", "division by zero"),
    ("", "empty"),
    ("\x00", "null bytes"),
])
def test_hostile_and_wrong_expressions_are_refused_saying_what(text, says):
    with pytest.raises(ExpressionError, match=re.escape(says)):
        Expression.parse(text)


def test_a_refusal_says_where():
    with pytest.raises(ExpressionError, match="at column 7"):
        Expression.parse("1 + t*t.real")


def test_a_10k_character_expression_is_refused_for_its_length():
    with pytest.raises(ExpressionError, match=f"at most {MAX_LENGTH}"):
        Expression.parse("+".join(["t"] * 5000))


@pytest.mark.parametrize("text", [
    "-" * 500 + "t",  # 500 levels of unary minus
    "abs(" * 150 + "t" + ")" * 150,
    "(" * 499 + "t" + ")" * 499,
    "not " * 240 + "t",
    "1+" * 499 + "1",
])
def test_deep_nesting_is_refused_without_recursion_error(text):
    with pytest.raises(ExpressionError):
        Expression.parse(text)


def test_nesting_past_the_depth_limit_is_refused_by_name():
    with pytest.raises(ExpressionError, match=f"nested more than {MAX_DEPTH}"):
        Expression.parse("-" * (MAX_DEPTH + 5) + "t")
    assert Expression.parse("-" * 20 + "t").evaluate(AT) == 2.5  # ordinary nesting still works


@pytest.mark.parametrize("text, t, fine_t, says", [
    ("1/(t - 2)", 2.0, 1.5, "division by zero"),
    ("t % (t - 2)", 2.0, 1.5, "division by zero"),
    ("sqrt(t)", -1.0, 1.5, "math domain error"),
    ("log(t)", 0.0, 1.5, "math domain error"),
    ("t**0.5", -8.0, 1.5, "math domain error"),
    ("exp(t)", 1000.0, 1.5, "too large"),
    ("t**9**9", 2.0, 1.0, "too large"),
    ("t*1e308*10", 1.0, 0.01, "the result is inf"),
    ("t*1e308*10 - t*1e308*10", 1.0, 0.01, "the result is nan"),
    ("floor(t*1e308*10)", 1.0, 0.01, "too large"),
])
def test_a_value_an_expression_cannot_give_is_an_expression_error(text, t, fine_t, says):
    expression = Expression.parse(text)
    with pytest.raises(ExpressionError, match=says):
        expression.evaluate({**AT, "t": t})
    assert math.isfinite(expression.evaluate({**AT, "t": fine_t}))  # the same expression at another time


def test_an_error_reads_the_same_at_every_time_it_happens():
    expression = Expression.parse("1/(t - floor(t))")
    messages = set()
    for t in (1.0, 2.0, 7.0):
        with pytest.raises(ExpressionError) as e:
            expression.evaluate({**AT, "t": t})
        messages.add(str(e.value))
    assert len(messages) == 1  # so a driver reports it once, not every frame


def test_every_function_is_documented_in_the_schedules_guide():
    guide = (Path(__file__).resolve().parent.parent / "docs" / "schedules.md").read_text(encoding="utf-8")
    missing = [name for name in FUNCTIONS if f"`{name}(" not in guide]
    assert not missing


# ---------------------------------------------------------------------------------------- keyframes
def test_keyframes_hold_before_the_first_and_after_the_last_and_interpolate_between():
    keyframes = parse_keyframes("10:(0.2), 20:(0.6), 40:(0.4)")
    assert [keyframes.at(p, AT) for p in (0, 10, 15, 20, 30, 40, 99)] == \
        pytest.approx([0.2, 0.2, 0.4, 0.6, 0.5, 0.4, 0.4])


def test_keyframe_expressions_are_evaluated_at_the_current_time():
    keyframes = parse_keyframes("0:(0.4), 30:(0.6 + 0.1*sin(t))")
    assert keyframes.at(30, {**AT, "t": 1.0}) == pytest.approx(0.6 + 0.1 * math.sin(1.0))
    assert keyframes.at(15, {**AT, "t": 1.0}) == pytest.approx((0.4 + 0.6 + 0.1 * math.sin(1.0)) / 2)
    assert keyframes.at(99, {**AT, "t": 2.0}) == pytest.approx(0.6 + 0.1 * math.sin(2.0))


def test_keyframe_strings_take_deforum_spacing_calls_with_commas_and_bare_values():
    keyframes = parse_keyframes(" 0: (clamp(t, 0, 1)) ,\n 7.5:(max(1, 2, 3)), 10: 0.5,")
    assert [k.position for k in keyframes.keyframes] == [0.0, 7.5, 10.0]
    assert keyframes.at(7.5, AT) == 3.0 and keyframes.at(10, AT) == 0.5


@pytest.mark.parametrize("text, says", [
    ("0:(0.4), x:(1)", "keyframe 'x'"),
    ("0:(0.4), 10:(foo)", "keyframe 10: '(foo)': unknown name 'foo'"),
    ("0:(1), 0.0:(2)", "two keyframes at 0"),
    ("-5:(1)", "at or above 0"),
    ("nan:(1)", "keyframe"),
    ("0:(1", "not closed"),
    ("0:1), 4:(2)", "unmatched"),
    ("0.4", "not position:(value)"),
    ("0:(1),, 5:(2)", "entry 2 is empty"),
])
def test_bad_keyframe_strings_are_refused_naming_the_keyframe(text, says):
    with pytest.raises(ExpressionError, match=re.escape(says)):
        parse_keyframes(text)


# ---------------------------------------------------------------------------------------- fuzz
_ATOMS = st.sampled_from(["t", "beat", "frame", "bpm", "pi", "0", "1", "2.5", "1e308", "-3", "0.0", "x", "'s'"])
_FUNCTIONS = st.sampled_from(sorted(FUNCTIONS) + ["open", "eval"])
_OPERATORS = st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "<", "==", " and ", " or ", "&", "."])


def _expressions():
    return st.recursive(_ATOMS, lambda inner: st.one_of(
        st.tuples(inner, _OPERATORS, inner).map(lambda p: f"({p[0]}{p[1]}{p[2]})"),
        st.tuples(_FUNCTIONS, st.lists(inner, max_size=4)).map(lambda p: f"{p[0]}({', '.join(p[1])})"),
        st.tuples(inner, inner, inner).map(lambda p: f"({p[0]} if {p[1]} else {p[2]})"),
        inner.map(lambda s: f"-{s}"),
    ), max_leaves=12)


_FINITE = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(st.text(max_size=60), st.text(alphabet="tbeamfrpinsocl()+-*/%<>=!.,:[]{}'\"0123456789 _",
                                                    max_size=80), _expressions()),
       t=_FINITE, beat=_FINITE, frame=_FINITE)
def test_no_text_gives_anything_but_a_finite_number_or_an_expression_error(text, t, beat, frame):
    try:
        expression = Expression.parse(text)
    except ExpressionError:
        return
    try:
        result = expression.evaluate({"t": t, "beat": beat, "frame": frame, "bpm": 120.0})
    except ExpressionError:
        return
    assert isinstance(result, float) and math.isfinite(result)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet="0123456789.:(), tsin-+", max_size=60), position=_FINITE)
def test_no_keyframe_string_gives_anything_but_keyframes_or_an_expression_error(text, position):
    try:
        keyframes = parse_keyframes(text)
    except ExpressionError:
        return
    try:
        assert math.isfinite(keyframes.at(position, AT))
    except ExpressionError:
        pass
