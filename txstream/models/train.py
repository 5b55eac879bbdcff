"""``txstream train``: features from the pipeline's own transforms, then XGBoost.

Features are computed once by ``build_features`` (the very graph the scorer
runs) over the whole input and written to Parquet; training reads them back,
joins the fraud labels and splits by calendar day (UTC):

* ``train``: train days, a delay gap (labels of the most recent days are not
  yet known in production), test days;
* ``train_handbook``: the Fraud Detection Handbook's protocol (see
  ``txstream.models.protocol``): its baseline split, its four prequential
  test folds and its four validation folds, each metric next to the book's.

Every training transaction's label is used, as in the handbook: with a delay
of at least the generator's longest label delay (7 days), all of them are
known when the test period starts. Features only ever use labels known at
the transaction's own time.

The artifact records feature order, training window, parameters, metrics and
the content hash.
"""
import glob
import itertools
import logging
import os
import tempfile
import time
import uuid
from typing import Dict, List, NamedTuple, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq
import xgboost
from apache_beam.options.pipeline_options import PipelineOptions

from txstream.core import contracts, decide, decode
from txstream.core.contracts import FEATURE_NAMES
from txstream.io import schema_registry, wire
from txstream.models import artifacts, protocol
from txstream.models.evaluate import detection_metrics
from txstream.pipelines.graph import build_features
from txstream.runners.profiles import run_context, runner_for

_LOGGER = logging.getLogger(__name__)
DAY_MS = 86_400_000
# From the handbook's grid, on its validation folds (training 2018-06-20 ..
# 07-11), never on the test folds: within 0.002 average precision of the best
# (50 trees, depth 9) with shallower trees. `--protocol handbook --select`
# redoes the choice.
DEFAULT_PARAMS = {"n_estimators": 50, "max_depth": 6, "learning_rate": 0.1, "n_jobs": 2,
                  "eval_metric": "logloss", "tree_method": "hist"}
# The handbook's XGBoost grid (chapter 5, "Model selection").
HANDBOOK_GRID = {"max_depth": (3, 6, 9), "n_estimators": (25, 50, 100), "learning_rate": (0.1, 0.3)}
# Longest look-back of any feature: 30-day terminal windows behind a 7-day delay.
HISTORY_DAYS = 37
# Feature sets the handbook protocol can compare. Only "all" can be served.
_EARLY_LABEL_FEATURES = [n for n in FEATURE_NAMES if n.startswith("TERMINAL_ID_KNOWN_")
                         or n == "TERMINAL_ID_DAYS_SINCE_KNOWN_FRAUD"]
FEATURE_SETS: Dict[str, List[str]] = {
    "all": list(FEATURE_NAMES),
    # Only information the handbook's features use: no label younger than the 7-day delay.
    "no_early_labels": [n for n in FEATURE_NAMES if n not in _EARLY_LABEL_FEATURES],
    # The handbook's 15 features exactly.
    "handbook": (["TX_AMOUNT", "TX_DURING_WEEKEND", "TX_DURING_NIGHT"]
                 + [f"CUSTOMER_ID_{k}_{n}DAY_WINDOW" for n in (1, 7, 30) for k in ("NB_TX", "AVG_AMOUNT")]
                 + [f"TERMINAL_ID_{k}_{n}DAY_WINDOW" for n in (1, 7, 30) for k in ("NB_TX", "RISK")]),
}


class FeatureTable(NamedTuple):
  """Rows in (event time, transaction_id) order; ``day`` is the UTC epoch day."""
  transaction_id: List[str]
  x: np.ndarray
  y: np.ndarray
  event_time_ms: np.ndarray
  day: np.ndarray
  customer: np.ndarray


_KEEP = ["transaction_id", "event_time_ms", "customer_id"] + list(contracts.FEATURE_COLUMNS)


class _WriteFeaturesFn(beam.DoFn):
  """Each FeaturedBatch (own rows only) as one Parquet file of ids, times, customers and features."""
  def __init__(self, directory: str):
    self._directory = directory

  def process(self, batch):
    table = batch.table
    table = table.filter(pa.compute.invert(table.column("history"))).select(_KEEP)
    if table.num_rows:
      pq.write_table(table, os.path.join(self._directory, f"features-{uuid.uuid4().hex}.parquet"))


def compute_features(input_dir: str, out_dir: str, beam_args=()) -> str:
  """Runs the feature part of the graph over ``input_dir``; returns the Parquet glob."""
  options = PipelineOptions(["--input", input_dir, *beam_args])
  runner = runner_for(options)
  with run_context(runner), beam.Pipeline(runner=runner, options=options) as p:
    outputs = build_features(p, options)
    _ = outputs.featured | "Write" >> beam.ParDo(_WriteFeaturesFn(out_dir))
  return os.path.join(out_dir, "features-*.parquet")


def read_fraud_ids(input_dir: str) -> set:
  decoder = decode.Decoder(schema_registry.FileSchemaRegistry(), schema_registry.LABEL_SUBJECT)
  frauds = set()
  for path in sorted(glob.glob(os.path.join(input_dir, "labels", "*.wire"))):
    with open(path, "rb") as f:
      for frames in wire.read_frame_batches(f):
        labels, _ = decode.decode_labels(frames.raw(os.path.basename(path)), decoder)
        frauds.update(labels.filter(labels.column("is_fraud")).column("transaction_id").to_pylist())
  return frauds


def load_features(pattern: str, fraud_ids: set) -> FeatureTable:
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ValueError(f"no features written to {pattern}: the input holds no valid transactions")
  table = pa.concat_tables([pq.read_table(p) for p in paths])
  table = table.sort_by([("event_time_ms", "ascending"), ("transaction_id", "ascending")])
  ids = table.column("transaction_id").to_pylist()
  x = decide.feature_matrix(table)
  y = np.array([i in fraud_ids for i in ids], dtype=bool)
  t = table.column("event_time_ms").to_numpy()
  return FeatureTable(ids, x, y, t, t // DAY_MS, table.column("customer_id").to_numpy())


def features_for(input_dir: str, beam_args=()) -> FeatureTable:
  """Computes the features of the whole input once, with the pipeline, and loads them."""
  if not os.path.isdir(os.path.join(input_dir, "labels")):
    raise ValueError(f"--input {input_dir}: not a directory written by `txstream generate`")
  with tempfile.TemporaryDirectory(prefix="txstream-train-") as tmp:
    return load_features(compute_features(input_dir, tmp, beam_args), read_fraud_ids(input_dir))


def _params(seed: int, params: Optional[dict]) -> dict:
  return dict(DEFAULT_PARAMS, random_state=seed, **(params or {}))


def _fit(x, y, params: dict) -> xgboost.XGBClassifier:
  model = xgboost.XGBClassifier(**params)
  model.fit(x, y)
  return model


def _fit_predict(params: dict):
  return lambda x_train, y_train, x_test: _fit(x_train, y_train, params).predict_proba(x_test)[:, 1]


def _write_model(model_dir: str, model, window: protocol.Window, params: dict, metrics: dict, **extra) -> dict:
  with tempfile.TemporaryDirectory(prefix="txstream-model-") as tmp:
    path = os.path.join(tmp, artifacts.MODEL_FILE)
    model.save_model(path)
    with open(path, "rb") as f:
      model_bytes = f.read()
  described = window.describe()
  return artifacts.write_artifact(model_dir, model_bytes, {
      "feature_names": list(FEATURE_NAMES),
      "training_window": {"start": described["train"][0], "end": described["train"][1],
                          "test_start": described["test"][0], "test_end": described["test"][1]},
      "params": params, "metrics": metrics, "xgboost_version": xgboost.__version__, **extra})


def train(input_dir: str, model_dir: str, train_days: Optional[int] = None, test_days: int = 7,
          delay_days: int = 7, seed: int = 0, params: Optional[dict] = None, beam_args=()) -> dict:
  """Trains on the first days, tests after the delay; writes an artifact, returns the test metrics.

  The test set is built as the handbook builds it (``protocol.split``).
  """
  params = _params(seed, params)
  t0 = time.monotonic()
  data = features_for(input_dir, beam_args)
  feature_seconds = time.monotonic() - t0
  first = int(data.day.min())
  n_days = int(data.day.max()) - first + 1
  if train_days is None:
    train_days = n_days - test_days - delay_days
  if train_days < 1 or test_days < 1 or delay_days < 0:
    raise ValueError(f"{n_days} days of data cannot hold {test_days} test + {delay_days} delay days")
  window = protocol.Window(first, train_days, delay_days, test_days)
  train_mask, test_mask = protocol.split(data.day, data.customer, data.y, window)
  if not data.y[train_mask].any():
    raise ValueError("no fraud in the training days: nothing to learn from")
  model = _fit(data.x[train_mask], data.y[train_mask], params)
  score = model.predict_proba(data.x[test_mask])[:, 1]
  metrics = detection_metrics(data.day[test_mask], data.customer[test_mask], score, data.y[test_mask])
  meta = _write_model(model_dir, model, window, params, metrics, train_rows=int(train_mask.sum()),
                      train_frauds=int(data.y[train_mask].sum()))
  return dict(metrics, model_version=meta["version"], model_dir=model_dir,
              feature_seconds=round(feature_seconds, 1), wall_seconds=round(time.monotonic() - t0, 1))


def _run_windows(data: FeatureTable, columns: Sequence[int], windows, params: dict) -> dict:
  x = data.x[:, columns]
  folds = [protocol.evaluate_window(x, data.y, data.day, data.customer, w, _fit_predict(params)) for w in windows]
  return {"folds": folds, "mean": protocol.summarise(folds)}


def select_params(data: FeatureTable, columns: Sequence[int], windows, seed: int) -> List[dict]:
  """The handbook's grid on the validation folds, best mean average precision first."""
  results = []
  for depth, trees, rate in itertools.product(*HANDBOOK_GRID.values()):
    params = _params(seed, {"max_depth": depth, "n_estimators": trees, "learning_rate": rate})
    mean = _run_windows(data, columns, windows, params)["mean"]
    results.append({"params": {"max_depth": depth, "n_estimators": trees, "learning_rate": rate}, **mean})
    _LOGGER.info("validation %s: %s", results[-1]["params"], mean)
  return sorted(results, key=lambda r: (-r["average_precision"], -r["auc_roc"], -r["card_precision_at_100"]))


def train_handbook(input_dir: str, model_dir: str, seed: int = 0, params: Optional[dict] = None,
                   feature_sets: Sequence[str] = ("all",), select: bool = False, beam_args=()) -> dict:
  """The handbook's protocol on features computed once; writes the baseline split's model.

  For each feature set: the validation folds, the baseline split and the
  prequential test folds, per fold and mean, beside the book's figures. The
  top-level metrics are the first set's prequential mean. Only the "all" set
  matches the pipeline's feature list, so only it is written as an artifact.
  """
  unknown = [s for s in feature_sets if s not in FEATURE_SETS]
  if unknown or not feature_sets:
    raise ValueError(f"unknown feature set {unknown[0] if unknown else ''!r}; choose from {sorted(FEATURE_SETS)}")
  t0 = time.monotonic()
  schedule = protocol.handbook_schedule()
  data = features_for(input_dir, beam_args)
  feature_seconds = time.monotonic() - t0
  protocol.check_coverage(data.day, [w for ws in schedule.values() for w in ws], HISTORY_DAYS)
  report = {"protocol": "handbook", "input": input_dir, "rows": len(data.y), "frauds": int(data.y.sum()),
            "data_days": [str(protocol.day_date(data.day.min())), str(protocol.day_date(data.day.max()))],
            "handbook": protocol.HANDBOOK_FIGURES, "feature_seconds": round(feature_seconds, 1), "feature_sets": {}}
  for name in feature_sets:
    columns = [FEATURE_NAMES.index(n) for n in FEATURE_SETS[name]]
    run = {"features": FEATURE_SETS[name]}
    chosen = _params(seed, params)
    if select:
      ranked = select_params(data, columns, schedule["validation"], seed)
      run["selection"] = ranked
      chosen = _params(seed, dict(params or {}, **ranked[0]["params"]))
    run["params"] = chosen
    run["validation"] = _run_windows(data, columns, schedule["validation"], chosen)
    run["single_split"] = _run_windows(data, columns, schedule["single_split"], chosen)["folds"][0]
    run["prequential"] = _run_windows(data, columns, schedule["prequential"], chosen)
    run.update(protocol.compare(run["prequential"]["mean"]))
    report["feature_sets"][name] = run
    _LOGGER.info("%s: prequential mean %s", name, run["prequential"]["mean"])
  first = report["feature_sets"][feature_sets[0]]
  report.update({m: first["prequential"]["mean"][m] for m in protocol.METRICS})
  report["beats_handbook_best"] = first["beats_handbook_best"]
  if "all" in feature_sets:
    report["model_dir"], report["model_version"] = model_dir, _write_handbook_model(
        data, model_dir, schedule["single_split"][0], report["feature_sets"]["all"])
  else:
    report["model_dir"], report["model_version"] = None, None
  report["wall_seconds"] = round(time.monotonic() - t0, 1)
  return report


def _write_handbook_model(data: FeatureTable, model_dir: str, window: protocol.Window, run: dict) -> str:
  train_mask, _ = protocol.split(data.day, data.customer, data.y, window)
  model = _fit(data.x[train_mask], data.y[train_mask], run["params"])
  metrics = {m: run["single_split"][m] for m in ("auc_roc", "average_precision", "card_precision_at_100", "n",
                                                 "frauds")}
  meta = _write_model(model_dir, model, window, run["params"], metrics, train_rows=int(train_mask.sum()),
                      train_frauds=int(data.y[train_mask].sum()), protocol="handbook",
                      prequential_mean=run["prequential"]["mean"])
  return meta["version"]
