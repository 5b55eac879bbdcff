"""Detection quality metrics, as the Fraud Detection Handbook defines them.

``card_precision_at_k``: for each test day, each card's (customer's) highest
score that day; the k cards with the highest scores, cards already found
compromised on earlier days removed; precision = compromised cards among
them / k; the mean over days.
"""
from typing import Dict

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def card_precision_at_k(day: np.ndarray, customer: np.ndarray, score: np.ndarray, fraud: np.ndarray,
                        k: int = 100) -> float:
  caught: set = set()
  precisions = []
  for d in np.unique(day):
    on_day = day == d
    per_card: Dict[int, list] = {}
    for c, s, f in zip(customer[on_day], score[on_day], fraud[on_day]):
      if c in caught:
        continue
      best = per_card.get(c)
      if best is None:
        per_card[c] = [s, f]
      else:
        best[0] = max(best[0], s)
        best[1] = best[1] or f
    ranked = sorted(per_card.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
    hits = [c for c, (_, f) in ranked if f]
    precisions.append(len(hits) / k)
    caught.update(hits)
  return float(np.mean(precisions)) if precisions else 0.0


def detection_metrics(day, customer, score, fraud, k: int = 100) -> dict:
  fraud = np.asarray(fraud, dtype=bool)
  both = 0 < fraud.sum() < len(fraud)
  return {
      "auc_roc": round(float(roc_auc_score(fraud, score)), 4) if both else None,
      "average_precision": round(float(average_precision_score(fraud, score)), 4) if both else None,
      f"card_precision_at_{k}": round(card_precision_at_k(np.asarray(day), np.asarray(customer),
                                                          np.asarray(score), fraud, k), 4),
      "n": int(len(fraud)),
      "frauds": int(fraud.sum()),
  }
