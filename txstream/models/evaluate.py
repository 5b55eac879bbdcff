"""Detection quality metrics, as the Fraud Detection Handbook defines them.

``card_precision_at_k`` follows the handbook's ``card_precision_top_k``
(chapter "Precision top-k metrics", remove_detected_frauded_cards=True):

* days are taken in increasing order; a day is a calendar day of the data
  (the handbook's ``TX_TIME_DAYS``);
* on each day every card (customer) counts once, with its highest score that
  day and as fraudulent if any of its transactions that day is;
* cards already detected (a fraudulent card among the top k of an earlier
  day) are removed before ranking: investigators do not alert twice on a
  blocked card;
* the k highest-scoring cards are the day's alerts; precision = fraudulent
  cards among them / k, even when the day has fewer than k cards;
* the metric is the mean over days.

Equal scores are ranked by customer id so the figure is reproducible (the
handbook's pandas sort leaves ties in an unspecified order).

Removing the cards already *known* to be compromised through the labels
before the test period is part of building the test set, not of the metric:
see ``txstream.models.protocol``.
"""
from typing import List, Tuple

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def _daily_cards(customer: np.ndarray, score: np.ndarray, fraud: np.ndarray):
  """Per card of one day: (customer ids, max score, any fraud), ranked best first."""
  cards, inverse = np.unique(customer, return_inverse=True)
  best = np.full(len(cards), -np.inf)
  np.maximum.at(best, inverse, score)
  hit = np.zeros(len(cards), dtype=bool)
  np.logical_or.at(hit, inverse, fraud)
  # lexsort: last key is primary; ties on score go to the lower customer id.
  order = np.lexsort((cards, -best))
  return cards[order], best[order], hit[order]


def card_precision_at_k_per_day(day, customer, score, fraud, k: int = 100) -> List[Tuple[int, float, int]]:
  """[(day, CP@k of that day, fraudulent cards still to find that day)] in day order."""
  if k < 1:
    raise ValueError("k must be >= 1")
  day, customer = np.asarray(day), np.asarray(customer)
  score, fraud = np.asarray(score, dtype=float), np.asarray(fraud, dtype=bool)
  detected = np.zeros(0, dtype=customer.dtype)
  out = []
  for d in np.unique(day):
    on_day = (day == d) & ~np.isin(customer, detected)
    cards, _, hit = _daily_cards(customer[on_day], score[on_day], fraud[on_day])
    found = cards[:k][hit[:k]]
    out.append((int(d), len(found) / k, int(hit.sum())))
    detected = np.concatenate([detected, found])
  return out


def card_precision_at_k(day, customer, score, fraud, k: int = 100) -> float:
  """The handbook's CP@k: mean over days of the daily card precision (see module doc)."""
  per_day = card_precision_at_k_per_day(day, customer, score, fraud, k)
  return float(np.mean([p for _, p, _ in per_day])) if per_day else 0.0


def detection_metrics(day, customer, score, fraud, k: int = 100) -> dict:
  """AUC ROC, average precision (transaction level) and CP@k; None when a class is missing."""
  fraud = np.asarray(fraud, dtype=bool)
  both = 0 < fraud.sum() < len(fraud)
  return {
      "auc_roc": round(float(roc_auc_score(fraud, score)), 4) if both else None,
      "average_precision": round(float(average_precision_score(fraud, score)), 4) if both else None,
      f"card_precision_at_{k}": round(card_precision_at_k(day, customer, score, fraud, k), 4),
      "n": int(len(fraud)),
      "frauds": int(fraud.sum()),
  }
