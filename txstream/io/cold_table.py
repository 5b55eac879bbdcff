"""Cold tier: a Delta Lake table of decisions, partitioned by event day, merged on ``transaction_id``.

``<root>/decisions`` is the table (``_delta_log/`` and ``event_date=YYYY-MM-DD/``
Parquet files), on a local path or ``s3://``. A run never writes into it
directly: its writers stage Parquet files under ``<root>/_staging/<run_id>/``
(``io.parquet.DayFiles``: one file per event day and writer), and once the
whole pipeline has succeeded the run driver calls ``commit``, which MERGEs
every staged row into the table on ``transaction_id`` (a transaction the
table holds is replaced, a new one inserted) in one table version, then
removes the staging directory. So each transaction is in the table exactly
once after any sequence of runs, reruns and split inputs; a run that crashed
committed nothing (its staging directory stays behind, never read); and every
run is a version to read back (time travel: ``DeltaTable(path, version=N)``
or ``load_as_version(datetime)``).
"""
import gc
import logging
from typing import NamedTuple, Optional

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from txstream.io import parquet

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


def filesystem(path: str, options: dict):
  """(pyarrow filesystem, path within it) for reading the staged files."""
  if not path.startswith("s3://"):
    return pyarrow.fs.LocalFileSystem(), path
  endpoint = options.get("AWS_ENDPOINT_URL", "")
  fs = pyarrow.fs.S3FileSystem(access_key=options.get("AWS_ACCESS_KEY_ID"),
                               secret_key=options.get("AWS_SECRET_ACCESS_KEY"),
                               region=options.get("AWS_REGION", "us-east-1"),
                               endpoint_override=endpoint.split("://", 1)[-1] or None,
                               scheme="http" if endpoint.startswith("http://") else "https")
  return fs, path[len("s3://"):]


def commit(root: str, run_id: str, options: Optional[PipelineOptions] = None) -> Committed:
  """MERGEs the run's staged rows into the table (one version) and removes the staging directory."""
  from deltalake import DeltaTable
  storage = storage_options(options)
  fs, where = filesystem(staging_path(root, run_id), storage)
  files = [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(where, recursive=True, allow_not_found=True))
           if f.path.endswith(".parquet") and not f.base_name.startswith((".", "_"))]
  if not files:
    return Committed(None, 0, 0)
  source = ds.dataset(files, format="parquet", filesystem=fs, schema=parquet.COLD_SCHEMA)
  uri = table_path(root)
  if not DeltaTable.is_deltatable(uri, storage_options=storage):
    DeltaTable.create(uri, schema=parquet.COLD_SCHEMA, partition_by=["event_date"], storage_options=storage,
                      name="decisions", description="txstream decisions, one row per transaction_id")
  table = DeltaTable(uri, storage_options=storage)
  # Arrow's threaded scans through deltalake can leave threads that abort the process at exit
  # (delta-io/delta-rs#2184): one thread here, and in ``read``.
  metrics = (table.merge(source=source.scanner(use_threads=False).to_reader(),
                         predicate="t.transaction_id = s.transaction_id",
                         source_alias="s", target_alias="t", streamed_exec=True)
             .when_matched_update_all().when_not_matched_insert_all().execute())
  fs.delete_dir(where)
  version = DeltaTable(uri, storage_options=storage).version()
  inserted, updated = metrics.get("num_target_rows_inserted", 0), metrics.get("num_target_rows_updated", 0)
  _LOGGER.info("cold tier: version %d of %s, %d rows inserted, %d replaced", version, uri, inserted, updated)
  return Committed(version, inserted, updated)


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
