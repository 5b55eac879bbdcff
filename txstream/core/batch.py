"""The element that crosses Beam: an Arrow table of one kind, and its coder.

Elements are batches of hundreds to tens of thousands of rows, so Beam's
per-element cost is paid per batch. ``BatchCoder`` writes the table as an
Arrow IPC stream with zstd-compressed buffers and decodes it *lazily*: a batch
that only passes through a runner's shuffle buffer (the FnApiRunner decodes
every grouped value) stays a compressed byte string until a stage reads its
``table``. Pickling a zero-copy slice would write its parent's buffers; the
IPC writer writes the slice only, and a batch pickles as its IPC bytes.

``spilling(directory)``: while active, the coder writes each batch's bytes
to an append-only file in ``directory`` and hands the runner a reference
(file, offset, length) instead. An in-process runner (the FnApiRunner, which
holds every shuffle in memory) then holds references, and memory follows the
batches being worked on, not the input. Only for runners whose workers share
this machine's disk: the run driver turns it on for those alone.
"""
import contextlib
import os
import struct
import threading
from typing import Dict, Iterator, List, Optional, Tuple, Type

import numpy as np
import pyarrow as pa
from apache_beam import coders

from txstream.core import contracts

# zstd: measured on decision rows, 75 bytes a row (LZ4: 230, none: 500) and no slower to write than LZ4.
_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")
_HEADER = struct.Struct(">BQ")  # kind, rows
_SPILLED = struct.Struct(">BQQQ")  # kind | 0x80, rows, offset, length; then the spill file's path
_SPILL_FLAG = 0x80
_COMPRESS_ROWS = 2_000


class Batch:
  """An Arrow table with the schema of its kind (``SCHEMA``); cheap to hold undecoded."""
  SCHEMA: pa.Schema = None
  KIND = 0
  __slots__ = ("_table", "_encoded", "_rows", "_spilled")

  def __init__(self, table: Optional[pa.Table] = None, *, _encoded: Optional[bytes] = None, _rows: int = 0,
               _spilled: Optional[bytes] = None):
    if table is not None and not table.schema.equals(self.SCHEMA):
      table = table.select(self.SCHEMA.names).cast(self.SCHEMA)
    self._table = table
    self._encoded = _encoded
    self._rows = table.num_rows if table is not None else _rows
    self._spilled = _spilled  # the reference this batch was read from, when it was spilled

  @classmethod
  def empty(cls) -> "Batch":
    return cls(cls.SCHEMA.empty_table())

  @classmethod
  def concat(cls, batches) -> "Batch":
    """One batch of all rows of ``batches`` (chunked; nothing is copied)."""
    tables = [b.table for b in batches if len(b)]
    if not tables:
      return cls.empty()
    return cls(pa.concat_tables(tables) if len(tables) > 1 else tables[0])

  @property
  def table(self) -> pa.Table:
    if self._table is None:
      encoded = self._encoded if self._encoded is not None else _Spill.read(self._spilled)
      with pa.ipc.open_stream(pa.py_buffer(encoded)[_HEADER.size:]) as reader:
        self._table = reader.read_all()
    return self._table

  def __len__(self) -> int:
    return self._rows

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self._rows} rows)"

  def __eq__(self, other) -> bool:
    return type(self) is type(other) and self.table.equals(other.table)

  __hash__ = None

  def __reduce__(self):
    # Pickled (by a coder that does not know the type, e.g. a runner estimating sizes) as IPC bytes, never
    # the table's buffers; uncompressed unless already encoded, as pickling is not how batches are shuffled.
    if self._encoded is not None:
      return _decode, (self._encoded,)
    return _decode, (self._ipc(None) if self._table is not None else self._spilled,)

  def _spill_or_encode(self) -> bytes:
    """What the coder writes: a reference to the bytes in the spill file when spilling, else the bytes."""
    spill = _Spill.active
    if spill is None:
      return self.encode()
    if self._spilled is None:
      encoded = self.encode()
      self._spilled = spill.write(self.KIND, self._rows, encoded)
      self._encoded = None  # the bytes live on disk now; the table, if any, stays for this worker
    return self._spilled

  def encoded_size(self) -> int:
    """About the size of ``encode()`` without encoding (runners ask for every element's size)."""
    if self._encoded is not None:
      return len(self._encoded)
    if self._table is None:
      return len(self._spilled)
    return max(1, self._table.nbytes // 4)

  def encode(self) -> bytes:
    """The IPC bytes; kept, so a batch a runner encodes twice (size, then data) is compressed once."""
    if self._encoded is not None:
      return self._encoded
    # Compression costs per buffer (each column has a few): small batches go uncompressed.
    self._encoded = self._ipc(_IPC_OPTIONS if self._rows >= _COMPRESS_ROWS else None)
    return self._encoded

  def _ipc(self, options: Optional[pa.ipc.IpcWriteOptions]) -> bytes:
    sink = pa.BufferOutputStream()
    table = self.table
    if table.num_rows and any(c.num_chunks > 1 for c in table.columns):
      table = table.combine_chunks()  # one record batch: compression costs per buffer written
    with pa.ipc.new_stream(sink, self.SCHEMA, options=options) as writer:
      writer.write_table(table)
    return _HEADER.pack(self.KIND, self._rows) + sink.getvalue().to_pybytes()


class RawBatch(Batch):
  """Undecoded messages with their source positions (``contracts.RAW``)."""
  SCHEMA = contracts.RAW
  KIND = 1


class TransactionBatch(Batch):
  """Decoded, validated (and after Enrich, enriched) transactions (``contracts.TRANSACTION``)."""
  SCHEMA = contracts.TRANSACTION
  KIND = 2


class LabelBatch(Batch):
  """Fraud labels (``contracts.LABEL``)."""
  SCHEMA = contracts.LABEL
  KIND = 3


class FeaturedBatch(Batch):
  """Transactions with their feature columns (``contracts.FEATURED``)."""
  SCHEMA = contracts.FEATURED
  KIND = 4


class DecisionBatch(Batch):
  """Scored transactions: features, score, decision, reason codes, versions (``contracts.DECISION``)."""
  SCHEMA = contracts.DECISION
  KIND = 5


class DeadLetterBatch(Batch):
  """Inputs that could not be processed, each with its stage and reason (``contracts.DEAD_LETTER``)."""
  SCHEMA = contracts.DEAD_LETTER
  KIND = 6


class ArchiveBatch(Batch):
  """Accepted input messages as received, for the raw archive (``contracts.ARCHIVE``)."""
  SCHEMA = contracts.ARCHIVE
  KIND = 7


_KINDS: Dict[int, Type[Batch]] = {cls.KIND: cls for cls in (RawBatch, TransactionBatch, LabelBatch, FeaturedBatch,
                                                             DecisionBatch, DeadLetterBatch, ArchiveBatch)}


def _decode(encoded: bytes) -> Batch:
  kind, rows = _HEADER.unpack_from(encoded)
  if kind & _SPILL_FLAG:
    return _KINDS[kind & ~_SPILL_FLAG](_rows=rows, _spilled=encoded)
  return _KINDS[kind](_encoded=encoded, _rows=rows)


class _Spill:
  """An append-only file of batch bytes in a directory; references carry the path, offset and length."""
  active: Optional["_Spill"] = None

  def __init__(self, directory: str):
    self._path = os.path.join(directory, f"batches-{os.getpid()}.spill")
    self._file = open(self._path, "ab")  # pylint: disable=consider-using-with
    self._lock = threading.Lock()

  def write(self, kind: int, rows: int, data: bytes) -> bytes:
    with self._lock:
      offset = self._file.tell()
      self._file.write(data)
      self._file.flush()
    return _SPILLED.pack(kind | _SPILL_FLAG, rows, offset, len(data)) + self._path.encode()

  @staticmethod
  def read(reference: bytes) -> bytes:
    _, _, offset, length = _SPILLED.unpack_from(reference)
    with open(reference[_SPILLED.size:].decode(), "rb") as f:
      f.seek(offset)
      return f.read(length)

  def close(self) -> None:
    self._file.close()


@contextlib.contextmanager
def spilling(directory: str):
  """Spills every batch the coder writes to ``directory`` while the block runs (see the module notes)."""
  spill = _Spill(directory)
  previous, _Spill.active = _Spill.active, spill
  try:
    yield
  finally:
    _Spill.active = previous
    spill.close()


class BatchCoder(coders.Coder):
  """Arrow IPC (zstd) for every ``Batch`` kind; decoding defers the IPC read to first use."""

  def encode(self, value: Batch) -> bytes:
    return value._spill_or_encode()  # pylint: disable=protected-access

  def decode(self, encoded: bytes) -> Batch:
    return _decode(encoded)

  def estimate_size(self, value: Batch) -> int:
    return value.encoded_size()

  def is_deterministic(self) -> bool:
    return False

  def to_type_hint(self):
    return Batch

  def __eq__(self, other):
    return type(self) is type(other)

  def __hash__(self):
    return hash(type(self))


class StateBatchCoder(BatchCoder):
  """Uncompressed Arrow IPC: for batches kept in user state, read and rewritten at every timer firing."""

  def encode(self, value: Batch) -> bytes:
    # pylint: disable-next=protected-access
    return value._encoded if value._encoded is not None else value._ipc(None)


for _kind in _KINDS.values():
  coders.registry.register_coder(_kind, BatchCoder)
coders.registry.register_coder(Batch, BatchCoder)


def split_by(table: pa.Table, keys: np.ndarray) -> Iterator[Tuple[int, pa.Table]]:
  """(key, rows with that key) for each distinct key, keys ascending, rows in their original order."""
  if table.num_rows == 0:
    return
  if (keys[1:] >= keys[:-1]).all():  # already grouped in order (e.g. rows of a day-ordered shard): no copy
    order, sorted_keys, taken = None, keys, table
  else:
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    taken = table.take(pa.array(order))
  bounds = np.flatnonzero(np.diff(sorted_keys)) + 1
  starts = np.concatenate(([0], bounds))
  ends = np.concatenate((bounds, [len(keys)]))
  for start, end in zip(starts.tolist(), ends.tolist()):
    yield int(sorted_keys[start]), taken.slice(start, end - start)


def shard_of(ids: np.ndarray, shards: int) -> np.ndarray:
  """The shard of each id: ``id % shards`` (ids are non-negative after validation)."""
  return np.asarray(ids, dtype=np.int64) % shards


def column(table: pa.Table, name: str, dtype=None) -> np.ndarray:
  """A column as a numpy array (zero-copy where Arrow allows it)."""
  array = table.column(name)
  if dtype is None:
    return array.to_numpy()
  return np.asarray(array.to_numpy(), dtype=dtype)


def concat_tables(tables: List[pa.Table], schema: pa.Schema) -> pa.Table:
  tables = [t for t in tables if t.num_rows]
  if not tables:
    return schema.empty_table()
  return pa.concat_tables(tables) if len(tables) > 1 else tables[0]
