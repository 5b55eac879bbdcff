"""Exact arithmetic helpers: vectorised results identical to the Python expressions they replace.

Reruns and reconciliation compare outputs bit for bit, so a vectorised
feature, distance or score must equal what ``int / int`` or ``round(x, d)``
give in Python, not merely be close.
"""
from typing import Callable, Optional

import numpy as np

EXACT = 2 ** 53  # integers below this convert to float64 exactly


def exact_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """``num / den`` elementwise as Python's true division of ints gives it (correctly rounded)."""
  if num.dtype != object and (num.size == 0 or (np.abs(num).max() < EXACT and np.abs(den).max() < EXACT)):
    return num.astype(np.float64) / den.astype(np.float64)
  return np.array([int(a) / int(b) for a, b in zip(num.tolist(), den.tolist())], dtype=np.float64)


def round_like_python(values: np.ndarray, digits: int,
                      exact: Optional[Callable[[int], float]] = None) -> np.ndarray:
  """``round(x, digits)`` per element as Python computes it (correctly rounded, ties to even).

  numpy scales before rounding, which can fall on the other side of a tie by
  an ulp; values within a hair of a tie are redone in Python. ``exact(i)``,
  when given, recomputes element i's unrounded value in Python first (for
  inputs that numpy itself may compute an ulp away from Python).
  """
  scale = 10.0 ** digits
  scaled = values * scale
  out = np.round(values, digits)
  near = np.flatnonzero(np.abs(scaled - np.floor(scaled) - 0.5) < 1e-6)
  for i in near.tolist():
    out[i] = round(exact(i) if exact is not None else float(values[i]), digits)
  return out
