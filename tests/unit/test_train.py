"""`txstream train`: features computed once by the pipeline, the handbook's protocol, the artifact."""
import datetime
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from txstream import cli
from txstream.models import artifacts
from txstream.models import train as train_lib
from txstream.pipelines import generate
from txstream.core.contracts import FEATURE_COLUMNS, FEATURE_NAMES


@pytest.fixture(scope="module")
def book_days(tmp_path_factory):
  """The handbook's calendar (2018-04-01 .. 2018-09-04) with a tiny population: seconds, not minutes."""
  out = tmp_path_factory.mktemp("book") / "data"
  generate.generate(str(out), customers=60, terminals=120, days=157, start=datetime.date(2018, 4, 1), seed=1)
  return str(out)


def test_handbook_protocol_computes_features_once_and_reports_every_fold(book_days, tmp_path, monkeypatch):
  calls = []
  compute = train_lib.compute_features
  monkeypatch.setattr(train_lib, "compute_features", lambda *a, **k: calls.append(a) or compute(*a, **k))
  model_dir = str(tmp_path / "model")
  report = train_lib.train_handbook(book_days, model_dir, params={"n_estimators": 5},
                                    feature_sets=["all", "handbook"])
  assert len(calls) == 1
  assert report["data_days"] == ["2018-04-01", "2018-09-04"]
  for name, width in (("all", len(FEATURE_NAMES)), ("handbook", 15)):
    run = report["feature_sets"][name]
    assert len(run["features"]) == width
    assert run["params"]["n_estimators"] == 5
    assert run["single_split"]["train"] == ["2018-07-25", "2018-07-31"]
    assert [f["test"] for f in run["prequential"]["folds"]] == [
        ["2018-08-29", "2018-09-04"], ["2018-08-22", "2018-08-28"], ["2018-08-15", "2018-08-21"],
        ["2018-08-08", "2018-08-14"]]
    assert len(run["validation"]["folds"]) == 4
    folds = run["prequential"]["folds"]
    assert run["prequential"]["mean"]["auc_roc"] == pytest.approx(np.mean([f["auc_roc"] for f in folds]), abs=1e-4)
    # The baseline split is the last prequential fold: same data, same model, same figures.
    assert run["single_split"] == folds[-1]
  assert report["auc_roc"] == report["feature_sets"]["all"]["prequential"]["mean"]["auc_roc"]
  meta = artifacts.load_metadata(model_dir, FEATURE_NAMES)
  assert meta["version"] == report["model_version"]
  assert meta["training_window"]["start"] == "2018-07-25" and meta["protocol"] == "handbook"
  assert meta["metrics"]["auc_roc"] == report["feature_sets"]["all"]["single_split"]["auc_roc"]


def test_load_features_sorts_rows_and_keeps_vectors_with_their_ids(tmp_path):
  width = len(FEATURE_NAMES)
  rows = [("b", 2 * 86_400_000, 7, [2.0] * width), ("a", 5, 3, [1.0] * width), ("c", 2 * 86_400_000, 9, [3.0] * width)]
  columns = {"transaction_id": [r[0] for r in rows], "event_time_ms": [r[1] for r in rows],
             "customer_id": [r[2] for r in rows]}
  columns.update({name: [r[3][j] + j for r in rows] for j, name in enumerate(FEATURE_COLUMNS)})
  table = pa.table(columns)
  pq.write_table(table, str(tmp_path / "features-0.parquet"))
  data = train_lib.load_features(str(tmp_path / "features*.parquet"), {"c"})
  assert data.transaction_id == ["a", "b", "c"]
  assert data.x[:, 0].tolist() == [1.0, 2.0, 3.0] and data.x.shape == (3, width)
  assert data.x[0, width - 1] == 1.0 + width - 1  # columns in FEATURE_NAMES order
  assert data.y.tolist() == [False, False, True]
  assert data.day.tolist() == [0, 2, 2] and data.customer.tolist() == [3, 7, 9]


def test_feature_sets_are_subsets_of_the_pipeline_features():
  assert train_lib.FEATURE_SETS["all"] == list(FEATURE_NAMES)
  for names in train_lib.FEATURE_SETS.values():
    assert set(names) <= set(FEATURE_NAMES)
  assert not [n for n in train_lib.FEATURE_SETS["no_early_labels"] if "KNOWN" in n]


def test_cli_rejects_flags_of_the_other_protocol(capsys):
  assert cli.main(["train", "--input", "x", "--model_dir", "y", "--select"]) == 2
  assert "--protocol handbook only" in capsys.readouterr().err
  assert cli.main(["train", "--input", "x", "--model_dir", "y", "--protocol", "handbook", "--train_days", "3"]) == 2
  assert "do not apply" in capsys.readouterr().err
  assert cli.main(["train", "--input", "x", "--model_dir", "y", "--params", "[1]"]) == 2
  assert "JSON object" in capsys.readouterr().err


def test_cli_handbook_names_the_days_it_needs(capsys, tmp_path):
  short = tmp_path / "short"
  generate.generate(str(short), customers=20, terminals=40, days=40, start=datetime.date(2018, 4, 1), seed=2)
  assert cli.main(["train", "--input", str(short), "--model_dir", str(tmp_path / "m"), "--protocol", "handbook"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("txstream: error: the data cover 2018-04-01..2018-05-10") and "\n" not in err
  assert "--days 157" in err
  assert not (tmp_path / "m").exists()
