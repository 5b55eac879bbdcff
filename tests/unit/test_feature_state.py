"""The per-key feature computations, checked against a brute-force definition."""
import random

from txstream.transforms.feature_state import DAY_MS, CustomerHistory, TerminalHistory, time_flags


def _brute_customer(events, t):
  out = []
  for n in (1, 7, 30):
    window = [a for (s, a) in events if t - n * DAY_MS < s <= t]
    out += [float(len(window)), sum(window) / len(window) / 100.0]
  return tuple(out)


def test_customer_windows_match_definition():
  rng = random.Random(3)
  times = sorted(rng.randrange(0, 90 * DAY_MS) for _ in range(600))
  history, seen = CustomerHistory(), []
  for t in times:
    amount = rng.randrange(1, 50_000)
    seen.append((t, amount))
    got = history.add(t, amount)
    want = _brute_customer(seen, t)
    assert got[0::2] == want[0::2]
    assert all(abs(a - b) < 1e-9 for a, b in zip(got[1::2], want[1::2]))


def test_customer_window_edges_are_half_open():
  history = CustomerHistory()
  history.add(0, 100)
  # Exactly one day later the first transaction has left the 1-day window (t - 1d, t].
  assert history.add(DAY_MS, 300)[:2] == (1.0, 3.0)
  assert history.add(DAY_MS + 1, 500)[:2] == (2.0, 4.0)


def _brute_terminal(txs, frauds, t, delay=7):
  out = []
  end = t - delay * DAY_MS
  for n in (1, 7, 30):
    window = [(s, i) for (s, i) in txs if end - n * DAY_MS < s <= end]
    nb = len(window)
    known = sum(1 for (s, i) in window if i in frauds)
    out += [float(nb), known / nb if nb else 0.0]
  return tuple(out)


def test_terminal_delayed_windows_and_known_frauds():
  rng = random.Random(5)
  history = TerminalHistory(delay_days=7)
  txs, known = [], set()
  events = sorted((rng.randrange(0, 120 * DAY_MS), i) for i in range(800))
  fraud_label_at = {i: s + rng.randrange(DAY_MS, 7 * DAY_MS) for s, i in events if rng.random() < 0.2}
  labels = sorted((at, i) for i, at in fraud_label_at.items())
  li = 0
  for t, i in events:
    while li < len(labels) and labels[li][0] <= t:
      at, fid = labels[li]
      history.add_label(f"t{fid}", dict((j, s) for s, j in events)[fid])
      known.add(fid)
      li += 1
    got = history.add(t)
    want = _brute_terminal(txs, known, t)
    assert got == want
    txs.append((t, i))


def test_time_flags():
  assert time_flags(1522540800000) == (1.0, 1.0)  # 2018-04-01 00:00 UTC, a Sunday
  assert time_flags(1522540800000 + DAY_MS + 12 * 3_600_000) == (0.0, 0.0)  # Monday noon
  assert time_flags(1522540800000 + DAY_MS + 6 * 3_600_000 + 59 * 60_000) == (0.0, 1.0)


def test_duplicates():
  history = CustomerHistory()
  assert history.is_duplicate("a", 1, 11) is None
  assert history.is_duplicate("a", 1, 11) == "duplicate"
  assert history.is_duplicate("a", 1, 12) == "conflicting_duplicate"
