"""The Fraud Detection Handbook's evaluation protocol, on precomputed features.

Le Borgne et al., "Reproducible Machine Learning for Credit Card Fraud
Detection - Practical Handbook": chapter 3 (baseline, one train/test split)
and chapter 5 (prequential validation and model selection). Days are
calendar days (UTC) of the data, the handbook's ``TX_TIME_DAYS``.

``split`` is the handbook's ``get_train_test_set``: one week of training, a
delay week whose labels are not yet known, one test week. Customers already
known to be compromised are left out of each test day: those with a fraud
between the start of training and ``delay_days`` + 1 days before that test
day (their card is blocked, so scoring them says nothing about the model).

``prequential_windows`` is ``prequentialSplit``: fold i trains i weeks
earlier. The handbook's test folds start training on 2018-08-15, -08, -01
and 2018-07-25 (the baseline split); its validation folds, used to choose
parameters, on 2018-07-11, -04, 2018-06-27 and -20.
"""
import datetime
import logging
from typing import Callable, Dict, List, NamedTuple, Sequence

import numpy as np

from txstream.models.evaluate import detection_metrics

_LOGGER = logging.getLogger(__name__)
DAY_MS = 86_400_000
METRICS = ("auc_roc", "average_precision", "card_precision_at_100")

HANDBOOK_TRAIN_START = datetime.date(2018, 7, 25)
HANDBOOK_FOLDS = 4
HANDBOOK_WEEK = 7
# The handbook's published XGBoost test figures: chapter 3's baseline split,
# and chapter 5's prequential test mean with the parameters chosen on the
# validation folds.
HANDBOOK_FIGURES = {
    "baseline": {"auc_roc": 0.862, "average_precision": 0.639, "card_precision_at_100": 0.273},
    "best": {"auc_roc": 0.872, "average_precision": 0.687, "card_precision_at_100": 0.303},
}


def epoch_day(date: datetime.date) -> int:
  return (date - datetime.date(1970, 1, 1)).days


def day_date(day: int) -> datetime.date:
  return datetime.date(1970, 1, 1) + datetime.timedelta(days=int(day))


class Window(NamedTuple):
  """One train/delay/test split; ``train_start`` is an epoch day (UTC)."""
  train_start: int
  train_days: int = 7
  delay_days: int = 7
  test_days: int = 7

  @property
  def test_start(self) -> int:
    return self.train_start + self.train_days + self.delay_days

  @property
  def end(self) -> int:
    """First day after the test period."""
    return self.test_start + self.test_days

  def describe(self) -> dict:
    return {"train": [str(day_date(self.train_start)), str(day_date(self.train_start + self.train_days - 1))],
            "test": [str(day_date(self.test_start)), str(day_date(self.end - 1))]}


def split(day: np.ndarray, customer: np.ndarray, fraud: np.ndarray, window: Window):
  """(train mask, test mask) as the handbook's ``get_train_test_set`` builds them.

  Test day d keeps only customers with no fraud in
  [train_start, d - delay_days - 1]: the frauds known by then.
  """
  if min(window.train_days, window.test_days) < 1 or window.delay_days < 0:
    raise ValueError(f"bad window {window}")
  train = (day >= window.train_start) & (day < window.train_start + window.train_days)
  test = np.zeros(len(day), dtype=bool)
  since_start = fraud & (day >= window.train_start)
  for d in range(window.test_start, window.end):
    known = np.unique(customer[since_start & (day <= d - window.delay_days - 1)])
    test |= (day == d) & ~np.isin(customer, known)
  return train, test


def prequential_windows(train_start: int, n_folds: int = HANDBOOK_FOLDS, days: int = HANDBOOK_WEEK) -> List[Window]:
  """Fold i trains ``i * days`` earlier (the handbook's ``prequentialSplit``)."""
  return [Window(train_start - i * days, days, days, days) for i in range(n_folds)]


def handbook_schedule(train_start: datetime.date = HANDBOOK_TRAIN_START) -> Dict[str, List[Window]]:
  """The handbook's windows: the baseline split, the test folds and the validation folds."""
  start = epoch_day(train_start)
  week = HANDBOOK_WEEK
  return {"single_split": [Window(start, week, week, week)],
          "prequential": prequential_windows(start + (HANDBOOK_FOLDS - 1) * week),
          "validation": prequential_windows(start - 2 * week)}


def check_coverage(day: np.ndarray, windows: Sequence[Window], history_days: int):
  """Raises ValueError unless the data cover every window plus the features' history."""
  first, last = int(day.min()), int(day.max())
  need_first = min(w.train_start for w in windows) - history_days
  need_last = max(w.end for w in windows) - 1
  if first > need_first or last < need_last:
    raise ValueError(
        f"the data cover {day_date(first)}..{day_date(last)}; the protocol needs "
        f"{day_date(need_first)}..{day_date(need_last)} ({history_days} days of feature history before the "
        f"first training day): generate from 2018-04-01 with --days {need_last - epoch_day(datetime.date(2018, 4, 1)) + 1}")


FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def evaluate_window(x, y, day, customer, window: Window, fit_predict: FitPredict) -> dict:
  """Trains on the window's training week and scores its test week."""
  train, test = split(day, customer, y, window)
  if not y[train].any() or y[train].all():
    raise ValueError(f"training week {window.describe()['train']} needs both classes")
  score = fit_predict(x[train], y[train], x[test])
  metrics = detection_metrics(day[test], customer[test], score, y[test])
  return dict(window.describe(), **metrics, train_rows=int(train.sum()), train_frauds=int(y[train].sum()))


def summarise(folds: Sequence[dict]) -> dict:
  """Mean and standard deviation of each metric over folds (as the handbook reports them)."""
  out = {}
  for name in METRICS:
    values = np.array([f[name] for f in folds], dtype=float)
    out[name] = round(float(values.mean()), 4)
    out[f"{name}_std"] = round(float(values.std()), 4)
  return out


def compare(ours: dict, figures: dict = HANDBOOK_FIGURES["best"]) -> dict:
  """Per metric: ours - theirs, and whether every metric beats theirs."""
  deltas = {name: round(ours[name] - figures[name], 4) for name in METRICS}
  return {"delta_vs_handbook_best": deltas, "beats_handbook_best": all(v > 0 for v in deltas.values())}
