"""How the suite compares floats: exactly, or within a bound derived from float32 rounding.

Two kinds of equality, and every numerical assertion in the suite is one of them:

- **Exact** (`np.testing.assert_array_equal`, `==`): the same program runs twice on the same
  machine with the same inputs (a resumed run against an uninterrupted one, an accumulation
  whose order is kept, an export/import round trip, a copy of weights), or an input change
  that mathematically adds exact zeros (a masked future token in a causality test). Any
  difference there is a bug, whatever the CPU.
- **Within `ulps` units of float32 rounding at the values' scale** (`assert_close`): two
  different programs compute the same math (scanned against unrolled layers, a cached
  decoding step against the full forward, plm_jax against transformers, grouped against
  repeated-head attention). XLA fuses, reorders and vectorises each program differently per
  instruction set (AVX2 against AVX-512) and per release, so only rounding-level agreement is
  guaranteed: the bound is `ulps * eps32 * max|desired|` (eps32 = 2**-23), or
  `ulps * eps32 * |desired|` element by element where values span orders of magnitude (RoPE
  frequencies). Each call site says why its `ulps` is what the computation can deliver, and
  `assert_not_close` shows the same bound rejects a deliberately wrong variant, so the bound
  is still tight enough to catch a real bug.

Comparisons against hand-computed literals (a norm of four numbers) keep plain `rtol`: they
measure one short computation against exact math, not two programs against each other.
"""

from __future__ import annotations

import numpy as np

F32_EPS = float(np.finfo(np.float32).eps)  # 2**-23 = 1.19e-07: one unit in the last place at 1


def f32_bound(desired, ulps: float, *, per_element: bool = False) -> np.ndarray | float:
    """The largest difference `ulps` float32 rounding units allow at `desired`'s scale."""
    magnitude = np.abs(np.asarray(desired, np.float64))
    if per_element:
        return ulps * F32_EPS * magnitude
    return ulps * F32_EPS * float(magnitude.max(initial=0.0))


def assert_close(actual, desired, *, ulps: float, per_element: bool = False, err_msg: str = ""):
    """`actual` equals `desired` up to `ulps` float32 rounding units of their scale.

    Args:
      actual, desired: arrays (or scalars) from two programs computing the same math.
      ulps: rounding units allowed, relative to max|desired| (or to each |desired| when
        `per_element`).
      per_element: bound each element by its own magnitude, for values spanning decades.
    """
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    bound = f32_bound(desired, ulps, per_element=per_element)
    error = np.abs(actual - desired)
    worst = float((error - bound).max(initial=-np.inf))
    if not worst <= 0 or np.isnan(error).any():  # also fails on NaN
        where = np.unravel_index(int(np.nanargmax(error - bound)), error.shape)
        limit = np.broadcast_to(bound, error.shape)[where]
        raise AssertionError(
            f"not equal within {ulps} float32 ulps of the values' scale: |difference| "
            f"{error[where]:.3g} at {where} > bound {limit:.3g} "
            f"(max|desired| {float(np.abs(desired).max(initial=0.0)):.3g}). {err_msg}"
        )


def assert_not_close(actual, desired, *, ulps: float, per_element: bool = False):
    """A deliberately wrong variant is rejected by the same bound `assert_close` uses."""
    actual = np.asarray(actual, np.float64)
    desired = np.asarray(desired, np.float64)
    bound = f32_bound(desired, ulps, per_element=per_element)
    assert (np.abs(actual - desired) > bound).any(), "the bound cannot tell the variants apart"
