"""The math reward (last \\boxed{} + math-verify) on a hand-written table, plus extraction and time limits."""

import random
import time

import pytest

from megatron_apo.rewards import compute_score, extract_last_boxed, math_score
from megatron_apo.rewards.deadline import SampleTimeout, time_limit

B = "\\boxed"

# (response, ground truth, expected score). Written by hand; the expectation is what a careful grader
# says, and math-verify must agree.
CASES = [
    # integers and trivial forms
    (f"The answer is {B}{{42}}.", "42", 1.0),
    (f"{B}{{42}}", "43", 0.0),
    (f"{B}{{-7}}", "-7", 1.0),
    (f"{B}{{7}}", "-7", 0.0),
    (f"{B}{{3.0}}", "3", 1.0),
    (f"{B}{{003}}", "3", 1.0),
    (f"{B}{{1,000}}", "1000", 1.0),
    (f"{B}{{1{{,}}000}}", "1000", 1.0),
    (f"{B}{{10^{{3}}}}", "1000", 1.0),
    (f"{B}{{2^{{10}}}}", "1024", 1.0),
    # fractions and decimals
    (f"{B}{{\\frac{{1}}{{2}}}}", "0.5", 1.0),
    (f"{B}{{\\dfrac{{1}}{{2}}}}", "\\frac{1}{2}", 1.0),
    (f"{B}{{\\tfrac12}}", "1/2", 1.0),
    (f"{B}{{\\dfrac12}}", "0.5", 1.0),
    (f"{B}{{0.5}}", "\\frac{1}{2}", 1.0),
    (f"{B}{{1/2}}", "\\dfrac{1}{2}", 1.0),
    (f"{B}{{\\frac{{2}}{{4}}}}", "\\frac{1}{2}", 1.0),
    (f"{B}{{\\frac{{1}}{{3}}}}", "\\frac{1}{2}", 0.0),
    (f"{B}{{-\\frac{{3}}{{4}}}}", "-0.75", 1.0),
    (f"{B}{{\\frac{{-3}}{{4}}}}", "-\\frac{3}{4}", 1.0),
    (f"{B}{{\\frac{{3}}{{4}}}}", "-\\frac{3}{4}", 0.0),
    (f"{B}{{0.3333333}}", "\\frac{1}{3}", 1.0),  # within math-verify's float rounding (6 places)
    (f"{B}{{0.33}}", "\\frac{1}{3}", 0.0),  # too coarse to be the same number
    (f"{B}{{\\frac{{7}}{{2}}}}", "3\\frac{1}{2}", 1.0),  # mixed number
    (f"{B}{{2.50}}", "\\frac{5}{2}", 1.0),
    # radicals and constants
    (f"{B}{{2\\sqrt{{2}}}}", "\\sqrt{8}", 1.0),
    (f"{B}{{\\sqrt{{2}}}}", "\\sqrt{3}", 0.0),
    (f"{B}{{\\sqrt 2}}", "\\sqrt{2}", 1.0),
    (f"{B}{{\\frac{{\\sqrt{{3}}}}{{2}}}}", "\\frac{\\sqrt3}{2}", 1.0),
    (f"{B}{{\\frac{{1}}{{\\sqrt{{2}}}}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    (f"{B}{{3\\sqrt{{3}}}}", "\\sqrt{27}", 1.0),
    (f"{B}{{\\frac{{\\pi}}{{2}}}}", "\\pi/2", 1.0),
    (f"{B}{{2\\pi}}", "\\pi", 0.0),
    # intervals and sets
    (f"{B}{{[1, 2)}}", "[1,2)", 1.0),
    (f"{B}{{(1, 2]}}", "[1,2)", 0.0),
    (f"{B}{{(-\\infty, 3]}}", "(-\\infty,3]", 1.0),
    (f"{B}{{(-\\infty, 3)}}", "(-\\infty,3]", 0.0),
    (f"{B}{{\\{{1, 2\\}}}}", "\\{2, 1\\}", 1.0),
    (f"{B}{{1, 2}}", "2, 1", 1.0),
    (f"{B}{{1, 3}}", "1, 2", 0.0),
    # percentages
    (f"{B}{{50\\%}}", "50", 1.0),
    (f"{B}{{50\\%}}", "0.5", 1.0),
    (f"{B}{{50}}", "50\\%", 1.0),
    (f"{B}{{25\\%}}", "50\\%", 0.0),
    # algebra
    (f"{B}{{x^2+2x+1}}", "(x+1)^2", 1.0),
    (f"{B}{{x^2+1}}", "(x+1)^2", 0.0),
    (f"{B}{{x = 3}}", "3", 1.0),
    (f"{B}{{3}}", "x=3", 1.0),
    (f"{B}{{\\text{{(B)}}}}", "B", 1.0),
    (f"{B}{{C}}", "B", 0.0),
    # box placement: last box wins, nested braces, \fbox, unterminated box
    (f"First {B}{{1}} then corrected: {B}{{2}}", "2", 1.0),
    (f"First {B}{{2}} then corrected: {B}{{1}}", "2", 0.0),
    (f"{B}{{\\frac{{\\sqrt{{16}}}}{{2}}}}", "2", 1.0),
    (f"{B}{{{{{{5}}}}}}", "5", 1.0),  # \boxed{{{5}}}
    ("\\fbox{12}", "12", 1.0),
    (f"{B}{{3}} and then {B}{{4", "3", 1.0),  # the last box is never closed: the previous complete one
    (f"{B} 9", "9", 1.0),
    # no answer at all
    ("The answer is 42.", "42", 0.0),  # no box
    ("", "42", 0.0),  # empty output
    (f"{B}{{}}", "42", 0.0),  # empty box
    (f"{B}{{", "42", 0.0),  # unterminated box
    ("\\boxed{x} is something", "42", 0.0),
]


def test_case_table_is_large_enough():
    assert len(CASES) >= 50
    assert {e for _, _, e in CASES} == {0.0, 1.0}


@pytest.mark.parametrize("response,truth,expected", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_math_reward_table(response, truth, expected):
    assert compute_score("math", response, truth) == expected
    # The same through verl-style data_source names that route to the math verifier.
    assert compute_score("lighteval/MATH", response, truth) == expected


def test_ground_truth_forms_are_normalised():
    assert compute_score("math", f"{B}{{\\frac12}}", "$\\frac{1}{2}$") == 1.0
    assert compute_score("math", f"{B}{{\\frac12}}", "\\boxed{0.5}") == 1.0
    assert compute_score("aime24", f"{B}{{204}}", "204") == 1.0  # prefix route


def test_dapo_accepts_answer_line_but_prefers_box():
    assert compute_score("math_dapo", "reasoning...\nAnswer: 34", "34") == 1.0
    assert compute_score("math_dapo", "reasoning...\nAnswer: $\\frac{1}{2}$", "0.5") == 1.0
    assert compute_score("math", "reasoning...\nAnswer: 34", "34") == 0.0  # plain math needs a box
    assert compute_score("math_dapo", f"Answer: 34 but {B}{{35}}", "34") == 0.0


def test_extract_last_boxed():
    assert extract_last_boxed("a \\boxed{x^{2}} b \\boxed{\\frac{a}{b}} c") == "\\frac{a}{b}"
    assert extract_last_boxed("no box") is None
    assert extract_last_boxed("\\boxed{a{b}c}") == "a{b}c"
    assert extract_last_boxed("") is None


def test_100kb_garbage_returns_within_timeout():
    rng = random.Random(0)
    alphabet = "\\{}()[]^_0123456789abcdefxyz+-*/=,. "
    body = "".join(rng.choice(alphabet) for _ in range(100_000))
    pathological = [
        "\\boxed{" + body.replace("{", "(").replace("}", ")") + "}",  # one huge box of noise
        body + "\\boxed{" + "9^{" * 12 + "9" + "}" * 12 + "}",  # a power tower: sympy would take forever
        "\\boxed{" + "(" * 50_000 + "1" + ")" * 50_000 + "}",  # 100 kB of nesting
    ]
    for text in pathological:
        assert len(text) >= 100_000
        start = time.monotonic()
        try:
            assert math_score(text, "1", timeout_s=1.0) == 0.0
        except SampleTimeout:  # the raw scorer signals the timeout; compute_score turns it into 0.0
            pass
        assert time.monotonic() - start < 1.0 + 1.5
    # Through the public entry point with its default per-sample limit (5 s): 0.0, not a hang.
    start = time.monotonic()
    assert compute_score("math", pathological[1], "1") == 0.0
    assert time.monotonic() - start < 5.0 + 2.0


def test_time_limit_raises_and_nests():
    with pytest.raises(SampleTimeout):
        with time_limit(0.2):
            time.sleep(2)
    # An inner limit must not cancel the outer one.
    start = time.monotonic()
    with pytest.raises(SampleTimeout):
        with time_limit(0.5):
            with time_limit(5.0):  # longer than the outer: the outer still fires
                pass
            with time_limit(0.1):
                pass
            time.sleep(3)
    assert time.monotonic() - start < 1.5
