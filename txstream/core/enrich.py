"""Enrich: customer and terminal reference data joined by id, as sorted arrays.

A transaction whose customer is not on file is a dead letter (a card the bank
never issued); an unknown terminal (a new merchant) is kept with no distance.
The reference-data version (a content hash of the files) is stamped on every
row for lineage. Files that cannot be joined against (no records, an id twice,
a column missing) are a ``ReferenceDataError`` when loaded, before any
transaction is read.
"""
import hashlib
import io
import math
from typing import NamedTuple, Tuple

import fastavro
import numpy as np
import pyarrow as pa

from txstream.core import contracts, dead_letters
from txstream.core.numeric import round_like_python

REFERENCE_FILES = ("customers.avro", "terminals.avro")
# Per file, the columns a join reads; the first is the id.
REFERENCE_COLUMNS = {"customers.avro": ("customer_id", "home_x", "home_y", "segment"),
                     "terminals.avro": ("terminal_id", "x", "y")}


class ReferenceDataError(ValueError):
  """Reference data a run cannot join against (unreadable, a missing column, no records, an id twice); one line."""


def _records(data: bytes, name: str, columns: Tuple[str, ...]) -> list:
  """The records of one reference file, checked before any transaction meets them.

  No records would make every transaction a dead letter, and an id on file
  twice would join to whichever row sorts first: both are errors, as is a
  column the join needs and the file lacks.
  """
  try:
    reader = fastavro.reader(io.BytesIO(data))
    records = list(reader)
  except (ValueError, EOFError) as e:
    raise ReferenceDataError(f"reference file {name} is not an Avro container file: {e}") from None
  fields = [f["name"] for f in reader.writer_schema.get("fields", ())]
  for column in columns:
    if column not in fields:
      raise ReferenceDataError(f"reference file {name} has no column {column!r} (its columns: {', '.join(fields)})")
  if not records:
    raise ReferenceDataError(f"reference file {name} has no records: every transaction would be a dead letter")
  ids, counts = np.unique(np.array([r[columns[0]] for r in records], dtype=np.int64), return_counts=True)
  repeated = np.flatnonzero(counts > 1)
  if len(repeated):
    first = repeated[0]
    raise ReferenceDataError(f"reference file {name}: {columns[0]} {ids[first]} is on file {counts[first]} times "
                             f"({len(repeated)} {columns[0]}s are on file more than once)")
  return records


class Reference(NamedTuple):
  """Reference tables as arrays sorted by id; ``version`` is their content hash."""
  customer_ids: np.ndarray
  home_x: np.ndarray
  home_y: np.ndarray
  segment: pa.Array
  terminal_ids: np.ndarray
  terminal_x: np.ndarray
  terminal_y: np.ndarray
  version: str

  @classmethod
  def from_avro(cls, customers: bytes, terminals: bytes, names: Tuple[str, str] = REFERENCE_FILES) -> "Reference":
    """From the bytes of ``customers.avro`` and ``terminals.avro`` (Avro container files).

    ``names`` (the files' paths) name them in errors. Raises
    ``ReferenceDataError`` for a file that is not Avro, lacks a column, has no
    records or has an id twice.
    """
    version = hashlib.sha256(customers + terminals).hexdigest()[:16]
    c = _records(customers, names[0], REFERENCE_COLUMNS["customers.avro"])
    t = _records(terminals, names[1], REFERENCE_COLUMNS["terminals.avro"])
    c_order = np.argsort(np.array([r["customer_id"] for r in c], dtype=np.int64), kind="stable")
    t_order = np.argsort(np.array([r["terminal_id"] for r in t], dtype=np.int64), kind="stable")
    cs = [c[i] for i in c_order]
    ts = [t[i] for i in t_order]
    return cls(np.array([r["customer_id"] for r in cs], dtype=np.int64),
               np.array([r["home_x"] for r in cs], dtype=np.float64),
               np.array([r["home_y"] for r in cs], dtype=np.float64),
               pa.array([r["segment"] for r in cs], pa.string()),
               np.array([r["terminal_id"] for r in ts], dtype=np.int64),
               np.array([r["x"] for r in ts], dtype=np.float64),
               np.array([r["y"] for r in ts], dtype=np.float64),
               version)


def _lookup(ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
  """Index of each wanted id in the sorted ``ids``, -1 where absent."""
  at = np.searchsorted(ids, wanted)
  found = at < len(ids)
  found[found] = ids[at[found]] == wanted[found]
  return np.where(found, at, -1)


def enrich(tx: pa.Table, reference: Reference) -> Tuple[pa.Table, pa.Table]:
  """(enriched contracts.TRANSACTION rows, contracts.DEAD_LETTER rows for unknown customers), input order kept.

  Dead letters are written for the run's own rows only; history rows with an
  unknown customer simply leave the feature state alone.
  """
  customers = tx.column("customer_id").to_numpy()
  c = _lookup(reference.customer_ids, customers)
  known = c >= 0
  dead = _unknown_customers(tx, customers, known)
  if not known.all():
    tx, c = tx.filter(pa.array(known)), c[known]
  t = _lookup(reference.terminal_ids, tx.column("terminal_id").to_numpy())
  on_file = t >= 0
  dx = reference.home_x[c][on_file] - reference.terminal_x[t[on_file]]
  dy = reference.home_y[c][on_file] - reference.terminal_y[t[on_file]]
  distance = np.full(len(c), np.nan)
  distance[on_file] = round_like_python(np.hypot(dx, dy), 3, lambda i: math.hypot(dx[i], dy[i]))
  columns = {"customer_segment": reference.segment.take(pa.array(c)),
             "home_distance": pa.array(distance, mask=~on_file),
             "reference_version": pa.array([reference.version], pa.string()).take(pa.array(np.zeros(len(c), np.int32)))}
  for name, values in columns.items():
    tx = tx.set_column(tx.schema.get_field_index(name), name, values)
  return tx, dead


def _unknown_customers(tx: pa.Table, customers: np.ndarray, known: np.ndarray) -> pa.Table:
  unknown = np.flatnonzero(~known & ~tx.column("history").to_numpy(zero_copy_only=False))
  if not len(unknown):
    return contracts.empty(contracts.DEAD_LETTER)
  sources = tx.column("source").take(pa.array(unknown)).to_pylist()
  return dead_letters.table(
      sources, [None] * len(unknown), contracts.ENRICH, contracts.UNKNOWN_CUSTOMER, "",
      [f"customer {customer} is not on file" for customer in customers[unknown].tolist()])


def unknown_terminals(tx: pa.Table) -> int:
  """How many rows of an enriched table have a terminal that is not on file (no distance)."""
  return tx.column("home_distance").null_count

