"""The shared type checks: a bool is never a count or a measurement."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_influence import InfluenceCallback, InfluenceConfigError
from lightning_influence.checks import check_positive_int, is_int, is_real
from lightning_influence.diagnostics import Diagnostic, combine_scalars


def test_bools_are_not_numbers():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_real(3) and is_real(2.5) and is_real(math.nan) and not is_real(False) and not is_real("1")


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "4"])
def test_check_positive_int_names_the_argument(value):
    with pytest.raises(InfluenceConfigError, match=rf"chunk_size={value!r} must be a positive integer\."):
        check_positive_int("chunk_size", value)
    check_positive_int("chunk_size", 4)
    check_positive_int("query_batch_size", None, allow_none=True)
    with pytest.raises(InfluenceConfigError, match="must be a positive integer or None"):
        check_positive_int("query_batch_size", True, allow_none=True)


@pytest.mark.parametrize("arg", ["num_queries", "top_k", "chunk_size", "query_batch_size"])
def test_callback_refuses_a_bool_where_a_count_goes(arg):
    with pytest.raises(InfluenceConfigError, match=rf"{arg}=True must be a positive integer"):
        InfluenceCallback(**{arg: True})


def test_combined_counts_stay_integers():
    chunks = [[Diagnostic("hvp_calls", 3, "HVPs", reduce="sum")], [Diagnostic("hvp_calls", 4, "HVPs", reduce="sum")]]
    (total,) = combine_scalars(chunks)
    assert total.value == 7 and isinstance(total.value, int)
    mixed = [[Diagnostic("hvp_calls", 3, "HVPs", reduce="sum")], [Diagnostic("hvp_calls", 0.5, "HVPs", reduce="sum")]]
    assert combine_scalars(mixed)[0].value == 3.5


def test_nonfinite_rows_is_exact_where_a_row_sum_overflows():
    from lightning_influence.functional import nonfinite_rows

    x = torch.ones(6, 3, 2)
    x[1, 0, 0] = float("nan")
    x[3, 2, 1] = float("inf")
    x[4] = 3e38  # finite entries whose float32 sum overflows: not a bad row
    x[5, 0, 0], x[5, 1, 1] = float("inf"), -float("inf")  # their sum is NaN
    assert nonfinite_rows(x).tolist() == [False, True, False, True, False, True]
    assert nonfinite_rows(torch.zeros(0, 4)).tolist() == []
