"""The raw archive: every accepted input message, as received, in the cold tier.

Two Delta tables beside the decisions, same rules (partitioned by day,
written by MERGE in one version per run, time travel):

- ``<root>/raw``: each transaction message that decoded and validated, its
  wire bytes (Confluent framing included), source position, broker time,
  event time and schema id;
- ``<root>/raw_labels``: each fraud-label message that decoded, partitioned
  by the day the label became known.

The key is (``transaction_id``, ``event_date``): a message sent again
(a rerun, a redelivery) replaces its copy, while two different messages
that share an id on different days both stay, as received, so a rerun from
the archive meets the same conflicting duplicate the original met. Within a
run, copies of one key keep the first.

Writers stage one Parquet file per input batch and day under
``<root>/_staging/<run_id>-<table>/`` (named after the batch's first source,
so a retried bundle replaces its own files); ``commit`` MERGEs them once the
whole run succeeded, one day at a time streamed into one MERGE. ``txstream
rerun`` reads the archive back as the messages it holds (``ReadArchive``),
so a rerun depends neither on Kafka's retention nor on the original files.
"""
import hashlib
import logging
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from txstream.core import contracts
from txstream.core.batch import ArchiveBatch, RawBatch, split_by
from txstream.io import cold_table
from txstream.io.file_retry import RetryingFileWrite

_LOGGER = logging.getLogger(__name__)
TRANSACTIONS, LABELS = "raw", "raw_labels"
BATCH_ROWS = 20_000

SCHEMA = pa.schema([
    ("transaction_id", pa.string()),
    ("source", pa.string()),
    ("value", pa.binary()),
    ("broker_time", pa.timestamp("ms", tz="UTC")),
    ("event_time", pa.timestamp("ms", tz="UTC")),  # labels: when the fraud became known
    ("schema_id", pa.int32()),
    ("event_date", pa.date32()),
])


def archive_rows(raw: pa.Table, accepted: pa.Table, time_column: str) -> pa.Table:
  """contracts.ARCHIVE rows of the messages of ``raw`` (contracts.RAW) that became ``accepted`` rows.

  ``accepted`` holds decoded rows (contracts.TRANSACTION or LABEL) with their
  ``source``; history rows were archived by the run that decided them.
  """
  own = accepted.filter(pc.invert(accepted.column("history")))
  messages = raw.take(pc.index_in(own.column("source"), value_set=raw.column("source")))
  values = messages.column("value").combine_chunks()
  header = pc.binary_slice(values, 1, 5).cast(pa.binary(4))
  schema_ids = np.frombuffer(header.buffers()[1], dtype=">i4", count=len(header), offset=header.offset * 4)
  return pa.Table.from_arrays([own.column("transaction_id"), own.column("source"), values,
                               messages.column("timestamp_ms"), own.column(time_column),
                               pa.array(schema_ids.astype(np.int32))], schema=contracts.ARCHIVE)


def to_table_layout(rows: pa.Table) -> pa.Table:
  """contracts.ARCHIVE rows in the tables' layout (``SCHEMA``: times as UTC timestamps, the day added)."""
  times = rows.column("event_time_ms")
  days = pc.floor(pc.divide(times.cast(pa.float64()), contracts.DAY_MS)).cast(pa.int32()).cast(pa.date32())
  return pa.Table.from_arrays(
      [rows.column("transaction_id"), rows.column("source"), rows.column("value"),
       rows.column("timestamp_ms").cast(pa.timestamp("ms", tz="UTC")), times.cast(pa.timestamp("ms", tz="UTC")),
       rows.column("schema_id"), days], schema=SCHEMA)


def staging_path(root: str, run_id: str, table: str) -> str:
  return FileSystems.join(root, cold_table.STAGING, f"{run_id}-{table}")


class _StageFn(beam.DoFn):
  def __init__(self, staging: str, table: str):
    self._staging = staging
    self._table = table
    self._write = RetryingFileWrite("raw_archive")

  def process(self, batch: ArchiveBatch):
    if not len(batch):
      return
    rows = to_table_layout(batch.table)
    name = hashlib.sha1(rows.column("source")[0].as_py().encode()).hexdigest()[:16]
    days = rows.column("event_date").cast(pa.int32()).to_numpy()
    for day, part in split_by(rows, days):
      path = FileSystems.join(self._staging, f"{day}-{name}.parquet")
      self._write(lambda part=part, path=path: _write_parquet(part, path), path)


def _write_parquet(rows: pa.Table, path: str) -> None:
  with FileSystems.create(path) as f:
    pq.write_table(rows, f, compression="zstd")


class StageArchive(beam.PTransform[beam.PCollection[ArchiveBatch], beam.PCollection]):
  """ArchiveBatches -> the run's staged files of ``table``, one per batch and day (``commit`` publishes them)."""
  def __init__(self, root: str, run_id: str, table: str):
    super().__init__()
    self._staging, self._table = staging_path(root, run_id, table), table

  def expand(self, rows):
    return rows | "Stage" >> beam.ParDo(_StageFn(self._staging, self._table))


class Committed(NamedTuple):
  version: Optional[int]
  rows: int


def _deduplicated(fs, files) -> Iterator[pa.RecordBatch]:
  """The staged rows, a day at a time, the first copy of each key kept."""
  by_day = {}
  for path in files:
    by_day.setdefault(path.rsplit("/", 1)[-1].split("-", 1)[0], []).append(path)
  for day in sorted(by_day, key=int):
    parts = [pq.read_table(fs.open_input_file(p), use_threads=False) for p in sorted(by_day[day])]
    rows = pl.from_arrow(pa.concat_tables(parts)).unique(subset=["transaction_id"], keep="first",
                                                          maintain_order=True).to_arrow()
    yield from rows.cast(SCHEMA).to_batches(BATCH_ROWS)


def commit(root: str, run_id: str, table: str, options: Optional[PipelineOptions] = None) -> Committed:
  """Writes the run's staged archive rows of ``table`` into it (one version); removes them."""
  storage = cold_table.storage_options(options)
  fs, where = cold_table.filesystem(staging_path(root, run_id, table), storage)
  staged = [cold_table.Staged(f.path, str(np.datetime64(int(f.base_name.split("-", 1)[0]), "D")))
            for f in fs.get_file_info(pyarrow.fs.FileSelector(where, allow_not_found=True))
            if f.path.endswith(".parquet")]
  if not staged:
    return Committed(None, 0)
  files = [f.path for f in staged]
  keys = ["transaction_id", "event_date"]
  staged_keys = pa.concat_tables(pq.read_table(fs.open_input_file(p), columns=keys) for p in files)
  committed = cold_table.upsert(FileSystems.join(root, table), SCHEMA, keys, fs, staged, run_id,
                                lambda: pa.RecordBatchReader.from_batches(SCHEMA, _deduplicated(fs, files)),
                                staged_keys, storage, f"txstream {table}: accepted input messages as received")
  fs.delete_dir(where)
  _LOGGER.info("raw archive: version %s of %s/%s, %d messages", committed.version, root, table,
               committed.inserted + committed.updated)
  return Committed(committed.version, committed.inserted + committed.updated)


class _ReadFileFn(beam.DoFn):
  def __init__(self, storage: dict):
    self._storage = storage

  def process(self, uri: str):
    fs, path = cold_table.filesystem(uri, self._storage)
    with fs.open_input_file(path) as f:
      for rows in pq.ParquetFile(f).iter_batches(BATCH_ROWS, columns=["source", "value", "broker_time"],
                                                 use_threads=False):
        n = rows.num_rows
        yield RawBatch(pa.Table.from_arrays(
            [rows.column(0), rows.column(1), rows.column(2).cast(pa.int64()), pa.array(np.zeros(n, bool))],
            schema=contracts.RAW))


class ReadArchive(beam.PTransform[beam.pvalue.PBegin, beam.PCollection[RawBatch]]):
  """The archived messages of ``table`` with an event day before ``to_ms``'s (all of them without), as RawBatches."""
  def __init__(self, root: str, table: str, to_ms: Optional[int] = None,
               options: Optional[PipelineOptions] = None):
    super().__init__()
    from deltalake import DeltaTable
    storage = cold_table.storage_options(options)
    uri = FileSystems.join(root, table)
    if not DeltaTable.is_deltatable(uri, storage_options=storage):
      raise FileNotFoundError(f"no raw archive at {uri}")
    filters = None
    if to_ms is not None:
      last = np.datetime64(to_ms // contracts.DAY_MS, "D").astype(str)
      filters = [("event_date", "<=", last)]
    self._files = sorted(DeltaTable(uri, storage_options=storage).file_uris(partition_filters=filters))
    self._storage = storage

  def expand(self, pbegin):
    return (pbegin
            | "Files" >> beam.Create(self._files)
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(_ReadFileFn(self._storage)).with_output_types(RawBatch))
