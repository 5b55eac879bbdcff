"""Data quality of real runs: a drifted day fails exactly its window's decline rate, and nothing is lost.

The input is generated, then one day is drifted: one transaction in ten on
that day gets an amount far above the usual (the model's plainest fraud
pattern), so the day's decline rate goes up tenfold and more while every other
day, and the run as a whole, stays within the thresholds.
"""
import datetime
import glob
import io
import json
import os

import fastavro
import psycopg2
import pytest

from txstream import cli
from txstream.io import cold_table, schema_registry, wire
from txstream.pipelines import generate

DRIFTED_DAY = "2018-04-06"
THRESHOLDS = """
window:
  decline_rate: {max: 0.03}
  review_rate: {max: 0.5}
  mean_score: {max: 0.5}
  rows_vs_median: {min: 0.25, max: 4.0}
  min_rows: 100
run:
  decline_rate: {max: 0.05}
  review_rate: {max: 0.5}
  mean_score: {max: 0.5}
  dead_letter_rate: {max: 0.02}
"""


def _drift(path: str) -> int:
  """Multiplies the amount of every tenth transaction of a day file by 40; returns how many it changed."""
  registry = schema_registry.FileSchemaRegistry()
  with open(path, "rb") as f:
    messages = [m for _, m in wire.read_frames(f)]
  out, changed = [], 0
  for i, message in enumerate(messages):
    schema_id, payload = wire.split_header(message)
    if i % 10:
      out.append(message)
      continue
    record = fastavro.schemaless_reader(io.BytesIO(bytes(payload)), registry.parsed(schema_id), None)
    record["amount_minor"] *= 40
    out.append(wire.encode(schema_id, registry.parsed(schema_id), record))
    changed += 1
  with open(path, "wb") as f:
    wire.write_frames(f, out)
  return changed


@pytest.fixture(scope="module")
def drifted_input(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("drift"))
  generate.generate(out, customers=1000, terminals=2000, days=10, start=datetime.date(2018, 4, 1), seed=11)
  assert _drift(os.path.join(out, "transactions", f"day-{DRIFTED_DAY}.wire")) > 100
  config = os.path.join(out, "quality.yaml")
  with open(config, "w", encoding="utf-8") as f:
    f.write(THRESHOLDS)
  return out, config


def _run(capsys, input_dir, config, out, dsn, *extra):
  code = cli.main(["run", f"--input={input_dir}", f"--cold_path={out}/cold", f"--dead_letter_path={out}/dead",
                   f"--postgres_dsn={dsn}", f"--dq_config={config}", f"--dq_docs_dir={out}/docs",
                   f"--metrics_file={out}/txstream.prom", "--progress_interval_s=0", *extra])
  captured = capsys.readouterr()
  assert code in (0, 3), captured.err
  return code, json.loads(captured.out), captured.err


def test_a_drifted_day_fails_exactly_its_decline_rate_and_the_run_exits_3(services, fresh_postgres, drifted_input,
                                                                          tmp_path, capsys):
  input_dir, config = drifted_input
  dsn = fresh_postgres()
  code, summary, err = _run(capsys, input_dir, config, tmp_path, dsn)
  quality = summary["data_quality"]
  assert code == 3, err
  assert "data quality failed (window_distribution: decline_rate)" in err and "\n" not in err.strip()
  failed = {(s["suite"], f["column"]) for s in quality["suites"] for f in s["failed"]}
  assert failed == {("window_distribution", "decline_rate")}
  windows = next(s for s in quality["suites"] if s["suite"] == "window_distribution")["windows"]
  bad = [w for w in windows if not w["success"]]
  day_ms = int(datetime.datetime.fromisoformat(DRIFTED_DAY).replace(tzinfo=datetime.timezone.utc).timestamp() * 1000)
  assert [w["window_start_ms"] for w in bad] == [day_ms]
  others = [w for w in windows if w["success"]]
  assert len(others) == 9
  # Nothing lost: every decision is in the cold tier and the warm tier all the same.
  assert cold_table.read(f"{tmp_path}/cold").num_rows == summary["scored"] == summary["events_in"]
  assert not glob.glob(f"{tmp_path}/cold/_staging/*")  # staging and the validation's snapshot of it are gone
  with psycopg2.connect(dsn) as conn, conn.cursor() as cur:
    cur.execute("SELECT count(*) FROM decisions")
    assert cur.fetchone()[0] == summary["scored"]
    cur.execute("SELECT suite, scope, window_start, success, failed FROM dq_results WHERE run_id = %s",
                (summary["run_id"],))
    stored = cur.fetchall()
  assert len(stored) == 4 + 10  # a row per suite, and one per window
  failing = [(suite, scope, start) for suite, scope, start, success, _ in stored if not success]
  assert sorted(failing, key=str) == sorted([("window_distribution", "run", None),
                                             ("window_distribution", "window",
                                              datetime.datetime.fromisoformat(DRIFTED_DAY + "T00:00:00+00:00"))],
                                            key=str)
  observed = next(f for s, scope, _, ok, f in stored if scope == "window" and not ok)[0]["observed"]
  assert observed == pytest.approx(bad[0]["failed"][0]["observed"]) and observed > 0.03
  with open(quality["docs"], encoding="utf-8") as f:
    page = f.read()
  assert summary["run_id"] in page and "FAILED" in page and DRIFTED_DAY in page
  with open(f"{tmp_path}/txstream.prom", encoding="utf-8") as f:
    text = f.read()
  assert 'txstream_dq_success{scope="window",suite="window_distribution"} 0.0' in text
  assert 'txstream_dq_success{scope="run",suite="decisions"} 1.0' in text
  # The bounded run's latency distributions: the warm tier's batch writes.
  warm = summary["latency"]["sink_write_ms"]["warm"]
  assert warm["count"] >= 1 and warm["p50_ms"] <= warm["p95_ms"] <= warm["p99_ms"] and warm["max_ms"] >= 0


def test_dq_fail_ok_exits_0_and_a_clean_input_passes(services, fresh_postgres, drifted_input, tmp_path, capsys):
  input_dir, config = drifted_input
  code, summary, _ = _run(capsys, input_dir, config, tmp_path / "ok", fresh_postgres(), "--dq_fail_ok")
  assert code == 0 and summary["data_quality"]["success"] is False
  clean = tmp_path / "clean"
  generate.generate(str(clean), customers=300, terminals=600, days=4, start=datetime.date(2018, 4, 1), seed=5)
  code, summary, err = _run(capsys, str(clean), config, tmp_path / "clean-out", fresh_postgres())
  assert code == 0, err
  assert summary["data_quality"]["success"] and summary["data_quality"]["evaluated"] == 49
  assert sorted(glob.glob(f"{tmp_path}/clean-out/docs/*.html")) == sorted(
      [f"{tmp_path}/clean-out/docs/index.html", summary["data_quality"]["docs"]])
