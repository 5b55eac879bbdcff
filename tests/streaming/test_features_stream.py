"""ComputeFeatures under TestStream: out-of-order arrival, watermark jumps and late data.

The streaming path (state per key, timers on the watermark) must give the
same features as the definition computed over all events in event-time order,
whatever the arrival order and however the watermark moves; an event behind
the allowed lateness goes to dead letters as ``late`` and changes nothing.
"""
import random

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.test_stream import TestStream
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import TimestampedValue

from tests import helpers as h
from tests.unit.test_features import _dataset, _expected, _tx
from txstream.records import Label, Transaction
from txstream.transforms.features import ComputeFeatures

LATENESS_S = 2 * 3600


def _stream(txs, labels, seed, late=()):
  """Arrival in shuffled chunks, each within the lateness; the watermark jumps after each chunk."""
  rng = random.Random(seed)
  events = sorted([(tx.event_time_ms, tx) for tx in txs] + [(lb.label_time_ms, lb) for lb in labels],
                  key=lambda e: (e[0], e[1].transaction_id))
  stream = TestStream().with_output_types(object)
  chunk, chunk_start = [], None
  for t, e in events + [(None, None)]:
    if e is not None and (chunk_start is None or t - chunk_start < LATENESS_S * 1000 // 2):
      chunk_start = t if chunk_start is None else chunk_start
      chunk.append(TimestampedValue(e, t / 1000))
      continue
    rng.shuffle(chunk)
    stream = stream.add_elements(chunk)
    stream = stream.advance_watermark_to(chunk_start / 1000)
    chunk, chunk_start = ([TimestampedValue(e, t / 1000)], t) if e is not None else ([], None)
  if late:
    stream = stream.add_elements([TimestampedValue(tx, tx.event_time_ms / 1000) for tx in late])
  # Let every timer fire before the end of time: at +inf the global window
  # has expired and a stateful step downstream would drop what arrives then.
  last_s = events[-1][0] / 1000
  return stream.advance_watermark_to(last_s + 3 * LATENESS_S).advance_watermark_to_infinity()


def _run_stream(txs, labels, seed, late=()):
  options = PipelineOptions()
  options.view_as(StandardOptions).streaming = True
  with TestPipeline(options=options) as p:
    events = p | _stream(txs, labels, seed, late)
    split = events | beam.Partition(lambda e, _: 1 if isinstance(e, Label) else 0, 2)
    out = (split[0] | "AsTx" >> beam.Map(lambda e: e).with_output_types(Transaction)
           | ComputeFeatures(split[1] | "AsLabel" >> beam.Map(lambda e: e).with_output_types(Label),
                             allowed_lateness_s=LATENESS_S))
    assert_that(out.featured | beam.Map(lambda f: (f.transaction.transaction_id, tuple(f.features))),
                equal_to(_expected(txs, labels)), label="features")
    assert_that(out.dead_letters | beam.Map(lambda d: (d.source, d.reason)),
                equal_to([(tx.source, "late") for tx in late]), label="late")


def test_out_of_order_and_watermark_jumps_give_the_definition():
  txs, labels = _dataset(seed=3, n=150)
  _run_stream(txs, labels, seed=1)
  _run_stream(txs, labels, seed=2)


def test_late_event_is_dead_lettered_and_changes_nothing():
  txs, labels = _dataset(seed=5, n=120)
  late = [_tx(999, h.T0 + h.HOUR_MS, txs[0].customer_id, txs[0].terminal_id, 12_345)]
  _run_stream(txs, labels, seed=4, late=late)
