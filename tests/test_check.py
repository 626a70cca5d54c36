"""The correctness checks themselves must catch what they are for."""

import pytest
import torch

from moebench.check import Mismatch, assert_close, assert_equal, poison


def test_unwritten_output_is_caught_even_where_the_reference_holds_nan():
    ref = torch.tensor([1.0, float("nan"), 3.0])
    assert_close(ref.clone(), ref, "x", torch.float32)
    got = poison(torch.empty(3))
    got[0] = 1.0
    with pytest.raises(Mismatch, match="1 elements NaN"):
        assert_close(got, ref, "x", torch.float32)


def test_tolerance_follows_the_dtype():
    ref = torch.ones(4)
    assert_close(ref + 1e-2, ref, "x", torch.bfloat16)
    with pytest.raises(Mismatch, match="beyond rtol"):
        assert_close(ref + 1e-2, ref, "x", torch.float32)


def test_assert_equal_names_the_first_difference():
    with pytest.raises(Mismatch, match=r"1 of 3 elements differ, first at \[2\]"):
        assert_equal(torch.tensor([1, 2, 4]), torch.tensor([1, 2, 3]), "ids")
