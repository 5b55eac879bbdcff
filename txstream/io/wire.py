"""Confluent wire format and the framed files that carry it.

A Confluent message is: magic byte 0, a 4-byte big-endian schema id, then the
Avro binary body (no container header). Files written by ``txstream generate``
hold a sequence of such messages, each prefixed by its 4-byte big-endian
length, so a damaged message damages one record and never its neighbours; the
record's index in the file is its source position.
"""
import io
import logging
import struct
from typing import BinaryIO, Iterator, List, NamedTuple, Tuple

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from txstream.core import contracts

_LOGGER = logging.getLogger(__name__)

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")
FRAME = struct.Struct(">I")
# A single event is a few hundred bytes; anything near this is damage, not data.
MAX_FRAME_BYTES = 1 << 20
# A transaction or label is a few hundred bytes; a message this large is an
# upstream fault, refused before any decoding work.
MAX_MESSAGE_BYTES = 64 << 10
FILE_MAGIC = b"TXSW1\n"


class WireFormatError(ValueError):
  """A message that is not a valid Confluent wire-format message.

  ``reason`` is a stable, machine-readable code used for dead-letter counts.
  """
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def encode(schema_id: int, parsed_schema, record: dict) -> bytes:
  """Encodes one record as a Confluent wire-format message."""
  buf = io.BytesIO()
  buf.write(HEADER.pack(MAGIC_BYTE, schema_id))
  fastavro.schemaless_writer(buf, parsed_schema, record)
  return buf.getvalue()


def split_header(message: bytes) -> Tuple[int, memoryview]:
  """Returns (schema_id, avro_body); raises WireFormatError on a bad header."""
  if message is None:
    raise WireFormatError("null_value", "message has no value")
  if len(message) > MAX_MESSAGE_BYTES:
    raise WireFormatError("oversized_message", f"message of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
  if len(message) < HEADER.size:
    raise WireFormatError(
        "truncated_header", f"message of {len(message)} bytes is shorter than the 5-byte header")
  if message[0] != MAGIC_BYTE:
    raise WireFormatError("bad_magic_byte", f"magic byte is {message[0]}, expected 0")
  (schema_id,) = struct.unpack_from(">I", message, 1)
  return schema_id, memoryview(message)[HEADER.size:]


def write_frames(stream: BinaryIO, messages) -> int:
  """Writes messages to a framed file stream; returns the number written."""
  n = 0
  stream.write(FILE_MAGIC)
  for message in messages:
    stream.write(FRAME.pack(len(message)))
    stream.write(message)
    n += 1
  return n


def read_frames(stream: BinaryIO) -> Iterator[Tuple[int, bytes]]:
  """Yields (record_index, message) from a framed file stream.

  Raises WireFormatError if the file itself is not a framed file or a frame
  length runs past the end of the file: framing damage makes the rest of the
  file unreadable, unlike damage inside one message.
  """
  head = stream.read(len(FILE_MAGIC))
  if head != FILE_MAGIC:
    raise WireFormatError("not_a_frame_file", "file does not start with the txstream frame header")
  index = 0
  while True:
    prefix = stream.read(FRAME.size)
    if not prefix:
      return
    if len(prefix) < FRAME.size:
      raise WireFormatError("truncated_frame", f"frame {index}: length prefix cut short")
    (length,) = FRAME.unpack(prefix)
    if length > MAX_FRAME_BYTES:
      raise WireFormatError("oversized_frame", f"frame {index}: length {length} exceeds {MAX_FRAME_BYTES}")
    body = stream.read(length)
    if len(body) < length:
      raise WireFormatError("truncated_frame", f"frame {index}: {len(body)} of {length} bytes")
    yield index, body
    index += 1


class FrameBatch(NamedTuple):
  """Consecutive messages of a framed file: the index of the first, and the messages."""
  first_index: int
  values: pa.BinaryArray

  def raw(self, name: str) -> pa.Table:
    """contracts.RAW rows of these messages of file ``name`` (sources ``name#index``)."""
    n = len(self.values)
    positions = pa.array(np.arange(self.first_index, self.first_index + n), pa.int64()).cast(pa.string())
    sources = pc.binary_join_element_wise(pa.scalar(f"{name}#"), positions, "")
    return pa.Table.from_arrays([sources, self.values, pa.nulls(n, pa.int64()), pa.array(np.zeros(n, bool))],
                                schema=contracts.RAW)


_READ_BYTES = 4 << 20


def read_frame_batches(stream: BinaryIO, max_records: int = 20_000) -> Iterator[FrameBatch]:
  """Streams a framed file as batches of at most ``max_records`` messages, reading ~4 MiB at a time.

  Raises WireFormatError (with ``.index``, the first record it could not
  read) where ``read_frames`` would, after yielding every batch before it.
  """
  head = stream.read(len(FILE_MAGIC))
  if head != FILE_MAGIC:
    raise _framing("not_a_frame_file", "file does not start with the txstream frame header", 0)
  buffer = b""
  index = 0
  while True:
    more = stream.read(_READ_BYTES)
    buffer += more
    starts, lengths, used = _scan(buffer, max_records, index)
    while starts:
      yield FrameBatch(index, _binary(buffer, starts, lengths))
      index += len(starts)
      buffer = buffer[used:]
      starts, lengths, used = _scan(buffer, max_records, index)
    if not more:
      if buffer:
        if len(buffer) < FRAME.size:
          raise _framing("truncated_frame", f"frame {index}: length prefix cut short", index)
        (length,) = FRAME.unpack_from(buffer)
        raise _framing("truncated_frame", f"frame {index}: {len(buffer) - FRAME.size} of {length} bytes", index)
      return


def _framing(reason: str, message: str, index: int) -> WireFormatError:
  error = WireFormatError(reason, message)
  error.index = index
  return error


def _scan(buffer: bytes, max_records: int, index: int) -> Tuple[List[int], List[int], int]:
  """Complete frames at the start of ``buffer``: (body starts, body lengths, bytes they span)."""
  starts, lengths = [], []
  pos, end = 0, len(buffer)
  unpack = FRAME.unpack_from
  while pos + 4 <= end and len(starts) < max_records:
    (length,) = unpack(buffer, pos)
    if length > MAX_FRAME_BYTES:
      if starts:
        break  # hand over the frames before it first
      raise _framing("oversized_frame", f"frame {index}: length {length} exceeds {MAX_FRAME_BYTES}", index)
    if pos + 4 + length > end:
      break
    starts.append(pos + 4)
    lengths.append(length)
    pos += 4 + length
  return starts, lengths, pos


def _binary(buffer: bytes, starts: List[int], lengths: List[int]) -> pa.BinaryArray:
  """The frames' bodies as one Arrow binary array (the 4-byte prefixes squeezed out)."""
  data = np.frombuffer(buffer, dtype=np.uint8)
  starts_np = np.asarray(starts, dtype=np.int64)
  lengths_np = np.asarray(lengths, dtype=np.int64)
  offsets = np.zeros(len(starts) + 1, dtype=np.int64)
  np.cumsum(lengths_np, out=offsets[1:])
  # Each body moves left by 4 bytes per frame before it: one gather of the kept bytes.
  first, last = starts[0], starts[-1] + lengths[-1]
  keep = np.ones(last - first, dtype=bool)
  prefixes = (starts_np[1:] - 4 - first)[:, None] + np.arange(4)
  keep[prefixes.ravel()] = False
  values = data[first:last][keep]
  return pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(starts),
                                          [None, pa.py_buffer(offsets), pa.py_buffer(values)]).cast(pa.binary())
