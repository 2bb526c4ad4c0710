"""The one number check and the one name lookup every declaration uses, and their messages."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

from unison._validate import INJECTABLE, InvalidNumberError, check_number, is_number, lookup


# ---------------------------------------------------------------------------------- check_number
@pytest.mark.parametrize("value, kwargs, expected", [
    (3, {"integer": True}, 3),
    (np.int64(3), {"integer": True, "low": 1}, 3),
    (1, {"integer": True, "low": 1}, 1),
    (0.5, {}, 0.5),
    (2, {}, 2.0),
    (Fraction(1, 2), {"low": 0, "high": 1}, 0.5),
    (np.float32(0.25), {"low": 0, "low_inclusive": False}, 0.25),
    (10, {"integer": True, "low": 0, "high": 10}, 10),
    (None, {"allow_none": True, "low": 1}, None),
    (math.inf, {"finite": False}, math.inf),
])
def test_check_number_accepts_and_converts(value: Any, kwargs: dict[str, Any], expected: Any) -> None:
    got = check_number(value, "x", owner="Thing", **kwargs)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("value, kwargs, message", [
    (True, {"integer": True, "low": 1}, "Thing(x=...) must be a whole number >= 1, got True"),
    (False, {}, "Thing(x=...) must be a number, got False"),
    (1.5, {"integer": True}, "Thing(x=...) must be an int, got 1.5"),
    ("3", {"integer": True, "low": 1}, "Thing(x=...) must be a whole number >= 1, got '3'"),
    (0, {"integer": True, "low": 1}, "Thing(x=...) must be a whole number >= 1, got 0"),
    (-1, {"integer": True, "low": 0}, "Thing(x=...) must be a non-negative int, got -1"),
    (-0.5, {"low": 0}, "Thing(x=...) must be a non-negative number, got -0.5"),
    (0, {"low": 0, "low_inclusive": False, "unit": "seconds"},
     "Thing(x=...) must be a number of seconds > 0, got 0"),
    (11, {"integer": True, "low": 0, "high": 10, "unit": "bytes"},
     "Thing(x=...) must be a whole number of bytes between 0 and 10, got 11"),
    (1.0, {"low": 0, "high": 1, "high_inclusive": False},
     "Thing(x=...) must be a number >= 0 and < 1, got 1.0"),
    (2, {"high": 1}, "Thing(x=...) must be a number <= 1, got 2"),
    (math.nan, {}, "Thing(x=...) must be finite, got nan"),
    (-math.inf, {}, "Thing(x=...) must be finite, got -inf"),
    (math.inf, {"low": 0, "low_inclusive": False, "unit": "seconds", "allow_none": True},
     "Thing(x=...) must be a number of seconds > 0, got inf"),
    (math.nan, {"finite": False, "low": 0}, "Thing(x=...) must be a non-negative number, got nan"),
    (None, {"integer": True, "low": 1}, "Thing(x=...) must be a whole number >= 1, got None"),
    ([1], {}, "Thing(x=...) must be a number, got [1]"),
])
def test_check_number_rejects_with_one_message_format(value: Any, kwargs: dict[str, Any],
                                                      message: str) -> None:
    with pytest.raises(InvalidNumberError, match=f"^{re.escape(message)}$"):
        check_number(value, "x", owner="Thing", **kwargs)


def test_a_rejected_number_is_both_a_value_and_a_type_error() -> None:
    # Callers raised TypeError for a wrong type and ValueError for a bad value; either still catches it.
    for error in (ValueError, TypeError):
        with pytest.raises(error):
            check_number("x", "x", owner="Thing")
        with pytest.raises(error):
            check_number(-1, "x", owner="Thing", low=0)


def test_without_an_owner_the_message_names_the_parameter_alone() -> None:
    with pytest.raises(ValueError, match=r"^seed must be a non-negative int, got -1$"):
        check_number(-1, "seed", owner="", integer=True, low=0, allow_none=True)


@pytest.mark.parametrize("value, integer, finite, expected", [
    (1, False, False, True), (1.5, True, False, False), (True, False, False, False),
    (None, False, False, False), (math.nan, False, False, True), (math.nan, False, True, False),
    (np.int32(4), True, True, True), ("1", False, False, False),
])
def test_is_number(value: Any, integer: bool, finite: bool, expected: bool) -> None:
    assert is_number(value, integer=integer, finite=finite) is expected


# ---------------------------------------------------------------------------------------- lookup
REGISTRY = {"median": "M", "asha": "A", "hyperband": "H"}


def test_lookup_returns_the_registered_value() -> None:
    assert lookup("scheduler", "asha", REGISTRY) == "A"


@pytest.mark.parametrize("spec, message", [
    ("ashaa", r"^unknown scheduler 'ashaa': did you mean 'asha'\? "
              r"Use one of \['asha', 'hyperband', 'median'\] or an instance$"),
    ("MEDIAN", r"^unknown scheduler 'MEDIAN': did you mean 'median'\?"),
    ("zzz", r"^unknown scheduler 'zzz': use one of \['asha', 'hyperband', 'median'\] or an instance$"),
    (3, r"^unknown scheduler 3: use one of"),
    (["asha"], r"^unknown scheduler \['asha'\]: use one of"),
])
def test_lookup_of_an_unknown_name_says_what_exists(spec: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lookup("scheduler", spec, REGISTRY, "an instance")


def test_injectable_names_have_one_definition() -> None:
    from unison.worker import injection

    assert injection.INJECTABLE is INJECTABLE
    assert "reporter" in INJECTABLE and "ctx" in INJECTABLE
