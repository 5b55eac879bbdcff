"""Many Confluent wire-format messages of one writer schema decoded in one call, exactly.

A message is a 5-byte header (magic byte, schema id) and an Avro body, so
messages that share a schema id, laid end to end, are one Avro container
*block* of a synthetic schema whose first field is a ``fixed(5)``; one
``polars.read_avro`` call decodes the block. Two vectorised checks make
that exact rather than hopeful:

* ``BulkReader.scan``, before: a structural pass over every message, varint
  by varint, that keeps out what polars and fastavro would read differently
  or that polars could not frame: truncated or trailing bytes, non-canonical
  varints, booleans other than 0/1, union branches other than 0/1, ints
  beyond 32 bits. Such messages go to the per-record path.
* ``BulkReader.read``, after: each record's Avro length, recomputed from the
  decoded values, must equal its message's length. A decoder never consumes
  fewer bytes than the canonical encoding of what it produced, and the
  lengths add up to the block, so each record was read from exactly its own
  bytes (polars refuses invalid UTF-8 rather than replacing it, so a string's
  decoded length is its encoded length). Otherwise ``read`` returns None and
  the caller decodes those messages per record; since one string that is not
  UTF-8 fails the whole block, ``BulkReader.non_ascii`` names the messages
  that could hold one.

Only schemas whose fields are primitives, or unions of null and a
primitive, are read in bulk; ``BulkReader.build`` says None for the rest.
"""
import io
import json
import logging
from typing import Dict, List, Optional, Tuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from txstream.io import wire

_LOGGER = logging.getLogger(__name__)

ARROW_TYPES = {"string": pa.string(), "bytes": pa.binary(), "long": pa.int64(), "int": pa.int32(),
               "boolean": pa.bool_(), "float": pa.float32(), "double": pa.float64()}
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
_FIXED_SIZE = {"boolean": 1, "float": 4, "double": 8}
_HEADER_FIELD = "txstream_wire_header"
_SYNC = bytes(range(16))  # the container is ours and read once: any marker will do
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64)

# A field type is (primitive, null_branch): null_branch is None for a plain
# primitive, else the position of "null" in a two-branch union.
FieldType = Tuple[str, Optional[int]]


def _primitive(node) -> Optional[str]:
  if isinstance(node, dict) and set(node) == {"type"}:  # {"type": "long"} once logical types are stripped
    node = node["type"]
  return node if isinstance(node, str) and node in ARROW_TYPES else None


def field_type(node) -> Optional[FieldType]:
  """The ``FieldType`` of a parsed Avro field type, or None when the bulk reader cannot read it."""
  if isinstance(node, list):
    if len(node) != 2 or "null" not in node:
      return None
    null_branch = node.index("null")
    other = _primitive(node[1 - null_branch])
    return (other, null_branch) if other else None
  primitive = _primitive(node)
  return (primitive, None) if primitive else None


def arrow_schema(record) -> pa.Schema:
  """The Arrow schema of decoded records of ``record`` (a parsed record schema); ValueError if it has none."""
  fields = []
  for field in record["fields"]:
    kind = field_type(field["type"])
    if kind is None:
      raise ValueError(f"{record['name']}.{field['name']}: Avro type {field['type']!r} has no columnar mapping")
    fields.append(pa.field(field["name"], ARROW_TYPES[kind[0]]))
  return pa.schema(fields)


def _avro_type(kind: FieldType):
  primitive, null_branch = kind
  if null_branch is None:
    return primitive
  return ["null", primitive] if null_branch == 0 else [primitive, "null"]


def _long(n: int) -> bytes:
  z = (n << 1) ^ (n >> 63)
  out = bytearray()
  while z > 0x7F:
    out.append((z & 0x7F) | 0x80)
    z >>= 7
  out.append(z)
  return bytes(out)


def _avro_bytes(b: bytes) -> bytes:
  return _long(len(b)) + b


# -- the structural scan --------------------------------------------------------------------------------------------

def _zigzag_decode(z: np.ndarray) -> np.ndarray:
  return (z >> np.uint64(1)).astype(np.int64) ^ -(z & np.uint64(1)).astype(np.int64)


def _scan_varint(buf: np.ndarray, pos: np.ndarray):
  """(size, zig-zag value, canonical) of the varint at each ``pos``; canonical: minimal and within 64 bits.

  Reads past the end of ``buf`` see its last byte: the caller's end check fails them.
  """
  byte = np.take(buf, pos, mode="clip")
  value = (byte & 0x7F).astype(np.uint64)
  size = np.ones(len(pos), dtype=np.int64)
  last, more = byte, byte >= 0x80
  for shift in range(7, 70, 7):
    if not more.any():
      break
    byte = np.take(buf, pos + size, mode="clip") * more
    value |= (byte & 0x7F).astype(np.uint64) << np.uint64(shift)
    last = np.where(more, byte, last)
    size += more
    more = byte >= 0x80
  canonical = ~more & ((size == 1) | ((last != 0) & ((size < 10) | (last == 1))))
  return size, value, canonical


def _scan_value(buf: np.ndarray, pos: np.ndarray, primitive: str):
  """(size, sound) of a value of ``primitive`` at each ``pos``."""
  if primitive in _FIXED_SIZE:
    size = np.full(len(pos), _FIXED_SIZE[primitive], dtype=np.int64)
    if primitive == "boolean":  # fastavro reads any non-zero byte as true, polars only 1
      return size, np.take(buf, pos, mode="clip") <= 1
    return size, np.ones(len(pos), dtype=bool)
  size, z, sound = _scan_varint(buf, pos)
  if primitive in ("string", "bytes"):
    n = _zigzag_decode(z)
    sound &= (n >= 0) & (n <= wire.MAX_MESSAGE_BYTES)
    size = size + np.clip(n, 0, wire.MAX_MESSAGE_BYTES + 1)
  elif primitive == "int":  # fastavro does not bound an int; polars wraps it to 32 bits
    n = _zigzag_decode(z)
    sound &= (n >= INT_MIN) & (n <= INT_MAX)
  return size, sound


# -- the size check -----------------------------------------------------------------------------------------------

def _varint_sizes(values: np.ndarray) -> np.ndarray:
  v = values.astype(np.int64)
  z = ((v << 1) ^ (v >> 63)).view(np.uint64)
  return np.searchsorted(_VARINT_LIMITS, z, side="right") + 1


def _column_sizes(column: pa.Array, primitive: str) -> np.ndarray:
  """The Avro-encoded size of each value of ``column`` (a null's value counts 0)."""
  if primitive in _FIXED_SIZE:
    return np.full(len(column), _FIXED_SIZE[primitive], dtype=np.int64)
  if primitive in ("string", "bytes"):
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32)[column.offset:column.offset + len(column) + 1]
    lengths = np.diff(offsets).astype(np.int64)
    return _varint_sizes(lengths) + lengths
  return _varint_sizes((pc.fill_null(column, 0) if column.null_count else column).to_numpy())


def _encoded_sizes(table: pa.Table, fields: List[Tuple[str, FieldType]]) -> np.ndarray:
  total = np.full(table.num_rows, wire.HEADER.size, dtype=np.int64)
  for name, (primitive, null_branch) in fields:
    column = table.column(name).combine_chunks()
    sizes = _column_sizes(column, primitive)
    if null_branch is not None:
      sizes = 1 + np.where(column.is_valid().to_numpy(zero_copy_only=False), sizes, 0)
    total += sizes
  return total


class BulkReader:
  """Decodes messages of one writer schema, in bulk, into records of the reader schema."""

  def __init__(self, schema_id: int, fields: List[Tuple[str, FieldType]], reader_arrow: pa.Schema,
               defaults: Dict[str, object]):
    self.schema_id = schema_id
    self._fields = fields
    self._writer_arrow = pa.schema([(name, ARROW_TYPES[kind[0]]) for name, kind in fields])
    self._reader_arrow = reader_arrow
    self._defaults = defaults
    schema = {"type": "record", "name": "TxstreamWire", "fields": (
        [{"name": _HEADER_FIELD, "type": {"type": "fixed", "name": "TxstreamWireHeader", "size": wire.HEADER.size}}]
        + [{"name": name, "type": _avro_type(kind)} for name, kind in fields])}
    meta = {b"avro.schema": json.dumps(schema).encode(), b"avro.codec": b"null"}
    self._head = (b"Obj\x01" + _long(len(meta)) + b"".join(_avro_bytes(k) + _avro_bytes(v) for k, v in meta.items())
                  + _long(0) + _SYNC)

  @classmethod
  def build(cls, schema_id: int, writer, reader, reader_arrow: pa.Schema) -> Optional["BulkReader"]:
    """A reader of ``writer``'s messages as ``reader`` records (parsed schemas), or None when fastavro's
    resolution of the two would be more than taking fields by name and filling defaults."""
    fields = [(f["name"], field_type(f["type"])) for f in writer["fields"]]
    if any(kind is None for _, kind in fields):
      return None
    writer_types, defaults = dict(fields), {}
    for field in reader["fields"]:
      if field.get("aliases"):
        return None
      if field["name"] in writer_types:
        if writer_types[field["name"]] != field_type(field["type"]):
          return None  # a promotion or a union change: fastavro's rules, left to fastavro
      elif "default" in field:
        defaults[field["name"]] = field["default"]
      else:
        return None
    return cls(schema_id, fields, reader_arrow, defaults)

  def _walk(self, buf: np.ndarray, starts: np.ndarray):
    """([(primitive, value start, value size, present, sound)] of each field, where each message ends)."""
    pos = starts + wire.HEADER.size
    fields = []
    for _, (primitive, null_branch) in self._fields:
      if null_branch is None:
        size, ok = _scan_value(buf, pos, primitive)
        fields.append((primitive, pos, size, True, ok))
        pos = pos + size
      else:
        # Branch indexes 0 and 1 only, one byte each (zig-zag 0 and 2); fastavro would also take -1 as the last.
        branch = np.take(buf, pos, mode="clip")
        present = branch == (2 if null_branch == 0 else 0)
        size, ok = _scan_value(buf, pos + 1, primitive)
        fields.append((primitive, pos + 1, size, present, ((branch == 0) | (branch == 2)) & (~present | ok)))
        pos = pos + 1 + np.where(present, size, 0)
    return fields, pos

  def scan(self, buf: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Whether each message ``buf[start:end]`` is framed exactly, in a form polars and fastavro read alike."""
    fields, end = self._walk(buf, starts)
    sound = end == ends
    for *_, ok in fields:
      sound &= ok
    return sound

  def non_ascii(self, buf: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Whether a string of each (sound) message has a byte over 0x7F, so may not be UTF-8: polars then fails
    the whole block, fastavro only that message."""
    high = np.concatenate(([0], np.cumsum(buf >= 0x80)))
    found = np.zeros(len(starts), dtype=bool)
    for primitive, pos, size, present, _ in self._walk(buf, starts)[0]:
      if primitive == "string":
        text = pos + _scan_varint(buf, pos)[0]  # after the length prefix
        found |= present & (np.take(high, pos + size, mode="clip") > np.take(high, text, mode="clip"))
    return found

  def read(self, body, sizes: np.ndarray) -> Optional[pa.Table]:
    """The records of the messages laid end to end in ``body`` (each ``sizes`` long), or None unless every one
    provably decoded from exactly its own bytes."""
    block = _long(len(sizes)) + _long(int(sizes.sum()))
    try:
      frame = pl.read_avro(io.BytesIO(b"".join((self._head, block, body, _SYNC))))
    except (Exception, pl.exceptions.PanicException) as e:  # pylint: disable=broad-except
      # Not swallowed: the caller decodes these messages one by one and dead-letters what fails.
      _LOGGER.debug("bulk read of schema %d failed (%s); decoding per record", self.schema_id, e)
      return None
    table = frame.to_arrow(compat_level=pl.CompatLevel.newest()).drop_columns([_HEADER_FIELD])
    if table.num_rows != len(sizes):
      return None
    table = table.cast(self._writer_arrow)
    if not np.array_equal(_encoded_sizes(table, self._fields), sizes):
      return None
    return self._resolve(table)

  def _resolve(self, table: pa.Table) -> pa.Table:
    """Reader fields by name, and the reader's default where the writer lacks one (as fastavro resolves)."""
    columns = []
    for field in self._reader_arrow:
      if field.name in self._defaults:
        columns.append(pa.array([self._defaults[field.name]] * table.num_rows, field.type))
      else:
        columns.append(table.column(field.name))
    return pa.Table.from_arrays(columns, schema=self._reader_arrow)
