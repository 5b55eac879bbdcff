"""ComputeFeatures under TestStream: out-of-order arrival, watermark jumps and late data.

The streaming path (state per shard key, timers on the watermark) must give
the same features as the definition computed over all events in event-time
order, whatever the arrival order, however rows are batched and however the
watermark moves; an event behind the allowed lateness goes to dead letters as
``late`` and changes nothing.
"""
import random

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from tests import helpers as h
from tests.unit.test_features import _dataset, _expected, _tx, feature_rows, labels, transactions
from txstream.core.batch import Batch, LabelBatch, TransactionBatch
from txstream.transforms.features import ComputeFeatures

LATENESS_S = 2 * 3600


def _time(e):
  return e.get("label_time_ms", e.get("event_time_ms"))


def _batches(chunk):
  """A chunk of events as a TransactionBatch and a LabelBatch, each timestamped at its earliest event."""
  out = []
  txs = [e for e in chunk if "label_time_ms" not in e]
  lbs = [e for e in chunk if "label_time_ms" in e]
  if txs:
    out.append(TimestampedValue(transactions(txs), min(_time(e) for e in txs) / 1000))
  if lbs:
    out.append(TimestampedValue(labels(lbs), min(_time(e) for e in lbs) / 1000))
  return out


def _stream(txs, labels_, seed, late=()):
  """Arrival in shuffled chunks, each within the lateness, in batches of a dozen rows; the watermark jumps after each."""
  rng = random.Random(seed)
  events = sorted(txs + labels_, key=lambda e: (_time(e), e["transaction_id"]))
  stream = TestStream().with_output_types(Batch)
  chunk, chunk_start = [], None
  for e in events + [None]:
    if e is not None and (chunk_start is None or _time(e) - chunk_start < LATENESS_S * 1000 // 2):
      chunk_start = _time(e) if chunk_start is None else chunk_start
      chunk.append(e)
      continue
    rng.shuffle(chunk)
    for start in range(0, len(chunk), 12):
      stream = stream.add_elements(_batches(chunk[start:start + 12]))
    stream = stream.advance_watermark_to(chunk_start / 1000)
    chunk, chunk_start = ([e], _time(e)) if e is not None else ([], None)
  if late:
    stream = stream.add_elements(_batches(list(late)))
  # Let every timer fire before the end of time: at +inf the global window
  # has expired and a stateful step downstream would drop what arrives then.
  last_s = _time(events[-1]) / 1000
  return stream.advance_watermark_to(last_s + 3 * LATENESS_S).advance_watermark_to_infinity()


def _run_stream(txs, labels_, seed, late=()):
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  with TestPipeline(options=options) as p:
    events = p | _stream(txs, labels_, seed, late)
    split = events | beam.Partition(lambda b, _: 1 if isinstance(b, LabelBatch) else 0, 2)
    out = (split[0] | "AsTx" >> beam.Map(lambda b: b).with_output_types(TransactionBatch)
           | ComputeFeatures(split[1] | "AsLabel" >> beam.Map(lambda b: b).with_output_types(LabelBatch),
                             allowed_lateness_s=LATENESS_S, shards=3))
    assert_that(feature_rows(out.featured), equal_to(_expected(txs, labels_)), label="features")
    assert_that(h.flat(out.dead_letters, "Late", "source", "reason"),
                equal_to([(tx["source"], "late") for tx in late]), label="late")


def test_out_of_order_and_watermark_jumps_give_the_definition():
  txs, labels_ = _dataset(seed=3, n=150)
  _run_stream(txs, labels_, seed=1)
  _run_stream(txs, labels_, seed=2)


def test_late_event_is_dead_lettered_and_changes_nothing():
  txs, labels_ = _dataset(seed=5, n=120)
  late = [_tx(999, h.T0 + h.HOUR_MS, txs[0]["customer_id"], txs[0]["terminal_id"], 12_345)]
  _run_stream(txs, labels_, seed=4, late=late)
