"""Run records in the warm tier (PostgreSQL): one ``runs`` row per pipeline run.

A row says what produced a run's output (code, model, rules, reference data
and schema versions) and, once the run ends, its summary.
"""
import datetime
import json
import logging
from typing import Optional

import txstream
from txstream.io import migrations
from txstream.io.postgres_sink import connect

_LOGGER = logging.getLogger(__name__)


def _moment(value) -> Optional[datetime.datetime]:
  if value is None or isinstance(value, datetime.datetime):
    return value
  if isinstance(value, (int, float)):
    return datetime.datetime.fromtimestamp(value / 1000, tz=datetime.timezone.utc)
  return datetime.datetime.fromisoformat(str(value))


def record_run(dsn: str, run_record: dict) -> None:
  """Upserts one ``runs`` row (call at start, and again at the end with ``finished_at`` and ``summary``).

  Keys: ``run_id`` (required), ``started_at`` (required on first call),
  ``finished_at``, ``pipeline_version`` (default: this package's),
  ``code_version``, ``model_version``, ``rules_version``,
  ``reference_version``, ``schema_ids`` (list of int), ``summary`` and
  ``manifest`` (JSON-able dicts), ``status``, ``kind``. Times are datetimes, ISO
  strings or epoch milliseconds. Keys left out keep their stored value.
  Idempotent: recording the same values again changes nothing.
  """
  unknown = set(run_record) - {"run_id", "started_at", "finished_at", "pipeline_version", "code_version",
                               "model_version", "reference_version", "schema_ids", "summary",
                               "manifest", "status", "kind", "rules_version"}
  if unknown or not run_record.get("run_id"):
    raise ValueError(f"run record needs run_id and only known keys; unknown: {sorted(unknown)}")
  row = dict(run_record)
  row.setdefault("pipeline_version", txstream.__version__)
  for key in ("started_at", "finished_at"):
    if key in row:
      row[key] = _moment(row[key])
  for key in ("summary", "manifest"):
    if key in row:
      row[key] = json.dumps(row[key], sort_keys=True, default=str)
  if "schema_ids" in row:
    row["schema_ids"] = [int(x) for x in row["schema_ids"]]
  columns = list(row)
  if "started_at" in row:
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != "run_id")
    sql = (f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
           f"ON CONFLICT (run_id) DO UPDATE SET {updates}")
    params = [row[c] for c in columns]
  else:
    columns.remove("run_id")
    sql = f"UPDATE runs SET {', '.join(f'{c} = %s' for c in columns)} WHERE run_id = %s"
    params = [row[c] for c in columns] + [row["run_id"]]
  conn = connect(dsn)
  try:
    migrations.apply(conn)
    with conn, conn.cursor() as cur:
      cur.execute(sql, params)
      if cur.rowcount == 0:
        raise ValueError(f"run {row['run_id']!r} is not recorded yet; its first record needs started_at")
  finally:
    conn.close()

