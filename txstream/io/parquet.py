"""Cold-tier Parquet: decisions in the cold layout, one file per event day and writer, in row groups.

A writer appends each batch's rows of a day to that day's file as a row
group, so a file holds every row a writer had for the day. Files are staged
on local disk and published (copied whole, through Beam's ``FileSystems``: a
local folder or ``s3://``) when the writer finishes, into a directory
``io.cold_table`` then commits to the Delta table; a crashed writer leaves
no partial file.
"""
import datetime
import functools
import logging
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from txstream.core import contracts

_LOGGER = logging.getLogger(__name__)
COMPRESSION = "zstd"
ROW_GROUP_ROWS = 131_072
BUFFER_ROWS = 262_144  # rows held across all days before the largest day is written out


def cold_schema() -> pa.Schema:
  """The cold layout: decision columns, times as UTC timestamps, and the event day (the table's partition)."""
  fields = []
  for field in contracts.DECISION:
    if field.name == "event_time_ms":
      fields.append(pa.field("event_time", pa.timestamp("ms", tz="UTC")))
    elif field.name == "decided_at_ms":
      fields.append(pa.field("decided_at", pa.timestamp("ms", tz="UTC")))
    else:
      fields.append(field)
  return pa.schema(fields + [pa.field("event_date", pa.date32())])


COLD_SCHEMA = cold_schema()


def to_cold(decisions: pa.Table) -> pa.Table:
  """contracts.DECISION rows in the cold-tier layout (the times re-typed, not converted; the day added)."""
  columns = []
  for field, column in zip(COLD_SCHEMA, decisions.columns):
    columns.append(column.cast(field.type) if field.type != column.type else column)
  days = pa.array(event_days(decisions).astype(np.int32)).cast(pa.date32())
  return pa.Table.from_arrays(columns + [days], schema=COLD_SCHEMA)


@functools.lru_cache(maxsize=8192)
def day_partition(day: int) -> str:
  """``event_date=YYYY-MM-DD`` of a UTC epoch day."""
  return f"event_date={datetime.date(1970, 1, 1) + datetime.timedelta(days=day):%Y-%m-%d}"


def event_days(decisions: pa.Table) -> np.ndarray:
  return np.floor_divide(decisions.column("event_time_ms").to_numpy(), contracts.DAY_MS)


class DayFiles:
  """One writer's Parquet files, one per event day, staged on local disk and published by ``publish``.

  Staging locally keeps memory flat however many rows a writer gets, and
  makes publishing a whole-file copy that can be retried after a store
  outage. Not thread-safe; one per DoFn instance and bundle.
  """

  def __init__(self, root: str, row_group_rows: int = ROW_GROUP_ROWS, buffer_rows: int = BUFFER_ROWS):
    self._root = root
    self._row_group_rows = row_group_rows
    self._buffer_rows = buffer_rows
    self._dir: Optional[str] = None
    self._open: Dict[int, pq.ParquetWriter] = {}
    self._buffered: Dict[int, List[pa.Table]] = {}
    self._buffered_rows: Dict[int, int] = {}
    self.rows = 0

  def _staged(self, day: int) -> str:
    return os.path.join(self._dir, f"{day}.parquet")

  def write(self, day: int, rows: pa.Table) -> None:
    """Adds ``rows`` (contracts.DECISION, all of event day ``day``) to the day's file.

    Rows are buffered per day and written as row groups of ``row_group_rows``
    (a row group costs milliseconds whatever its size); past ``buffer_rows``
    in all, the largest day's buffer is written out first.
    """
    self._buffered.setdefault(day, []).append(rows)
    self._buffered_rows[day] = self._buffered_rows.get(day, 0) + rows.num_rows
    self.rows += rows.num_rows
    if self._buffered_rows[day] >= self._row_group_rows:
      self._flush(day)
    while sum(self._buffered_rows.values()) > self._buffer_rows:
      self._flush(max(self._buffered_rows, key=self._buffered_rows.get))

  def _flush(self, day: int) -> None:
    tables = self._buffered.pop(day)
    del self._buffered_rows[day]
    writer = self._open.get(day)
    if writer is None:
      self._dir = self._dir or tempfile.mkdtemp(prefix="txstream-cold-")
      writer = self._open[day] = pq.ParquetWriter(self._staged(day), COLD_SCHEMA, compression=COMPRESSION)
    writer.write_table(to_cold(pa.concat_tables(tables)), row_group_size=self._row_group_rows)

  def publish(self, name: str, retrying: Callable[[Callable[[], None], str], None]) -> int:
    """Copies each day's file to ``event_date=.../part-<name>.parquet`` under the root.

    ``retrying(copy, path)`` runs a copy, retrying it as it sees fit; each
    copy replaces the whole object. Returns the rows published.
    """
    for day in list(self._buffered):
      self._flush(day)
    for writer in self._open.values():
      writer.close()
    for day in sorted(self._open):
      final = FileSystems.join(self._root, day_partition(day), f"part-{name}.parquet")
      retrying(functools.partial(_copy, self._staged(day), final), final)
    rows = self.rows
    self.discard()
    return rows

  def discard(self) -> None:
    """Drops the staged files (after publishing, or when the bundle failed and will be written again)."""
    for writer in self._open.values():
      try:
        writer.close()
      except (OSError, pa.ArrowException):
        pass  # already closed or broken: it is deleted below anyway
    if self._dir is not None:
      shutil.rmtree(self._dir, ignore_errors=True)
    self._open, self.rows, self._dir = {}, 0, None
    self._buffered, self._buffered_rows = {}, {}


def _copy(local: str, destination: str) -> None:
  with open(local, "rb") as source, FileSystems.create(destination) as target:
    shutil.copyfileobj(source, target, 8 << 20)
