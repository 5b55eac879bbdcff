"""The columnar feature engines against the sequential oracle, bit for bit, however the input is batched."""
import random

import numpy as np
import pyarrow as pa
import pytest

from tests import helpers as h
from tests.reference_features import CustomerHistory, TerminalHistory
from txstream.core import contracts
from txstream.core import features as engine


def _rows(seed, n, customers=5, terminals=4, days=40, hourly=False, amounts=(100, 30_000)):
  """Transactions (hourly times make many same-millisecond ties) and fraud labels of a share of them."""
  rng = random.Random(seed)
  rows = []
  for i in range(n):
    t = h.T0 + (rng.randrange(0, days * 24) * h.HOUR_MS if hourly else rng.randrange(0, days * h.DAY_MS))
    rows.append({"transaction_id": f"tx-{rng.randrange(10**6):06d}-{i}", "event_time_ms": t,
                 "customer_id": rng.randrange(customers), "terminal_id": rng.randrange(terminals),
                 "card_token": "t" * 64, "amount_minor": rng.randrange(*amounts), "currency": "EUR",
                 "source": f"f#{i}"})
  labels = [{"transaction_id": r["transaction_id"], "label_time_ms": r["event_time_ms"] + rng.randrange(0, 7 * h.DAY_MS),
             "tx_time_ms": r["event_time_ms"], "customer_id": r["customer_id"], "terminal_id": r["terminal_id"],
             "is_fraud": True, "source": f"l#{k}"} for k, r in enumerate(rows) if rng.random() < 0.2]
  return rows, labels


def _oracle(rows, labels, delay_days=7):
  customers, terminals, out, by_customer = {}, {}, {}, {}
  for r in sorted(rows, key=lambda x: (x["event_time_ms"], x["transaction_id"])):
    by_customer[r["transaction_id"]] = customers.setdefault(r["customer_id"], CustomerHistory()).add(
        r["event_time_ms"], r["amount_minor"])
  events = [(lb["label_time_ms"], 0, lb["transaction_id"], lb) for lb in labels]
  events += [(r["event_time_ms"], 1, r["transaction_id"], r) for r in rows]
  for _, kind, _, e in sorted(events, key=lambda x: x[:3]):
    history = terminals.setdefault(e["terminal_id"], TerminalHistory(delay_days))
    if kind == 0:
      history.add_label(e["transaction_id"], e["tx_time_ms"])
    else:
      out[e["transaction_id"]] = by_customer[e["transaction_id"]] + history.add(e["event_time_ms"])
  return out


def _table(rows):
  return pa.Table.from_pylist(rows)


def _engines(rows, labels, batches, delay_days=7, shuffle_within=True):
  """Features from the engines fed in event-time order, in ``batches`` batches (each shuffled inside)."""
  customers, terminals = engine.CustomerEngine(), engine.TerminalEngine(delay_days)
  if labels:
    terminals.add_labels(pa.Table.from_pylist(labels))
  ordered = sorted(rows, key=lambda x: (x["event_time_ms"], x["transaction_id"]))
  out = {}
  for part in np.array_split(np.arange(len(ordered)), batches):
    batch = [ordered[i] for i in part]
    if shuffle_within:
      random.Random(len(batch)).shuffle(batch)
    table = _table(batch)
    result = customers.update(table)
    assert (result.outcome == engine.KEPT).all()
    terminal = terminals.update(table)
    for i, r in enumerate(batch):
      out[r["transaction_id"]] = tuple(c[i] for c in result.features) + tuple(c[i] for c in terminal)
  return out


@pytest.mark.parametrize("seed,n,hourly", [(1, 300, False), (2, 400, True), (3, 1500, True), (4, 800, False)])
@pytest.mark.parametrize("batches", [1, 3, 17])
def test_engines_equal_the_oracle_bit_for_bit(seed, n, hourly, batches):
  rows, labels = _rows(seed, n, hourly=hourly)
  assert _engines(rows, labels, batches) == _oracle(rows, labels)


def test_no_delay_and_huge_amounts_stay_exact():
  # Squares of amounts near 10**11 overflow int64: the engine falls back to Python integers there.
  rows, labels = _rows(5, 300, hourly=True, amounts=(10**10, 10**11))
  assert _engines(rows, labels, 4, delay_days=0) == _oracle(rows, labels, delay_days=0)


def test_labels_may_arrive_after_their_time_and_count_only_from_it():
  rows, labels = _rows(6, 500)
  customers, terminals = engine.CustomerEngine(), engine.TerminalEngine(7)
  ordered = sorted(rows, key=lambda x: (x["event_time_ms"], x["transaction_id"]))
  out = {}
  for part in np.array_split(np.arange(len(ordered)), 10):
    batch = [ordered[i] for i in part]
    # Each label arrives with the first batch that reaches its label time (as a live stream would have it).
    until = batch[-1]["event_time_ms"]
    arrived = [lb for lb in labels if lb["label_time_ms"] <= until]
    labels = [lb for lb in labels if lb["label_time_ms"] > until]
    if arrived:
      terminals.add_labels(pa.Table.from_pylist(arrived))
    table = _table(batch)
    c, t = customers.update(table), terminals.update(table)
    for i, r in enumerate(batch):
      out[r["transaction_id"]] = tuple(x[i] for x in c.features) + tuple(x[i] for x in t)
  rows_all, labels_all = _rows(6, 500)
  assert out == _oracle(rows_all, labels_all)


def test_out_of_order_row_counts_what_is_at_or_before_it():
  t = h.T0
  rows = [{"transaction_id": f"tx-{i}", "event_time_ms": t + i * h.HOUR_MS, "customer_id": 1, "terminal_id": 2,
           "card_token": "t" * 64, "amount_minor": 1000 * (i + 1), "currency": "EUR", "source": f"s#{i}"}
          for i in range(4)]
  customers = engine.CustomerEngine()
  customers.update(_table([rows[0], rows[1], rows[3]]))
  late = customers.update(_table([rows[2]]))
  history = CustomerHistory()
  for r in (rows[0], rows[1], rows[3]):
    history.add(r["event_time_ms"], r["amount_minor"])
  assert tuple(c[0] for c in late.features) == history.add(rows[2]["event_time_ms"], rows[2]["amount_minor"])


def test_repeats_are_told_apart_and_the_first_is_kept():
  base = {"transaction_id": "tx-1", "event_time_ms": h.T0, "customer_id": 1, "terminal_id": 2, "card_token": "t" * 64,
          "amount_minor": 100, "currency": "EUR", "source": "a#1"}
  customers = engine.CustomerEngine()
  first = customers.update(_table([dict(base, source="a#2"), dict(base, source="a#1"),
                                   dict(base, amount_minor=7, source="a#3")]))
  assert first.outcome.tolist() == [engine.DUPLICATE, engine.KEPT, engine.CONFLICT]
  # Held from the earlier batch: an exact repeat and a conflicting one; another customer's tx-1 is its own.
  later = customers.update(_table([dict(base, source="b#1"), dict(base, currency="USD", source="b#2"),
                                   dict(base, customer_id=9, source="b#3")]))
  assert later.outcome.tolist() == [engine.DUPLICATE, engine.CONFLICT, engine.KEPT]


def test_state_is_trimmed_to_the_longest_window():
  rows, _ = _rows(7, 3000, customers=50, terminals=40, days=200)
  customers, terminals = engine.CustomerEngine(), engine.TerminalEngine(7)
  ordered = sorted(rows, key=lambda x: (x["event_time_ms"], x["transaction_id"]))
  for part in np.array_split(np.arange(len(ordered)), 40):
    table = _table([ordered[i] for i in part])
    customers.update(table)
    terminals.update(table)
  # 200 days of traffic; the customer state holds about 30 days of it, the terminal state 37.
  assert len(customers) < 3000 * 45 / 200
  assert len(terminals) < 3000 * 55 / 200


def test_time_flags_match_python_datetime():
  import datetime
  times = np.array([h.T0 + k * 997_013 for k in range(20_000)] + [0, 6 * h.HOUR_MS - 1, 7 * h.HOUR_MS])
  weekend, night = engine.time_flags(times)
  for t, w, n in zip(times.tolist(), weekend.tolist(), night.tolist()):
    moment = datetime.datetime.fromtimestamp(t / 1000, tz=datetime.timezone.utc)
    assert (w, n) == (float(moment.weekday() >= 5), float(moment.hour <= 6))


def test_times_outside_the_key_range_are_refused():
  bad = {"transaction_id": "x", "event_time_ms": 10**15, "customer_id": 1, "terminal_id": 2, "card_token": "t" * 64,
         "amount_minor": 1, "currency": "EUR", "source": "s#1"}
  with pytest.raises(ValueError, match="event time outside"):
    engine.TerminalEngine().update(_table([bad]))
  assert contracts.FEATURE_NAMES[3:3 + len(contracts.CUSTOMER_FEATURES)] == tuple(contracts.CUSTOMER_FEATURES)
