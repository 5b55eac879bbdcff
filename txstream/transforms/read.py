"""ReadTransactions, ReadLabels: framed wire-format files as batches of undecoded messages.

Each output element is a ``RawBatch`` of consecutive messages of one file,
with every message's source position (``file#index``); files are streamed in
batches, never read whole. Decoding happens in ``DecodeAndValidate``, so every
damaged message becomes a dead letter with its position. Damage to the
framing itself is one dead letter (stage ``read``) per damaged stretch, with
its bytes, counted as one input; reading resumes at the next frame with a
known schema id (see ``wire.read_frame_segments`` for the rule and how record
indices continue after it).
"""
import logging
import os
from typing import NamedTuple

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from txstream.core import contracts, dead_letters
from txstream.core.batch import DeadLetterBatch, RawBatch
from txstream.io import wire
from txstream.io.schema_registry import FileSchemaRegistry
from txstream.transforms import counting

_LOGGER = logging.getLogger(__name__)
DEAD = "dead_letters"
BATCH_RECORDS = 20_000


class ReadResult(NamedTuple):
  records: beam.PCollection
  dead_letters: beam.PCollection


class _ReadFramesFn(beam.DoFn):
  def __init__(self, stream: str, batch_records: int):
    self._batch_records = batch_records
    self._records = f"{stream}_in"
    self._dead = "dead_letter" if stream == "events" else "label_dead_letter"
    self._schema_ids = ()

  def setup(self):
    # Files come from `txstream generate`, which writes with the bundled registry: its ids are what resynchronises.
    self._schema_ids = [e["id"] for e in FileSchemaRegistry().entries()]

  def process(self, readable: fileio.ReadableFile):
    name = os.path.basename(readable.metadata.path)
    with readable.open(compression_type=beam.io.filesystem.CompressionTypes.UNCOMPRESSED) as f:
      for item in wire.read_frame_segments(f, self._schema_ids, self._batch_records):
        if isinstance(item, wire.Damage):
          counting.inc(self._records)
          Metrics.counter(contracts.NAMESPACE, f"{self._dead}.{contracts.READ}.{item.reason}").inc()
          yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead_letters.of_errors(
              [f"{name}#{item.index}"], [item.raw], contracts.READ, [item.error()])))
        else:
          counting.inc(self._records, len(item.values))
          yield RawBatch(item.raw(name))


class ReadFramedFiles(beam.PTransform[beam.pvalue.PBegin, beam.PCollection[RawBatch]]):
  """Framed wire-format files matching ``pattern`` -> RawBatches + DeadLetterBatches."""
  def __init__(self, pattern: str, stream: str = "events", batch_records: int = BATCH_RECORDS):
    super().__init__()
    if not pattern:
      raise ValueError("a file pattern is required")
    if batch_records < 1:
      raise ValueError("batch_records must be >= 1")
    self._pattern = pattern
    self._stream = stream
    self._batch_records = batch_records

  def expand(self, pbegin):
    results = (
        pbegin
        | "Match" >> fileio.MatchFiles(self._pattern, empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
        | "Distribute" >> beam.Reshuffle()
        | "Open" >> fileio.ReadMatches()
        | "Frames" >> beam.ParDo(_ReadFramesFn(self._stream, self._batch_records)).with_output_types(
            RawBatch, **{DEAD: DeadLetterBatch}).with_outputs(DEAD, main="records"))
    return ReadResult(results.records, results[DEAD])


class ReadTransactions(beam.PTransform[beam.pvalue.PBegin, beam.PCollection[RawBatch]]):
  """All transaction messages of an input directory written by ``txstream generate``."""
  def __init__(self, input_dir: str, batch_records: int = BATCH_RECORDS):
    super().__init__()
    if not input_dir:
      raise ValueError("--input is required")
    self._input_dir = input_dir
    self._batch_records = batch_records

  def expand(self, pbegin):
    return pbegin | "Files" >> ReadFramedFiles(
        os.path.join(self._input_dir, "transactions", "*.wire"), "events", self._batch_records)


class ReadLabels(beam.PTransform[beam.pvalue.PBegin, beam.PCollection[RawBatch]]):
  """The fraud label (chargeback) messages of an input directory."""
  def __init__(self, input_dir: str):
    super().__init__()
    if not input_dir:
      raise ValueError("--input is required")
    self._input_dir = input_dir

  def expand(self, pbegin):
    return pbegin | "Files" >> ReadFramedFiles(os.path.join(self._input_dir, "labels", "*.wire"), "labels")


def _count_own(batch: RawBatch, name: str) -> RawBatch:
  """Counts a batch's own records (not history) under ``name``."""
  table = batch.table
  counting.inc(name, table.num_rows - pa.compute.sum(table.column("history").cast(pa.int64())).as_py()
               if table.num_rows else 0)
  return batch


class ReadFromSource(beam.PTransform[beam.pvalue.PBegin, beam.PCollection[RawBatch]]):
  """A non-file source of RawBatches (Kafka, a test's Create) with its own records counted as ``<stream>_in``."""
  def __init__(self, source: beam.PTransform, stream: str = "events"):
    super().__init__()
    self._source = source
    self._counter = "events_in" if stream == "events" else "labels_in"

  def expand(self, pbegin):
    records = (pbegin
               | "Read" >> self._source
               | "CountIn" >> beam.Map(_count_own, self._counter).with_output_types(RawBatch))
    none = pbegin | "NoDeadLetters" >> beam.Create([]).with_output_types(DeadLetterBatch)
    return ReadResult(records, none)
