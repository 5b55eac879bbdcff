"""The feature definition as a sequential pass in plain Python: the oracle the columnar engine is held to.

Both classes consume one key's events strictly in event-time order and return
features from what they have seen so far, so the same code serves the stream,
the batch rerun and training. Windows follow the Fraud Detection Handbook:

* customer, window n days: (t - n, t], current transaction included;
  number of transactions and mean amount.
* terminal, window n days with delay d: (t - (d + n), t - d], current
  transaction excluded; number of transactions and risk = known frauds /
  transactions (0 when none). A fraud is known at t when its label's time is
  <= t.

Beyond the handbook (measured with ``txstream train --protocol handbook``):

* customer: the amount against the customer's earlier transactions of the
  last 7 and 30 days, (t - n, t] without the current one: ratio to their mean
  (-1 when there is none) and, over 30 days, the z-score
  (amount - mean) / max(std, 1 currency unit) (0 when there is none);
* terminal, no delay: frauds known at t (label time <= t) among the
  terminal's transactions of (t - n, t] for n = 7 and 30 days, their number
  and their share of the earlier transactions in that window; and the days
  since the most recent such fraud's transaction (30 when none in 30 days).
  Chargebacks arrive over days, so the terminal is flagged as soon as the
  first one does instead of a whole delay later.
"""
import bisect
import datetime
import math
from typing import Dict, List, Tuple

DAY_MS = 86_400_000
WINDOWS_DAYS = (1, 7, 30)
RATIO_WINDOWS_DAYS = (7, 30)
KNOWN_WINDOWS_DAYS = (7, 30)


class CustomerHistory:
  """A customer's recent spending; amounts in minor units."""
  __slots__ = ("times", "cum_amounts", "cum_squares", "seen", "_base", "_base_squares")

  def __init__(self):
    self.times: List[int] = []
    # cum_amounts[i] = sum of amounts[0..i] (cum_squares: of their squares);
    # window sums are two look-ups. Python ints, so sums stay exact.
    self.cum_amounts: List[int] = []
    self.cum_squares: List[int] = []
    self.seen: Dict[str, Tuple[int, int]] = {}
    self._base = 0
    self._base_squares = 0

  def add(self, t: int, amount: int) -> Tuple[float, ...]:
    """Adds a transaction at t; returns (nb, mean) per window, then the amount ratios and z-score.

    The graph feeds transactions in event-time order; one that comes earlier
    than the latest seen (the live hot path) is inserted in its place, and its
    features count what is at or before it, exactly as if it had come in order.
    """
    at = len(self.times)
    if at and t < self.times[-1]:
      at = bisect.bisect_right(self.times, t)
    self.times.insert(at, t)
    self.cum_amounts.insert(at, self._sum(self.cum_amounts, self._base, at) + amount)
    self.cum_squares.insert(at, self._sum(self.cum_squares, self._base_squares, at) + amount * amount)
    for i in range(at + 1, len(self.times)):
      self.cum_amounts[i] += amount
      self.cum_squares[i] += amount * amount
    out = []
    total = self.cum_amounts[at]
    for n in WINDOWS_DAYS:
      i = bisect.bisect_right(self.times, t - n * DAY_MS)
      count = at - i + 1
      out.append(float(count))
      out.append((total - self._sum(self.cum_amounts, self._base, i)) / count / 100.0)
    out = tuple(out) + self._versus_earlier(t, amount, at)
    self._prune(self.times[-1] - WINDOWS_DAYS[-1] * DAY_MS)
    return out

  @staticmethod
  def _sum(cum: List[int], base: int, i: int) -> int:
    """Sum of the values before index i (the pruned ones included)."""
    return cum[i - 1] if i > 0 else base

  def _versus_earlier(self, t: int, amount: int, last: int) -> Tuple[float, ...]:
    """The amount against the earlier transactions (index < last) of each ratio window."""
    out = []
    before_total = self._sum(self.cum_amounts, self._base, last)
    before_squares = self._sum(self.cum_squares, self._base_squares, last)
    z = 0.0
    for n in RATIO_WINDOWS_DAYS:
      i = bisect.bisect_right(self.times, t - n * DAY_MS)
      count = last - i
      total = before_total - self._sum(self.cum_amounts, self._base, i)
      if count == 0 or total <= 0:  # validation admits only positive amounts; no history, no ratio
        out.append(-1.0)
        continue
      squares = before_squares - self._sum(self.cum_squares, self._base_squares, i)
      out.append(amount * count / total)
      if n == RATIO_WINDOWS_DAYS[-1]:
        mean = total / count
        std = math.sqrt(max(squares / count - mean * mean, 0.0))
        z = (amount - mean) / max(std, 100.0)
    out.append(z)
    return tuple(out)

  def _prune(self, horizon: int):
    i = bisect.bisect_right(self.times, horizon)
    if i > 64 and i > len(self.times) // 2:
      self._base = self.cum_amounts[i - 1]
      self._base_squares = self.cum_squares[i - 1]
      del self.times[:i]
      del self.cum_amounts[:i]
      del self.cum_squares[:i]
    if len(self.seen) > 4 * (len(self.times) + 16):
      self.seen = {k: v for k, v in self.seen.items() if v[0] > horizon}

  def is_duplicate(self, transaction_id: str, t: int, fingerprint: int) -> "str | None":
    """'duplicate' for an exact repeat, 'conflicting_duplicate' for a different record with a used id."""
    previous = self.seen.get(transaction_id)
    if previous is None:
      self.seen[transaction_id] = (t, fingerprint)
      return None
    return "duplicate" if previous == (t, fingerprint) else "conflicting_duplicate"


class TerminalHistory:
  """A terminal's transactions and the frauds known so far, for delayed windows."""
  __slots__ = ("delay_ms", "times", "fraud_times", "frauds")

  def __init__(self, delay_days: int = 7):
    self.delay_ms = delay_days * DAY_MS
    self.times: List[int] = []
    self.fraud_times: List[int] = []
    self.frauds: set = set()

  def add_label(self, transaction_id: str, tx_time: int):
    if transaction_id in self.frauds:
      return
    self.frauds.add(transaction_id)
    bisect.insort(self.fraud_times, tx_time)

  def add(self, t: int) -> Tuple[float, ...]:
    """Returns (nb, risk) per delayed window, then the known-fraud features; records the transaction at t."""
    out = self.peek(t)
    if self.times and t < self.times[-1]:
      bisect.insort(self.times, t)  # out of order (the live hot path); in order it is an append
    else:
      self.times.append(t)
    self._prune(t - self.delay_ms - WINDOWS_DAYS[-1] * DAY_MS)
    return out

  def peek(self, t: int) -> Tuple[float, ...]:
    """The features ``add(t)`` would return, without recording the transaction."""
    end = t - self.delay_ms
    i_end = bisect.bisect_right(self.times, end)
    f_end = bisect.bisect_right(self.fraud_times, end)
    out = []
    for n in WINDOWS_DAYS:
      start = end - n * DAY_MS
      count = i_end - bisect.bisect_right(self.times, start)
      frauds = f_end - bisect.bisect_right(self.fraud_times, start)
      out.append(float(count))
      out.append(frauds / count if count else 0.0)
    out.extend(self._known(t))
    return tuple(out)

  def _known(self, t: int) -> List[float]:
    """Frauds known at t, no delay: (number, share of earlier transactions) per window, days since the last."""
    # fraud_times holds only frauds whose label has arrived; a label cannot
    # precede its transaction, but a bad one must not count a future fraud.
    f_end = bisect.bisect_right(self.fraud_times, t)
    out = []
    for n in KNOWN_WINDOWS_DAYS:
      start = t - n * DAY_MS
      frauds = f_end - bisect.bisect_right(self.fraud_times, start)
      count = bisect.bisect_right(self.times, t) - bisect.bisect_right(self.times, start)
      out.append(float(frauds))
      out.append(frauds / count if count else 0.0)
    horizon = KNOWN_WINDOWS_DAYS[-1] * DAY_MS
    since = t - self.fraud_times[f_end - 1] if f_end else horizon
    out.append(min(since, horizon) / DAY_MS)
    return out

  def _prune(self, horizon: int):
    i = bisect.bisect_right(self.times, horizon)
    if i > 64 and i > len(self.times) // 2:
      del self.times[:i]
    j = bisect.bisect_right(self.fraud_times, horizon)
    if j > 64:
      del self.fraud_times[:j]


def time_flags(t: int) -> Tuple[float, float]:
  """(weekend, night) for a UTC epoch-millis time; night is hour <= 6."""
  moment = datetime.datetime.fromtimestamp(t / 1000, tz=datetime.timezone.utc)
  return float(moment.weekday() >= 5), float(moment.hour <= 6)
