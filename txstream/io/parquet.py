"""Cold tier: decisions as Parquet, partitioned by event date and hour.

Files are written through Beam's ``FileSystems``, so the same code writes a
local folder or ``s3://``. Names are deterministic per partition
(``decisions/event_date=YYYY-MM-DD/event_hour=HH/part-00000.parquet``) and
rows are sorted by ``transaction_id``: a rerun of the same window replaces the
file instead of adding a second copy.
"""
import datetime
import functools
import io
import logging
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from txstream.records import Decision

_LOGGER = logging.getLogger(__name__)


def decision_schema(feature_names: Sequence[str]) -> pa.Schema:
  return pa.schema(
      [("transaction_id", pa.string()), ("event_time", pa.timestamp("ms", tz="UTC")),
       ("customer_id", pa.int64()), ("terminal_id", pa.int64()), ("card_token", pa.string()),
       ("amount_minor", pa.int64()), ("currency", pa.string()), ("entry_mode", pa.string()),
       ("merchant_category", pa.int32()), ("score", pa.float64()), ("decision", pa.string()),
       ("reason_codes", pa.list_(pa.string())), ("model_version", pa.string()),
       ("reference_version", pa.string()), ("pipeline_version", pa.string()), ("schema_id", pa.int32()),
       ("source", pa.string()), ("decided_at", pa.timestamp("ms", tz="UTC"))]
      + [(name.lower(), pa.float64()) for name in feature_names])


HOUR_MS = 3_600_000


@functools.lru_cache(maxsize=4096)
def _partition_of_hour(hour: int) -> str:
  moment = datetime.datetime.fromtimestamp(hour * 3600, tz=datetime.timezone.utc)
  return f"event_date={moment:%Y-%m-%d}/event_hour={moment:%H}"


def partition_of(event_time_ms: int) -> str:
  """``event_date=YYYY-MM-DD/event_hour=HH`` of an event time (UTC)."""
  return _partition_of_hour(event_time_ms // HOUR_MS)


def decision_row(d: Decision) -> tuple:
  """A decision as a flat tuple of primitives in ``decision_schema`` column order.

  Cheap to encode and shuffle (no nested records), so the cold tier groups
  rows, not Decisions.
  """
  t = d.transaction
  return ((t.transaction_id, t.event_time_ms, t.customer_id, t.terminal_id, t.card_token, t.amount_minor,
           t.currency, t.entry_mode, t.merchant_category, d.score, d.decision, list(d.reason_codes),
           d.model_version, t.reference_version, d.pipeline_version, t.schema_id, t.source, d.decided_at_ms)
          + tuple(d.features))


def write_rows(root: str, partition: str, rows: Iterable[tuple], feature_names: Sequence[str],
               file_tag: str = "00000") -> int:
  """Writes (replaces) ``part-<file_tag>.parquet`` of a partition from ``decision_row`` tuples.

  ``file_tag`` names what the run covered: the default for a run over whole
  windows (files), the start offsets for an incremental Kafka run, so that a
  retried run replaces its own file and the next run adds a new one.
  Returns the number of rows.
  """
  rows = sorted(rows, key=lambda r: r[0])
  schema = decision_schema(feature_names)
  columns = list(zip(*rows)) if rows else [[] for _ in schema]
  table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, schema)], schema=schema)
  buf = io.BytesIO()
  pq.write_table(table, buf, compression="zstd")
  path = FileSystems.join(root, "decisions", partition, f"part-{file_tag}.parquet")
  with FileSystems.create(path) as f:
    f.write(buf.getvalue())
  return len(rows)


def write_partition(root: str, partition: str, decisions: Iterable[Decision],
                    feature_names: Sequence[str]) -> int:
  """Writes (replaces) one partition file of Decisions; returns the number of rows."""
  return write_rows(root, partition, [decision_row(d) for d in decisions], feature_names)
