"""Decide: XGBoost on whole batches, rules, reason codes, versions stamped.

``Model`` wraps an XGBoost booster and predicts a whole batch in one
``inplace_predict`` call on one thread (measured on 2 cores: OpenMP threads
competing with the pipeline's own work were 10-20x slower per call).
``decide`` turns featured rows into decision rows: the score rounded to six
decimals exactly as Python's ``round`` does, the rules' decision and reason
codes, the model, rules and pipeline versions, and the decision time.
"""
import time
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xgboost

from txstream.core import contracts, numeric
from txstream.core.rules import RuleSet


class Model:
  """A loaded model and the version every prediction it makes is stamped with (shareable per worker)."""
  __slots__ = ("booster", "version", "__weakref__")

  def __init__(self, booster: xgboost.Booster, version: str):
    self.booster = booster
    self.version = version

  @classmethod
  def from_bytes(cls, model_json: bytes, version: str) -> "Model":
    booster = xgboost.Booster()
    booster.load_model(bytearray(model_json))
    booster.set_param({"nthread": 1})
    return cls(booster, version)

  def predict(self, matrix: np.ndarray) -> np.ndarray:
    """P(fraud) per row of a float32 feature matrix in FEATURE_NAMES order."""
    if not len(matrix):
      return np.zeros(0)
    return self.booster.inplace_predict(matrix).astype(np.float64)


def feature_matrix(featured: pa.Table) -> np.ndarray:
  """The model's input: float32, one row per transaction, FEATURE_NAMES order."""
  matrix = np.empty((featured.num_rows, len(contracts.FEATURE_COLUMNS)), dtype=np.float32)
  for j, name in enumerate(contracts.FEATURE_COLUMNS):
    matrix[:, j] = featured.column(name).to_numpy()
  return matrix


def decide(featured: pa.Table, probabilities: np.ndarray, model_version: str, rules: RuleSet,
           decided_at_ms: Optional[int] = None) -> pa.Table:
  """contracts.DECISION rows for the featured rows (history rows, which only fed state, are dropped).

  ``probabilities`` are the model's, one per featured row.
  """
  if featured.num_rows and pc.any(featured.column("history")).as_py():
    own = pc.invert(featured.column("history"))
    probabilities = probabilities[own.to_numpy(zero_copy_only=False)]
    featured = featured.filter(own)
  n = featured.num_rows
  scores = numeric.round_like_python(probabilities, 6)
  columns = {name: featured.column(column).to_numpy()
             for name, column in zip(contracts.FEATURE_NAMES, contracts.FEATURE_COLUMNS)}
  decision, reason_codes = rules.decide(columns, scores)
  now = int(time.time() * 1000) if decided_at_ms is None else decided_at_ms
  table = featured.drop_columns(["history"])
  for name, values in (("score", pa.array(scores)), ("decision", decision), ("reason_codes", reason_codes),
                       ("model_version", _repeat(model_version, n)), ("rules_version", _repeat(rules.version, n)),
                       ("pipeline_version", _repeat(contracts.PIPELINE_VERSION, n)),
                       ("decided_at_ms", pa.array(np.full(n, now, dtype=np.int64)))):
    table = table.append_column(name, values)
  return table.cast(contracts.DECISION)


def _repeat(value: str, n: int) -> pa.Array:
  return pa.array([value], pa.string()).take(pa.array(np.zeros(n, np.int32)))
