"""The suite's float comparison helpers (tests/numerics.py) fail where they should."""

import numpy as np
import pytest

from tests.numerics import F32_EPS, assert_close, assert_not_close, f32_bound


def test_the_bound_is_ulps_at_the_values_scale():
    desired = np.array([4.0, -1.0, 0.5], np.float32)
    assert f32_bound(desired, 16) == 16 * F32_EPS * 4.0
    np.testing.assert_array_equal(
        f32_bound(desired, 2, per_element=True), 2 * F32_EPS * abs(desired)
    )
    assert_close(desired + [15 * 4 * F32_EPS, 0, 0], desired, ulps=16)
    with pytest.raises(AssertionError, match="within 16 float32 ulps"):
        assert_close(desired + [0, 0, 17 * 4 * F32_EPS], desired, ulps=16)


def test_per_element_bounds_each_value_by_its_own_magnitude():
    desired = np.array([1.0, 1e-4])
    assert_close(desired * (1 + 3 * F32_EPS), desired, ulps=4, per_element=True)
    with pytest.raises(AssertionError):  # 1e-4 * 5 ulps: within 4 ulps of max|desired|, not of 1e-4
        assert_close(desired + [0, 5 * F32_EPS * 1e-4 * 1e3], desired, ulps=4, per_element=True)
    assert_close(desired + [0, 5 * F32_EPS * 1e-4 * 1e3], desired, ulps=4)


def test_nan_never_passes_and_not_close_needs_a_real_difference():
    with pytest.raises(AssertionError):
        assert_close([np.nan, 1.0], [1.0, 1.0], ulps=1000)
    assert_not_close([1.0, 2.0], [1.0, 2.1], ulps=16)
    with pytest.raises(AssertionError, match="cannot tell"):
        assert_not_close([1.0, 2.0], [1.0, 2.0 * (1 + F32_EPS)], ulps=16)
