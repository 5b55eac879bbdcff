"""ComputeFeatures in a pipeline: ordering, duplicates, labels and determinism, bounded and stateful."""
import random

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests import helpers as h
from tests.reference_features import CustomerHistory, TerminalHistory, time_flags
from txstream.core import contracts
from txstream.core.batch import LabelBatch, TransactionBatch
from txstream.core.contracts import FEATURE_COLUMNS, FEATURE_NAMES
from txstream.transforms.features import ComputeFeatures


def _tx(i, t, customer, terminal, amount, source=None, **extra):
  row = {"transaction_id": f"tx-{i:05d}", "event_time_ms": t, "customer_id": customer, "terminal_id": terminal,
         "card_token": h.token(customer), "amount_minor": amount, "currency": "EUR", "entry_mode": "chip",
         "merchant_category": 5411, "schema_id": 2, "source": source or f"test#{i}", "history": False,
         "customer_segment": "retail", "home_distance": 4.0, "reference_version": "ref"}
  row.update(extra)
  return row


def _label(tx, label_time):
  return {"transaction_id": tx["transaction_id"], "label_time_ms": label_time, "tx_time_ms": tx["event_time_ms"],
          "customer_id": tx["customer_id"], "terminal_id": tx["terminal_id"], "is_fraud": True,
          "source": f"labels#{tx['transaction_id']}", "history": False}


def transactions(rows) -> TransactionBatch:
  return TransactionBatch(pa.Table.from_pylist(rows, schema=contracts.TRANSACTION))


def labels(rows) -> LabelBatch:
  return LabelBatch(pa.Table.from_pylist(rows, schema=contracts.LABEL))


def _dataset(seed=7, n=400):
  rng = random.Random(seed)
  txs = [_tx(i, h.T0 + rng.randrange(0, 40 * h.DAY_MS), rng.randrange(0, 5), rng.randrange(0, 4),
             rng.randrange(100, 30_000)) for i in range(n)]
  frauds = [tx for tx in txs if rng.random() < 0.15]
  return txs, [_label(tx, tx["event_time_ms"] + rng.randrange(h.DAY_MS, 7 * h.DAY_MS)) for tx in frauds]


def _expected(txs, labels_, delay_days=7):
  """The definition, computed sequentially over all events in (time, kind, id) order with the oracle."""
  customers, terminals, out = {}, {}, {}
  by_customer = {}
  for tx in sorted(txs, key=lambda x: (x["event_time_ms"], x["transaction_id"])):
    by_customer[tx["transaction_id"]] = customers.setdefault(tx["customer_id"], CustomerHistory()).add(
        tx["event_time_ms"], tx["amount_minor"])
  events = [(lb["label_time_ms"], 0, lb["transaction_id"], lb) for lb in labels_]
  events += [(tx["event_time_ms"], 1, tx["transaction_id"], tx) for tx in txs]
  for _, kind, _, e in sorted(events, key=lambda x: x[:3]):
    history = terminals.setdefault(e["terminal_id"], TerminalHistory(delay_days))
    if kind == 0:
      history.add_label(e["transaction_id"], e["tx_time_ms"])
    else:
      out[e["transaction_id"]] = ((e["amount_minor"] / 100.0,) + time_flags(e["event_time_ms"])
                                  + by_customer[e["transaction_id"]] + history.add(e["event_time_ms"]) + (4.0,))
  return sorted(out.items())


def feature_rows(pcoll, label="Features"):
  """(transaction_id, feature tuple) per featured row."""
  return h.flat(pcoll, label, "transaction_id", *FEATURE_COLUMNS) | f"{label}Pairs" >> beam.Map(
      lambda r: (r[0], tuple(r[1:])))


def _chunks(rows, k):
  return [rows[i::k] for i in range(k) if rows[i::k]]


def _run(txs, labels_, bounded, chunks=3):
  with TestPipeline() as p:
    lab = p | "Labels" >> beam.Create([labels(c) for c in _chunks(labels_, chunks)])
    out = (p | "Txs" >> beam.Create([transactions(c) for c in _chunks(txs, chunks)])
           | ComputeFeatures(lab, allowed_lateness_s=0, bounded=bounded, shards=3))
    assert_that(feature_rows(out.featured), equal_to(_expected(txs, labels_)))


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "stateful"])
def test_features_match_definition_in_any_input_order(bounded):
  txs, labels_ = _dataset(n=400 if bounded else 150)  # the stateful path fires a timer per distinct time
  assert len(FEATURE_NAMES) == len(_expected(txs, labels_)[0][1])
  _run(txs, labels_, bounded)
  rng = random.Random(1)
  shuffled_txs, shuffled_labels = txs[:], labels_[:]
  rng.shuffle(shuffled_txs)
  rng.shuffle(shuffled_labels)
  _run(shuffled_txs, shuffled_labels, bounded, chunks=5)


def test_terminal_risk_uses_known_labels_only():
  t = h.T0
  txs = [_tx(0, t, 1, 3, 100), _tx(1, t + 8 * h.DAY_MS, 2, 3, 100), _tx(2, t + 9 * h.DAY_MS, 2, 3, 100)]
  # The fraud on tx 0 becomes known between tx 1 and tx 2.
  labels_ = [_label(txs[0], t + 8 * h.DAY_MS + 1)]
  with TestPipeline() as p:
    out = p | "Txs" >> beam.Create([transactions(txs)]) | ComputeFeatures(
        p | "Labels" >> beam.Create([labels(labels_)]), bounded=True)
    assert_that(h.flat(out.featured, "Risk", "transaction_id", "terminal_id_risk_7day_window"),
                equal_to([("tx-00000", 0.0), ("tx-00001", 0.0), ("tx-00002", 1.0)]))


@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "stateful"])
def test_exact_duplicates_are_filtered_and_conflicts_dead_lettered(bounded):
  a = _tx(0, h.T0, 1, 3, 100)
  repeat = dict(a, source="test#8")
  conflict = dict(a, amount_minor=999, source="test#9")
  history_conflict = dict(a, amount_minor=555, source="test#7", history=True)
  with TestPipeline() as p:
    out = (p | beam.Create([transactions([a, repeat]), transactions([conflict, history_conflict])])
           | ComputeFeatures(None, bounded=bounded))
    assert_that(h.flat(out.featured, "Kept", "source"), equal_to([("test#0",)]), label="kept")
    assert_that(h.flat(out.filtered, "Filtered", "source"), equal_to([("test#8",)]), label="filtered")
    assert_that(h.flat(out.dead_letters, "Dead", "source", "reason", "message"),
                equal_to([("test#9", "conflicting_duplicate", "transaction_id tx-00000 reused with other content")]),
                label="dead")
