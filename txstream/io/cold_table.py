"""Cold tier: a Delta Lake table of decisions, partitioned by event day, merged on ``transaction_id``.

``<root>/decisions`` is the table (``_delta_log/`` and ``event_date=YYYY-MM-DD/``
Parquet files), on a local path or ``s3://``. A run never writes into it
directly: its writers stage Parquet files under ``<root>/_staging/<run_id>/``
(``io.parquet.DayFiles``: one file per event day and writer), and once the
whole pipeline has succeeded the run driver calls ``commit``, which puts every
staged row into the table keyed on ``transaction_id`` (a transaction the
table holds is replaced, a new one inserted) in one table version, then
removes the staging directory: new transactions only (the usual run) by
moving the staged files into the table and committing them as they are,
otherwise by a MERGE (``upsert``). So each transaction is in the table exactly
once after any sequence of runs, reruns and split inputs; a run that crashed
committed nothing (its staging directory stays behind, never read); and every
run is a version to read back (time travel: ``DeltaTable(path, version=N)``
or ``load_as_version(datetime)``).
"""
import gc
import json
import logging
import time
from typing import Callable, NamedTuple, Optional, Sequence

import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from txstream.io import object_store, parquet
from txstream.io.object_store import filesystem

_LOGGER = logging.getLogger(__name__)
TABLE = "decisions"
STAGING = "_staging"


class Committed(NamedTuple):
  version: Optional[int]  # the table version this run made; None when it staged nothing
  inserted: int
  updated: int


def table_path(root: str) -> str:
  return FileSystems.join(root, TABLE)


def staging_path(root: str, run_id: str) -> str:
  return FileSystems.join(root, STAGING, run_id)


def storage_options(options: Optional[PipelineOptions]) -> dict:
  """deltalake's object-store settings from Beam's S3 flags (the same endpoint and credentials)."""
  if options is None:
    return {}
  flags = options.get_all_options()
  out = {}
  for flag, key in (("s3_endpoint_url", "AWS_ENDPOINT_URL"), ("s3_access_key_id", "AWS_ACCESS_KEY_ID"),
                    ("s3_secret_access_key", "AWS_SECRET_ACCESS_KEY"), ("s3_region_name", "AWS_REGION")):
    if flags.get(flag):
      out[key] = flags[flag]
  if out.get("AWS_ENDPOINT_URL", "").startswith("http://"):
    out["AWS_ALLOW_HTTP"] = "true"
  # One committer per run and table; S3 has no atomic rename for delta-rs to lean on.
  out["AWS_S3_ALLOW_UNSAFE_RENAME"] = "true"
  return out


class Staged(NamedTuple):
  """A staged Parquet file of a run (a path of ``fs``) and the event day it holds (``YYYY-MM-DD``)."""
  path: str
  event_date: str


def commit(root: str, run_id: str, options: Optional[PipelineOptions] = None) -> Committed:
  """Publishes the run's staged rows in the table (one version) and removes the staging directory."""
  storage = storage_options(options)
  fs, where = filesystem(staging_path(root, run_id), storage)
  staged = [Staged(path, path.rsplit("/", 2)[-2].split("=", 1)[1]) for path in object_store.parquet_files(fs, where)]
  if not staged:
    return Committed(None, 0, 0)
  source = ds.dataset([f.path for f in staged], format="parquet", filesystem=fs, schema=parquet.COLD_SCHEMA)
  # Arrow's threaded scans through deltalake can leave threads that abort the process at exit
  # (delta-io/delta-rs#2184): one thread here, and in ``read``.
  committed = upsert(table_path(root), parquet.COLD_SCHEMA, ("transaction_id",), fs, staged, run_id,
                     lambda: source.scanner(use_threads=False).to_reader(),
                     source.to_table(columns=["transaction_id"], use_threads=False), storage,
                     "txstream decisions, one row per transaction_id")
  fs.delete_dir(where)
  _LOGGER.info("cold tier: version %s of %s, %d rows inserted, %d replaced", committed.version, table_path(root),
               committed.inserted, committed.updated)
  return committed


def upsert(uri: str, schema: pa.Schema, keys: Sequence[str], fs, staged: Sequence[Staged], run_id: str,
           rows: Callable[[], pa.RecordBatchReader], staged_keys: pa.Table, storage: dict,
           description: str) -> Committed:
  """Puts the staged rows into the Delta table at ``uri``, keyed on ``keys``, as one version: a row whose key
  the table holds replaces it, the others are inserted.

  ``rows()`` reads the staged rows (each key once); ``staged_keys`` are the
  staged files' key columns. When no key is in the table yet and none is
  staged twice (a run over new data: the usual case), the staged files
  themselves join the table (moved in, one commit adding them: no data is
  rewritten); when keys are new but staged twice, ``rows()`` is appended;
  only otherwise is it a MERGE, which joins the staged rows with the table
  (about 3 s and 1.5 GiB a million decision rows). Deciding reads the
  table's key columns only.
  """
  from deltalake import DeltaTable, write_deltalake
  if not DeltaTable.is_deltatable(uri, storage_options=storage):
    DeltaTable.create(uri, schema=schema, partition_by=["event_date"], storage_options=storage,
                      name=uri.rstrip("/").rsplit("/", 1)[-1], description=description)
  table = DeltaTable(uri, storage_options=storage)
  dataset = table.to_pyarrow_dataset()
  stored = dataset.to_table(columns=list(keys), use_threads=False)
  del dataset
  new_keys = pl.from_arrow(staged_keys)
  overlap = stored.num_rows and new_keys.join(pl.from_arrow(stored), on=list(keys), how="semi").height
  inserted, updated = staged_keys.num_rows, 0
  if not overlap and not new_keys.is_duplicated().any():
    _add_files(table, uri, schema, fs, staged, run_id, storage)
  elif not overlap:
    write_deltalake(table, rows(), mode="append", storage_options=storage)
    inserted = new_keys.n_unique()
  else:
    predicate = " AND ".join(f"t.{k} = s.{k}" for k in keys)
    metrics = (table.merge(source=rows(), predicate=predicate, source_alias="s", target_alias="t",
                           streamed_exec=True)
               .when_matched_update_all().when_not_matched_insert_all().execute())
    inserted, updated = metrics.get("num_target_rows_inserted", 0), metrics.get("num_target_rows_updated", 0)
  gc.collect()
  return Committed(DeltaTable(uri, storage_options=storage).version(), inserted, updated)


def _add_files(table, uri: str, schema: pa.Schema, fs, staged: Sequence[Staged], run_id: str, storage: dict) -> None:
  """Moves the staged files into the table's partitions and commits them, unchanged, as one version."""
  from deltalake.transaction import AddAction
  _, table_dir = filesystem(uri, storage)
  actions = []
  for i, f in enumerate(staged):
    relative = f"event_date={f.event_date}/{run_id}-{i:05d}.parquet"
    fs.create_dir(f"{table_dir}/event_date={f.event_date}")
    fs.move(f.path, f"{table_dir}/{relative}")
    with fs.open_input_file(f"{table_dir}/{relative}") as opened:
      size, records = opened.size(), pq.ParquetFile(opened).metadata.num_rows
    actions.append(AddAction(relative, size, {"event_date": f.event_date}, int(time.time() * 1000), True,
                             json.dumps({"numRecords": records})))
  table.create_write_transaction(actions, "append", schema, partition_by=["event_date"])


def read(root: str, options: Optional[PipelineOptions] = None, version=None, table: str = TABLE) -> pa.Table:
  """The rows of the cold root's ``table`` (as of ``version``: a version number or a datetime)."""
  from deltalake import DeltaTable
  table = DeltaTable(FileSystems.join(root, table), storage_options=storage_options(options))
  if version is not None:
    table.load_as_version(version)
  dataset = table.to_pyarrow_dataset()
  rows = dataset.to_table(use_threads=False)
  del dataset
  gc.collect()  # the scan's resources go now, not at interpreter exit
  return rows
