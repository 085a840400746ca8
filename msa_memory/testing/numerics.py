"""Rounding-error bounds for tests that hold a fast path to its reference: unit roundoffs and Higham's γ_n.

A sum of n products computed in precision u, in any order, is within γ_n·Σ|a_i b_i| of its exact value
(Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1), so a tolerance follows from the dtype and
the accumulation length instead of from one run's difference.
"""

from __future__ import annotations

__all__ = ["U32", "U64", "UBF16", "gamma"]

U32, U64, UBF16 = 2.0**-24, 2.0**-53, 2.0**-8
"""Unit roundoff of fp32, fp64 and bf16 (round to nearest)."""


def gamma(n: int, u: float = U32) -> float:
    """γ_n = n·u / (1 − n·u): a sum of n products in precision u, any order, is within γ_n·Σ|a_i b_i| of exact."""
    return n * u / (1 - n * u)
