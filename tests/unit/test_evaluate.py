"""The handbook's metrics and test-set construction, on examples computed by hand."""
import datetime

import numpy as np
import pytest

from txstream.models import protocol
from txstream.models.evaluate import card_precision_at_k, card_precision_at_k_per_day, detection_metrics


def _cp(rows, k):
  day, customer, score, fraud = (np.array(c) for c in zip(*rows))
  return card_precision_at_k_per_day(day, customer, score, fraud, k), card_precision_at_k(day, customer, score,
                                                                                           fraud, k)


def test_card_precision_counts_cards_not_transactions():
  # Day 0: card 1 has three fraudulent transactions at the top; it counts once.
  # Cards by max score: 1 (0.9, fraud), 2 (0.8, genuine), 3 (0.7, fraud), 4 (0.1, fraud).
  rows = [(0, 1, 0.9, 1), (0, 1, 0.85, 1), (0, 1, 0.84, 1), (0, 2, 0.8, 0), (0, 3, 0.2, 0), (0, 3, 0.7, 1),
          (0, 4, 0.1, 1)]
  per_day, mean = _cp(rows, k=3)
  # Top 3 cards: 1, 2, 3 -> 2 fraudulent cards / 3; 3 fraudulent cards existed.
  assert per_day == [(0, 2 / 3, 3)]
  assert mean == pytest.approx(2 / 3)


def test_card_is_fraudulent_if_any_transaction_that_day_is():
  # Card 7's top-scored transaction is genuine, a lower one is the fraud: the card is a hit.
  rows = [(0, 7, 0.9, 0), (0, 7, 0.1, 1), (0, 8, 0.5, 0)]
  assert _cp(rows, k=1)[1] == 1.0


def test_detected_cards_leave_later_days_but_missed_ones_stay():
  rows = [
      # day 0, k=2: cards 1 (fraud) and 2 (genuine) are alerted; card 3 (fraud) is missed.
      (0, 1, 0.9, 1), (0, 2, 0.8, 0), (0, 3, 0.1, 1),
      # day 1: card 1 was detected, so it is gone although it scores highest;
      # cards 3 (fraud again, now found) and 2 are the top 2.
      (1, 1, 0.99, 1), (1, 3, 0.7, 1), (1, 2, 0.6, 0), (1, 4, 0.5, 1),
      # day 2: 1 and 3 are gone; 2 and 4 remain, 4 is a fraud.
      (2, 1, 0.99, 1), (2, 3, 0.99, 1), (2, 2, 0.3, 0), (2, 4, 0.2, 1),
  ]
  per_day, mean = _cp(rows, k=2)
  assert per_day == [(0, 0.5, 2), (1, 0.5, 2), (2, 0.5, 1)]
  assert mean == pytest.approx(0.5)
  # A genuine card in the alerts is not "detected": card 2 stays every day.
  rows = [(0, 2, 0.9, 0), (1, 2, 0.9, 0), (1, 5, 0.1, 1)]
  assert _cp(rows, k=1)[0] == [(0, 0.0, 0), (1, 0.0, 1)]


def test_precision_divides_by_k_even_on_a_small_day_and_ties_go_to_the_lower_id():
  rows = [(3, 9, 0.5, 1), (3, 4, 0.5, 0)]
  assert _cp(rows, k=100)[0] == [(3, 0.01, 1)]
  # Equal scores: card 4 ranks before card 9, so with k=1 the alert is the genuine card.
  assert _cp(rows, k=1)[0] == [(3, 0.0, 1)]


def test_detection_metrics_against_hand_values():
  day = np.zeros(4, dtype=int)
  customer = np.arange(4)
  score = np.array([0.9, 0.8, 0.3, 0.1])
  fraud = np.array([1, 0, 1, 0], dtype=bool)
  m = detection_metrics(day, customer, score, fraud, k=2)
  # Pairs (fraud, genuine) ranked right: (0.9>0.8), (0.9>0.1), (0.3>0.1); wrong: (0.3<0.8) -> 3/4.
  assert m["auc_roc"] == 0.75
  # AP = mean precision at each fraud's rank: (1/1 + 2/3) / 2.
  assert m["average_precision"] == round((1 + 2 / 3) / 2, 4)
  assert m["card_precision_at_2"] == 0.5
  assert (m["n"], m["frauds"]) == (4, 2)
  one_class = detection_metrics(day, customer, score, np.zeros(4, dtype=bool), k=2)
  assert one_class["auc_roc"] is None and one_class["card_precision_at_2"] == 0.0


def test_split_drops_customers_known_compromised_through_the_delay():
  w = protocol.Window(train_start=10, train_days=2, delay_days=2, test_days=3)  # train 10-11, test 14-16
  rows = [
      (9, 1, 1),    # before training: not known to the protocol, customer 1 stays in the test
      (10, 2, 1),   # fraud in training: customer 2 is out of every test day
      (12, 3, 1),   # fraud on the first delay day: known from test day 15 (15 - 2 - 1 = 12)
      (13, 4, 1),   # fraud on the second delay day: known from test day 16
      (14, 5, 1),   # fraud on the first test day: known only from day 17, after the test
      (14, 1, 0), (14, 2, 0), (14, 3, 0), (14, 4, 0), (14, 5, 0),
      (15, 1, 0), (15, 2, 0), (15, 3, 0), (15, 4, 0), (15, 5, 0),
      (16, 1, 0), (16, 2, 0), (16, 3, 0), (16, 4, 0), (16, 5, 0),
      (17, 1, 0),   # after the test week
  ]
  day, customer, fraud = (np.array(c) for c in zip(*rows))
  train, test = protocol.split(day, customer, fraud.astype(bool), w)
  assert train.tolist() == [d in (10, 11) for d in day]
  kept = sorted(zip(day[test].tolist(), customer[test].tolist()))
  assert kept == [(14, 1), (14, 3), (14, 4), (14, 5), (14, 5), (15, 1), (15, 4), (15, 5), (16, 1), (16, 5)]


def test_handbook_schedule_dates():
  s = protocol.handbook_schedule()
  assert [w.describe() for w in s["single_split"]] == [
      {"train": ["2018-07-25", "2018-07-31"], "test": ["2018-08-08", "2018-08-14"]}]
  assert [w.describe()["train"][0] for w in s["prequential"]] == ["2018-08-15", "2018-08-08", "2018-08-01",
                                                                  "2018-07-25"]
  assert s["prequential"][0].describe()["test"] == ["2018-08-29", "2018-09-04"]
  assert [w.describe()["train"][0] for w in s["validation"]] == ["2018-07-11", "2018-07-04", "2018-06-27",
                                                                 "2018-06-20"]


def test_coverage_names_the_days_to_generate():
  windows = [w for ws in protocol.handbook_schedule().values() for w in ws]
  start = protocol.epoch_day(datetime.date(2018, 4, 1))
  protocol.check_coverage(np.array([start, start + 156]), windows, history_days=37)
  with pytest.raises(ValueError, match="--days 157"):
    protocol.check_coverage(np.array([start, start + 155]), windows, history_days=37)
  with pytest.raises(ValueError, match="2018-05-14"):
    protocol.check_coverage(np.array([start + 60, start + 200]), windows, history_days=37)


def test_summary_and_comparison():
  folds = [{"auc_roc": 0.9, "average_precision": 0.7, "card_precision_at_100": 0.3},
           {"auc_roc": 0.8, "average_precision": 0.7, "card_precision_at_100": 0.32}]
  mean = protocol.summarise(folds)
  assert (mean["auc_roc"], mean["auc_roc_std"], mean["card_precision_at_100"]) == (0.85, 0.05, 0.31)
  verdict = protocol.compare(mean)
  assert verdict["delta_vs_handbook_best"] == {"auc_roc": -0.022, "average_precision": 0.013,
                                               "card_precision_at_100": 0.007}
  assert verdict["beats_handbook_best"] is False
