"""One computation on every path: the bounded graph, the streaming graph, the live hot path and training.

The same generated input (with damaged records) goes through
(a) the bounded graph on the FnApiRunner,
(b) the streaming graph under TestStream, with shuffled arrival inside the
    allowed lateness and the watermark jumping,
(c) the live hot path (``DecideLive``), fed the topics' records in event-time
    order as a live stream would bring them,
(d) training's feature pass;
every feature, score, decision and reason code must be identical, and so must
the dead letters of (a), (b) and (c).
"""
import datetime
import glob
import os
import random

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.transforms.window import TimestampedValue

from tests import helpers as h
from txstream.core import contracts, decode
from txstream.core.batch import Batch, RawBatch
from txstream.io import schema_registry, wire
from txstream.models import train
from txstream.pipelines import generate
from txstream.pipelines.graph import Sources, build_graph
from txstream.transforms.live import DecideLive

LATENESS_S = 3600
COLUMNS = (["transaction_id", "score", "decision", "reason_codes", "model_version", "rules_version",
            "reference_version", "source"] + list(contracts.FEATURE_COLUMNS))
DEAD = ["source", "stage", "reason", "message"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("parity"))
  generate.generate(out, customers=40, terminals=80, days=10, start=datetime.date(2018, 4, 1), seed=11,
                    corrupt_fraction=0.01)
  return out


def _records(data):
  """Every transaction and label message with its topic, the time a stream would bring it, and its file source."""
  out = []
  for topic, subject, pattern in (("tx", schema_registry.TRANSACTION_SUBJECT, "transactions/*.wire"),
                                  ("lb", schema_registry.LABEL_SUBJECT, "labels/*.wire")):
    decoder = decode.Decoder(schema_registry.FileSchemaRegistry(), subject)
    last = 0
    for path in sorted(glob.glob(os.path.join(data, pattern))):
      with open(path, "rb") as f:
        for index, message in wire.read_frames(f):
          try:
            _, record = decoder.decode_message(message)
            last = record["event_time" if topic == "tx" else "label_time"]
          except ValueError:
            pass  # a damaged record arrives when its neighbours do
          out.append((last, 0 if topic == "lb" else 1, topic, f"{os.path.basename(path)}#{index}", message))
  out.sort(key=lambda r: r[:2])
  return out


def _rows(pcoll, label, columns):
  return h.flat(pcoll, label, *columns) | f"{label}Tuples" >> beam.Map(
      lambda r: tuple(tuple(v) if isinstance(v, list) else v for v in r))


# The in-process runners unpickle _Keep by reference, so it appends to this very dict.
_KEPT = {}


class _Keep(beam.DoFn):
  def __init__(self, token: str):
    self._token = token

  def process(self, row):
    _KEPT[self._token].append(row)


def _keep(pcoll, label: str) -> list:
  token = f"{label}-{id(pcoll)}"
  _KEPT[token] = []
  _ = pcoll | label >> beam.ParDo(_Keep(token))
  return _KEPT[token]


def _run_bounded(data):
  options = PipelineOptions([f"--input={data}", "--no_cold", "--dead_letter_path="])
  with TestPipeline(options=options) as p:
    out = build_graph(p, options)
    got = _keep(_rows(out.decisions, "Decisions", COLUMNS), "Keep")
    dead = _keep(_rows(out.dead_letters, "Dead", DEAD), "KeepDead")
  return sorted(got), sorted(dead)


def _stream_of(records, seed):
  """The records as RawBatches in shuffled chunks inside the lateness; the watermark jumps after each chunk."""
  rng = random.Random(seed)
  stream = TestStream().with_output_types(Batch)
  chunk, start = [], None
  for record in records + [None]:
    if record is not None and (start is None or record[0] - start < LATENESS_S * 1000 // 2):
      start = record[0] if start is None else start
      chunk.append(record)
      continue
    rng.shuffle(chunk)
    for topic in ("tx", "lb"):
      part = [r for r in chunk if r[2] == topic]
      for i in range(0, len(part), 25):
        batch = h.raw_batch([(r[3], r[4]) for r in part[i:i + 25]])
        stream = stream.add_elements([TimestampedValue((topic, batch), min(r[0] for r in part[i:i + 25]) / 1000)])
    if start is not None:
      stream = stream.advance_watermark_to(start / 1000)
    chunk, start = ([record], record[0]) if record is not None else ([], None)
  return stream.advance_watermark_to(records[-1][0] / 1000 + 3 * LATENESS_S).advance_watermark_to_infinity()


def _run_streaming(data, records):
  options = PipelineOptions([f"--reference_dir={data}/reference", "--no_cold", "--dead_letter_path=",
                             f"--allowed_lateness_s={LATENESS_S}"])
  options.view_as(StandardOptions).streaming = True
  with TestPipeline(options=options) as p:
    events = p | _stream_of(records, seed=5)
    split = events | beam.Partition(lambda e, _: 0 if e[0] == "tx" else 1, 2)
    raw = split[0] | "Tx" >> beam.Map(lambda e: e[1]).with_output_types(RawBatch)
    raw_labels = split[1] | "Lb" >> beam.Map(lambda e: e[1]).with_output_types(RawBatch)
    out = build_graph(p, options, Sources(raw=raw, raw_labels=raw_labels))
    got = _keep(_rows(out.decisions, "Decisions", COLUMNS), "Keep")
    dead = _keep(_rows(out.dead_letters, "Dead", DEAD), "KeepDead")
  return sorted(got), sorted(dead)


def _run_live(data, records):
  """DecideLive fed the records in event-time order: one batch per run of records from one topic."""
  fn = DecideLive(None, "tx", "lb", {}, f"{data}/reference")._fn
  fn.setup()
  offsets = {"tx": 0, "lb": 0}
  decisions, dead = [], []

  class _Finalizer:
    def register(self, callback):
      pass

  fn.start_bundle()
  runs = []
  for record in records:
    if runs and runs[-1][0] == record[2] and len(runs[-1][1]) < 40:
      runs[-1][1].append(record)
    else:
      runs.append((record[2], [record]))
  for topic, run in runs:
    first = offsets[topic]
    offsets[topic] += len(run)
    batch = h.raw_batch([(f"{topic}/0@{first + i}", r[4]) for i, r in enumerate(run)])
    for out in fn.process(batch, _Finalizer()):
      (dead if isinstance(out, beam.pvalue.TaggedOutput) else decisions).append(
          out.value if isinstance(out, beam.pvalue.TaggedOutput) else out)
  decisions += [w.value for w in fn.finish_bundle()]
  fn.teardown()
  # Live sources are topic positions: map them back to the files' to compare.
  files = {f"{r[2]}/0@{i}": r[3] for topic in ("tx", "lb") for i, r in enumerate(x for x in records if x[2] == topic)}
  got = []
  for batch in decisions:
    for row in h.rows(batch, *COLUMNS):
      row = list(row)
      row[COLUMNS.index("source")] = files[row[COLUMNS.index("source")]]
      got.append(tuple(tuple(v) if isinstance(v, list) else v for v in row))
  letters = [(files[s], stage, reason, message) for b in dead for s, stage, reason, message in h.rows(b, *DEAD)]
  return sorted(got), sorted(letters)


def test_bounded_streaming_live_and_training_agree(data):
  records = _records(data)
  bounded, bounded_dead = _run_bounded(data)
  assert len(bounded) > 200 and bounded_dead, "the sample must be scored and hold damaged records"
  assert {d[2] for d in bounded} >= {"approve", "decline"}

  streaming, streaming_dead = _run_streaming(data, records)
  assert streaming == bounded
  assert streaming_dead == bounded_dead

  live, live_dead = _run_live(data, records)
  assert live == bounded
  assert live_dead == bounded_dead

  table = train.features_for(data)
  trained = {i: tuple(x) for i, x in zip(table.transaction_id, table.x.tolist())}
  scored = {d[0]: tuple(np.float32(v).item() for v in d[len(COLUMNS) - len(contracts.FEATURE_COLUMNS):])
            for d in bounded}
  assert trained == scored
