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

from txstream.core import decode
from txstream.core.batch import DeadLetterBatch, LabelBatch, RawBatch, TransactionBatch
from txstream.io import schema_registry
from txstream.transforms import counting

_LOGGER = logging.getLogger(__name__)
DEAD = "dead_letters"


class DecodeResult(NamedTuple):
  valid: beam.PCollection
  dead_letters: beam.PCollection


def decoder(registry_url: Optional[str], subject: str = schema_registry.TRANSACTION_SUBJECT) -> decode.Decoder:
  """A decoder of ``subject`` (transactions by default) against the registry at ``registry_url``."""
  return decode.Decoder(schema_registry.make_registry(registry_url), subject)


class _DecodeFn(beam.DoFn):
  def __init__(self, registry_url: Optional[str]):
    self._registry_url = registry_url

  def setup(self):
    self._decoder = decoder(self._registry_url)

  def process(self, raw: RawBatch):
    valid, dead = decode.decode_transactions(raw.table, self._decoder)
    counting.inc("decode_valid", valid.num_rows)
    counting.dead_letters(dead)
    if valid.num_rows:
      yield TransactionBatch(valid)
    if dead.num_rows:
      yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead))


class DecodeAndValidate(beam.PTransform[beam.PCollection[RawBatch], DecodeResult]):
  """RawBatches -> (TransactionBatches, DeadLetterBatches with stage 'decode' and a reason)."""
  def __init__(self, schema_registry_url: Optional[str] = None):
    super().__init__()
    if schema_registry_url:
      schema_registry.HttpSchemaRegistry(schema_registry_url)  # validates the URL now
    self._registry_url = schema_registry_url

  def expand(self, batches):
    results = batches | "Decode" >> beam.ParDo(_DecodeFn(self._registry_url)).with_output_types(
        TransactionBatch, **{DEAD: DeadLetterBatch}).with_outputs(DEAD, main="valid")
    return DecodeResult(results.valid, results[DEAD])


class _DecodeLabelFn(beam.DoFn):
  def __init__(self, registry_url: Optional[str]):
    self._registry_url = registry_url

  def setup(self):
    self._decoder = decoder(self._registry_url, schema_registry.LABEL_SUBJECT)

  def process(self, raw: RawBatch):
    labels, dead = decode.decode_labels(raw.table, self._decoder)
    counting.dead_letters(dead, "label_dead_letter")
    if labels.num_rows:
      yield LabelBatch(labels)
    if dead.num_rows:
      yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead))


class DecodeLabels(beam.PTransform[beam.PCollection[RawBatch], DecodeResult]):
  """RawBatches of the label stream -> (LabelBatches, DeadLetterBatches with stage 'decode_label')."""
  def __init__(self, schema_registry_url: Optional[str] = None):
    super().__init__()
    self._registry_url = schema_registry_url

  def expand(self, batches):
    results = batches | "Decode" >> beam.ParDo(_DecodeLabelFn(self._registry_url)).with_output_types(
        LabelBatch, **{DEAD: DeadLetterBatch}).with_outputs(DEAD, main="valid")
    return DecodeResult(results.valid, results[DEAD])
