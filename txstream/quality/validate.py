"""Runs the expectation suites over a run's (or a live window's) decisions; returns ``data_quality``.

The decisions arrive as Arrow (the cold tier's staged rows of a bounded run,
a live window's decided batches). Great Expectations validates pandas frames:
the row-level suite gets the columns it checks plus three derived ones
(``has_reasons``, ``decision_evidence``, ``score_band``, computed here in
Arrow, because Great Expectations' column-pair expectation is a Python loop
over the rows: 18 s a million rows against 0.6 s for the whole suite this
way); the feature suite gets one row, each feature column's extremes (the
range is all it checks of a column, and 26 columns of a million floats as
pandas cost more than the rest of the validation); the distribution suites
get one row per window and one for the run, computed in polars. Each suite is one validation, whatever the number of
windows: a window's failures are read back from the unexpected rows' index.

Thresholds come from ``quality.yaml`` as expectation parameters; a bound the
file leaves out is open. A window smaller than ``window.min_rows`` is not
held to the rate expectations (its rates are left null, which Great
Expectations counts as missing, not as failing), and the first and last
windows are not held to ``rows_vs_median``: a run's edges are partial days.
"""
import dataclasses
import importlib
import json
import logging
import os
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from txstream.core import contracts
from txstream.core import validate as core_validate

_LOGGER = logging.getLogger(__name__)
SUITES_DIR = os.path.join(os.path.dirname(__file__), "suites")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "config", "quality.yaml")
DECISIONS, FEATURES, WINDOW, RUN = "decisions", "feature_ranges", "window_distribution", "run_distribution"
RATES = ("decline_rate", "review_rate", "mean_score")
_EXAMPLES = 5  # unexpected values kept per failed expectation
_CONFIG_KEYS = {"version": None, "decisions": ("amount_minor_max", "currencies"),
                "window": RATES + ("rows_vs_median", "min_rows"), "run": RATES + ("dead_letter_rate", "min_rows"),
                "live_window_s": None}
_BOUND_KEYS = ("min", "max")


class QualityConfigError(ValueError):
  """A mistake in the data-quality config; reported as one line."""


@dataclasses.dataclass(frozen=True)
class QualityConfig:
  """The thresholds of ``quality.yaml``: ``window``/``run`` map a measure to ``{min, max}``."""
  amount_minor_max: int
  currencies: Tuple[str, ...]
  window: Dict[str, Dict[str, float]]
  run: Dict[str, Dict[str, float]]
  min_rows: int
  run_min_rows: int
  live_window_s: float
  path: str

  @classmethod
  def load(cls, path: Optional[str] = None) -> "QualityConfig":
    """The bundled ``quality.yaml``, overridden key by key by ``path``'s; ``QualityConfigError`` if wrong.

    A file given with ``--dq_config`` need only hold what it changes: its
    sections (``decisions``, ``window``, ``run``) are laid over the bundled ones.
    """
    spec = _read(DEFAULT_CONFIG)
    if path:
      own = _read(path)
      _known(own, _CONFIG_KEYS, path, "")
      for key, value in own.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) and key in spec else value
    path = path or DEFAULT_CONFIG
    _known(spec, _CONFIG_KEYS, path, "")
    decisions = spec.get("decisions") or {}
    window, run = spec.get("window") or {}, spec.get("run") or {}
    _known(decisions, dict.fromkeys(_CONFIG_KEYS["decisions"]), path, "decisions.")
    _known(window, dict.fromkeys(_CONFIG_KEYS["window"]), path, "window.")
    _known(run, dict.fromkeys(_CONFIG_KEYS["run"]), path, "run.")
    currencies = decisions.get("currencies", [])
    if not isinstance(currencies, list) or not currencies or not all(
        isinstance(c, str) and len(c) == 3 and c.isupper() for c in currencies):
      raise QualityConfigError(f"--dq_config {path}: decisions.currencies must be a list of ISO 4217 codes")
    return cls(amount_minor_max=int(_number(decisions.get("amount_minor_max", core_validate.MAX_AMOUNT_MINOR), path,
                                            "decisions.amount_minor_max")),
               currencies=tuple(currencies),
               window={k: _bounds(v, path, f"window.{k}") for k, v in window.items() if k != "min_rows"},
               run={k: _bounds(v, path, f"run.{k}") for k, v in run.items() if k != "min_rows"},
               min_rows=int(_number(window.get("min_rows", 0), path, "window.min_rows")),
               run_min_rows=int(_number(run.get("min_rows", 0), path, "run.min_rows")),
               live_window_s=_number(spec.get("live_window_s", 60), path, "live_window_s", positive=True),
               path=path)


def _read(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      spec = yaml.safe_load(f)
  except OSError as e:
    raise QualityConfigError(f"--dq_config {path}: {e.strerror}") from None
  except yaml.YAMLError as e:
    raise QualityConfigError(f"--dq_config {path}: not YAML ({str(e).splitlines()[0]})") from None
  if not isinstance(spec, dict):
    raise QualityConfigError(f"--dq_config {path}: expected a mapping with {', '.join(_CONFIG_KEYS)}")
  return spec


def _known(spec: dict, valid, path: str, where: str) -> None:
  import difflib
  if not isinstance(spec, dict):
    raise QualityConfigError(f"--dq_config {path}: {where.rstrip('.')} must be a mapping")
  for key in spec:
    if key not in valid:
      near = difflib.get_close_matches(str(key), list(valid), n=1)
      hint = f" (did you mean {near[0]!r}?)" if near else f" (one of: {', '.join(valid)})"
      raise QualityConfigError(f"--dq_config {path}: unknown key {where}{key}{hint}")


def _number(value, path: str, key: str, positive: bool = False) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and value <= 0):
    raise QualityConfigError(f"--dq_config {path}: {key} must be a {'positive ' if positive else ''}number, "
                             f"not {value!r}")
  return float(value)


def _bounds(value, path: str, key: str) -> Dict[str, float]:
  if not isinstance(value, dict) or not value or set(value) - set(_BOUND_KEYS):
    raise QualityConfigError(f"--dq_config {path}: {key} must be a mapping of min and/or max, not {value!r}")
  bounds = {k: _number(v, path, f"{key}.{k}") for k, v in value.items()}
  if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
    raise QualityConfigError(f"--dq_config {path}: {key}: min {bounds['min']} is above max {bounds['max']}")
  return bounds


# ------------------------------------------------------------------------------------------------ Great Expectations

_GX_LOCK = threading.Lock()
_GX: dict = {}


def preload() -> threading.Thread:
  """Imports Great Expectations on a daemon thread (seconds of work) so ``check`` finds it loaded."""
  thread = threading.Thread(target=_gx, name="txstream-gx-import", daemon=True)
  thread.start()
  return thread


def _gx():
  """The module and an ephemeral context with the suites, made once per process."""
  with _GX_LOCK:
    if not _GX:
      os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no usage statistics leave the machine
      gx = importlib.import_module("great_expectations")
      from great_expectations.data_context.types.base import ProgressBarsConfig
      from great_expectations.expectations.expectation_configuration import ExpectationConfiguration
      for name in ("great_expectations", "great_expectations.data_context.types.base"):
        logging.getLogger(name).setLevel(logging.ERROR)  # its INFO lines (a temporary docs folder) are noise here
      # The pandas engine fingerprints each batch by hashing every row: a batch marker nothing here reads,
      # which took longer than the whole suite's checks (0.8 s against 0.5 s for 300,000 decisions).
      from great_expectations.execution_engine import pandas_execution_engine
      pandas_execution_engine.HASH_THRESHOLD = 0
      context = gx.get_context(mode="ephemeral")
      context.variables.progress_bars = ProgressBarsConfig(globally=False)
      source = context.data_sources.add_pandas("txstream")
      suites = {}
      for name in (DECISIONS, FEATURES, WINDOW, RUN):
        with open(os.path.join(SUITES_DIR, f"{name}.json"), encoding="utf-8") as f:
          spec = json.load(f)
        suite = gx.ExpectationSuite(name=spec["name"], meta=spec.get("meta", {}), expectations=[
            ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta", {})).to_domain_obj()
            for e in spec["expectations"]])
        suites[name] = context.suites.add(suite)
      batches = {name: source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
                 for name in suites}
      _GX.update(gx=gx, context=context, suites=suites, batches=batches)
  return _GX


def suite_names() -> Tuple[str, ...]:
  return DECISIONS, FEATURES, WINDOW, RUN


def _validate(name: str, frame, parameters: dict, result_format: str = "SUMMARY"):
  gx = _gx()
  batch = gx["batches"][name].get_batch(batch_parameters={"dataframe": frame})
  return batch.validate(gx["suites"][name], expectation_parameters=parameters,
                        result_format={"result_format": result_format, "partial_unexpected_count": _EXAMPLES})


# ------------------------------------------------------------------------------------------------ frames

def _epoch_ms(column: pa.ChunkedArray) -> np.ndarray:
  if pa.types.is_timestamp(column.type):
    column = column.cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64())
  return column.to_numpy()


def _codes(column) -> Tuple[np.ndarray, List[str]]:
  """(codes, values) of a string column; a null's code is -1 (a missing value to pandas)."""
  encoded = pc.dictionary_encode(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
  return pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64), encoded.dictionary.to_pylist()


def decision_frame(decisions: pa.Table, review_score: float, decline_score: float):
  """The row-level suite's frame: the checked columns and the derived ones (see the module docstring).

  The few-valued string columns become pandas categories, the derived ones
  built from codes (a decision's code and a 0/1 or band number), never as
  strings row by row; the ids are Python strings. Great Expectations filters
  every column by row masks, and on Arrow-backed strings each filter is an
  Arrow ``take`` (0.4 s a million rows over the suite).
  """
  import pandas as pd
  n = decisions.num_rows
  decision, actions = _codes(decisions.column("decision"))
  # The derived columns spell a missing decision "null" (the suite's value sets never hold it).
  known = np.where(decision < 0, len(actions), decision)
  labels = actions + ["null"]
  has_reasons = pc.greater(pc.fill_null(pc.list_value_length(decisions.column("reason_codes")), 0), 0)
  evidence = pd.Categorical.from_codes(known * 2 + has_reasons.to_numpy(zero_copy_only=False).astype(np.int64),
                                       [f"{a}:{r}" for a in labels for r in ("none", "reasons")])
  score = decisions.column("score")
  scores = score.to_numpy(zero_copy_only=False).astype(np.float64) if n else np.zeros(0)
  bands = np.where(np.isnan(scores), 3, np.where(scores >= decline_score, 2, np.where(scores >= review_score, 1, 0)))
  band = pd.Categorical.from_codes(bands * len(labels) + known,
                                   [f"{b}:{a}" for b in ("low", "elevated", "high", "null") for a in labels])
  time_column = "event_time_ms" if "event_time_ms" in decisions.column_names else "event_time"
  frame = pd.DataFrame({
      "transaction_id": pd.Series(decisions.column("transaction_id").to_numpy(zero_copy_only=False), dtype=object),
      "amount_minor": decisions.column("amount_minor").to_pandas(),
      "currency": pd.Categorical.from_codes(*_codes(decisions.column("currency"))),
      "event_time_ms": _epoch_ms(decisions.column(time_column)) if n else np.zeros(0, np.int64),
      "score": score.to_pandas(),
      "decision": pd.Categorical.from_codes(decision, actions),
      "decision_evidence": evidence, "score_band": band,
      "model_version": pd.Categorical.from_codes(*_codes(decisions.column("model_version")))})
  return frame


def feature_ranges(decisions: pa.Table) -> Dict[str, Tuple[float, float]]:
  """``{feature column: (min, max)}`` of decided rows."""
  out = {}
  for name in contracts.FEATURE_COLUMNS:
    extremes = pc.min_max(decisions.column(name))
    out[name] = (extremes["min"].as_py(), extremes["max"].as_py())
  return out


def feature_frame(ranges: Dict[str, Tuple[float, float]]):
  """The feature suite's frame: one row, ``<feature>_min`` and ``<feature>_max`` of every feature column.

  A column's range is all the suite checks of it, so the rows never become a
  pandas frame (26 columns of a million floats: most of the validation's
  time); a bounded run reads the ranges from the Parquet statistics alone.
  """
  import pandas as pd
  row = {}
  for name in contracts.FEATURE_COLUMNS:
    row[f"{name}_min"], row[f"{name}_max"] = ranges[name]
  return pd.DataFrame([row], dtype="float64")


def window_frame(decisions: pa.Table, window_ms: Optional[int], min_rows: int):
  """One row per window: ``window_start_ms``, ``window_end_ms``, ``rows``, the rates, ``rows_vs_median``.

  ``window_ms`` None: UTC event days (a bounded run); else fixed windows of
  that many ms of ``decided_at`` (a live run's processing-time windows).
  """
  import polars as pl
  time_column = "event_time_ms" if window_ms is None else "decided_at_ms"
  if time_column not in decisions.column_names:
    time_column = time_column[:-3]
  size = window_ms or contracts.DAY_MS
  # Arrow straight into polars: the decisions stay Arrow strings (as numpy objects they took 0.2 s a million).
  frame = pl.from_arrow(pa.table({"t": pa.array(_epoch_ms(decisions.column(time_column)) if decisions.num_rows
                                                else np.zeros(0, np.int64)),
                                  "declined": pc.equal(decisions.column("decision"), "decline"),
                                  "reviewed": pc.equal(decisions.column("decision"), "review"),
                                  "score": decisions.column("score")}))
  windows = (frame.with_columns(((pl.col("t") // size) * size).alias("window_start_ms"))
             .group_by("window_start_ms")
             .agg(pl.len().alias("rows"), pl.col("declined").mean().alias("decline_rate"),
                  pl.col("reviewed").mean().alias("review_rate"),
                  pl.col("score").mean().alias("mean_score"))
             .sort("window_start_ms")
             .with_columns((pl.col("window_start_ms") + size).alias("window_end_ms")))
  median = windows["rows"].median() if windows.height else None
  windows = windows.with_columns((pl.col("rows") / median).alias("rows_vs_median") if median else
                                 pl.lit(None, pl.Float64).alias("rows_vs_median"))
  small = pl.col("rows") < min_rows
  windows = windows.with_columns([pl.when(small).then(None).otherwise(pl.col(c)).alias(c) for c in RATES])
  if windows.height:
    edge = (pl.int_range(pl.len()) == 0) | (pl.int_range(pl.len()) == pl.len() - 1)
    windows = windows.with_columns(pl.when(edge).then(None).otherwise(pl.col("rows_vs_median"))
                                   .alias("rows_vs_median"))
  return windows.to_pandas()


def run_frame(decisions: Optional[pa.Table], counts: dict, min_rows: int = 0):
  """One row for the run; ``counts`` = ``events_in``, ``scored``, ``dead_letter_total``, ``filtered``.

  A run of fewer than ``min_rows`` decisions is too small for its rates to
  mean anything: they are left null (not held to their bounds); the
  accounting is checked whatever the size.
  """
  import pandas as pd
  events_in, scored = counts.get("events_in", 0), counts.get("scored", 0)
  row = {"rows": scored, "dead_letter_rate": counts.get("dead_letter_total", 0) / events_in if events_in else 0.0,
         "unaccounted": events_in - scored - counts.get("dead_letter_total", 0) - counts.get("filtered", 0)}
  if decisions is not None and decisions.num_rows:
    actions = decisions.column("decision")
    row["decline_rate"] = pc.sum(pc.equal(actions, "decline")).as_py() / decisions.num_rows
    row["review_rate"] = pc.sum(pc.equal(actions, "review")).as_py() / decisions.num_rows
    row["mean_score"] = pc.mean(decisions.column("score")).as_py()
  elif scored and counts.get("decisions"):  # no rows at hand (no cold tier): the counters still give the rates
    row["decline_rate"] = counts["decisions"].get("decline", 0) / scored
    row["review_rate"] = counts["decisions"].get("review", 0) / scored
    row["mean_score"] = None
  else:
    row.update(decline_rate=None, review_rate=None, mean_score=None)
  if scored < min_rows:
    row.update(decline_rate=None, review_rate=None, mean_score=None, dead_letter_rate=None)
  return pd.DataFrame([row])


def _parameters(bounds: Dict[str, Dict[str, float]], names: Sequence[str]) -> dict:
  out = {}
  for name in names:
    out[f"{name}_min"] = bounds.get(name, {}).get("min")
    out[f"{name}_max"] = bounds.get(name, {}).get("max")
  return out


# ------------------------------------------------------------------------------------------------ results

def _plain(value):
  """JSON-able observed values (numpy scalars, tuples)."""
  if isinstance(value, (np.generic,)):
    return value.item()
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, dict):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def _failure(result) -> dict:
  config = result.expectation_config
  kwargs = {k: _plain(v) for k, v in config.kwargs.items()
            if k not in ("batch_id", "column", "value_set") or (k == "value_set" and len(v) <= 10)}
  observed = result.result or {}
  failure = {"expectation": config.type, "column": config.kwargs.get("column"), "kwargs": kwargs}
  if "observed_value" in observed:
    failure["observed"] = _plain(observed["observed_value"])
  if "unexpected_count" in observed:
    failure["unexpected_count"] = int(observed["unexpected_count"])
    failure["unexpected_percent"] = round(float(observed.get("unexpected_percent") or 0.0), 6)
    failure["observed"] = _plain(observed.get("partial_unexpected_list", [])[:_EXAMPLES])
  if result.exception_info and result.exception_info.get("raised_exception"):
    failure["error"] = str(result.exception_info.get("exception_message"))[:300]
  return failure


def _suite_result(name: str, scope: str, validation, rows: int) -> dict:
  return {"suite": name, "scope": scope, "success": bool(validation.success), "rows": rows,
          "evaluated": int(validation.statistics["evaluated_expectations"]),
          "failed": [_failure(r) for r in validation.results if not r.success]}


def _window_results(validation, windows) -> List[dict]:
  """Each window's own result from one validation over all windows (by the unexpected rows' index)."""
  failed_by_window: Dict[int, List[dict]] = {}
  evaluated = int(validation.statistics["evaluated_expectations"])
  for result in validation.results:
    if result.success:
      continue
    column = result.expectation_config.kwargs.get("column")
    indexes = (result.result or {}).get("unexpected_index_list")
    if indexes is None:  # an error, not unexpected values: every window shares it
      indexes = list(range(len(windows)))
    for i in indexes:
      failure = _failure(result)
      failure["observed"] = _plain(windows[column].iloc[i]) if column in windows else failure.get("observed")
      failure.pop("unexpected_count", None)
      failure.pop("unexpected_percent", None)
      failed_by_window.setdefault(int(i), []).append(failure)
  out = []
  for i in range(len(windows)):
    failed = failed_by_window.get(i, [])
    out.append({"window_start_ms": int(windows["window_start_ms"].iloc[i]),
                "window_end_ms": int(windows["window_end_ms"].iloc[i]),
                "rows": int(windows["rows"].iloc[i]), "success": not failed, "evaluated": evaluated,
                "failed": failed})
  return out


def check(decisions: Optional[pa.Table], counts: dict, config: QualityConfig, review_score: float,
          decline_score: float, window: Optional[Tuple[int, int]] = None, window_ms: Optional[int] = None,
          run_scope: bool = True, ranges: Optional[Dict[str, Tuple[float, float]]] = None) -> dict:
  """Validates the suites; returns ``data_quality`` (see ``txstream.quality``).

  ``decisions``: the decided rows (``contracts.DECISION`` or the cold tier's
  layout), None when the run kept none at hand (no cold tier): the row-level
  and window suites are then not evaluated and say so. ``counts``: the run
  summary's ``events_in``, ``scored``, ``dead_letter_total``, ``filtered``,
  ``decisions``. ``window``: the run's event-time window ``[from, to)``
  (default: what validation accepts). ``window_ms``: fixed processing-time
  windows (a live run) instead of event days. ``run_scope`` False: a live
  window, validated against the window thresholds only. ``ranges``: the
  feature columns' ``(min, max)`` when known without the rows (then
  ``decisions`` need not hold the feature columns).
  """
  started = time.monotonic()
  lo, hi = window or (core_validate.MIN_EVENT_TIME_MS, core_validate.MAX_EVENT_TIME_MS)
  suites: List[dict] = []
  if decisions is not None:
    frame = decision_frame(decisions, review_score, decline_score)
    validation = _validate(DECISIONS, frame, {"amount_minor_max": config.amount_minor_max,
                                              "currencies": list(config.currencies),
                                              "window_from_ms": lo, "window_to_ms": hi})
    scope = "run" if run_scope else "window"
    suites.append(_suite_result(DECISIONS, scope, validation, decisions.num_rows))
    del frame
    ranges = ranges or feature_ranges(decisions)
    suites.append(_suite_result(FEATURES, scope, _validate(FEATURES, feature_frame(ranges), {}), decisions.num_rows))
    windows = window_frame(decisions, window_ms, config.min_rows)
    validation = _validate(WINDOW, windows, _parameters(config.window, RATES + ("rows_vs_median",)), "COMPLETE")
    result = _suite_result(WINDOW, "window", validation, decisions.num_rows)
    result["windows"] = _window_results(validation, windows)
    result["failed_windows"] = sum(not w["success"] for w in result["windows"])
    suites.append(result)
  else:
    for name, scope in ((DECISIONS, "run" if run_scope else "window"), (FEATURES, "run" if run_scope else "window"),
                        (WINDOW, "window")):
      suites.append({"suite": name, "scope": scope, "success": True, "rows": 0, "evaluated": 0, "failed": [],
                     "note": "not evaluated: the run kept no decisions at hand (--no_cold)"})
  if run_scope:
    validation = _validate(RUN, run_frame(decisions, counts, config.run_min_rows),
                           _parameters(config.run, RATES + ("dead_letter_rate",)))
    suites.append(_suite_result(RUN, "run", validation, counts.get("scored", 0)))
    if counts.get("scored", 0) < config.run_min_rows:
      suites[-1]["note"] = f"rates not held: fewer than run.min_rows ({config.run_min_rows}) decisions"
  return {"success": all(s["success"] for s in suites), "evaluated": sum(s["evaluated"] for s in suites),
          "failed": sum(len(s["failed"]) for s in suites), "suites": suites, "config": config.path,
          "seconds": round(time.monotonic() - started, 3)}
