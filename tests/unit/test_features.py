"""ComputeFeatures in a pipeline: ordering, duplicates, labels and determinism in batch."""
import random

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import helpers as h
from txstream.records import Label, Transaction
from txstream.transforms.feature_state import CustomerHistory, TerminalHistory, time_flags
from txstream.transforms.features import FEATURE_NAMES, ComputeFeatures


def _tx(i, t, customer, terminal, amount):
  return Transaction(f"tx-{i:05d}", t, customer, terminal, h.token(customer), amount, "EUR", "chip", 5411, 2,
                     f"test#{i}", "retail", 4.0, "ref")


def _dataset(seed=7, n=400):
  rng = random.Random(seed)
  txs = [_tx(i, h.T0 + rng.randrange(0, 40 * h.DAY_MS), rng.randrange(0, 5), rng.randrange(0, 4),
             rng.randrange(100, 30_000)) for i in range(n)]
  frauds = [tx for tx in txs if rng.random() < 0.15]
  labels = [Label(tx.transaction_id, tx.event_time_ms + rng.randrange(h.DAY_MS, 7 * h.DAY_MS), tx.event_time_ms,
                  tx.customer_id, tx.terminal_id, True) for tx in frauds]
  return txs, labels


def _expected(txs, labels):
  """The definition, computed sequentially over all events in (time, kind, id) order."""
  customers, terminals, out = {}, {}, {}
  by_customer = {}
  for tx in sorted(txs, key=lambda x: (x.event_time_ms, x.transaction_id)):
    by_customer[tx.transaction_id] = customers.setdefault(tx.customer_id, CustomerHistory()).add(
        tx.event_time_ms, tx.amount_minor)
  events = [(lb.label_time_ms, 0, lb.transaction_id, lb) for lb in labels]
  events += [(tx.event_time_ms, 1, tx.transaction_id, tx) for tx in txs]
  for _, kind, _, e in sorted(events, key=lambda x: x[:3]):
    history = terminals.setdefault(e.terminal_id, TerminalHistory(7))
    if kind == 0:
      history.add_label(e.transaction_id, e.tx_time_ms)
    else:
      out[e.transaction_id] = ((e.amount_minor / 100.0,) + time_flags(e.event_time_ms) + by_customer[e.transaction_id]
                               + history.add(e.event_time_ms) + (4.0,))
  return sorted(out.items())


def _run(txs, labels, bounded):
  with TestPipeline() as p:
    lab = p | "Labels" >> beam.Create(labels)
    out = p | "Txs" >> beam.Create(txs) | ComputeFeatures(lab, allowed_lateness_s=0, bounded=bounded)
    assert_that(out.featured | beam.Map(lambda f: (f.transaction.transaction_id, tuple(f.features))),
                equal_to(_expected(txs, labels)))


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "unbounded"])
def test_features_match_definition_in_any_input_order(bounded):
  txs, labels = _dataset()
  assert len(FEATURE_NAMES) == len(_expected(txs, labels)[0][1])
  _run(txs, labels, bounded)
  rng = random.Random(1)
  shuffled_txs, shuffled_labels = txs[:], labels[:]
  rng.shuffle(shuffled_txs)
  rng.shuffle(shuffled_labels)
  _run(shuffled_txs, shuffled_labels, bounded)


def test_terminal_risk_uses_known_labels_only():
  t = h.T0
  txs = [_tx(0, t, 1, 3, 100), _tx(1, t + 8 * h.DAY_MS, 2, 3, 100), _tx(2, t + 9 * h.DAY_MS, 2, 3, 100)]
  # The fraud on tx 0 becomes known between tx 1 and tx 2.
  labels = [Label("tx-00000", t + 8 * h.DAY_MS + 1, t, 1, 3, True)]
  risk_7d = FEATURE_NAMES.index("TERMINAL_ID_RISK_7DAY_WINDOW")
  with TestPipeline() as p:
    out = p | "Txs" >> beam.Create(txs) | ComputeFeatures(p | "Labels" >> beam.Create(labels))
    assert_that(out.featured | beam.Map(lambda f: (f.transaction.transaction_id, f.features[risk_7d])),
                equal_to([("tx-00000", 0.0), ("tx-00001", 0.0), ("tx-00002", 1.0)]))


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "unbounded"])
def test_exact_duplicates_are_filtered_and_conflicts_dead_lettered(bounded):
  a = _tx(0, h.T0, 1, 3, 100)
  conflict = a._replace(amount_minor=999, source="test#9")
  with TestPipeline() as p:
    out = p | beam.Create([a, a._replace(source="test#8"), conflict]) | ComputeFeatures(None, bounded=bounded)
    assert_that(out.featured | "Ids" >> beam.Map(lambda f: f.transaction.source), equal_to(["test#0"]), label="kept")
    assert_that(out.filtered | "F" >> beam.Map(lambda kv: kv[0]), equal_to(["duplicate"]), label="filtered")
    assert_that(out.dead_letters | "D" >> beam.Map(lambda d: d.reason), equal_to(["conflicting_duplicate"]),
                label="dead")
