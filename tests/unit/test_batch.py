"""The batch element: its coder (lazy, compact, spillable), pickling of slices, splitting by key."""
import os
import pickle

import numpy as np
import pyarrow as pa
from apache_beam import coders

from tests import helpers as h
from txstream.core import batch
from txstream.core.batch import DeadLetterBatch, RawBatch, TransactionBatch


def _raw(n: int) -> RawBatch:
  return h.raw_batch([(f"f.wire#{i}", b"x" * 120 + i.to_bytes(4, "big")) for i in range(n)])


def test_the_registry_codes_every_kind_and_decoding_waits_for_the_table():
  coder = coders.registry.get_coder(RawBatch)
  assert isinstance(coder, batch.BatchCoder)
  assert isinstance(coders.registry.get_coder(DeadLetterBatch), batch.BatchCoder)
  original = _raw(5000)
  decoded = coder.decode(coder.encode(original))
  assert type(decoded) is RawBatch and len(decoded) == 5000
  assert decoded._table is None  # pylint: disable=protected-access
  assert decoded == original
  # Big batches are compressed; a second encode of the same batch is free (kept).
  assert len(coder.encode(original)) < original.table.nbytes / 2
  assert coder.encode(original) is coder.encode(original)


def test_a_pickled_slice_carries_only_its_rows():
  big = _raw(50_000).table
  part = RawBatch(big.slice(100, 10))
  assert len(pickle.dumps(part)) < 10_000 < len(pickle.dumps(big.slice(100, 10)))
  assert pickle.loads(pickle.dumps(part)) == part


def test_spilled_batches_travel_as_references_to_the_spill_file(tmp_path):
  coder = batch.BatchCoder()
  original = _raw(20_000)
  with batch.spilling(str(tmp_path)):
    reference = coder.encode(original)
    assert len(reference) < 200 and coder.encode(original) == reference
    decoded = coder.decode(reference)
    assert len(decoded) == 20_000 and decoded == original
    # Re-encoding a batch read from a reference writes nothing new.
    size = sum(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path))
    assert coder.encode(decoded) == reference
    assert sum(os.path.getsize(tmp_path / name) for name in os.listdir(tmp_path)) == size
  assert len(coder.encode(_raw(10))) > 200  # spilling is over: bytes again


def test_split_by_groups_rows_by_key_in_their_order():
  table = pa.table({"k": [3, 1, 3, 2, 1], "v": ["a", "b", "c", "d", "e"]})
  parts = {k: t.column("v").to_pylist() for k, t in batch.split_by(table, np.array([3, 1, 3, 2, 1]))}
  assert parts == {1: ["b", "e"], 2: ["d"], 3: ["a", "c"]}
  ordered = {k: t.column("v").to_pylist() for k, t in batch.split_by(table, np.array([1, 1, 2, 2, 5]))}
  assert ordered == {1: ["a", "b"], 2: ["c", "d"], 5: ["e"]}


def test_a_table_of_another_column_order_is_cast_to_the_kind():
  columns = {f.name: pa.nulls(2, f.type) for f in TransactionBatch.SCHEMA}
  shuffled = pa.table(dict(reversed(list(columns.items()))))
  assert TransactionBatch(shuffled).table.schema.equals(TransactionBatch.SCHEMA)
