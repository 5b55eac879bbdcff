"""Wire-format messages -> Arrow tables of transactions or labels, and dead letters, a batch at a time.

The outcome for every message is exactly that of the per-record path,
``Decoder.decode_message`` (``fastavro.schemaless_reader`` per message, as the
graph decoded before the columnar core): the same values, and for a bad
message the same reason, exception class and message text. Only the cost
differs. Header faults are found vectorised, and each group of messages that
share a known schema id is decoded in one call by ``avro_bulk.BulkReader``
(~1 us a message, against ~7 us one by one), which proves every record it
returns exact and hands any message it cannot back to the per-record path.
"""
import collections
import io
import logging
from typing import NamedTuple, Optional, Tuple

import fastavro
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from txstream.core import avro_bulk, contracts, dead_letters
from txstream.core.validate import InvalidRecord, validate
from txstream.io import schema_registry, wire

_LOGGER = logging.getLogger(__name__)

# A polars call costs ~0.1 ms however small; below this many messages, decoding each is cheaper.
MIN_BULK_ROWS = 32


class Decoded(NamedTuple):
  records: pa.Table       # one row per decoded message: reader-schema names, Avro types as Arrow types
  rows: np.ndarray        # int64 index into the input of each row of ``records``, ascending
  schema_ids: np.ndarray  # int32 writer schema id of each row of ``records``
  failed: list            # [(index into the input, WireFormatError or InvalidRecord)], ascending


# -- batches of messages ------------------------------------------------------------------------------------------

def _binary(values) -> pa.BinaryArray:
  if isinstance(values, pa.ChunkedArray):
    values = values.combine_chunks()
  return values if values.type == pa.binary() else values.cast(pa.binary())


def _layout(values: pa.BinaryArray) -> Tuple[np.ndarray, np.ndarray]:
  """(offsets of each message into the data buffer, the data buffer as bytes)."""
  if len(values) == 0:
    return np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.uint8)
  _, offsets, data = values.buffers()
  offsets = np.frombuffer(offsets, dtype=np.int32)[values.offset:values.offset + len(values) + 1].astype(np.int64)
  return offsets, (np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8))


def _headers(values: pa.BinaryArray, offsets: np.ndarray, data: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(whether each message has a sound 5-byte header, its schema id): ``wire.split_header``'s checks, vectorised."""
  lengths = np.diff(offsets)
  ok = values.is_valid().to_numpy(zero_copy_only=False) & (lengths >= wire.HEADER.size)
  ok &= lengths <= wire.MAX_MESSAGE_BYTES
  rows = np.flatnonzero(ok)
  head = data[offsets[rows][:, None] + np.arange(wire.HEADER.size)].astype(np.int64)
  ok[rows] = head[:, 0] == wire.MAGIC_BYTE
  schema_ids = np.full(len(values), -1, dtype=np.int64)
  schema_ids[rows] = (head[:, 1] << 24) | (head[:, 2] << 16) | (head[:, 3] << 8) | head[:, 4]
  return ok, schema_ids


def _gather(values: pa.BinaryArray, rows: np.ndarray) -> pa.Buffer:
  """The messages at ``rows`` end to end; zero-copy when they are adjacent."""
  if rows[-1] - rows[0] + 1 == len(rows):
    subset = values.slice(int(rows[0]), len(rows))
  else:
    subset = values.take(pa.array(rows, pa.int64()))
  offsets, _ = _layout(subset)
  return subset.buffers()[2].slice(int(offsets[0]), int(offsets[-1] - offsets[0]))


class _Outcome:
  """Collects one batch's decoded records (bulk tables and per-record dicts) and failures."""

  def __init__(self, decoder: "Decoder", values: pa.BinaryArray):
    self._decoder, self._values = decoder, values
    self._tables, self._rows, self._ids = [], [], []
    self._records, self._record_rows, self._record_ids = [], [], []
    self._failed = []

  def fail(self, rows: np.ndarray, error: Exception):
    self._failed.extend((row, error) for row in rows.tolist())

  def bulk(self, rows: np.ndarray, table: pa.Table, schema_id: int):
    self._tables.append(table)
    self._rows.append(rows)
    self._ids.append(np.full(len(rows), schema_id, dtype=np.int32))
    self._decoder.counts["fast"] += len(rows)

  def per_record(self, rows: np.ndarray):
    for row in rows.tolist():
      try:
        schema_id, record = self._decoder.decode_message(self._values[row].as_py())
      except (wire.WireFormatError, InvalidRecord) as e:
        self._failed.append((row, e))
        continue
      self._records.append(record)
      self._record_rows.append(row)
      self._record_ids.append(schema_id)
    self._decoder.counts["per_record"] += len(rows)

  def result(self) -> Decoded:
    schema = self._decoder.arrow_schema
    if self._records:
      self._tables.append(pa.Table.from_pylist(self._records, schema=schema))
      self._rows.append(np.array(self._record_rows, dtype=np.int64))
      self._ids.append(np.array(self._record_ids, dtype=np.int32))
    self._failed.sort(key=lambda failure: failure[0])
    if not self._tables:
      return Decoded(schema.empty_table(), np.zeros(0, np.int64), np.zeros(0, np.int32), self._failed)
    table = pa.concat_tables(self._tables) if len(self._tables) > 1 else self._tables[0]
    rows, ids = np.concatenate(self._rows).astype(np.int64), np.concatenate(self._ids)
    if np.any(np.diff(rows) < 0):
      order = np.argsort(rows, kind="stable")
      table, rows, ids = table.take(pa.array(order)), rows[order], ids[order]
    return Decoded(table, rows, ids, self._failed)


class Decoder:
  """Decodes wire-format messages of one subject against the subject's latest (reader) schema.

  ``counts`` says how many messages went through the bulk reader ("fast") and
  how many were decoded one by one ("per_record"); the outcome is the same.
  """

  def __init__(self, registry: schema_registry.SchemaRegistry, subject: str):
    self._registry = registry
    self._subject = subject
    _, reader_json = registry.latest(subject)
    self._reader = schema_registry.parse(reader_json)
    self._reader_name = self._reader["name"]
    self.arrow_schema = avro_bulk.arrow_schema(self._reader)
    self._int_fields = [field.name for field in self.arrow_schema if field.type == pa.int32()]
    self._writers = {}
    self._bulk_readers = {}
    self.counts = collections.Counter()

  def _writer(self, schema_id: int):
    writer = self._writers.get(schema_id)
    if writer is None:
      try:
        writer = self._registry.parsed(schema_id)
      except schema_registry.UnknownSchemaError as e:
        raise InvalidRecord("unknown_schema_id", str(e)) from e
      if writer.get("name") != self._reader_name:
        raise InvalidRecord(
            "wrong_schema", f"schema id {schema_id} is {writer.get('name')}, not {self._reader_name}")
      self._writers[schema_id] = writer
    return writer

  def _bulk_reader(self, schema_id: int) -> Optional[avro_bulk.BulkReader]:
    if schema_id not in self._bulk_readers:
      self._bulk_readers[schema_id] = avro_bulk.BulkReader.build(
          schema_id, self._writer(schema_id), self._reader, self.arrow_schema)
    return self._bulk_readers[schema_id]

  def decode_message(self, message: Optional[bytes]) -> Tuple[int, dict]:
    """(schema id, record) of one message: the reference path. Raises ``WireFormatError`` or ``InvalidRecord``."""
    schema_id, body = wire.split_header(message)
    writer = self._writer(schema_id)
    buf = io.BytesIO(body)
    try:
      record = fastavro.schemaless_reader(buf, writer, self._reader)
    except (EOFError, IndexError, ValueError, UnicodeDecodeError, OverflowError) as e:
      raise InvalidRecord("avro_decode_error", f"{type(e).__name__}: {e}") from e
    if buf.tell() != len(body):
      raise InvalidRecord("trailing_bytes", f"{len(body) - buf.tell()} bytes after the record")
    for name in self._int_fields:
      # fastavro reads an int as a long; an Arrow int32 column cannot hold what does not fit.
      if record[name] is not None and not avro_bulk.INT_MIN <= record[name] <= avro_bulk.INT_MAX:
        raise InvalidRecord("avro_decode_error", f"OverflowError: {name} {record[name]} does not fit in an Avro int")
    return schema_id, record

  def decode(self, values) -> Decoded:
    """Decodes each message of ``values`` (binary, nulls allowed); see ``Decoded``."""
    values = _binary(values)
    offsets, data = _layout(values)
    outcome = _Outcome(self, values)
    sound, schema_ids = _headers(values, offsets, data)
    for schema_id in np.unique(schema_ids[sound]).tolist():
      rows = np.flatnonzero(sound & (schema_ids == schema_id))
      try:
        reader = self._bulk_reader(schema_id)
      except InvalidRecord as e:
        outcome.fail(rows, e)
        continue
      if reader is None or len(rows) < MIN_BULK_ROWS:
        outcome.per_record(rows)
        continue
      scanned = reader.scan(data, offsets[rows], offsets[rows + 1])
      outcome.per_record(rows[~scanned])
      self._read(reader, values, offsets, data, rows[scanned], outcome)
    outcome.per_record(np.flatnonzero(~sound))  # each raises split_header's own error
    return outcome.result()

  def _read(self, reader: avro_bulk.BulkReader, values: pa.BinaryArray, offsets: np.ndarray, data: np.ndarray,
            rows: np.ndarray, outcome: _Outcome, text_checked: bool = False):
    if len(rows) < MIN_BULK_ROWS:
      outcome.per_record(rows)
      return
    table = reader.read(_gather(values, rows), offsets[rows + 1] - offsets[rows])
    if table is not None:
      outcome.bulk(rows, table, reader.schema_id)
      return
    if not text_checked:  # the usual cause: a string that is not UTF-8
      text = reader.non_ascii(data, offsets[rows])
      outcome.per_record(rows[text])
      self._read(reader, values, offsets, data, rows[~text], outcome, text_checked=True)
      return
    # Something else the scan does not foresee: halve until the culprits are decoded alone.
    half = len(rows) // 2
    self._read(reader, values, offsets, data, rows[:half], outcome, text_checked=True)
    self._read(reader, values, offsets, data, rows[half:], outcome, text_checked=True)


# -- transactions and labels ----------------------------------------------------------------------------------------

def _assemble(schema: pa.Schema, records: pa.Table, raw: pa.Table, rows: np.ndarray, columns: dict) -> pa.Table:
  """A ``schema`` table from ``columns``, else ``raw``'s source and history at ``rows``, else ``records`` by name,
  else nulls."""
  take = pa.array(rows, pa.int64())
  arrays = []
  for field in schema:
    if field.name in columns:
      arrays.append(columns[field.name])
    elif field.name in ("source", "history"):
      arrays.append(raw.column(field.name).take(take))
    elif field.name in records.column_names:
      arrays.append(records.column(field.name))
    else:
      arrays.append(pa.nulls(len(rows), field.type))
  return pa.Table.from_arrays(arrays, schema=schema)


def _dead_letters(raw: pa.Table, failed: list, stage: str) -> pa.Table:
  """Dead letters of ``failed`` [(row, error)] in row order, except for history rows (an earlier run wrote theirs)."""
  history = pc.fill_null(raw.column("history"), False).to_numpy(zero_copy_only=False)
  kept = sorted(((row, e) for row, e in failed if not history[row]), key=lambda failure: failure[0])
  rows = pa.array([row for row, _ in kept], pa.int64())
  return dead_letters.of_errors(raw.column("source").take(rows).to_pylist(), raw.column("value").take(rows).to_pylist(),
                                stage, [e for _, e in kept])


def decode_transactions(raw: pa.Table, decoder: Decoder) -> Tuple[pa.Table, pa.Table]:
  """``contracts.RAW`` -> (``contracts.TRANSACTION`` of the valid transactions, ``contracts.DEAD_LETTER``).

  Decodes, validates (``core.validate``) and maps columns: ``event_time`` to
  ``event_time_ms``, the writer's ``schema_id``, ``source`` and ``history``
  from the raw row; enrichment columns null. Both tables keep input order.
  Every input row ends in exactly one of them, except that history rows
  (read for feature state only) leave no dead letter: an earlier run wrote it.
  """
  decoded = decoder.decode(raw.column("value"))
  valid, invalid = validate(decoded.records)
  records = decoded.records.filter(pa.array(valid))
  columns = {"event_time_ms": records.column("event_time"),
             "schema_id": pa.array(decoded.schema_ids[valid], pa.int32())}
  transactions = _assemble(contracts.TRANSACTION, records, raw, decoded.rows[valid], columns)
  failed = decoded.failed + [(int(decoded.rows[row]), e) for row, e in invalid]
  return transactions, _dead_letters(raw, failed, contracts.DECODE)


def decode_labels(raw: pa.Table, decoder: Decoder) -> Tuple[pa.Table, pa.Table]:
  """``contracts.RAW`` -> (``contracts.LABEL``, ``contracts.DEAD_LETTER`` with stage 'decode_label').

  Labels are not validated beyond decoding; the history rule and the order are those of ``decode_transactions``.
  """
  decoded = decoder.decode(raw.column("value"))
  records = decoded.records
  columns = {"label_time_ms": records.column("label_time"), "tx_time_ms": records.column("tx_time")}
  labels = _assemble(contracts.LABEL, records, raw, decoded.rows, columns)
  return labels, _dead_letters(raw, decoded.failed, contracts.DECODE_LABEL)

