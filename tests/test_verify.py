"""Maths answer extraction / comparison and the code verifier, on hand-made cases."""

from __future__ import annotations

from fractions import Fraction

import pytest

from polyfuse.verify.checkers import (
    VerifierConfig,
    answers_match,
    build_test_program,
    extract_answer,
    extract_boxed,
    extract_code,
    normalize_answer,
    parse_number,
    verify_code,
    verify_code_many,
    verify_math,
)
from polyfuse.verify.sandbox import SandboxConfig

FAST = VerifierConfig(sandbox=SandboxConfig(timeout_s=5))


# --------------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize("text, expected", [
    (r"We get $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\left(1, \frac{2}{3}\right)}", r"\left(1, \frac{2}{3}\right)"),
    (r"first \boxed{3}, corrected: \boxed{4}", "4"),
    (r"so \boxed 7 is it", "7"),
    (r"\fbox{x^{2}}", "x^{2}"),
    (r"\boxed{a{b{c}}d}", "a{b{c}}d"),
    ("no box here", None),
    (r"\boxed{unclosed", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"Thus the answer is $\boxed{12}$ and not 13.", "12"),
    ("Adding them, the answer is 42.", "42"),
    (r"**Final Answer:** $\frac{3}{4}$", r"\frac{3}{4}"),
    ("Answer: 3.5 dollars.", "3.5 dollars"),
    ("We have 12 apples and then 1,234 pears", "1,234"),
    ("It costs -0.75 in the end", "-0.75"),
    ("I am not sure.", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# --------------------------------------------------------------------------------------------------
# normalisation and numbers


@pytest.mark.parametrize("raw, expected", [
    (r"$x = \dfrac{3}{4}$", r"\frac{3}{4}"),
    (r"\left( 1,\, 2 \right)", "(1,2)"),
    (r"\text{5 cm}", "5cm"),
    (r"50\%", "50"),
    (r"90^\circ", "90"),
    ("1,000,000", "1000000"),
    (r"\frac12", r"\frac{1}{2}"),
    ("7.", "7"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize("raw, value, decimal", [
    ("12", Fraction(12), False),
    ("2.50", Fraction(5, 2), True),
    ("3/4", Fraction(3, 4), False),
    (r"-\frac{3}{4}", Fraction(-3, 4), False),
    (r"\frac{-3}{4}", Fraction(-3, 4), False),
    (r"2\frac{1}{2}", Fraction(5, 2), False),
    ("1,000", Fraction(1000), False),
    ("1e-3", Fraction(1, 1000), True),
    ("5 dollars", Fraction(5), False),
])
def test_parse_number(raw, value, decimal):
    assert parse_number(raw) == (value, decimal)


@pytest.mark.parametrize("raw", [r"\sqrt{2}", "5x", "2pi", "(1,2)", r"\frac{1}{0}", "abc", ""])
def test_parse_number_rejects_non_numbers(raw):
    assert parse_number(raw) is None


# --------------------------------------------------------------------------------------------------
# comparison


@pytest.mark.parametrize("predicted, gold", [
    ("0.5", r"\frac{1}{2}"),
    ("2/4", r"\dfrac{1}{2}"),
    (r"\frac12", "0.50"),
    ("1,000", "1000"),
    ("2.500", "2.5"),
    (r"50\%", "50"),
    ("$x = 3$", "3"),
    (r"2\frac{1}{2}", "5/2"),
    ("0.3333333", r"\frac{1}{3}"),
    (r"\left( 1, \frac{1}{2} \right)", "(1, 0.5)"),
    (r"\text{Yes}", "yes"),
    (r"90^\circ", "90"),
    (r"2\sqrt{3}", r"\sqrt{12}"),
    (r"\frac{\pi}{2}", r"\pi/2"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
])
def test_answers_match(predicted, gold):
    assert answers_match(predicted, gold)


@pytest.mark.parametrize("predicted, gold", [
    ("0.33", r"\frac{1}{3}"),
    ("1/3", "0.3"),
    ("(1,2)", "(2,1)"),
    ("[1,2)", "(1,2)"),
    ("(1,2,3)", "(1,2)"),
    ("3", "-3"),
    ("1,2", "12"),
    (r"2\sqrt{3}", r"\sqrt{13}"),
    ("", "0"),
    ("f", "e"),
    ("pi", "3"),
])
def test_answers_differ(predicted, gold):
    assert not answers_match(predicted, gold)


def test_tolerance_is_configurable():
    assert not answers_match("3.14", r"\frac{22}{7}")
    assert answers_match("3.14", r"\frac{22}{7}", rel_tol=1e-3)


def test_sympy_never_evaluates_arbitrary_text(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert not answers_match(evil, "1")
    for tower in ("9^9^9^9", "9^99^99", "(9^99)^99"):  # huge powers are refused, not computed
        assert not answers_match(tower, "1")
    assert not marker.exists()


def test_without_sympy_falls_back_to_strings():
    assert not answers_match(r"2\sqrt{3}", r"\sqrt{12}", use_sympy=False)
    assert answers_match(r"2\sqrt{3}", r"2 \sqrt{3}", use_sympy=False)


def test_verify_math():
    good = verify_math(r"... so the total is $\boxed{\dfrac{7}{2}}$.", "3.5")
    assert good.correct and good.extracted == r"\dfrac{7}{2}" and good.reason == "match"
    bad = verify_math("The answer is 4.", "3.5")
    assert not bad.correct and bad.reason == "mismatch"
    none = verify_math("I cannot solve this.", "3")
    assert not none.correct and none.extracted is None and none.reason == "no answer"
    assert verify_math("The answer is 12", r"Since ... we get \boxed{12}.").correct


# --------------------------------------------------------------------------------------------------
# code


def test_extract_code_variants():
    fenced = "Here:\n```python\ndef f(x):\n    return x\n```\nUsage:\n```python\nprint(f(1))\n```\n"
    assert extract_code(fenced) == "def f(x):\n    return x"
    assert extract_code(fenced, entry_point="f") == "def f(x):\n    return x"
    assert extract_code("```\nx = 1\n```") == "x = 1"
    assert extract_code("```py\ny = 2\n```\n```bash\nls -la /some/long/path\n```") == "y = 2"
    assert extract_code("def g():\n    return 2\n") == "def g():\n    return 2"
    assert extract_code("```python\ndef h():\n    return 3\n") == "def h():\n    return 3"  # unclosed fence
    two = "```python\ndef helper():\n    return 1\n\n\n\n\n```\n```python\ndef solve():\n    return helper()\n```"
    assert extract_code(two, entry_point="solve") == "def solve():\n    return helper()"


def test_build_test_program():
    assert build_test_program(["assert f(1) == 1", "assert f(2) == 2"]) == "assert f(1) == 1\nassert f(2) == 2"
    humaneval = "def check(candidate):\n    assert candidate(2) == 4\n"
    assert build_test_program(humaneval, "double").endswith("check(double)\n")
    assert build_test_program(humaneval + "\ncheck(double)\n", "double").count("check(double)") == 1


def test_verify_code_pass_fail_and_sandbox_status():
    right = "Sure:\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    looping = "```python\ndef add(a, b):\n    while True:\n        pass\n```"
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
    assert verify_code(right, tests, config=FAST).correct
    failed = verify_code(wrong, tests, config=FAST)
    assert not failed.correct and failed.status == "failed"
    slow = verify_code(looping, tests, config=VerifierConfig(sandbox=SandboxConfig(timeout_s=1)))
    assert not slow.correct and slow.status == "timeout"


def test_verify_code_humaneval_style_and_many():
    tests = "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(0) == 0\n"
    responses = ["```python\ndef square(n):\n    return n * n\n```", "```python\ndef square(n):\n    return n + n\n```"]
    verdicts = verify_code_many([(r, tests, "square") for r in responses], FAST, workers=2)
    assert [v.correct for v in verdicts] == [True, False]
    assert verdicts[1].status == "failed"


def test_different_atoms_never_reach_sympy(monkeypatch):
    from polyfuse.verify import checkers as verify

    def boom(a, b):
        raise AssertionError("sympy called")

    monkeypatch.setattr(verify, "_sympy_equal", boom)
    assert not answers_match("f", "e") and not answers_match("x", "7")
    with pytest.raises(AssertionError, match="sympy called"):
        answers_match("x+1", "1+x")
