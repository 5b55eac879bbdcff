"""Builders for test inputs (wire-format messages, batches, reference data) and readers of batch outputs."""
import hashlib
from typing import Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
import pyarrow as pa

from txstream.core import contracts
from txstream.core.batch import RawBatch
from txstream.core.enrich import Reference
from txstream.io import schema_registry, wire

REGISTRY = schema_registry.FileSchemaRegistry()
T0 = 1_522_540_800_000  # 2018-04-01T00:00:00Z
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def token(customer_id: int) -> str:
  return hashlib.sha256(f"card-{customer_id}".encode()).hexdigest()


def tx_record(i: int, t: int, customer: int = 1, terminal: int = 10, amount: int = 5_000, **extra) -> dict:
  record = {"transaction_id": f"tx-{i:05d}", "event_time": t, "customer_id": customer, "terminal_id": terminal,
            "card_token": token(customer), "amount_minor": amount, "currency": "EUR",
            "entry_mode": "chip", "merchant_category": 5411}
  record.update(extra)
  return record


def message(record: dict, schema_id: int = 2) -> bytes:
  if schema_id == 1:
    record = {k: v for k, v in record.items() if k not in ("entry_mode", "merchant_category")}
  return wire.encode(schema_id, REGISTRY.parsed(schema_id), record)


def raw(i: int, value: Optional[bytes]) -> Tuple[str, Optional[bytes]]:
  return f"test.wire#{i}", value


def raw_batch(records: Sequence[Tuple[str, Optional[bytes]]], history: Sequence[bool] = ()) -> RawBatch:
  """A RawBatch of (source, message) pairs; ``history`` flags per record (default: none)."""
  n = len(records)
  flags = list(history) if history else [False] * n
  return RawBatch(pa.Table.from_arrays([
      pa.array([s for s, _ in records], pa.string()), pa.array([v for _, v in records], pa.binary()),
      pa.nulls(n, pa.int64()), pa.array(flags, pa.bool_())], schema=contracts.RAW))


def rows(batch, *columns) -> list:
  """A batch's rows as tuples of the named columns."""
  table = batch.table.select(list(columns))
  return list(zip(*(table.column(c).to_pylist() for c in columns)))


def flat(pcoll, label: str, *columns) -> beam.PCollection:
  """A PCollection of batches as a PCollection of row tuples (for assert_that)."""
  return pcoll | label >> beam.FlatMap(rows, *columns)


def reference(customers: Sequence, terminals: Sequence, version: str = "ref") -> Reference:
  """A Reference from (id, (x, y, segment)) and (id, (x, y, mcc)) pairs, like ``CUSTOMERS``/``TERMINALS``."""
  customers, terminals = sorted(customers), sorted(terminals)
  return Reference(np.array([c for c, _ in customers], np.int64), np.array([v[0] for _, v in customers]),
                   np.array([v[1] for _, v in customers]), pa.array([v[2] for _, v in customers], pa.string()),
                   np.array([t for t, _ in terminals], np.int64), np.array([v[0] for _, v in terminals]),
                   np.array([v[1] for _, v in terminals]), version)


def label_message(tx_id: str, label_time: int, tx_time: int, customer: int, terminal: int) -> bytes:
  return wire.encode(3, REGISTRY.parsed(3), {"transaction_id": tx_id, "label_time": label_time, "tx_time": tx_time,
                                              "customer_id": customer, "terminal_id": terminal, "is_fraud": True})


CUSTOMERS = [(c, (50.0, 50.0, "retail")) for c in range(5)]
TERMINALS = [(t, (53.0, 54.0, 5411)) for t in range(20)]
