"""Parquet files on a local disk or S3 with pyarrow alone (no Beam): what a helper process can import cheaply.

``filesystem`` turns a path and deltalake-style object-store settings
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...; see
``cold_table.storage_options``) into a pyarrow filesystem; the rest reads a set
of Parquet files: their columns, or numeric columns' extremes from the row
groups' statistics alone.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq


def filesystem(path: str, options: dict):
  """(pyarrow filesystem, path within it)."""
  if not path.startswith("s3://"):
    return pyarrow.fs.LocalFileSystem(), path
  endpoint = options.get("AWS_ENDPOINT_URL", "")
  fs = pyarrow.fs.S3FileSystem(access_key=options.get("AWS_ACCESS_KEY_ID"),
                               secret_key=options.get("AWS_SECRET_ACCESS_KEY"),
                               region=options.get("AWS_REGION", "us-east-1"),
                               endpoint_override=endpoint.split("://", 1)[-1] or None,
                               scheme="http" if endpoint.startswith("http://") else "https")
  return fs, path[len("s3://"):]


def parquet_files(fs, where: str) -> List[str]:
  """The Parquet files under ``where`` (recursively; hidden and ``_`` files left out); none if it is absent."""
  return [f.path for f in fs.get_file_info(pyarrow.fs.FileSelector(where, recursive=True, allow_not_found=True))
          if f.path.endswith(".parquet") and not f.base_name.startswith((".", "_"))]


def read_columns(fs, paths: Sequence[str], columns: Optional[Sequence[str]] = None) -> pa.Table:
  """``columns`` (all when None) of the files, which share one schema."""
  return ds.dataset(list(paths), format="parquet", filesystem=fs).to_table(
      columns=list(columns) if columns else None)


def column_ranges(fs, paths: Sequence[str], columns: Sequence[str]) -> Dict[str, Tuple]:
  """``{column: (min, max)}`` over the files, from their Parquet statistics; (None, None) without rows.

  No data is read: each row group's footer holds its columns' extremes. A
  column without statistics in some row group is read (that column only).
  """
  lows: Dict[str, list] = {c: [] for c in columns}
  highs: Dict[str, list] = {c: [] for c in columns}
  unread = set()
  for path in paths:
    with fs.open_input_file(path) as opened:
      meta = pq.ParquetFile(opened).metadata
    positions = {meta.schema.column(i).path: i for i in range(meta.num_columns)}
    for g in range(meta.num_row_groups):
      group = meta.row_group(g)
      if not group.num_rows:
        continue
      for c in columns:
        stats = group.column(positions[c]).statistics
        if stats is None or not stats.has_min_max:
          unread.add(c)
        else:
          lows[c].append(stats.min)
          highs[c].append(stats.max)
  if unread:
    table = read_columns(fs, paths, sorted(unread))
    for c in unread:
      extremes = pc.min_max(table.column(c))
      lows[c], highs[c] = [extremes["min"].as_py()], [extremes["max"].as_py()]
  return {c: (min(lows[c]) if lows[c] else None, max(highs[c]) if highs[c] else None) for c in columns}
