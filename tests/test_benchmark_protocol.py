"""The quality benchmarks' paired bootstrap: the gap between two methods scored on the same problems
and its interval over the problems, checked against cases whose answer is known."""

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from protocol import paired_bootstrap  # noqa: E402

sys.path.pop(0)


def test_a_constant_gap_on_every_problem_has_no_spread():
    base = torch.rand(3, 50, generator=torch.Generator().manual_seed(0)).tolist()
    found = paired_bootstrap([[v + 0.5 for v in seed] for seed in base], base)
    assert found["gap"] == pytest.approx(0.5) and found["low"] == pytest.approx(0.5) and found["high"] == pytest.approx(0.5)
    same = paired_bootstrap(base, base)
    assert same["gap"] == 0.0 and same["low"] == 0.0 and same["high"] == 0.0


def paired_case(n: int, shared: int, first_only: int, second_only: int) -> tuple:
    first = [1] * shared + [1] * first_only + [0] * second_only
    second = [1] * shared + [0] * first_only + [1] * second_only
    return first + [0] * (n - len(first)), second + [0] * (n - len(second))


@pytest.mark.parametrize("first_only, second_only, clear", [(10, 6, False), (10, 2, True)])
def test_the_interval_of_a_match_gap_is_the_paired_normal_one(first_only, second_only, clear):
    """400 problems, 30 right in both: the interval's half width is 1.96 × the per-problem
    differences' std / √n (to the bootstrap's noise); 10 against 6 problems right alone is within
    the test set's luck, 10 against 2 is not (McNemar's reading of the same counts)."""
    n = 400
    first, second = paired_case(n, 30, first_only, second_only)
    found = paired_bootstrap([first], [second], draws=20_000)
    differences = torch.tensor(first, dtype=torch.float64) - torch.tensor(second, dtype=torch.float64)
    half = 1.96 * float(differences.std(unbiased=False)) / math.sqrt(n)
    assert found["gap"] == pytest.approx((first_only - second_only) / n)
    assert (found["high"] - found["low"]) / 2 == pytest.approx(half, rel=0.08)
    assert (found["low"] > 0) == clear and found["high"] > 0
    unpaired = paired_bootstrap([first], [second[n // 2:] + second[:n // 2]], draws=20_000)  # problems shuffled
    assert unpaired["high"] - unpaired["low"] > 1.4 * (found["high"] - found["low"])


def test_seeds_are_averaged_per_problem_and_denominators_weigh_problems():
    first = [[2.0, 4.0, 0.0], [4.0, 2.0, 0.0]]  # seed mean per problem 3, 3, 0
    second = [[1.0, 1.0, 1.0]]
    tokens = [1, 2, 3]
    found = paired_bootstrap(first, second, denominators=tokens)
    assert found["gap"] == pytest.approx((6.0 - 3.0) / 6)
    assert found["low"] <= found["gap"] <= found["high"]


def test_problems_must_be_the_same_ones():
    with pytest.raises(ValueError, match="3 and 2 problems"):
        paired_bootstrap([[1, 0, 1]], [[1, 0]])
    with pytest.raises(ValueError, match="2 denominators for 3 problems"):
        paired_bootstrap([[1, 0, 1]], [[1, 0, 0]], denominators=[1, 2])
