"""Confluent wire format and the framed files that carry it.

A Confluent message is: magic byte 0, a 4-byte big-endian schema id, then the
Avro binary body (no container header). Files written by ``txstream generate``
hold a sequence of such messages, each prefixed by its 4-byte big-endian
length, so a damaged message damages one record and never its neighbours; the
record's index in the file is its source position. A damaged length damages a
stretch of the file, not the rest of it: ``read_frame_segments`` makes the
stretch one record and resynchronises on the next plausible frame.
"""
import io
import logging
import struct
from typing import BinaryIO, Iterable, Iterator, List, NamedTuple, Optional, Tuple, Union

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

  Strict, like ``read_frame_batches``: raises WireFormatError at the first
  framing damage. ``read_frame_segments`` reads on past it.
  """
  for batch in read_frame_batches(stream, 4096):
    for i, value in enumerate(batch.values.to_pylist()):
      yield batch.first_index + i, value


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


# A damaged region is kept for inspection, not replay: past this it is cut, and its message says so.
MAX_DAMAGE_BYTES = 1 << 20


class Damage(NamedTuple):
  """A stretch of a framed file that holds no frame: it takes one record index, like a message.

  ``raw`` is its bytes (the first ``MAX_DAMAGE_BYTES`` of them), ``offset``
  where it starts in the file, ``reason`` one of contracts.FILE_REASONS.
  """
  index: int
  offset: int
  raw: bytes
  reason: str
  message: str

  def error(self) -> WireFormatError:
    return _framing(self.reason, self.message, self.index)


_READ_BYTES = 4 << 20
# Frames that must chain after a plausible header before reading resumes there (see read_frame_segments).
RESYNC_CHAIN = 2


def read_frame_batches(stream: BinaryIO, max_records: int = 20_000) -> Iterator[FrameBatch]:
  """Streams a framed file as batches of at most ``max_records`` messages, reading ~4 MiB at a time.

  Strict: raises WireFormatError (with ``.index``, the first record it could
  not read) at the first framing damage, after yielding every batch before it.
  """
  for item in read_frame_segments(stream, (), max_records):
    if isinstance(item, Damage):
      raise item.error()
    yield item


def read_frame_segments(stream: BinaryIO, schema_ids: Iterable[int],
                        max_records: int = 20_000) -> Iterator[Union[FrameBatch, Damage]]:
  """Streams a framed file as FrameBatches, with a ``Damage`` for each stretch whose framing is broken.

  A resynchronisation point is an offset where a frame has a length in
  [5, MAX_FRAME_BYTES], magic byte 0 and a schema id in ``schema_ids`` (a
  plausible header), followed by ``RESYNC_CHAIN`` frames whose lengths
  chain within the file, or by the end of the file. (The headers after the
  first are not checked, so that a message damaged inside, next to framing
  damage, does not push the point past intact frames.)

  Framing damage is found at a length prefix that is too large, runs past
  the end of the file or is cut short. It starts there, unless the frame
  before it runs over a resynchronisation point: then that frame's length is
  wrong and the damage starts with it. A frame whose own header, or whose
  successor's header, is not plausible is checked the same way: if it runs
  over a resynchronisation point it is damage, else it is a message damaged
  inside intact framing and is read like any other (decoding rejects it).
  The damage ends at the first resynchronisation point after its first byte,
  or at the end of the file; with no ``schema_ids`` there is none.

  Record indices count frames and damages alike: a damage takes the index
  the next frame would have had, and the frames after it continue from the
  index after it. A frame whose length was shortened is read as its first
  bytes (decoding rejects it) and the damage is what it left behind.

  A file without ``FILE_MAGIC`` is one ``not_a_frame_file`` Damage at index 0.
  """
  head = stream.read(len(FILE_MAGIC))
  if head != FILE_MAGIC:
    kept = head + stream.read(MAX_DAMAGE_BYTES - len(head))
    cut = f" (first {len(kept)} bytes kept)" if stream.read(1) else ""
    yield Damage(0, 0, kept, "not_a_frame_file", f"file does not start with the txstream frame header{cut}")
    return
  ids = np.unique(np.fromiter(schema_ids, dtype=np.uint32))
  buf = _Buffer(stream, len(FILE_MAGIC))
  index, pos, starts, lengths = 0, 0, [], []
  while True:
    more_starts, more_lengths, after = _scan(buf.data, pos, max_records - len(starts), buf.final)
    keep = _first_in_doubt(buf.data, more_starts, more_lengths, buf.final, ids)
    starts += more_starts[:keep]
    lengths += more_lengths[:keep]
    pos = after if keep == len(more_starts) else more_starts[keep] - FRAME.size
    step = None if len(starts) == max_records else _step(buf.data, pos, buf.final, ids)
    if isinstance(step, int):
      starts.append(pos + FRAME.size)
      lengths.append(step)
      pos += FRAME.size + step
      continue
    if starts:  # before the buffer moves on, a damage is emitted, or the batch is full
      yield FrameBatch(index, _binary(buf.data, starts, lengths))
      index += len(starts)
      starts, lengths = [], []
    if step is _MORE:
      buf.advance(pos)
      pos = 0
    elif step is _END:
      return
    elif step is not None:
      damage, pos = _damage(buf, pos, step, index, ids)
      yield damage
      index += 1


class _Buffer:
  """The part of a stream in hand: ``data`` starts at file offset ``base``; ``final`` once the stream is exhausted."""
  def __init__(self, stream: BinaryIO, base: int):
    self._stream = stream
    self.data = b""
    self.base = base
    self.final = False

  def advance(self, pos: int) -> None:
    """Lets go of the bytes before ``pos`` and reads the next chunk.

    Reads until the chunk is full or the stream ends, so that the end is
    known with the last bytes and the file's last frame joins the batch
    before it.
    """
    chunks, size = [self.data[pos:]], 0
    while size < _READ_BYTES:
      more = self._stream.read(_READ_BYTES - size)
      if not more:
        self.final = True
        break
      chunks.append(more)
      size += len(more)
    self.data = b"".join(chunks)
    self.base += pos


def _scan(data: bytes, pos: int, max_records: int, final: bool) -> Tuple[List[int], List[int], int]:
  """Frames read from ``pos`` on: (body starts, body lengths, offset after them).

  A frame is taken once the frame after it is in ``data`` whole, with a
  length within bounds, or it ends ``data`` and ``data`` is ``final`` (ends
  the file); anything else is left to ``_step``. The hot loop of clean
  files: each length is unpacked once, as the successor of the frame before.
  """
  starts, lengths = [], []
  end = len(data)
  if pos + FRAME.size > end or max_records < 1:
    return starts, lengths, pos
  unpack = FRAME.unpack_from
  (length,) = unpack(data, pos)
  while len(starts) < max_records and length <= MAX_FRAME_BYTES:
    after = pos + 4 + length
    if after + 4 > end:
      if final and after == end:
        starts.append(pos + 4)
        lengths.append(length)
        pos = after
      break
    (following,) = unpack(data, after)
    if following > MAX_FRAME_BYTES or after + 4 + following > end:
      break
    starts.append(pos + 4)
    lengths.append(length)
    pos, length = after, following
  return starts, lengths, pos


def _first_in_doubt(data: bytes, starts: List[int], lengths: List[int], final: bool, ids: np.ndarray) -> int:
  """Of frames taken by ``_scan``, the first whose length is in doubt; ``len(starts)`` when none is.

  A length is in doubt where the frame's header or its successor's is not
  plausible and the frame runs over a resynchronisation point (or ``data``
  is too short to rule one out). Clean files cost one vectorised header check.
  """
  if not ids.size or not starts:
    return len(starts)
  view = np.frombuffer(data, dtype=np.uint8)
  heads = np.asarray(starts, dtype=np.int64) - FRAME.size
  end_of_last = starts[-1] + lengths[-1]
  if end_of_last < len(data):  # _scan took the last frame only with its successor whole
    plausible = _plausible(view, np.append(heads, end_of_last), ids)
  else:
    plausible = np.append(_plausible(view, heads, ids), True)
  for i in np.flatnonzero(~plausible[:-1] | ~plausible[1:]).tolist():
    stop = starts[i] + lengths[i]
    point, decided = _resync(data, starts[i] - FRAME.size + 1, stop, final, ids)
    if point is not None or decided < stop:
      return i
  return len(starts)


def _plausible(view: np.ndarray, offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
  """Whether a frame at each offset has a plausible header: length in [5, MAX_FRAME_BYTES], magic 0, id in ``ids``."""
  whole = offsets + 9 <= len(view)
  if not whole.any():
    return whole
  at = np.where(whole, offsets, 0)
  # Big-endian words at every byte offset: an unaligned, overlapping view of the bytes, not a copy.
  words = np.ndarray((len(view) - 3,), dtype=">u4", buffer=view, strides=(1,))
  length = words[at]
  return (whole & (length >= HEADER.size) & (length <= MAX_FRAME_BYTES) & (view[at + 4] == MAGIC_BYTE)
          & np.isin(words[at + 5], ids))


_MORE, _END = object(), object()


class _Broken(NamedTuple):
  """Damage found at a frame: its reason and message, and where it ends when that is already known."""
  reason: str
  message: str
  stop: Optional[int] = None


def _step(data: bytes, pos: int, final: bool, ids: np.ndarray):
  """The frame at ``pos`` where ``_scan`` stopped: _MORE (data needed), _END, its length, or _Broken."""
  end = len(data)
  if pos + FRAME.size > end:
    if not final:
      return _MORE
    return _END if pos == end else _Broken("truncated_frame", "length prefix cut short", end)
  (length,) = FRAME.unpack_from(data, pos)
  if length > MAX_FRAME_BYTES:
    return _Broken("oversized_frame", f"length {length} exceeds {MAX_FRAME_BYTES}")
  after = pos + 4 + length
  if after >= end and not final:
    return _MORE
  if after > end:
    return _Broken("truncated_frame", f"length {length} runs {after - end} bytes past the end of the file")
  doubt = _in_doubt(data, pos, after, final, ids) if ids.size else False
  if doubt is _MORE:
    return _MORE
  if doubt:
    # Its length may be what is wrong: it is, if the frame runs over a resynchronisation point.
    point, decided = _resync(data, pos + 1, after, final, ids)
    if point is None and decided < after:
      return _MORE
    if point is not None:
      return _Broken("oversized_frame", f"length {length} runs over the frame found {point - pos} bytes in", point)
  return length


def _in_doubt(data: bytes, pos: int, after: int, final: bool, ids: np.ndarray):
  """Whether the whole frame at ``pos`` (ending at ``after``) has a header, or a successor, that is not plausible.

  _MORE when the successor is not in ``data`` yet.
  """
  heads, end = [pos], len(data)
  if after < end:
    if after + FRAME.size > end:
      return True if final else _MORE
    (following,) = FRAME.unpack_from(data, after)
    if following > MAX_FRAME_BYTES:
      return True
    if after + 4 + following > end:
      return True if final else _MORE
    heads.append(after)
  return not _plausible(np.frombuffer(data, dtype=np.uint8), np.array(heads), ids).all()


def _resync(data: bytes, start: int, stop: int, final: bool, ids: np.ndarray) -> Tuple[Optional[int], int]:
  """The first resynchronisation point in [start, stop), and up to where that is decided.

  Returns (offset, offset) when found, else (None, d): no point in
  [start, d); d < stop only where deciding needs data beyond ``data``.
  """
  end = len(data)
  if not ids.size or start >= stop:
    return None, stop
  # A point needs its length, magic byte and schema id in hand: 9 bytes.
  last = min(stop, end - 8)
  if last <= start:
    return None, (stop if final else start)
  view = np.frombuffer(data, dtype=np.uint8)
  # Lengths within MAX_FRAME_BYTES (< 2**24) start with a zero byte, like the magic byte: a cheap first cut.
  offsets = np.flatnonzero((view[start:last] == 0) & (view[start + 4:last + 4] == MAGIC_BYTE)) + start
  for offset in offsets[_plausible(view, offsets, ids)].tolist():
    chained = _chains(data, offset, final)
    if chained is None:
      return None, offset
    if chained:
      return offset, offset
  return None, (stop if final or last == stop else last)


def _chains(data: bytes, pos: int, final: bool) -> Optional[bool]:
  """Whether the frame at ``pos`` and ``RESYNC_CHAIN`` after it chain within the file; None if ``data`` cannot say."""
  end = len(data)
  for k in range(RESYNC_CHAIN + 1):
    if pos + FRAME.size > end:
      if not final:
        return None
      return k > 0 and pos == end
    (length,) = FRAME.unpack_from(data, pos)
    pos += 4 + length
    if length > MAX_FRAME_BYTES or (pos > end and final):
      return False
    if pos > end:
      return None
  return True


def _damage(buf: _Buffer, start: int, broken: _Broken, index: int, ids: np.ndarray) -> Tuple[Damage, int]:
  """The Damage from ``start`` to its resynchronisation point, and that point; reads on as far as it needs."""
  offset = buf.base + start
  kept, size, stop, scan_from = bytearray(), 0, broken.stop, start + 1
  while stop is None:
    point, decided = _resync(buf.data, scan_from, len(buf.data), buf.final, ids)
    if point is not None or buf.final:
      stop = len(buf.data) if point is None else point
      break
    # Nothing in [start, decided) resynchronises: keep what the cap allows and read on.
    kept += buf.data[start:decided][:MAX_DAMAGE_BYTES - len(kept)]
    size += decided - start
    buf.advance(decided)
    start = scan_from = 0
  kept += buf.data[start:stop][:MAX_DAMAGE_BYTES - len(kept)]
  size += stop - start
  ending = "the end of the file" if stop == len(buf.data) and buf.final else f"offset {buf.base + stop}"
  cut = f" (first {len(kept)} bytes kept)" if len(kept) < size else ""
  message = f"frame {index}: {broken.message}; {size} bytes from offset {offset} to {ending} are dead{cut}"
  return Damage(index, offset, bytes(kept), broken.reason, message), stop


def _framing(reason: str, message: str, index: int) -> WireFormatError:
  error = WireFormatError(reason, message)
  error.index = index
  return error


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
