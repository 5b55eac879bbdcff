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
from typing import BinaryIO, Iterator, Tuple

import fastavro

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
