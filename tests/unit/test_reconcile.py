"""``txstream reconcile``: the columnar compare, the Beam composite, and the command end to end (exit codes)."""
import datetime
import json
import time

import apache_beam as beam
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from txstream import cli
from txstream.reconcile import compare, pipeline, sources

DAY = 86_400_000
START = 1522540800000  # 2018-04-01T00:00:00Z


def _base(n: int = 60) -> pl.DataFrame:
  return pl.DataFrame({
      "transaction_id": [f"t{i:03d}" for i in range(n)],
      "event_time_ms": [START + i * (3 * DAY // n) for i in range(n)],
      "customer_id": [i % 7 for i in range(n)],
      "amount_minor": [100 + i for i in range(n)],
      "score": [i / 100 for i in range(n)],
      "decision": ["approve"] * n,
      "reason_codes": [["A", "B"]] * n,
  })


def _set(df: pl.DataFrame, key: str, **values) -> pl.DataFrame:
  return df.with_columns([pl.when(pl.col("transaction_id") == key).then(pl.lit(v, dtype=df.schema[c]))
                          .otherwise(pl.col(c)).alias(c) for c, v in values.items()])


def _row(df: pl.DataFrame, key: str, **values) -> pl.DataFrame:
  return _set(df.filter(pl.col("transaction_id") == key), key, **values)


def _reconcile(tmp_path, left: str, right: str, *flags: str, name: str = "report"):
  status = cli.main(["reconcile", "--left", left, "--right", right, "--report", str(tmp_path / name),
                     "--shards", "4", *flags])
  report_path = tmp_path / name / "report.json"
  return status, (json.loads(report_path.read_text()) if report_path.exists() else None)


def _parquet(tmp_path, name: str, df: pl.DataFrame) -> str:
  path = tmp_path / f"{name}.parquet"
  df.write_parquet(path)
  return f"parquet:{path}"


@pytest.fixture(name="planted")
def _planted(tmp_path):
  """Two tables from the same rows with every kind of difference planted once or twice."""
  base = _base()
  left = pl.concat([
      base,
      _row(base, "t001", transaction_id="only-left-1"), _row(base, "t002", transaction_id="only-left-2"),
      _row(base, "t010"),                                 # an identical copy: a duplicate only
      _row(base, "t011", amount_minor=999),               # a copy that differs: a duplicate and a mismatch
  ])
  right = base
  right = _set(right, "t020", score=0.20 + 0.9e-6)        # just inside the tolerance
  right = _set(right, "t021", score=0.21 + 1.1e-6)        # just outside
  right = _set(right, "t022", decision="decline")
  right = _set(right, "t023", decision=None)              # null against a value
  right = _set(right, "t024", reason_codes=["B", "A"])    # lists compare in order
  right = pl.concat([right, _row(base, "t003", transaction_id="only-right-1"), _row(base, "t012")])
  return _parquet(tmp_path, "left", left), _parquet(tmp_path, "right", right)


def test_planted_differences_are_counted_exactly(tmp_path, planted):
  status, report = _reconcile(tmp_path, *planted, "--tolerance", "score=1e-6", "--by", "day")
  assert status == 1 and report["parity"] is False
  figures = {k: report[k] for k in ("left_rows", "right_rows", "matched", "missing_in_left", "missing_in_right",
                                    "duplicates_left", "duplicates_right", "mismatched_rows", "null_keys_left",
                                    "null_keys_right")}
  assert figures == {"left_rows": 64, "right_rows": 62, "matched": 60, "missing_in_left": 1, "missing_in_right": 2,
                     "duplicates_left": 2, "duplicates_right": 1, "mismatched_rows": 5, "null_keys_left": 0,
                     "null_keys_right": 0}
  assert report["mismatches_by_column"] == {"event_time_ms": 0, "customer_id": 0, "amount_minor": 1, "score": 1,
                                            "decision": 2, "reason_codes": 1}
  samples = report["samples"]
  assert [s["key"] for s in samples["missing_in_left"]] == [["only-right-1"]]
  assert [s["key"] for s in samples["missing_in_right"]] == [["only-left-1"], ["only-left-2"]]
  assert samples["duplicate"] == [{"key": ["t010"], "side": "left", "copies": 2},
                                  {"key": ["t011"], "side": "left", "copies": 2},
                                  {"key": ["t012"], "side": "right", "copies": 2}]
  mismatches = samples["mismatches"]
  assert [s["key"] for s in mismatches["amount_minor"]] == [["t011"]]
  assert mismatches["score"] == [{"key": ["t021"], "left": 0.21, "right": 0.21 + 1.1e-6}]
  assert mismatches["decision"] == [{"key": ["t022"], "left": "approve", "right": "decline"},
                                    {"key": ["t023"], "left": "approve", "right": None}]
  assert mismatches["reason_codes"] == [{"key": ["t024"], "left": ["A", "B"], "right": ["B", "A"]}]
  assert mismatches["customer_id"] == mismatches["event_time_ms"] == []
  windows = report["windows"]
  assert [w["window"] for w in windows] == ["2018-04-01", "2018-04-02", "2018-04-03"]
  for name in ("left_rows", "right_rows", "matched", "missing_in_left", "missing_in_right", "mismatched_rows",
               "duplicates_left", "duplicates_right"):
    assert sum(w[name] for w in windows) == report[name], name
  # t0xx rows are 72 minutes apart: t020-t024 fall on 2018-04-02, t001-t012 on 2018-04-01.
  assert [w["mismatched_rows"] for w in windows] == [1, 4, 0]
  assert report["inputs"] == {"left": planted[0], "right": planted[1]}
  page = (tmp_path / "report" / "report.html").read_text()
  assert "<svg" in page and "<script" not in page and "only-right-1" in page


def test_identical_inputs_are_parity(tmp_path):
  left = _parquet(tmp_path, "left", _base())
  right = _parquet(tmp_path, "right", _base().sample(fraction=1.0, shuffle=True, seed=1))
  status, report = _reconcile(tmp_path, left, right)
  assert status == 0 and report["parity"] is True
  assert report["matched"] == 60 and report["mismatched_rows"] == 0
  assert report["columns_compared"] == ["event_time_ms", "customer_id", "amount_minor", "score", "decision",
                                        "reason_codes"]


@pytest.mark.parametrize("flags, message", [
    (["--left", "parquet:/nonexistent/x.parquet"], "cannot read parquet:/nonexistent/x.parquet"),
    (["--left", "nowhere"], "expected SCHEME:LOCATION"),
    (["--left", "delta:/nonexistent"], "not a Delta table"),
    (["--tolerance", "score=abc"], "--tolerance 'score=abc'"),
    (["--tolerance", "decision=1"], "not a number"),
    (["--by", "week"], "invalid choice"),
    (["--columns", "nope"], "--columns: 'nope'"),
    (["--key", "nope"], "no key column 'nope'"),
    (["--map", "a=b:frobnicate"], "unknown conversion"),
    (["--unknown_flag"], "unrecognized arguments"),
])
def test_usage_and_read_errors_are_one_line(tmp_path, capsys, flags, message):
  left = _parquet(tmp_path, "left", _base(5))
  argv = ["reconcile", "--left", left, "--right", left, "--report", str(tmp_path / "r")]
  position = argv.index("--left") + 1
  if flags[0] == "--left":
    argv[position] = flags[1]
    flags = []
  assert cli.main(argv + flags) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("txstream: error: ") and message in err and "\n" not in err


def test_csv_legacy_extract_with_conversions(tmp_path):
  ours = _base(6).select("transaction_id", "event_time_ms", "amount_minor", "decision", "score")
  ours = _set(ours, "t002", decision="review")
  ours = _set(ours, "t003", decision="decline")
  words = {"approve": "APPROVED", "review": "REFERRED", "decline": "DECLINED"}
  paris = datetime.timezone(datetime.timedelta(hours=2))
  legacy = pl.DataFrame({
      "txn_ref": ours["transaction_id"],
      "local_time": [datetime.datetime.fromtimestamp(ms / 1000, paris).isoformat() for ms in ours["event_time_ms"]],
      "amount": [f"{a // 100}.{a % 100:02d}" for a in ours["amount_minor"]],
      "outcome": [words[d] for d in ours["decision"]],
      "score": [str(s) for s in ours["score"]],
  })
  legacy = legacy.with_columns(
      pl.when(pl.col("txn_ref") == "t004").then(pl.lit("1,04")).otherwise(pl.col("amount")).alias("amount"),
      pl.when(pl.col("txn_ref") == "t005").then(pl.lit("MAYBE")).otherwise(pl.col("outcome")).alias("outcome"))
  legacy.write_csv(tmp_path / "legacy.csv")
  maps = ["--map", "txn_ref=transaction_id", "--map", "amount=amount_minor:minor_units",
          "--map", "local_time=event_time_ms:epoch_ms",
          "--map", "outcome=decision:values(APPROVED=approve,REFERRED=review,DECLINED=decline)"]
  status, report = _reconcile(tmp_path, _parquet(tmp_path, "ours", ours), f"csv:{tmp_path / 'legacy.csv'}", *maps)
  assert status == 1
  assert (report["matched"], report["mismatched_rows"]) == (6, 2)
  assert report["mismatches_by_column"] == {"event_time_ms": 0, "amount_minor": 1, "decision": 1, "score": 0}
  assert report["samples"]["mismatches"]["amount_minor"] == [{"key": ["t004"], "left": 104, "right": "unparsed: 1,04"}]
  assert report["samples"]["mismatches"]["decision"] == [{"key": ["t005"], "left": "approve",
                                                          "right": "unparsed: MAYBE"}]


def test_conversions():
  df = pl.DataFrame({"a": ["12.34", "12", "-0.5", " 7.00 ", "1.234", "x", None],
                     "t": ["2018-04-01T02:13:05+02:00", "2018-04-01T00:13:05.250Z", "2018-04-01", None, None, None,
                           None],
                     "d": ["APPROVED", "DECLINED", "MAYBE", None, None, None, None]})
  out = df.select(compare.Conversion.parse("minor_units").expr("a").alias("a"),
                  compare.Conversion.parse("epoch_ms").expr("t").alias("t"),
                  compare.Conversion.parse("values(APPROVED=approve,DECLINED=decline)").expr("d").alias("d"))
  assert out["a"].to_list() == [1234, 1200, -50, 700, None, None, None]
  assert out["t"].to_list()[:3] == [1522541585000, 1522541585250, None]
  assert out["d"].to_list()[:3] == ["approve", "decline", None]
  assert compare.Conversion.parse("minor_units(0)").expr("a").pipe(lambda e: df.select(e)).to_series()[1] == 12


def test_compare_nulls_nans_and_null_keys():
  schema = pa.schema([("transaction_id", pa.string()), ("x", pa.float64())])
  plan = compare.make_plan(schema, schema)
  left = pl.DataFrame({"transaction_id": ["a", "b", "c", None], "x": [float("nan"), None, 1.0, 2.0]})
  right = pl.DataFrame({"transaction_id": ["a", "b", "c"], "x": [float("nan"), None, None]})
  stats = compare.compare(compare.prepare(left, plan.left, plan), compare.prepare(right, plan.right, plan), plan)
  assert (stats["matched"], stats["mismatched_rows"], stats["null_keys_left"]) == (3, 1, 1)
  assert stats["samples"]["mismatches"]["x"] == [{"key": ["c"], "left": 1.0, "right": None}]
  assert not compare.parity(stats)


def test_incomparable_columns_are_one_line():
  left = pa.schema([("transaction_id", pa.string()), ("codes", pa.list_(pa.string()))])
  right = pa.schema([("transaction_id", pa.string()), ("codes", pa.int64())])
  with pytest.raises(ValueError, match="column codes: cannot compare"):
    compare.make_plan(left, right)


def _delta_versions(path):
  from deltalake import write_deltalake
  cold = _base(8).with_columns(pl.from_epoch("event_time_ms", time_unit="ms").dt.replace_time_zone("UTC")
                               .alias("event_time")).drop("event_time_ms").to_arrow()
  write_deltalake(str(path), cold)
  time.sleep(0.1)
  between = datetime.datetime.now(datetime.timezone.utc)
  time.sleep(0.1)
  changed = _set(pl.DataFrame(cold), "t003", decision="decline").to_arrow()
  write_deltalake(str(path), changed, mode="overwrite")
  return between


def test_delta_versions_and_times(tmp_path):
  table = tmp_path / "cold" / "reruns" / "r1" / "decisions"
  between = _delta_versions(table)
  status, report = _reconcile(tmp_path, f"delta:{table}@0", f"delta:{table}", name="v0")
  assert status == 1 and report["mismatches_by_column"]["decision"] == 1
  assert (report["inputs"]["left_delta_version"], report["inputs"]["right_delta_version"]) == (0, 1)
  status, report = _reconcile(tmp_path, f"delta:{table}@{between.isoformat()}", f"delta:{table}@0", name="time")
  assert status == 0 and report["matched"] == 8
  # The cold layout's timestamp event_time meets event_time_ms as epoch ms; rerun:ID resolves under --cold_path.
  ours = _parquet(tmp_path, "ours", _set(_base(8), "t003", decision="decline"))
  status, report = _reconcile(tmp_path, "rerun:r1", ours, "--cold_path", str(tmp_path / "cold"), "--by", "day",
                              name="rerun")
  assert status == 0 and "event_time_ms" in report["columns_compared"]
  assert sum(w["matched"] for w in report["windows"]) == 8


def test_reconcile_composite(tmp_path):
  left = sources.parse(_parquet(tmp_path, "left", _base()))
  right = sources.parse(_parquet(tmp_path, "right", _base().filter(pl.col("transaction_id") != "t007")))
  plan = compare.make_plan(left.schema(), right.schema(), shards=3, samples=2)
  with TestPipeline() as p:
    figures = (p | pipeline.Reconcile({"left": left, "right": right}, plan)
               | beam.Map(lambda s: (s["matched"], s["missing_in_right"], s["shards"], s["samples"]["missing_in_right"])))
    assert_that(figures, equal_to([(59, 1, 3, [{"key": ["t007"]}])]))


def test_hive_partitioned_parquet_directory(tmp_path):
  table = _base().with_columns(pl.from_epoch("event_time_ms", time_unit="ms").dt.date().alias("event_date"))
  pq.write_to_dataset(table.to_arrow(), str(tmp_path / "cold"), partition_cols=["event_date"])
  status, report = _reconcile(tmp_path, f"parquet:{tmp_path / 'cold'}", _parquet(tmp_path, "ours", _base()),
                              "--by", "day")
  assert status == 0 and report["matched"] == 60
  assert report["columns_only_left"] == ["event_date"]
  assert [w["left_rows"] for w in report["windows"]] == [20, 20, 20]


def test_from_to_compares_only_the_window(tmp_path):
  # The right side holds day 2 (a rerun of it) and one row of day 3 that differs: inside the window, parity.
  base = _base()
  day2 = (pl.col("event_time_ms") >= START + DAY) & (pl.col("event_time_ms") < START + 2 * DAY)
  right = pl.concat([base.filter(day2), _row(base, "t050", decision="decline")])
  left, right = _parquet(tmp_path, "l", base), _parquet(tmp_path, "r", right)
  status, report = _reconcile(tmp_path, left, right, "--from", "2018-04-02", "--to", "2018-04-03T00:00:00+00:00")
  assert status == 0 and report["parity"] and report["left_rows"] == report["right_rows"] == 20
  status, report = _reconcile(tmp_path, left, right, "--from", "2018-04-02", name="open")
  assert status == 1 and (report["left_rows"], report["right_rows"]) == (40, 21)
  assert (report["missing_in_right"], report["mismatched_rows"]) == (19, 1)
  assert report["mismatches_by_column"]["decision"] == 1
