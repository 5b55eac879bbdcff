"""What ``txstream reconcile`` reads: a URI per side, read as Arrow record batches in splits.

URIs: ``delta:PATH[@VERSION|@ISO-TIME]`` (a table, or a cold root holding
``decisions/``), ``parquet:PATH`` (a file or a directory, hive partitions
read as columns), ``csv:PATH`` (a file or a directory of ``*.csv``; every
column read as text, parsed to the other side's types when compared),
``postgres:DSN#TABLE``, ``clickhouse:URL#TABLE`` (``clickhouse://host:9000/db``) and ``rerun:ID`` (the cold
table a rerun wrote, ``<cold_path>/reruns/<ID>/decisions``).

A source is picklable: the driver reads its ``schema()`` and lists its
``splits()``, and workers ``read(split, columns)`` each split. Listing pins
what is read: a Delta source is resolved to one table version first, so an
``@ISO-TIME`` reads the version current at that time on every worker.
"""
import dataclasses
import datetime
import gc
import glob
import os
import re
from typing import Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs

from txstream.io import cold_table

BATCH_ROWS = 262_144
_SPLIT_ROWS = 1_000_000  # Parquet row groups are gathered into splits of about this many rows


class SourceError(ValueError):
  """A URI that cannot be read, and why; one line."""


@dataclasses.dataclass(frozen=True)
class Delta:
  uri: str
  path: str
  version: int
  storage: Tuple[Tuple[str, str], ...]

  def _table(self):
    from deltalake import DeltaTable
    return DeltaTable(self.path, version=self.version, storage_options=dict(self.storage))

  def schema(self) -> pa.Schema:
    return pa.schema(self._table().schema().to_arrow())

  def splits(self) -> List[Tuple[str, ...]]:
    """The table's data files at this version, in groups (a group is read by one worker)."""
    dataset = self._table().to_pyarrow_dataset()
    files = sorted(f.path for f in dataset.get_fragments())
    del dataset
    gc.collect()
    return [tuple(files[i:i + 4]) for i in range(0, len(files), 4)]

  def read(self, split: Tuple[str, ...], columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    # One thread: deltalake's threaded Arrow scans abort the process at exit (delta-io/delta-rs#2184).
    dataset = self._table().to_pyarrow_dataset()
    wanted = set(split)
    for fragment in dataset.get_fragments():
      if fragment.path in wanted:
        scanner = ds.Scanner.from_fragment(fragment, schema=dataset.schema, columns=list(columns),
                                           use_threads=False, batch_size=BATCH_ROWS)
        yield from scanner.to_batches()
    del dataset
    gc.collect()


@dataclasses.dataclass(frozen=True)
class Parquet:
  uri: str
  path: str
  storage: Tuple[Tuple[str, str], ...]

  def _dataset(self, files=None) -> ds.Dataset:
    fs, where = cold_table.filesystem(self.path, dict(self.storage))
    if files is None:
      return ds.dataset(where, format="parquet", filesystem=fs, partitioning="hive")
    base = where if fs.get_file_info(where).type == pyarrow.fs.FileType.Directory else None
    return ds.dataset(list(files), format="parquet", filesystem=fs, partitioning="hive", partition_base_dir=base,
                      schema=self.schema())

  def schema(self) -> pa.Schema:
    return self._dataset().schema

  def splits(self) -> List[Tuple[str, Tuple[int, ...]]]:
    """(file, row groups) of about ``_SPLIT_ROWS`` rows each, so one large file still spreads over workers."""
    out = []
    for fragment in self._dataset().get_fragments():
      groups, rows, metadata = [], 0, fragment.metadata
      for i in range(metadata.num_row_groups):
        groups.append(i)
        rows += metadata.row_group(i).num_rows
        if rows >= _SPLIT_ROWS:
          out.append((fragment.path, tuple(groups)))
          groups, rows = [], 0
      if groups or not out or out[-1][0] != fragment.path:
        out.append((fragment.path, tuple(groups)))
    return out

  def read(self, split: Tuple[str, Tuple[int, ...]], columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    path, groups = split
    dataset = self._dataset([path])
    for fragment in dataset.get_fragments():
      # Threads are fine here (only deltalake's scans have the exit-time abort).
      scanner = ds.Scanner.from_fragment(fragment.subset(row_group_ids=list(groups)), schema=dataset.schema,
                                         columns=list(columns), use_threads=True, batch_size=BATCH_ROWS)
      yield from scanner.to_batches()


@dataclasses.dataclass(frozen=True)
class Csv:
  uri: str
  path: str

  def _files(self) -> List[str]:
    if os.path.isdir(self.path):
      return sorted(glob.glob(os.path.join(self.path, "**", "*.csv"), recursive=True))
    return [self.path]

  def schema(self) -> pa.Schema:
    files = self._files()
    if not files:
      raise SourceError(f"no *.csv files under {self.path}")
    with pacsv.open_csv(files[0], read_options=pacsv.ReadOptions(block_size=1 << 16)) as reader:
      names = reader.schema.names
    return pa.schema([(n, pa.string()) for n in names])

  def splits(self) -> List[str]:
    return self._files()

  def read(self, split: str, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    # Text, as written: the compare parses it to the other side's types and keeps what does not parse.
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in columns}, include_columns=list(columns),
                                   null_values=[""], strings_can_be_null=True)
    with pacsv.open_csv(split, read_options=pacsv.ReadOptions(block_size=32 << 20),
                        convert_options=convert) as reader:
      yield from reader


# PostgreSQL type OIDs read as themselves; every other type is read as its text.
_PG_TYPES = {16: pa.bool_(), 20: pa.int64(), 21: pa.int64(), 23: pa.int64(), 700: pa.float64(), 701: pa.float64(),
             25: pa.string(), 1043: pa.string(), 1082: pa.date32(), 1114: pa.timestamp("us"),
             1184: pa.timestamp("us", tz="UTC"), 1009: pa.list_(pa.string()), 1015: pa.list_(pa.string())}


@dataclasses.dataclass(frozen=True)
class Postgres:
  """A table read over a server-side cursor; ``numeric`` and other types without an Arrow twin as text."""
  uri: str
  dsn: str
  table: str

  def _identifier(self):
    from psycopg2 import sql
    return sql.Identifier(*self.table.split("."))

  def _types(self) -> List[Tuple[str, pa.DataType]]:
    import psycopg2
    from psycopg2 import sql
    with psycopg2.connect(self.dsn) as conn, conn.cursor() as cur:
      cur.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(self._identifier()))
      return [(d.name, _PG_TYPES.get(d.type_code, pa.string())) for d in cur.description]

  def schema(self) -> pa.Schema:
    return pa.schema(self._types())

  def splits(self) -> List[int]:
    return [0]

  def read(self, split: int, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    import psycopg2
    from psycopg2 import sql
    del split
    types = dict(self._types())
    fields = [pa.field(c, types[c]) for c in columns]
    select = [sql.Identifier(c) if types[c] != pa.string() else sql.SQL("{}::text").format(sql.Identifier(c))
              for c in columns]
    with psycopg2.connect(self.dsn) as conn, conn.cursor(name="txstream_reconcile") as cur:
      cur.itersize = 50_000
      cur.execute(sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(select), self._identifier()))
      while True:
        rows = cur.fetchmany(50_000)
        if not rows:
          return
        values = list(zip(*rows))
        yield pa.RecordBatch.from_arrays([pa.array(v, f.type) for v, f in zip(values, fields)], schema=pa.schema(fields))


@dataclasses.dataclass(frozen=True)
class ClickHouse:
  """A table read over the native protocol (``clickhouse://host:9000/db``) as Arrow record batches per block."""
  uri: str
  url: str
  table: str

  def _reader(self, client, columns: str, limit: str = "") -> pa.RecordBatchReader:
    name = ".".join(f"`{p}`" for p in self.table.split("."))
    return client.query_arrow_stream(f"SELECT {columns} FROM {name}{limit}", settings={"max_block_size": BATCH_ROWS})

  def schema(self) -> pa.Schema:
    from clickhouse_driver import Client
    with Client.from_url(self.url) as client:
      return self._reader(client, "*", " LIMIT 0").schema

  def splits(self) -> List[int]:
    return [0]

  def read(self, split: int, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
    from clickhouse_driver import Client
    del split
    with Client.from_url(self.url) as client:
      yield from self._reader(client, ", ".join(f"`{c}`" for c in columns))


def _delta(uri: str, location: str, storage: dict) -> Delta:
  from deltalake import DeltaTable
  path, at = location, None
  match = re.match(r"^(.*)@(\d+|\d{4}-\d\d-\d\d[T ]?[\d:.]*(?:Z|[+-]\d\d:?\d\d)?)$", location)
  if match:
    path, at = match.groups()
  if not DeltaTable.is_deltatable(path, storage_options=storage):
    if DeltaTable.is_deltatable(cold_table.table_path(path), storage_options=storage):
      path = cold_table.table_path(path)
    else:
      raise SourceError(f"{uri}: not a Delta table (nor a cold root holding {cold_table.TABLE}/)")
  table = DeltaTable(path, storage_options=storage)
  if at is not None and at.isdigit():
    table.load_as_version(int(at))
  elif at is not None:
    when = datetime.datetime.fromisoformat(at.replace("Z", "+00:00"))
    table.load_as_version(when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc))
  return Delta(uri, path, table.version(), tuple(sorted(storage.items())))


def parse(uri: str, *, cold_path: str = "out/cold", storage: Optional[dict] = None):
  """The source a URI names, checked to be readable (its schema read); ``SourceError`` if it is not."""
  storage = storage or {}
  scheme, colon, location = uri.partition(":")
  if not colon or not location:
    raise SourceError(f"{uri!r}: expected SCHEME:LOCATION (delta, parquet, csv, postgres, clickhouse, rerun)")
  if scheme == "rerun":
    scheme, location = "delta", os.path.join(cold_path, "reruns", location, cold_table.TABLE)
  try:
    if scheme == "delta":
      source = _delta(uri, location, storage)
    elif scheme == "parquet":
      source = Parquet(uri, location, tuple(sorted(storage.items())))
    elif scheme == "csv":
      source = Csv(uri, location)
    elif scheme in ("postgres", "clickhouse"):
      where, hash_, table = location.rpartition("#")
      if not (where and hash_ and table):
        raise SourceError(f"{uri!r}: expected {scheme}:{'DSN' if scheme == 'postgres' else 'URL'}#TABLE")
      source = Postgres(uri, where, table) if scheme == "postgres" else ClickHouse(uri, where, table)
    else:
      raise SourceError(f"{uri!r}: unknown scheme {scheme!r} (delta, parquet, csv, postgres, clickhouse, rerun)")
    source.schema()
  except SourceError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # any client's failure to read is the user's one line
    raise SourceError(f"cannot read {uri}: {_one_line(e)}") from e
  return source


def _one_line(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
