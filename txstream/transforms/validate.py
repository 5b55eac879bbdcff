"""DecodeAndValidate: wire-format messages -> Transactions, or dead letters.

Every input leaves this stage exactly once: as a valid ``Transaction`` or as a
``DeadLetter`` whose ``reason`` names what was wrong. Decoding resolves the
writer's schema (by the id in the message) against the latest transaction
schema, so data written by any registered version reads the same way.
"""
import io
import logging
from typing import NamedTuple, Optional

import apache_beam as beam
import fastavro
from apache_beam.metrics import Metrics

from txstream.io import schema_registry, wire
from txstream.records import DeadLetter, Label, RawRecord, Transaction, dead_letter

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"
DEAD = "dead_letters"
STAGE = "decode"

# ISO-4217 codes this deployment settles in; others are a data error upstream.
CURRENCIES = frozenset({"EUR", "USD", "GBP", "CHF", "SEK", "NOK", "DKK", "PLN", "CZK", "JPY"})
# 2000-01-01: an event before this is a corrupted timestamp, not history.
MIN_EVENT_TIME_MS = 946684800000
MAX_AMOUNT_MINOR = 10**11


class DecodeResult(NamedTuple):
  valid: beam.PCollection
  dead_letters: beam.PCollection


class InvalidRecord(ValueError):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def validate_transaction(record: dict) -> Optional[InvalidRecord]:
  """Business validation of a decoded record; None when it is valid."""
  if not record["transaction_id"]:
    return InvalidRecord("missing_transaction_id", "transaction_id is empty")
  if not 0 < record["amount_minor"] <= MAX_AMOUNT_MINOR:
    return InvalidRecord("invalid_amount", f"amount_minor {record['amount_minor']} out of range")
  if record["currency"] not in CURRENCIES:
    return InvalidRecord("invalid_currency", f"currency {record['currency']!r} is not accepted")
  if record["event_time"] < MIN_EVENT_TIME_MS:
    return InvalidRecord("invalid_event_time", f"event_time {record['event_time']} is before 2000")
  if record["customer_id"] < 0 or record["terminal_id"] < 0:
    return InvalidRecord("invalid_id", "customer_id and terminal_id must be non-negative")
  if len(record["card_token"]) != 64:
    return InvalidRecord("invalid_card_token", "card_token is not a 64-hex-digit token")
  return None


class Decoder:
  """Resolves schema ids of one subject and decodes bodies against the reader schema."""
  def __init__(self, registry: schema_registry.SchemaRegistry, subject: str):
    self._registry = registry
    self._subject = subject
    _, reader_json = registry.latest(subject)
    self._reader = schema_registry.parse(reader_json)
    self._reader_name = self._reader["name"]
    self._writers = {}

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

  def decode(self, message: bytes):
    schema_id, body = wire.split_header(message)
    writer = self._writer(schema_id)
    buf = io.BytesIO(body)
    try:
      record = fastavro.schemaless_reader(buf, writer, self._reader)
    except (EOFError, IndexError, ValueError, UnicodeDecodeError, OverflowError) as e:
      raise InvalidRecord("avro_decode_error", f"{type(e).__name__}: {e}") from e
    if buf.tell() != len(body):
      raise InvalidRecord("trailing_bytes", f"{len(body) - buf.tell()} bytes after the record")
    return schema_id, record


def decoder(registry_url: Optional[str], subject: str = schema_registry.TRANSACTION_SUBJECT) -> Decoder:
  """A decoder of ``subject`` (transactions by default) against the registry at ``registry_url``."""
  return Decoder(schema_registry.make_registry(registry_url), subject)


def to_transaction(transactions: Decoder, raw: RawRecord) -> Transaction:
  """The valid Transaction in ``raw``; raises ``WireFormatError`` or ``InvalidRecord`` (both with ``reason``)."""
  schema_id, r = transactions.decode(raw.value)
  problem = validate_transaction(r)
  if problem is not None:
    raise problem
  return Transaction(
      r["transaction_id"], r["event_time"], r["customer_id"], r["terminal_id"], r["card_token"],
      r["amount_minor"], r["currency"], r["entry_mode"], r["merchant_category"], schema_id, raw.source)


def to_label(labels: Decoder, raw: RawRecord) -> Label:
  """The Label in ``raw``; raises ``WireFormatError`` or ``InvalidRecord`` (both with ``reason``)."""
  _, r = labels.decode(raw.value)
  return Label(r["transaction_id"], r["label_time"], r["tx_time"], r["customer_id"], r["terminal_id"],
               r["is_fraud"])


class _DecodeFn(beam.DoFn):
  def __init__(self, registry_url: Optional[str]):
    self._registry_url = registry_url
    self._valid = Metrics.counter(NAMESPACE, "decode_valid")
    self._dead = {}

  def setup(self):
    self._decoder = decoder(self._registry_url)

  def _dead_letter(self, raw: RawRecord, reason: str, error: Exception):
    counter = self._dead.get(reason)
    if counter is None:
      counter = self._dead[reason] = Metrics.counter(NAMESPACE, f"dead_letter.{STAGE}.{reason}")
    counter.inc()
    return beam.pvalue.TaggedOutput(DEAD, dead_letter(raw.source, raw.value, STAGE, reason, error))

  def process(self, raw: RawRecord):
    try:
      tx = to_transaction(self._decoder, raw)
    except (wire.WireFormatError, InvalidRecord) as e:
      yield self._dead_letter(raw, e.reason, e)
      return
    self._valid.inc()
    yield tx


class DecodeAndValidate(beam.PTransform):
  """RawRecords -> (valid Transactions, DeadLetters with stage 'decode' and a reason)."""
  def __init__(self, schema_registry_url: Optional[str] = None):
    super().__init__()
    if schema_registry_url:
      schema_registry.HttpSchemaRegistry(schema_registry_url)  # validates the URL now
    self._registry_url = schema_registry_url

  def expand(self, records):
    results = records | "Decode" >> beam.ParDo(_DecodeFn(self._registry_url)).with_outputs(DEAD, main="valid")
    return DecodeResult(results.valid,
                        results[DEAD])


class _DecodeLabelFn(beam.DoFn):
  def __init__(self, registry_url: Optional[str]):
    self._registry_url = registry_url
    self._dead = Metrics.counter(NAMESPACE, "label_dead_letter.decode")

  def setup(self):
    self._decoder = decoder(self._registry_url, schema_registry.LABEL_SUBJECT)

  def process(self, raw: RawRecord):
    try:
      label = to_label(self._decoder, raw)
    except (wire.WireFormatError, InvalidRecord) as e:
      self._dead.inc()
      yield beam.pvalue.TaggedOutput(DEAD, dead_letter(raw.source, raw.value, "decode_label", e.reason, e))
      return
    yield label


class DecodeLabels(beam.PTransform):
  """RawRecords of the label stream -> (Labels, DeadLetters)."""
  def __init__(self, schema_registry_url: Optional[str] = None):
    super().__init__()
    self._registry_url = schema_registry_url

  def expand(self, records):
    results = records | "Decode" >> beam.ParDo(_DecodeLabelFn(self._registry_url)).with_outputs(DEAD, main="valid")
    return DecodeResult(results.valid, results[DEAD])
