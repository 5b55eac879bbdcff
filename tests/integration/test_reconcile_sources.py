"""``txstream reconcile`` reading PostgreSQL and ClickHouse tables (the real local servers) against Parquet."""
import datetime
import json
import uuid

import polars as pl
import psycopg2
import pytest
from clickhouse_driver import Client

from txstream import cli

START = 1522540800000
ROWS = 40


def _ours(tmp_path) -> str:
  df = pl.DataFrame({"transaction_id": [f"t{i:03d}" for i in range(ROWS)],
                     "event_time_ms": [START + i * 60_000 for i in range(ROWS)],
                     "amount_minor": [1000 + i for i in range(ROWS)],
                     "score": [i / 64 for i in range(ROWS)],
                     "decision": ["approve" if i % 3 else "review" for i in range(ROWS)],
                     "reason_codes": [["A"] if i % 2 else [] for i in range(ROWS)]})
  df.write_parquet(tmp_path / "ours.parquet")
  return f"parquet:{tmp_path / 'ours.parquet'}"


def _reconcile(tmp_path, left, right, *flags):
  status = cli.main(["reconcile", "--left", left, "--right", right, "--report", str(tmp_path / "r"), "--shards", "3",
                     *flags])
  return status, json.loads((tmp_path / "r" / "report.json").read_text())


@pytest.fixture(name="postgres_dsn")
def _postgres_dsn(fresh_postgres):
  return fresh_postgres("txstream_reconcile")


def test_postgres_legacy_table(tmp_path, postgres_dsn):
  """numeric amounts and timestamptz of a legacy table, read as text and times, meet ours exactly."""
  with psycopg2.connect(postgres_dsn) as conn, conn.cursor() as cur:
    cur.execute("CREATE TABLE legacy (ref text, at timestamptz, amount numeric(12,2), score double precision, "
                "decision text, reason_codes text[])")
    rows = [(f"t{i:03d}", START + i * 60_000, f"{(1000 + i) / 100:.2f}", i / 64,
             "approve" if i % 3 else "review", ["A"] if i % 2 else []) for i in range(ROWS) if i != 7]
    rows[4] = rows[4][:4] + ("decline",) + rows[4][5:]  # t004 decided differently
    cur.executemany("INSERT INTO legacy VALUES (%s, to_timestamp(%s / 1000.0), %s, %s, %s, %s)", rows)
  status, report = _reconcile(tmp_path, _ours(tmp_path), f"postgres:{postgres_dsn}#legacy",
                              "--map", "ref=transaction_id", "--map", "at=event_time_ms",
                              "--map", "amount=amount_minor:minor_units", "--by", "hour")
  assert status == 1
  assert (report["matched"], report["missing_in_right"], report["missing_in_left"]) == (ROWS - 1, 1, 0)
  assert report["mismatches_by_column"] == {"event_time_ms": 0, "amount_minor": 0, "score": 0, "decision": 1,
                                            "reason_codes": 0}
  assert report["samples"]["missing_in_right"] == [{"key": ["t007"]}]
  assert report["samples"]["mismatches"]["decision"] == [{"key": ["t004"], "left": "approve", "right": "decline"}]


def test_clickhouse_table(tmp_path, services):
  endpoint = services.require("clickhouse")
  database = f"txstream_reconcile_{uuid.uuid4().hex[:8]}"
  client = Client(endpoint.host, port=endpoint.port)
  client.execute(f"CREATE DATABASE {database}")
  try:
    client.execute(f"CREATE TABLE {database}.decisions (transaction_id String, event_time DateTime('UTC'), "
                   "amount_minor Int64, score Float64, decision String, "
                   "reason_codes Array(String)) ENGINE = MergeTree ORDER BY transaction_id")
    rows = [(f"t{i:03d}", datetime.datetime.fromtimestamp((START + i * 60_000) / 1000, datetime.timezone.utc),
             1000 + i, i / 64, "approve" if i % 3 else "review", ["A"] if i % 2 else []) for i in range(ROWS)]
    client.execute(f"INSERT INTO {database}.decisions VALUES", rows)
    url = f"clickhouse://{endpoint.host}:{endpoint.port}/{database}"
    status, report = _reconcile(tmp_path, _ours(tmp_path), f"clickhouse:{url}#decisions")
    assert status == 0, report
    assert report["matched"] == ROWS and "event_time_ms" in report["columns_compared"]
  finally:
    client.execute(f"DROP DATABASE IF EXISTS {database}")
    client.disconnect()
