"""Cold tier: decisions as Parquet, partitioned by event date and hour.

Files are written through Beam's ``FileSystems``, so the same code writes a
local folder or ``s3://``. Names are deterministic per partition
(``decisions/event_date=YYYY-MM-DD/event_hour=HH/part-00000.parquet``) and
rows are sorted by ``transaction_id``: a rerun of the same window replaces the
file instead of adding a second copy.
"""
import datetime
import io
import logging
from typing import Iterable, List, Sequence

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


def partition_of(event_time_ms: int) -> str:
  moment = datetime.datetime.fromtimestamp(event_time_ms / 1000, tz=datetime.timezone.utc)
  return f"event_date={moment:%Y-%m-%d}/event_hour={moment:%H}"


def decision_columns(decisions: List[Decision], feature_names: Sequence[str]) -> dict:
  txs = [d.transaction for d in decisions]
  columns = {
      "transaction_id": [t.transaction_id for t in txs],
      "event_time": [t.event_time_ms for t in txs],
      "customer_id": [t.customer_id for t in txs],
      "terminal_id": [t.terminal_id for t in txs],
      "card_token": [t.card_token for t in txs],
      "amount_minor": [t.amount_minor for t in txs],
      "currency": [t.currency for t in txs],
      "entry_mode": [t.entry_mode for t in txs],
      "merchant_category": [t.merchant_category for t in txs],
      "score": [d.score for d in decisions],
      "decision": [d.decision for d in decisions],
      "reason_codes": [list(d.reason_codes) for d in decisions],
      "model_version": [d.model_version for d in decisions],
      "reference_version": [t.reference_version for t in txs],
      "pipeline_version": [d.pipeline_version for d in decisions],
      "schema_id": [t.schema_id for t in txs],
      "source": [t.source for t in txs],
      "decided_at": [d.decided_at_ms for d in decisions],
  }
  for i, name in enumerate(feature_names):
    columns[name.lower()] = [d.features[i] for d in decisions]
  return columns


def write_partition(root: str, partition: str, decisions: Iterable[Decision],
                    feature_names: Sequence[str]) -> int:
  """Writes (replaces) one partition file; returns the number of rows."""
  rows = sorted(decisions, key=lambda d: d.transaction.transaction_id)
  table = pa.Table.from_pydict(decision_columns(rows, feature_names), schema=decision_schema(feature_names))
  buf = io.BytesIO()
  pq.write_table(table, buf, compression="zstd")
  path = FileSystems.join(root, "decisions", partition, "part-00000.parquet")
  with FileSystems.create(path) as f:
    f.write(buf.getvalue())
  return len(rows)
