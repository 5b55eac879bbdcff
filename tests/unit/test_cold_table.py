"""``cold_table.upsert``: one version per commit, each key once, whichever way the rows go in.

New keys go in as the staged files themselves; keys staged twice are
deduplicated and appended; keys the table holds are MERGEd (replaced).
"""
import datetime

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq

from txstream.io import cold_table, object_store

SCHEMA = pa.schema([("transaction_id", pa.string()), ("amount", pa.int64()), ("event_date", pa.date32())])


def _stage(tmp_path, name, ids, amounts, day="2018-04-01"):
  path = tmp_path / "staging" / name / f"event_date={day}" / "part.parquet"
  path.parent.mkdir(parents=True)
  date = datetime.date.fromisoformat(day)
  pq.write_table(pa.table({"transaction_id": ids, "amount": amounts, "event_date": [date] * len(ids)},
                          schema=SCHEMA), path)
  return cold_table.Staged(str(path), day)


def _upsert(tmp_path, uri, staged, run_id):
  fs = pyarrow.fs.LocalFileSystem()
  source = ds.dataset([f.path for f in staged], format="parquet", schema=SCHEMA)

  def rows():  # each key once, the last copy staged
    table = pl.from_arrow(source.to_table()).unique("transaction_id", keep="last", maintain_order=True)
    return pa.RecordBatchReader.from_batches(SCHEMA, table.to_arrow().cast(SCHEMA).to_batches())

  return cold_table.upsert(uri, SCHEMA, ("transaction_id",), fs, staged, run_id, rows,
                           source.to_table(columns=["transaction_id"]), {}, "test")


def _rows(uri, version=None):
  from deltalake import DeltaTable
  table = DeltaTable(uri, version=version)
  return sorted(pl.from_arrow(table.to_pyarrow_dataset().to_table(use_threads=False)).select(
      "transaction_id", "amount").iter_rows())


def test_new_keys_duplicates_and_stored_keys_each_make_one_version(tmp_path):
  uri = str(tmp_path / "table")
  first = _upsert(tmp_path, uri, [_stage(tmp_path, "a", ["t1", "t2"], [1, 2])], "run-a")
  assert (first.version, first.inserted, first.updated) == (1, 2, 0)
  assert not (tmp_path / "staging" / "a" / "event_date=2018-04-01" / "part.parquet").exists(), "moved in"
  second = _upsert(tmp_path, uri, [_stage(tmp_path, "b", ["t3", "t3"], [3, 3]),
                                   _stage(tmp_path, "b2", ["t4"], [4], day="2018-04-02")], "run-b")
  assert (second.version, second.inserted, second.updated) == (2, 2, 0)
  third = _upsert(tmp_path, uri, [_stage(tmp_path, "c", ["t1", "t5"], [10, 5])], "run-c")
  assert (third.version, third.inserted, third.updated) == (3, 1, 1)
  assert _rows(uri) == [("t1", 10), ("t2", 2), ("t3", 3), ("t4", 4), ("t5", 5)]
  assert _rows(uri, version=2) == [("t1", 1), ("t2", 2), ("t3", 3), ("t4", 4)]


def _staged(root, run_id):
  fs, where = object_store.filesystem(cold_table.staging_path(str(root), run_id), {})
  return fs, object_store.parquet_files(fs, where)


def test_staged_ranges_come_from_the_parquet_statistics_and_match_the_rows(tmp_path):
  root = tmp_path / "cold"
  rng = np.random.default_rng(4)
  written = []
  for day, groups in (("2018-04-01", 3), ("2018-04-02", 1)):
    folder = root / cold_table.STAGING / "run-1" / f"event_date={day}"
    folder.mkdir(parents=True)
    table = pa.table({"a": rng.normal(size=3000), "b": rng.integers(-5, 9, 3000).astype(float)})
    written.append(table)
    pq.write_table(table, folder / "w0.parquet", row_group_size=3000 // groups)
  # A file written without statistics: its column is read instead.
  pq.write_table(pa.table({"a": [100.0], "b": [-100.0]}), root / cold_table.STAGING / "run-1" /
                 "event_date=2018-04-02" / "w1.parquet", write_statistics=False)
  written.append(pa.table({"a": [100.0], "b": [-100.0]}))
  everything = pa.concat_tables(written)
  ranges = object_store.column_ranges(*_staged(root, "run-1"), ["a", "b"])
  for column in ("a", "b"):
    assert ranges[column] == (min(everything.column(column).to_pylist()), max(everything.column(column).to_pylist()))
  assert object_store.column_ranges(*_staged(root, "no-such-run"), ["a"]) == {"a": (None, None)}
