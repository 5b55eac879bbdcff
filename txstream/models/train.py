"""``txstream train``: features from the pipeline's own transforms, then XGBoost.

Features are computed by ``build_features`` (the very graph the scorer runs)
and written to Parquet; training reads them back, joins the fraud labels and
fits an ``XGBClassifier`` on a time split: train days, a delay gap (labels of
the most recent days are not yet known in production), test days. The
artifact records feature order, training window, parameters, metrics and the
content hash.
"""
import datetime
import glob
import io
import logging
import os
import tempfile
import time
from typing import Optional

import apache_beam as beam
import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xgboost
from apache_beam.options.pipeline_options import PipelineOptions

from txstream.io import schema_registry, wire
from txstream.models import artifacts
from txstream.models.evaluate import detection_metrics
from txstream.pipelines.graph import build_features
from txstream.runners.profiles import runner_for
from txstream.transforms.features import FEATURE_NAMES

_LOGGER = logging.getLogger(__name__)
DAY_MS = 86_400_000
DEFAULT_PARAMS = {"n_estimators": 50, "max_depth": 3, "learning_rate": 0.3, "n_jobs": 2,
                  "eval_metric": "logloss", "tree_method": "hist"}


def _feature_row(featured):
  tx = featured.transaction
  return {"transaction_id": tx.transaction_id, "event_time_ms": tx.event_time_ms,
          "customer_id": tx.customer_id, "features": list(featured.features)}


def compute_features(input_dir: str, out_dir: str, beam_args=()) -> str:
  """Runs the feature part of the graph over ``input_dir``; returns the Parquet glob."""
  schema = pa.schema([("transaction_id", pa.string()), ("event_time_ms", pa.int64()),
                      ("customer_id", pa.int64()), ("features", pa.list_(pa.float64()))])
  options = PipelineOptions(["--input", input_dir, *beam_args])
  prefix = os.path.join(out_dir, "features")
  with beam.Pipeline(runner=runner_for(options), options=options) as p:
    outputs = build_features(p, options)
    _ = (outputs.featured
         | "Rows" >> beam.Map(_feature_row)
         | "Write" >> beam.io.WriteToParquet(prefix, schema, file_name_suffix=".parquet"))
  return prefix + "*.parquet"


def read_fraud_ids(input_dir: str) -> set:
  registry = schema_registry.FileSchemaRegistry()
  frauds = set()
  for path in sorted(glob.glob(os.path.join(input_dir, "labels", "*.wire"))):
    with open(path, "rb") as f:
      for _, message in wire.read_frames(f):
        schema_id, body = wire.split_header(message)
        record = fastavro.schemaless_reader(io.BytesIO(body), registry.parsed(schema_id), None)
        if record["is_fraud"]:
          frauds.add(record["transaction_id"])
  return frauds


def load_features(pattern: str, fraud_ids: set):
  table = pa.concat_tables([pq.read_table(p) for p in sorted(glob.glob(pattern))])
  table = table.sort_by([("event_time_ms", "ascending"), ("transaction_id", "ascending")])
  ids = table.column("transaction_id").to_pylist()
  x = np.array(table.column("features").to_pylist(), dtype=np.float32)
  y = np.array([i in fraud_ids for i in ids], dtype=bool)
  t = table.column("event_time_ms").to_numpy()
  c = table.column("customer_id").to_numpy()
  return x, y, t, c


def train(input_dir: str, model_dir: str, train_days: Optional[int] = None, test_days: int = 7,
          delay_days: int = 7, seed: int = 0, params: Optional[dict] = None) -> dict:
  """Trains and writes an artifact; returns the metrics (test split)."""
  if not os.path.isdir(os.path.join(input_dir, "labels")):
    raise ValueError(f"--input {input_dir}: not a directory written by `txstream generate`")
  params = dict(DEFAULT_PARAMS, random_state=seed, **(params or {}))
  t0 = time.monotonic()
  with tempfile.TemporaryDirectory(prefix="txstream-train-") as tmp:
    x, y, t, c = load_features(compute_features(input_dir, tmp), read_fraud_ids(input_dir))
  feature_seconds = time.monotonic() - t0
  day = (t - t.min()) // DAY_MS
  n_days = int(day.max()) + 1
  if train_days is None:
    train_days = n_days - test_days - delay_days
  if train_days < 1:
    raise ValueError(f"{n_days} days of data cannot hold {test_days} test + {delay_days} delay days")
  train_mask = day < train_days
  test_start = train_days + delay_days
  test_mask = (day >= test_start) & (day < test_start + test_days)
  model = xgboost.XGBClassifier(**params)
  model.fit(x[train_mask], y[train_mask])
  score = model.predict_proba(x[test_mask])[:, 1]
  metrics = detection_metrics(day[test_mask], c[test_mask], score, y[test_mask])
  start = datetime.datetime.fromtimestamp(t.min() / 1000, tz=datetime.timezone.utc).date()
  with tempfile.NamedTemporaryFile(suffix=".json") as f:
    model.save_model(f.name)
    model_bytes = open(f.name, "rb").read()
  meta = artifacts.write_artifact(model_dir, model_bytes, {
      "feature_names": list(FEATURE_NAMES),
      "training_window": {"start": str(start + datetime.timedelta(days=0)),
                          "end": str(start + datetime.timedelta(days=train_days)),
                          "test_start": str(start + datetime.timedelta(days=test_start)),
                          "test_end": str(start + datetime.timedelta(days=test_start + test_days))},
      "params": params, "metrics": metrics, "xgboost_version": xgboost.__version__,
      "train_rows": int(train_mask.sum()), "train_frauds": int(y[train_mask].sum())})
  return dict(metrics, model_version=meta["version"], model_dir=model_dir,
              feature_seconds=round(feature_seconds, 1), wall_seconds=round(time.monotonic() - t0, 1))
