"""The repeats planner: the dose of a run is its repeats per image."""

import math
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from klein_core.errors import PlanError
from klein_core.train.planner import band, plan, repeats_per_image_for, training_steps_for


def test_seed_example_55_images_100_repeats_grad_accum_1_gives_5500_steps():
    result = plan(images=55, target_repeats=100, batch_size=1, grad_accum=1)
    assert result.training_steps == 5500
    assert result.repeats_per_image == 100


def test_changing_grad_accum_changes_training_steps_but_not_the_dose():
    g1 = plan(images=55, target_repeats=100, batch_size=1, grad_accum=1)
    g4 = plan(images=55, target_repeats=100, batch_size=1, grad_accum=4)
    assert g4.training_steps == 1375
    assert g1.repeats_per_image == g4.repeats_per_image == 100


def test_changing_batch_size_re_derives_steps():
    assert plan(images=40, target_repeats=80, batch_size=2).training_steps == 1600


def test_exact_integer_arithmetic_no_float_rounding():
    # 3*100/3 in floats can come out as 100.00000000000001 and ceil to 101
    assert training_steps_for(3, 100, 1, 3) == 100
    assert training_steps_for(7, 0.3, 1, 1) == 3  # 2.1 -> 3 exactly


@given(
    n=st.integers(1, 500),
    r=st.integers(1, 300),
    b=st.integers(1, 8),
    g=st.integers(1, 8),
)
def test_property_steps_are_the_smallest_that_reach_the_target_dose(n, r, b, g):
    s = training_steps_for(n, r, b, g)
    assert Fraction(s * b * g, n) >= r
    assert Fraction((s - 1) * b * g, n) < r
    if (n * r) % (b * g) == 0:  # exact multiples hit the target exactly
        assert repeats_per_image_for(s, n, b, g) == r


@given(s=st.integers(1, 10000), n=st.integers(1, 500), b=st.integers(1, 8), g=st.integers(1, 8))
def test_property_reported_dose_is_s_b_g_over_n(s, n, b, g):
    assert math.isclose(repeats_per_image_for(s, n, b, g), s * b * g / n)


@pytest.mark.parametrize(
    "dose,name",
    [
        (10, "under-trained"),
        (49.9, "under-trained"),
        (50, "normal identity"),
        (89.9, "normal identity"),
        (90, "high likeness"),
        (120, "high likeness"),
        (120.1, "over-training risk"),
    ],
)
def test_bands_name_the_dose(dose, name):
    assert band(dose) == name


def test_given_training_steps_reports_their_dose():
    result = plan(images=20, training_steps=1000, batch_size=1, grad_accum=2)
    assert result.repeats_per_image == 100
    assert result.band == "high likeness"
    assert result.epochs == 100


@pytest.mark.parametrize(
    "kwargs,named",
    [
        (dict(images=0), "images"),
        (dict(images=10, batch_size=0), "batch_size"),
        (dict(images=10, grad_accum=0), "grad_accum"),
        (dict(images=10, target_repeats=0), "target_repeats"),
        (dict(images=10, target_repeats=-5), "target_repeats"),
        (dict(images="ten"), "images"),
        (dict(images=10, target_repeats="lots"), "target_repeats"),
        (dict(images=10, batch_size=1.5), "batch_size"),
        (dict(images=10, target_repeats=float("nan")), "target_repeats"),
    ],
)
def test_bad_values_give_an_error_naming_the_value(kwargs, named):
    with pytest.raises(PlanError, match=named):
        plan(**kwargs)
