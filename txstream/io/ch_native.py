"""ClickHouse's Native format, written column-wise from Arrow and numpy arrays.

``INSERT ... FORMAT Native`` hands the server a block in its own columnar
layout: numbers are copied, nothing is parsed, so the server spends ~2 µs a
decision row where text formats cost it several times that, and the client
builds a block without a per-value Python loop (clickhouse-driver writes
strings, arrays and enums value by value). The HTTP interface reads Native
without block info, the same way on 18.16 and current releases.

A block: varint column count, varint row count, then per column its name and
type (varint-prefixed strings) and its data:
  numbers       little-endian values;
  ``String``    per value a varint length and the bytes;
  ``Nullable``  a UInt8 map (1 = NULL), then the nested column (a default where NULL);
  ``Array``     UInt64 end offsets of every row, then the nested column of all elements;
  ``Enum8``     Int8 codes.
"""
from typing import Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

Column = Union[pa.Array, pa.ChunkedArray]


def _array(column: Column) -> pa.Array:
  return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def varints(values: np.ndarray) -> pa.Array:
  """Each non-negative integer as its unsigned LEB128 bytes."""
  values = np.asarray(values, dtype=np.uint64)
  n = len(values)
  if not n or values.max() < 0x80:  # the usual case: one byte each
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(1), n, [None, pa.py_buffer(values.astype(np.uint8))]) \
        .cast(pa.binary())
  groups = np.stack([(values >> np.uint64(7 * i)) & np.uint64(0x7F) for i in range(10)], axis=1).astype(np.uint8)
  sizes = np.maximum(1, 10 - np.argmax(np.flip(groups, axis=1) != 0, axis=1))
  sizes[values == 0] = 1
  index = np.arange(10)[None, :]
  groups[index < sizes[:, None] - 1] |= 0x80
  offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int32)
  data = groups[index < sizes[:, None]]
  return pa.BinaryArray.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _varint(value: int) -> bytes:
  return varints(np.array([value]))[0].as_py()


def _string(value: bytes) -> bytes:
  return _varint(len(value)) + value


def _values(array: pa.Array) -> memoryview:
  """The concatenated bytes of a binary array's values."""
  if not len(array):
    return memoryview(b"")
  offsets = np.frombuffer(array.buffers()[1], dtype=np.int32, count=len(array) + 1, offset=array.offset * 4)
  return memoryview(array.buffers()[2])[int(offsets[0]):int(offsets[-1])]


def numbers(values: np.ndarray, dtype: str) -> memoryview:
  """A numeric column (``<i4``, ``<i8``, ``<u8``, ``<f8``, ``<i1``, ...) from values with no nulls."""
  return memoryview(np.ascontiguousarray(values, dtype=dtype)).cast("B")


def strings(column: Column) -> memoryview:
  """A ``String`` column from strings or binary (null as the empty string)."""
  payload = _array(column).cast(pa.binary()).fill_null(b"")
  lengths = pc.binary_length(payload).to_numpy(zero_copy_only=False)
  return _values(_array(pc.binary_join_element_wise(varints(lengths), payload, b"")))


def null_map(column: Column) -> memoryview:
  """The UInt8 null map that precedes a ``Nullable`` column's nested data."""
  return numbers(_array(column).is_null().to_numpy(zero_copy_only=False), "<u1")


def nullable_numbers(column: Column, dtype: str) -> bytes:
  """A ``Nullable`` numeric column: the null map, then the values (0 where null)."""
  column = _array(column)
  return b"".join([null_map(column), numbers(column.fill_null(0).to_numpy(zero_copy_only=False), dtype)])


def nullable_strings(column: Column) -> bytes:
  return b"".join([null_map(column), strings(column)])


def string_arrays(column: Column) -> bytes:
  """An ``Array(String)`` column from a list<string> column (a null list is empty)."""
  column = _array(column)
  lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False)
  return b"".join([numbers(np.cumsum(lengths, dtype=np.uint64), "<u8"), strings(pc.list_flatten(column))])


def enum8(column: Column, names: Sequence[str], codes: Sequence[int]) -> memoryview:
  """An ``Enum8`` column from strings, every one of which must be in ``names`` (code ``codes[i]``)."""
  positions = pc.index_in(_array(column), pa.array(list(names))).to_numpy(zero_copy_only=False)
  return numbers(np.asarray(codes, dtype=np.int8)[positions], "<i1")


def block(columns: Sequence[Tuple[str, str, bytes]], rows: int) -> bytes:
  """A Native block of ``rows`` rows from (name, type, data) per column."""
  parts = [_varint(len(columns)), _varint(rows)]
  for name, type_name, data in columns:
    parts += [_string(name.encode()), _string(type_name.encode()), data]
  return b"".join(parts)
