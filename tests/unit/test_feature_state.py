"""The per-key feature computations, checked against a brute-force definition."""
import random

from tests.reference_features import DAY_MS, CustomerHistory, TerminalHistory, time_flags


def _brute_customer(events, t):
  out = []
  for n in (1, 7, 30):
    window = [a for (s, a) in events if t - n * DAY_MS < s <= t]
    out += [float(len(window)), sum(window) / len(window) / 100.0]
  amount = events[-1][1]
  z = 0.0
  for n in (7, 30):
    earlier = [a for (s, a) in events[:-1] if t - n * DAY_MS < s <= t]
    out.append(amount / (sum(earlier) / len(earlier)) if earlier else -1.0)
    if n == 30 and earlier:
      mean = sum(earlier) / len(earlier)
      std = (sum((a - mean) ** 2 for a in earlier) / len(earlier)) ** 0.5
      z = (amount - mean) / max(std, 100.0)
  return tuple(out + [z])


def _close(got, want):
  return len(got) == len(want) and all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(got, want))


def test_customer_windows_match_definition():
  rng = random.Random(3)
  # Bursts on some days, gaps of weeks on others, so windows empty and refill and pruning runs.
  times = sorted(rng.randrange(0, 90 * DAY_MS) for _ in range(600))
  times += sorted(rng.randrange(150 * DAY_MS, 160 * DAY_MS) for _ in range(200))
  history, seen = CustomerHistory(), []
  for t in times:
    amount = rng.randrange(1, 50_000)
    seen.append((t, amount))
    got = history.add(t, amount)
    want = _brute_customer(seen, t)
    assert got[0:6:2] == want[0:6:2]
    assert _close(got, want), (got, want)


def _brute_customer_seen(seen, current):
  """Features of ``current`` from what has been seen: what is at or before its time counts."""
  t, amount = current
  earlier = list(seen)
  earlier.remove(current)
  before = sorted(e for e in earlier if e[0] <= t)
  return _brute_customer(before + [current], t)


def test_customer_out_of_order_arrivals_count_only_what_is_at_or_before():
  # The live hot path can see a customer's transactions slightly out of
  # order; each is placed by its time and later windows are unaffected.
  rng = random.Random(5)
  events = [(rng.randrange(0, 60 * DAY_MS), rng.randrange(1, 50_000)) for _ in range(400)]
  events.sort()
  arrivals = list(events)
  for i in range(0, len(arrivals) - 8, 8):  # shuffle within runs of 8
    chunk = arrivals[i:i + 8]
    rng.shuffle(chunk)
    arrivals[i:i + 8] = chunk
  history, seen = CustomerHistory(), []
  for t, amount in arrivals:
    seen.append((t, amount))
    got = history.add(t, amount)
    assert _close(got, _brute_customer_seen(seen, (t, amount))), (t, got)
  ordered = CustomerHistory()
  for t, amount in events:
    ordered.add(t, amount)
  later = events[-1][0] + 1
  assert _close(history.add(later, 777), ordered.add(later, 777))


def test_terminal_out_of_order_arrivals_match_in_order_state():
  rng = random.Random(6)
  times = sorted(rng.randrange(0, 60 * DAY_MS) for _ in range(300))
  arrivals = list(times)
  for i in range(0, len(arrivals) - 5, 5):
    chunk = arrivals[i:i + 5]
    rng.shuffle(chunk)
    arrivals[i:i + 5] = chunk
  shuffled, ordered = TerminalHistory(7), TerminalHistory(7)
  for t in arrivals:
    shuffled.add(t)
  for t in times:
    ordered.add(t)
  for probe in (times[-1] + 1, times[-1] + 3 * DAY_MS, times[len(times) // 2]):
    assert shuffled.peek(probe) == ordered.peek(probe)


def test_customer_amount_versus_earlier_by_hand():
  history = CustomerHistory()
  # First transaction: nothing earlier, ratio -1 and z 0.
  assert history.add(0, 1_000)[6:] == (-1.0, -1.0, 0.0)
  history.add(DAY_MS, 3_000)
  # Earlier amounts 10 and 30 (mean 20, std 10): 100 is 5x the mean, z = (10000 - 2000) / 1000.
  assert history.add(2 * DAY_MS, 10_000)[6:] == (5.0, 5.0, 8.0)
  # Eight days later the 7-day window holds nothing earlier; the 30-day one holds 10, 30 and 100.
  got = history.add(10 * DAY_MS, 7_000)
  assert got[6:8] == (-1.0, 7_000 / (14_000 / 3))
  # A constant spender has std 0: the z-score falls back to 1 currency unit.
  flat = CustomerHistory()
  flat.add(0, 500)
  assert flat.add(1, 800)[8] == 3.0


def test_customer_window_edges_are_half_open():
  history = CustomerHistory()
  history.add(0, 100)
  # Exactly one day later the first transaction has left the 1-day window (t - 1d, t].
  assert history.add(DAY_MS, 300)[:2] == (1.0, 3.0)
  assert history.add(DAY_MS + 1, 500)[:2] == (2.0, 4.0)


def _brute_terminal(txs, frauds, t, delay=7):
  """txs: earlier (time, id); frauds: {id: tx time} of the frauds whose label is known at t."""
  out = []
  end = t - delay * DAY_MS
  for n in (1, 7, 30):
    window = [(s, i) for (s, i) in txs if end - n * DAY_MS < s <= end]
    nb = len(window)
    known = sum(1 for (s, i) in window if i in frauds)
    out += [float(nb), known / nb if nb else 0.0]
  for n in (7, 30):
    earlier = [i for (s, i) in txs if t - n * DAY_MS < s <= t]
    known = sum(1 for s in frauds.values() if t - n * DAY_MS < s <= t)
    out += [float(known), known / len(earlier) if earlier else 0.0]
  recent = [s for s in frauds.values() if t - 30 * DAY_MS < s <= t]
  out.append((t - max(recent)) / DAY_MS if recent else 30.0)
  return tuple(out)


def test_terminal_windows_and_known_frauds_match_definition():
  rng = random.Random(5)
  history = TerminalHistory(delay_days=7)
  txs, known = [], {}
  events = sorted((rng.randrange(0, 120 * DAY_MS), i) for i in range(800))
  tx_time = {i: s for s, i in events}
  fraud_label_at = {i: s + rng.randrange(DAY_MS, 7 * DAY_MS) for s, i in events if rng.random() < 0.2}
  labels = sorted((at, i) for i, at in fraud_label_at.items())
  li = 0
  for t, i in events:
    while li < len(labels) and labels[li][0] <= t:
      _, fid = labels[li]
      history.add_label(f"t{fid}", tx_time[fid])
      known[fid] = tx_time[fid]
      li += 1
    got = history.add(t)
    want = _brute_terminal(txs, known, t)
    assert got[:6] == want[:6]
    assert _close(got, want), (got, want)
    txs.append((t, i))


def test_terminal_known_frauds_by_hand():
  history = TerminalHistory(delay_days=7)
  for d in range(4):
    history.add(d * DAY_MS)
  # The day-1 transaction turns out to be a fraud; its chargeback arrives on day 3.5.
  history.add_label("x", DAY_MS)
  got = history.add(4 * DAY_MS)
  # No delayed window sees anything yet (all before t - 7 days is empty).
  assert got[:6] == (0.0,) * 6
  # 1 known fraud among the 4 earlier transactions of the last 7 and 30 days, 3 days ago.
  assert got[6:] == (1.0, 0.25, 1.0, 0.25, 3.0)
  # Nine days later the fraud has left the 7-day window but not the 30-day one.
  assert history.add(10 * DAY_MS)[6:] == (0.0, 0.0, 1.0, 0.2, 9.0)
  # A label repeated (a retried message) counts once.
  history.add_label("x", DAY_MS)
  assert history.add(10 * DAY_MS + 1)[8] == 1.0


def test_time_flags():
  assert time_flags(1522540800000) == (1.0, 1.0)  # 2018-04-01 00:00 UTC, a Sunday
  assert time_flags(1522540800000 + DAY_MS + 12 * 3_600_000) == (0.0, 0.0)  # Monday noon
  assert time_flags(1522540800000 + DAY_MS + 6 * 3_600_000 + 59 * 60_000) == (0.0, 1.0)


def test_duplicates():
  history = CustomerHistory()
  assert history.is_duplicate("a", 1, 11) is None
  assert history.is_duplicate("a", 1, 11) == "duplicate"
  assert history.is_duplicate("a", 1, 12) == "conflicting_duplicate"
