"""Feature engines: per-shard customer and terminal histories as sorted arrays, features for whole batches.

The definition (Fraud Detection Handbook, plus the early-label features), for
a transaction at time t, all windows over event time:

* customer, n = 1, 7, 30 days, (t - n, t], the current transaction included:
  number of transactions and mean amount; against the customer's *earlier*
  transactions of the last 7 and 30 days: the amount's ratio to their mean
  (-1 when there are none) and, over 30 days, its z-score
  (amount - mean) / max(std, 1 currency unit) (0 when there are none);
* terminal, delay d, n = 1, 7, 30 days, (t - d - n, t - d], the current
  transaction excluded: number of transactions and risk = known frauds /
  transactions (0 when none); without delay, frauds known at t among the
  terminal's transactions of (t - n, t] for n = 7, 30 (their number and their
  share of the earlier transactions there) and the days since the latest known
  fraud's transaction (30 when none in 30 days). A fraud is known at t when
  its label's time is <= t (a label is known before a transaction at the
  same millisecond).

An engine processes each batch in (event time, transaction_id) order after
what it already holds: features of a transaction count the rows it holds
at or before the transaction's time (rows of the same millisecond held from
earlier batches included) and the rows before it in the batch. Fed in
event-time order that is exactly the definition; fed out of order (the live
hot path) a transaction counts what has arrived by then, like a person
would. Labels are kept with their label time and applied by it, whenever
they arrive.

All arithmetic is exact: sums are int64 prefix sums (Python ints past 2**53),
and every division is the one the definition names, on exactly representable
operands, so features are bit-identical to a sequential pass in Python.
State is trimmed to the longest window (plus the terminal delay and the
allowed lateness), so memory follows the active population, not the input.
"""
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from txstream.core import contracts, dead_letters, history
from txstream.core.numeric import exact_div

DAY_MS = contracts.DAY_MS
LONGEST_MS = contracts.WINDOWS_DAYS[-1] * DAY_MS
KEPT, DUPLICATE, CONFLICT = 0, 1, 2  # customer-stage outcome of a transaction


def time_flags(event_time_ms: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(weekend, night) as floats for UTC epoch-millis times; night is hour <= 6."""
  days = np.floor_divide(event_time_ms, DAY_MS)
  weekday = (days + 3) % 7  # 1970-01-01 was a Thursday (3)
  hour = np.floor_divide(event_time_ms - days * DAY_MS, contracts.HOUR_MS)
  return (weekday >= 5).astype(np.float64), (hour <= 6).astype(np.float64)



# ----------------------------------------------------------------------------------------------- customers

class CustomerResult(NamedTuple):
  """Per input row, in input order: outcome (KEPT, DUPLICATE, CONFLICT) and customer features (NaN unless kept)."""
  outcome: np.ndarray
  features: List[np.ndarray]  # one float64 column per CUSTOMER_FEATURES name


class Repeats:
  """Recognises repeated transaction ids per customer: exact ``DUPLICATE``s and ``CONFLICT``s.

  A transaction id seen before for the same customer is an exact duplicate
  (same time, terminal, token, amount, currency) or a conflict; the first
  occurrence (held ones first, then by time and source position) is the one
  kept. Occurrences are held for ``margin_ms`` behind the newest time seen.
  """

  def __init__(self, margin_ms: int):
    self._margin = margin_ms
    self._seen = history.Index()  # payload: fingerprint of the first occurrence; time: its event time
    self._newest: Optional[int] = None

  def check(self, tx: pa.Table, remember: bool = True) -> np.ndarray:
    """KEPT, DUPLICATE or CONFLICT per row of ``tx``; with ``remember`` the kept rows are held."""
    customer = tx.column("customer_id").to_numpy()
    times = tx.column("event_time_ms").to_numpy()
    seen_key = history.entity_key(customer, history.hash_strings(tx.column("transaction_id")))
    prints = pl.from_arrow(tx.select(["event_time_ms", "customer_id", "terminal_id", "card_token", "amount_minor",
                                      "currency"])).hash_rows(seed=history.HASH_SEED).to_numpy()
    outcome = np.zeros(len(seen_key), np.int8)
    held = self._seen.find(seen_key)
    if (held >= 0).any():
      rows = np.flatnonzero(held >= 0)
      same = (self._seen.time[held[rows]] == times[rows]) & (self._seen.payload[held[rows]] == prints[rows])
      outcome[rows] = np.where(same, DUPLICATE, CONFLICT)
    self._within(tx, seen_key, times, prints, np.flatnonzero(held < 0), outcome)
    if remember:
      kept = outcome == KEPT
      self._seen.add(seen_key[kept], times[kept], prints[kept])
      if kept.any():
        newest = int(times[kept].max())
        self._newest = newest if self._newest is None else max(self._newest, newest)
        self._seen.trim(self._newest - self._margin)
    return outcome

  @staticmethod
  def _within(tx, seen_key, times, prints, fresh, outcome) -> None:
    """Marks repeats among the batch's own rows (few; settled in Python)."""
    order = np.argsort(seen_key[fresh], kind="stable")
    k = seen_key[fresh][order]
    repeated = np.flatnonzero(k[1:] == k[:-1])
    if not len(repeated):
      return
    ids, sources = tx.column("transaction_id"), tx.column("source")
    groups: Dict[int, List[int]] = {}
    for i in np.unique(np.concatenate((repeated, repeated + 1))).tolist():
      groups.setdefault(int(k[i]), []).append(int(fresh[order[i]]))
    for rows in groups.values():
      by_id: Dict[str, List[int]] = {}
      for row in rows:  # equal hashes of different ids are different transactions
        by_id.setdefault(ids[row].as_py(), []).append(row)
      for same_id in by_id.values():
        same_id.sort(key=lambda r: (times[r], sources[r].as_py()))
        first = same_id[0]
        for row in same_id[1:]:
          same = times[row] == times[first] and prints[row] == prints[first]
          outcome[row] = DUPLICATE if same else CONFLICT


class CustomerEngine:
  """Customer histories of one shard, sorted by (customer, time), and the repeats among them.

  ``update`` drops repeats (``Repeats``: recognised while the first occurrence
  is held, the longest window plus ``lateness_ms``) and computes the features
  of the rest. ``keep_state=False`` is for a one-pass batch.
  """

  def __init__(self, lateness_ms: int = 0, keep_state: bool = True):
    self._margin = LONGEST_MS + lateness_ms
    self._keep = keep_state
    self._slots = history.Slots()
    self._key = np.zeros(0, np.int64)
    self._amount = np.zeros(0, np.int64)
    self._repeats = Repeats(self._margin)
    self._newest: Optional[int] = None

  def __len__(self) -> int:
    return len(self._key)

  def update(self, tx: pa.Table) -> CustomerResult:
    n = tx.num_rows
    if n == 0:
      return CustomerResult(np.zeros(0, np.int8), [np.zeros(0) for _ in contracts.CUSTOMER_FEATURES])
    outcome = self._repeats.check(tx, remember=self._keep)
    kept = np.flatnonzero(outcome == KEPT)
    times = tx.column("event_time_ms").to_numpy()[kept]
    key = history.time_key(self._slots.of(tx.column("customer_id").to_numpy()[kept]), times)
    amount = tx.column("amount_minor").to_numpy()[kept]
    order = history.order([key], history.Ties(tx, kept))
    merged = history.merge(self._key, {"amount": self._amount}, key[order], {"amount": amount[order]})
    features = []
    for values in _customer_windows(merged.key, merged.columns["amount"], merged.at):
      column = np.full(n, np.nan)
      column[kept[order]] = values
      features.append(column)
    if self._keep:
      self._key, self._amount = merged.key, merged.columns["amount"]
      if len(kept):
        self._trim(int(times.max()))
    return CustomerResult(outcome, features)

  def _trim(self, newest: int) -> None:
    self._newest = newest if self._newest is None else max(self._newest, newest)
    stale = (self._key % history.STRIDE) + history.BASE <= self._newest - self._margin
    if stale.sum() * 8 > len(stale):  # trim in steps: each trim copies the history
      self._key, self._amount = self._key[~stale], self._amount[~stale]


def _customer_windows(key: np.ndarray, amount: np.ndarray, at: np.ndarray) -> np.ndarray:
  """Customer features of the rows at sorted positions ``at`` of a (customer, time)-sorted history."""
  sums, squares = history.prefix(amount), history.prefix(amount, squares=True)
  k, a = key[at], amount[at]
  out = []
  starts = {}
  for days in contracts.WINDOWS_DAYS:
    j = starts[days] = history.search(key, k - days * DAY_MS)
    count = at - j + 1
    out += [count.astype(np.float64), exact_div(sums[at + 1] - sums[j], count) / 100.0]
  z = np.zeros(len(at))
  for days in contracts.RATIO_WINDOWS_DAYS:
    j = starts[days]
    count = at - j
    total = sums[at] - sums[j]
    ok = (count > 0) & (total > 0)
    ratio = np.full(len(at), -1.0)
    ratio[ok] = exact_div(a[ok] * count[ok], total[ok])
    out.append(ratio)
    if days == contracts.RATIO_WINDOWS_DAYS[-1]:
      mean = exact_div(total[ok], count[ok])
      variance = exact_div(squares[at[ok]] - squares[j[ok]], count[ok]) - mean * mean
      z[ok] = (a[ok].astype(np.float64) - mean) / np.maximum(np.sqrt(np.maximum(variance, 0.0)), 100.0)
  out.append(z)
  return out


# ----------------------------------------------------------------------------------------------- terminals

class TerminalEngine:
  """Terminal histories of one shard: transaction times and the fraud labels known so far.

  A label counts once per (terminal, transaction id): the first to arrive,
  the earliest by label time within a batch. ``add_labels`` may be called at
  any time: a label only ever counts for transactions at or after its label
  time. ``keep_state=False`` is for a one-pass batch.
  """

  def __init__(self, delay_days: int = 7, lateness_ms: int = 0, keep_state: bool = True):
    if delay_days < 0:
      raise ValueError("delay_days must be >= 0")
    self._delay_ms = delay_days * DAY_MS
    self._margin = self._delay_ms + LONGEST_MS + lateness_ms
    self._keep = keep_state
    self._slots = history.Slots()
    self._key = np.zeros(0, np.int64)            # transactions: slot * stride + time
    self._label_key = np.zeros(0, np.int64)      # frauds: slot * stride + the transaction's time
    self._label_time = np.zeros(0, np.int64)     # ... and when each became known
    self._labelled = history.Index()                    # (terminal, id) of every fraud counted
    self._newest: Optional[int] = None

  def __len__(self) -> int:
    return len(self._key) + len(self._label_key)

  def add_labels(self, labels: pa.Table) -> None:
    """Remembers the fraud labels of ``labels`` (contracts.LABEL); labels that are not frauds are ignored."""
    if labels.num_rows == 0:
      return
    frauds = labels.filter(labels.column("is_fraud"))
    if frauds.num_rows == 0:
      return
    terminal = frauds.column("terminal_id").to_numpy()
    tx_time = frauds.column("tx_time_ms").to_numpy()
    label_time = frauds.column("label_time_ms").to_numpy()
    seen_key = history.entity_key(terminal, history.hash_strings(frauds.column("transaction_id")))
    fresh = np.flatnonzero(self._labelled.find(seen_key) < 0)
    # The earliest label of each new (terminal, id), ties by source position.
    order = fresh[history.order([seen_key[fresh], label_time[fresh]], history.Ties(frauds, fresh, ("source",)))]
    first = np.concatenate(([True], seen_key[order][1:] != seen_key[order][:-1]))
    take = order[first]
    self._labelled.add(seen_key[take], tx_time[take], np.zeros(len(take), np.uint64))
    key = history.time_key(self._slots.of(terminal[take]), tx_time[take])
    ins = np.searchsorted(self._label_key, np.sort(key), side="right")
    sorted_take = take[np.argsort(key, kind="stable")]
    self._label_key = np.insert(self._label_key, ins, key[np.argsort(key, kind="stable")])
    self._label_time = np.insert(self._label_time, ins, label_time[sorted_take])

  def update(self, tx: pa.Table, record: bool = True) -> List[np.ndarray]:
    """Terminal features (one column per TERMINAL_FEATURES name) of the rows of ``tx``.

    The rows join the history unless ``record`` is false (a row that arrives
    after the history has moved past it gets what it would have seen, and
    changes nothing).
    """
    n = tx.num_rows
    if n == 0:
      return [np.zeros(0) for _ in contracts.TERMINAL_FEATURES]
    times = tx.column("event_time_ms").to_numpy()
    key = history.time_key(self._slots.of(tx.column("terminal_id").to_numpy()), times)
    order = history.order([key], history.Ties(tx, np.arange(n)))
    merged = history.merge(self._key, {}, key[order], {})
    features = []
    for values in self._windows(merged.key, merged.at):
      column = np.empty(n)
      column[order] = values
      features.append(column)
    if self._keep and record:
      self._key = merged.key
      self._trim(int(times.max()))
    return features

  def _windows(self, key: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Terminal features of the rows at sorted positions ``at`` of the (terminal, time)-sorted history."""
    k = key[at]
    t = (k % history.STRIDE) + history.BASE
    end = k - self._delay_ms
    end_rows = np.minimum(history.search(key, end), at)  # with no delay, later rows of the same millisecond wait
    frauds, known, latest = _label_counts(t, k, self._delay_ms, self._label_key, self._label_time)
    out = []
    for days in contracts.WINDOWS_DAYS:
      count = end_rows - history.search(key, end - days * DAY_MS)
      out += [count.astype(np.float64), _risk(frauds[days], count)]
    for days in contracts.KNOWN_WINDOWS_DAYS:
      count = at - history.search(key, k - days * DAY_MS)
      out += [known[days].astype(np.float64), _risk(known[days], count)]
    since = np.where(latest >= 0, t - latest, LONGEST_MS)
    out.append(exact_div(np.minimum(since, LONGEST_MS), np.full(len(t), DAY_MS)))
    return out

  def _trim(self, newest: int) -> None:
    self._newest = newest if self._newest is None else max(self._newest, newest)
    horizon = self._newest - self._margin
    stale = (self._key % history.STRIDE) + history.BASE <= horizon
    if stale.sum() * 8 > len(stale):
      self._key = self._key[~stale]
    stale = (self._label_key % history.STRIDE) + history.BASE <= horizon
    if stale.sum() * 8 > len(stale):
      self._label_key, self._label_time = self._label_key[~stale], self._label_time[~stale]
      self._labelled.trim(horizon)


def _risk(frauds: np.ndarray, count: np.ndarray) -> np.ndarray:
  out = np.zeros(len(count))
  some = count > 0
  out[some] = exact_div(frauds[some], count[some])
  return out


_PAIRS_PER_CHUNK = 1 << 22


def _label_counts(t: np.ndarray, k: np.ndarray, delay_ms: int, label_key: np.ndarray, label_time: np.ndarray):
  """Per transaction: known frauds per delayed window and per no-delay window, and the latest one's time.

  Each transaction meets the frauds of its terminal whose transaction time
  lies in (t - delay - 30d, t]; a pair counts when the label is known (label
  time <= t). Pairs are expanded in chunks to bound memory.
  """
  n = len(t)
  frauds = {days: np.zeros(n, np.int64) for days in contracts.WINDOWS_DAYS}
  known = {days: np.zeros(n, np.int64) for days in contracts.KNOWN_WINDOWS_DAYS}
  latest = np.full(n, -1, dtype=np.int64)
  if not len(label_key) or not n:
    return frauds, known, latest
  lo = np.searchsorted(label_key, k - delay_ms - LONGEST_MS, side="right")
  width = np.searchsorted(label_key, k, side="right") - lo
  ends = np.cumsum(width)
  start = 0
  while start < n:
    stop = max(int(np.searchsorted(ends, (ends[start - 1] if start else 0) + _PAIRS_PER_CHUNK, side="right")),
               start + 1)
    w = width[start:stop]
    row = np.repeat(np.arange(start, stop), w)
    first = np.concatenate(([0], np.cumsum(w)[:-1]))
    label = np.repeat(lo[start:stop] - first, w) + np.arange(int(w.sum()))
    ok = label_time[label] <= t[row]
    row, label = row[ok], label[ok]
    fraud_time = (label_key[label] % history.STRIDE) + history.BASE
    end = t[row] - delay_ms
    for days in contracts.WINDOWS_DAYS:
      inside = (fraud_time <= end) & (fraud_time > end - days * DAY_MS)
      frauds[days] += np.bincount(row[inside], minlength=n)
    for days in contracts.KNOWN_WINDOWS_DAYS:
      known[days] += np.bincount(row[fraud_time > t[row] - days * DAY_MS], minlength=n)
    np.maximum.at(latest, row, fraud_time)
    start = stop
  return frauds, known, latest


# ----------------------------------------------------------------------------------------------- assembly

def featured(tx: pa.Table) -> pa.Table:
  """contracts.FEATURED rows of enriched transactions: the row-local features set, the history ones null."""
  weekend, night = time_flags(tx.column("event_time_ms").to_numpy())
  n = tx.num_rows
  local = {"tx_amount": tx.column("amount_minor").to_numpy() / 100.0, "tx_during_weekend": weekend,
           "tx_during_night": night,
           "home_distance": tx.column("home_distance").fill_null(-1.0).to_numpy().astype(np.float64)}
  columns = [tx.column(f.name) for f in contracts.TRANSACTION if f.name != "home_distance"]
  for name in contracts.FEATURE_COLUMNS:
    columns.append(pa.array(local[name]) if name in local else pa.nulls(n, pa.float64()))
  return pa.Table.from_arrays(columns, schema=contracts.FEATURED)


def with_features(table: pa.Table, names, columns: List[np.ndarray]) -> pa.Table:
  """``table`` (contracts.FEATURED) with the features ``names`` (FEATURE_NAMES entries) set to ``columns``."""
  for name, values in zip(names, columns):
    column = name.lower()
    table = table.set_column(table.schema.get_field_index(column), column, pa.array(values))
  return table


class Features(NamedTuple):
  featured: pa.Table    # contracts.FEATURED, the kept rows, input order
  outcome: np.ndarray   # per input row: KEPT, DUPLICATE or CONFLICT


class Outcomes(NamedTuple):
  """What the customer stage makes of a batch: kept rows with their customer features, repeats."""
  featured: pa.Table      # contracts.FEATURED of the kept rows, the terminal features still null
  duplicates: pa.Table    # the run's own exact repeats (contracts.TRANSACTION): filtered, counted
  dead_letters: pa.Table  # the run's own conflicting repeats (contracts.DEAD_LETTER)


def own_rows(table: pa.Table) -> pa.Table:
  """The run's own rows (history rows only feed state: their outcomes belong to an earlier run)."""
  if not table.num_rows:
    return table
  return table.filter(pc.invert(table.column("history")))


def repeats(tx: pa.Table, outcome: np.ndarray) -> Tuple[pa.Table, pa.Table]:
  """(own exact duplicates, dead letters of own conflicting repeats) of a batch and its outcomes."""
  duplicates = own_rows(tx.filter(pa.array(outcome == DUPLICATE)))
  conflicts = own_rows(tx.filter(pa.array(outcome == CONFLICT)))
  dead = dead_letters.table(
      conflicts.column("source").to_pylist(), [None] * conflicts.num_rows, contracts.FEATURES,
      contracts.CONFLICTING_DUPLICATE, "",
      [f"transaction_id {i} reused with other content" for i in conflicts.column("transaction_id").to_pylist()])
  return duplicates, dead


def outcomes(tx: pa.Table, result: CustomerResult) -> Outcomes:
  """The customer stage's outputs for an enriched batch and its ``CustomerEngine.update`` result."""
  kept = np.flatnonzero(result.outcome == KEPT)
  rows = tx if len(kept) == tx.num_rows else tx.take(pa.array(kept))
  table = with_features(featured(rows), contracts.CUSTOMER_FEATURES, [c[kept] for c in result.features])
  return Outcomes(table, *repeats(tx, result.outcome))


class FeatureEngine:
  """Both engines for one process holding every key (the live hot path, training, a one-pass reference)."""

  def __init__(self, delay_days: int = 7, lateness_ms: int = 0, keep_state: bool = True):
    self.customers = CustomerEngine(lateness_ms, keep_state)
    self.terminals = TerminalEngine(delay_days, lateness_ms, keep_state)

  def add_labels(self, labels: pa.Table) -> None:
    self.terminals.add_labels(labels)

  def update(self, tx: pa.Table) -> Features:
    """Features of an enriched batch, processed in (event time, transaction_id) order after what is held."""
    customer = self.customers.update(tx)
    table = outcomes(tx, customer).featured
    return Features(with_features(table, contracts.TERMINAL_FEATURES, self.terminals.update(table)),
                    customer.outcome)
