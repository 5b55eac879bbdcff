"""DecodeAndValidate, DecodeLabels: batches of wire-format messages -> decoded rows, or dead letters.

Every input leaves this stage exactly once: as a valid row or as a dead
letter whose ``reason`` names what was wrong (``core.decode``,
``core.validate``). Decoding resolves each message's writer schema (by the id
in the message) against the latest schema of the subject, so data written by
any registered version reads the same way.
"""
import logging
from typing import NamedTuple, Optional

import apache_beam as beam
import pyarrow.compute as pc

from txstream.core import decode
from txstream.core.batch import ArchiveBatch, DeadLetterBatch, LabelBatch, RawBatch, TransactionBatch
from txstream.io import raw_archive, schema_registry
from txstream.transforms import counting

_LOGGER = logging.getLogger(__name__)
DEAD = "dead_letters"


ARCHIVE = "archive"


class DecodeResult(NamedTuple):
  valid: beam.PCollection
  dead_letters: beam.PCollection
  archive: Optional[beam.PCollection] = None  # ArchiveBatch of the accepted messages, when asked for


def decoder(registry_url: Optional[str], subject: str = schema_registry.TRANSACTION_SUBJECT) -> decode.Decoder:
  """A decoder of ``subject`` (transactions by default) against the registry at ``registry_url``."""
  return decode.Decoder(schema_registry.make_registry(registry_url), subject)


class _DecodeFn(beam.DoFn):
  def __init__(self, registry_url: Optional[str], archive: bool = False):
    self._registry_url = registry_url
    self._archive = archive

  def setup(self):
    self._decoder = decoder(self._registry_url)

  def process(self, raw: RawBatch):
    valid, dead = decode.decode_transactions(raw.table, self._decoder)
    counting.inc("decode_valid", valid.num_rows)
    counting.dead_letters(dead)
    if valid.num_rows:
      yield TransactionBatch(valid)
      if self._archive:
        yield beam.pvalue.TaggedOutput(ARCHIVE, ArchiveBatch(raw_archive.archive_rows(raw.table, valid,
                                                                                       "event_time_ms")))
    if dead.num_rows:
      yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead))


class DecodeAndValidate(beam.PTransform[beam.PCollection[RawBatch], DecodeResult]):
  """RawBatches -> (TransactionBatches, DeadLetterBatches with stage 'decode' and a reason).

  With ``archive``, also the accepted messages as received (``io.raw_archive``).
  """
  def __init__(self, schema_registry_url: Optional[str] = None, archive: bool = False):
    super().__init__()
    if schema_registry_url:
      schema_registry.HttpSchemaRegistry(schema_registry_url)  # validates the URL now
    self._registry_url = schema_registry_url
    self._archive = archive

  def expand(self, batches):
    results = batches | "Decode" >> beam.ParDo(_DecodeFn(self._registry_url, self._archive)).with_output_types(
        TransactionBatch, **{DEAD: DeadLetterBatch, ARCHIVE: ArchiveBatch}).with_outputs(DEAD, ARCHIVE, main="valid")
    return DecodeResult(results.valid, results[DEAD], results[ARCHIVE] if self._archive else None)


class _DecodeLabelFn(beam.DoFn):
  def __init__(self, registry_url: Optional[str], archive: bool = False):
    self._registry_url = registry_url
    self._archive = archive

  def setup(self):
    self._decoder = decoder(self._registry_url, schema_registry.LABEL_SUBJECT)

  def process(self, raw: RawBatch):
    labels, dead = decode.decode_labels(raw.table, self._decoder)
    counting.dead_letters(dead, "label_dead_letter")
    if labels.num_rows:
      yield LabelBatch(labels)
      if self._archive:
        yield beam.pvalue.TaggedOutput(ARCHIVE, ArchiveBatch(raw_archive.archive_rows(raw.table, labels,
                                                                                       "label_time_ms")))
    if dead.num_rows:
      yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead))


class DecodeLabels(beam.PTransform[beam.PCollection[RawBatch], DecodeResult]):
  """RawBatches of the label stream -> (LabelBatches, DeadLetterBatches with stage 'decode_label')."""
  def __init__(self, schema_registry_url: Optional[str] = None, archive: bool = False):
    super().__init__()
    self._registry_url = schema_registry_url
    self._archive = archive

  def expand(self, batches):
    results = batches | "Decode" >> beam.ParDo(_DecodeLabelFn(self._registry_url, self._archive)).with_output_types(
        LabelBatch, **{DEAD: DeadLetterBatch, ARCHIVE: ArchiveBatch}).with_outputs(DEAD, ARCHIVE, main="valid")
    return DecodeResult(results.valid, results[DEAD], results[ARCHIVE] if self._archive else None)


class _EventWindowFn(beam.DoFn):
  def __init__(self, from_ms: int, to_ms: int):
    self._from_ms, self._to_ms = from_ms, to_ms

  def process(self, batch: TransactionBatch):
    table = batch.table
    times = table.column("event_time_ms")
    before = pc.less(times, self._from_ms)
    after = pc.greater_equal(times, self._to_ms)
    counting.inc("filtered.before_window", pc.sum(pc.and_not(before, table.column("history"))).as_py() or 0)
    counting.inc("filtered.after_window", pc.sum(after).as_py() or 0)
    kept = table.filter(pc.invert(after))
    if kept.num_rows:
      history = pc.or_(kept.column("history"), pc.less(kept.column("event_time_ms"), self._from_ms))
      yield TransactionBatch(kept.set_column(kept.schema.get_field_index("history"), "history", history))


class EventWindow(beam.PTransform[beam.PCollection[TransactionBatch], beam.PCollection[TransactionBatch]]):
  """Keeps a rerun to the event-time window ``[from_ms, to_ms)``.

  Transactions before ``from_ms`` become history (feature state only, as an
  earlier run decided them), so each transaction in the window gets the
  features the original run gave it; those from ``to_ms`` on cannot change
  any feature in the window (features look back only) and are dropped. Both
  are counted as ``filtered.before_window`` / ``filtered.after_window``.
  """
  def __init__(self, from_ms: int, to_ms: int):
    super().__init__()
    if from_ms >= to_ms:
      raise ValueError("the window's end must be after its start")
    self._from_ms, self._to_ms = from_ms, to_ms

  def expand(self, batches):
    return batches | "Window" >> beam.ParDo(_EventWindowFn(self._from_ms, self._to_ms)).with_output_types(
        TransactionBatch)
