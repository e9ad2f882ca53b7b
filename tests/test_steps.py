"""The step rule: the paper's ceil(N * t0), a fixed count, the compiled bucket, bad configs."""

import math

import numpy as np
import pytest

from sdedit_jax.sampling.steps import StepRule, paper_steps, step_bucket


def test_paper_rule_is_ceil_of_n_t0_capped_at_the_bucket():
    rule = StepRule(steps_per_unit_time=100)
    t0 = np.array([0.01, 0.3, 0.5, 0.8, 1.0], np.float32)
    expected = [min(math.ceil(round(100 * float(t), 3)), rule.max_steps) for t in t0]
    np.testing.assert_array_equal(rule.steps_for(t0), expected)
    assert rule.max_steps == 128 and rule.steps_for(t0).dtype == np.int32
    np.testing.assert_array_equal(
        StepRule(steps_per_unit_time=100, max_steps=40).steps_for(t0), [1, 30, 40, 40, 40]
    )


def test_fixed_rule_ignores_t0_and_buckets_are_powers_of_two():
    rule = StepRule(n_steps=20)
    assert rule.max_steps == 32
    np.testing.assert_array_equal(rule.steps_for(np.array([0.1, 0.9])), [20, 20])
    assert [step_bucket(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]
    assert int(paper_steps(500, np.float32(0.8))) == 400  # float32 0.8 adds no step


@pytest.mark.parametrize(
    "fields, match",
    [
        ({}, "set exactly one of steps_per_unit_time"),
        ({"steps_per_unit_time": 10, "n_steps": 10}, "set exactly one of steps_per_unit_time"),
        ({"n_steps": 20, "max_steps": 16}, "n_steps=20 exceeds max_steps=16"),
    ],
)
def test_bad_rules_are_rejected(fields, match):
    with pytest.raises(ValueError, match=match):
        StepRule(**fields)
