"""Per-key feature state: the pure computations behind ComputeFeatures.

Both classes consume one key's events strictly in event-time order and return
features from what they have seen so far, so the same code serves the stream,
the batch rerun and training. Windows follow the Fraud Detection Handbook:

* customer, window n days: (t - n, t], current transaction included;
  number of transactions and mean amount.
* terminal, window n days with delay d: (t - (d + n), t - d], current
  transaction excluded; number of transactions and risk = known frauds /
  transactions (0 when none). A fraud is known at t when its label's time is
  <= t.
"""
import bisect
import datetime
from typing import Dict, List, Tuple

DAY_MS = 86_400_000
WINDOWS_DAYS = (1, 7, 30)


class CustomerHistory:
  """A customer's recent spending; amounts in minor units."""
  __slots__ = ("times", "cum_amounts", "seen", "_base")

  def __init__(self):
    self.times: List[int] = []
    # cum_amounts[i] = sum of amounts[0..i]; window sums are two look-ups.
    self.cum_amounts: List[int] = []
    self.seen: Dict[str, Tuple[int, int]] = {}
    self._base = 0

  def add(self, t: int, amount: int) -> Tuple[float, ...]:
    """Adds a transaction at t and returns (nb, mean) for each window."""
    self.times.append(t)
    self.cum_amounts.append((self.cum_amounts[-1] if self.cum_amounts else self._base) + amount)
    self._prune(t - WINDOWS_DAYS[-1] * DAY_MS)
    out = []
    last = len(self.times) - 1
    total = self.cum_amounts[last]
    for n in WINDOWS_DAYS:
      i = bisect.bisect_right(self.times, t - n * DAY_MS)
      count = last - i + 1
      before = self.cum_amounts[i - 1] if i > 0 else self._base
      out.append(float(count))
      out.append((total - before) / count / 100.0)
    return tuple(out)

  def _prune(self, horizon: int):
    i = bisect.bisect_right(self.times, horizon)
    if i > 64 and i > len(self.times) // 2:
      self._base = self.cum_amounts[i - 1]
      del self.times[:i]
      del self.cum_amounts[:i]
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
    """Returns (nb, risk) for each delayed window, then records the transaction at t."""
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
    self.times.append(t)
    self._prune(end - WINDOWS_DAYS[-1] * DAY_MS)
    return tuple(out)

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
