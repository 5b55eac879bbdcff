"""ReadTransactions: raw wire-format messages from files (Kafka in a later stage).

Each output element is a ``RawRecord`` holding one undecoded message and its
source position. Decoding happens in ``DecodeAndValidate`` so that every
damaged message becomes a dead letter with its position, never an exception
that fails the bundle.
"""
import logging
import os
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.metrics import Metrics

from txstream.io import wire
from txstream.records import DeadLetter, RawRecord, dead_letter

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"
DEAD = "dead_letters"


class ReadResult(NamedTuple):
  records: beam.PCollection
  dead_letters: beam.PCollection


class _ReadFramesFn(beam.DoFn):
  """Reads one framed file; damage to the framing dead-letters the unreadable rest."""
  def __init__(self, stream: str):
    self._stream = stream
    self._records = Metrics.counter(NAMESPACE, f"{stream}_in")

  def process(self, readable: fileio.ReadableFile):
    path = readable.metadata.path
    name = os.path.basename(path)
    last = -1
    try:
      with readable.open(compression_type=beam.io.filesystem.CompressionTypes.UNCOMPRESSED) as f:
        for index, message in wire.read_frames(f):
          last = index
          self._records.inc()
          yield RawRecord(f"{name}#{index}", message)
    except wire.WireFormatError as e:
      # The rest of the file cannot be split into records: one dead letter
      # stands for it and is counted as one input.
      self._records.inc()
      prefix = "dead_letter" if self._stream == "events" else "label_dead_letter"
      Metrics.counter(NAMESPACE, f"{prefix}.read.{e.reason}").inc()
      yield beam.pvalue.TaggedOutput(
          DEAD, dead_letter(f"{name}#{last + 1}", None, "read", e.reason, e))


class ReadFramedFiles(beam.PTransform):
  """Framed wire-format files matching ``pattern`` -> RawRecords + dead letters."""
  def __init__(self, pattern: str, stream: str = "events"):
    super().__init__()
    if not pattern:
      raise ValueError("a file pattern is required")
    self._pattern = pattern
    self._stream = stream

  def expand(self, pbegin):
    results = (
        pbegin
        | "Match" >> fileio.MatchFiles(self._pattern, empty_match_treatment=fileio.EmptyMatchTreatment.DISALLOW)
        | "Distribute" >> beam.Reshuffle()
        | "Open" >> fileio.ReadMatches()
        | "Frames" >> beam.ParDo(_ReadFramesFn(self._stream)).with_outputs(DEAD, main="records"))
    return ReadResult(
        results.records,
        results[DEAD])


class ReadTransactions(beam.PTransform):
  """All transaction messages of an input directory written by ``txstream generate``."""
  def __init__(self, input_dir: str):
    super().__init__()
    if not input_dir:
      raise ValueError("--input is required")
    self._input_dir = input_dir

  def expand(self, pbegin):
    return pbegin | "Files" >> ReadFramedFiles(
        os.path.join(self._input_dir, "transactions", "*.wire"), "events")


class ReadLabels(beam.PTransform):
  """The fraud label (chargeback) messages of an input directory."""
  def __init__(self, input_dir: str):
    super().__init__()
    if not input_dir:
      raise ValueError("--input is required")
    self._input_dir = input_dir

  def expand(self, pbegin):
    return pbegin | "Files" >> ReadFramedFiles(
        os.path.join(self._input_dir, "labels", "*.wire"), "labels")
