"""Transaction simulator: determinism, geometry, rates and the three fraud scenarios."""
import datetime
import math

import numpy as np
import pytest

from txstream.pipelines import simulator

START = datetime.date(2018, 4, 1)
START_MS = 1_522_540_800_000  # 2018-04-01T00:00:00Z
DAYS = 60
RADIUS = 5.0
# Share of N(43200, 20000) inside [0, 86400): the rest is discarded, not redrawn.
KEEP = math.erf(43_200 / (20_000 * math.sqrt(2)))


@pytest.fixture(scope="module")
def sim():
  return simulator.simulate(5000, 10000, DAYS, START, seed=7, radius=RADIUS)


def _small(seed, **kw):
  args = {"n_customers": 300, "n_terminals": 600, "days": 20, "start": START, "seed": seed}
  args.update(kw)
  return simulator.simulate(**args)


def test_same_seed_gives_identical_arrays():
  a, b = _small(3), _small(3)
  assert a.n_transactions == b.n_transactions > 0
  for part in ("customers", "terminals", "transactions"):
    x, y = getattr(a, part), getattr(b, part)
    assert x.keys() == y.keys()
    for key in x:
      assert x[key].dtype == y[key].dtype
      assert x[key].tobytes() == y[key].tobytes(), (part, key)


def test_different_seed_differs():
  a, b = _small(3), _small(4)
  assert not np.array_equal(a.customers["x"], b.customers["x"])
  assert not np.array_equal(a.terminals["x"], b.terminals["x"])
  assert a.n_transactions != b.n_transactions or not np.array_equal(
      a.transactions["amount_cents"], b.transactions["amount_cents"])


def test_schema_and_ids(sim):
  c, t, tx = sim.customers, sim.terminals, sim.transactions
  assert set(c) == {"customer_id", "x", "y", "mean_amount", "std_amount", "mean_nb_tx_per_day"}
  assert set(t) == {"terminal_id", "x", "y"}
  assert np.array_equal(c["customer_id"], np.arange(5000))
  assert np.array_equal(t["terminal_id"], np.arange(10000))
  assert c["customer_id"].dtype == t["terminal_id"].dtype == np.int64
  expected = {"tx_index": np.int64, "event_time_ms": np.int64, "customer_id": np.int64, "terminal_id": np.int64,
              "amount_cents": np.int64, "is_fraud": np.bool_, "fraud_scenario": np.int8, "label_time_ms": np.int64}
  assert {k: v.dtype.type for k, v in tx.items()} == expected
  assert all(len(v) == sim.n_transactions for v in tx.values())
  assert np.array_equal(tx["tx_index"], np.arange(sim.n_transactions))
  assert not tx["amount_cents"].flags.writeable
  assert sim.start == START and sim.seed == 7


def test_profiles_follow_the_published_ranges(sim):
  c, t = sim.customers, sim.terminals
  for xy in (c["x"], c["y"], t["x"], t["y"]):
    assert xy.min() >= 0 and xy.max() < 100
  assert c["mean_amount"].min() >= 5 and c["mean_amount"].max() < 100
  assert np.array_equal(c["std_amount"], c["mean_amount"] / 2)
  assert c["mean_nb_tx_per_day"].min() >= 0 and c["mean_nb_tx_per_day"].max() < 4
  assert abs(c["mean_nb_tx_per_day"].mean() - 2) < 0.1


def test_terminal_within_radius_of_customer(sim):
  c, t, tx = sim.customers, sim.terminals, sim.transactions
  dist = np.sqrt((c["x"][tx["customer_id"]] - t["x"][tx["terminal_id"]]) ** 2
                 + (c["y"][tx["customer_id"]] - t["y"][tx["terminal_id"]]) ** 2)
  assert dist.max() < RADIUS


def test_available_terminals_matches_brute_force():
  rng = np.random.default_rng(11)
  cx, cy, tx, ty = (rng.uniform(0, 100, n) for n in (400, 400, 900, 900))
  for radius in (0.7, 5.0, 23.0, 300.0):
    offsets, ids = simulator.available_terminals(cx, cy, tx, ty, radius)
    dist = np.sqrt((cx[:, None] - tx[None, :]) ** 2 + (cy[:, None] - ty[None, :]) ** 2)
    assert len(offsets) == 401
    for i in range(400):
      assert np.array_equal(ids[offsets[i]:offsets[i + 1]], np.nonzero(dist[i] < radius)[0]), (radius, i)


def test_customer_without_terminal_makes_no_transaction():
  s = _small(5, n_terminals=40, radius=2.0)
  c, t = s.customers, s.terminals
  dist = np.sqrt((c["x"][:, None] - t["x"][None, :]) ** 2 + (c["y"][:, None] - t["y"][None, :]) ** 2)
  lonely = np.nonzero((dist >= 2.0).all(axis=1))[0]
  assert len(lonely) > 100  # the case is really exercised
  assert not np.isin(s.transactions["customer_id"], lonely).any()
  assert s.n_transactions > 0


def test_times_in_range_and_sorted(sim):
  tx = sim.transactions
  ev = tx["event_time_ms"]
  assert ev.min() >= START_MS
  assert ev.max() < START_MS + DAYS * 86_400_000
  assert np.all(np.diff(ev) >= 0)
  assert np.all(ev % 1000 == 0)  # whole seconds
  days = (ev - START_MS) // 86_400_000
  assert np.array_equal(np.unique(days), np.arange(DAYS))
  # Time of day ~ N(12 h, 20000 s), truncated symmetrically to the day.
  seconds = (ev - START_MS) % 86_400_000 / 1000
  assert abs(seconds.mean() - 43_200) < 300
  assert 17_000 < seconds.std() < 20_000


def test_amounts_non_negative(sim):
  assert sim.transactions["amount_cents"].min() >= 0


def test_scenario1_is_exactly_the_large_unmultiplied_amounts(sim):
  tx = sim.transactions
  amount, scenario = tx["amount_cents"], tx["fraud_scenario"]
  large = amount > 22_000
  assert tx["is_fraud"][large].all()
  # Scenario 1 is decided on the original amounts, before scenario 3 multiplies
  # some of them; so outside scenario 3, "large" and "scenario 1" coincide.
  assert np.array_equal(large & (scenario != 3), scenario == 1)
  assert (scenario == 1).sum() == (large & (scenario != 3)).sum() > 0


def test_scenario3_amounts_are_five_times_an_ordinary_amount(sim):
  tx = sim.transactions
  s3 = tx["amount_cents"][tx["fraud_scenario"] == 3]
  assert len(s3) > 0
  assert np.all(s3 % 5 == 0)
  assert s3.max() <= 5 * 22_000
  # Three customers a day at most, and their 14-day windows.
  customers = np.unique(tx["customer_id"][tx["fraud_scenario"] == 3])
  assert len(customers) <= 3 * DAYS


def test_scenario2_covers_whole_terminal_days(sim):
  tx = sim.transactions
  day = (tx["event_time_ms"] - START_MS) // 86_400_000
  key = tx["terminal_id"] * DAYS + day
  hit = np.unique(key[tx["fraud_scenario"] == 2])
  assert len(hit) > 0
  on_hit = np.isin(key, hit)
  # A compromised terminal-day has no genuine and no scenario-3 transaction.
  assert set(np.unique(tx["fraud_scenario"][on_hit]).tolist()) <= {1, 2}
  # Two terminals a day, at most 28 days each.
  assert len(np.unique(tx["terminal_id"][tx["fraud_scenario"] == 2])) <= 2 * DAYS


def test_fraud_rate_and_scenarios(sim):
  tx = sim.transactions
  assert 0.003 < tx["is_fraud"].mean() < 0.02
  counts = np.bincount(tx["fraud_scenario"], minlength=4)
  assert len(counts) == 4
  assert all(counts[1:] > 0)
  assert np.array_equal(tx["is_fraud"], tx["fraud_scenario"] > 0)


def test_labels(sim):
  tx = sim.transactions
  fraud = tx["is_fraud"]
  delay = tx["label_time_ms"][fraud] - tx["event_time_ms"][fraud]
  assert delay.min() >= 86_400_000 and delay.max() <= 7 * 86_400_000
  # Uniform over the range, not stuck at a bound, and not whole seconds only.
  assert abs(delay.mean() - 4 * 86_400_000) < 0.2 * 86_400_000
  assert np.any(delay % 1000 != 0)
  assert np.all(tx["label_time_ms"][~fraud] == -1)


def test_transactions_per_customer_per_day(sim):
  c, tx = sim.customers, sim.transactions
  per_day = sim.n_transactions / (len(c["customer_id"]) * DAYS)
  lam = c["mean_nb_tx_per_day"]
  assert abs(per_day / lam.mean() - 1) < 0.10
  # Exact expectation: Poisson means of customers that have a terminal (all of
  # them at this density, checked below), thinned by the discarded times.
  offsets, _ = simulator.available_terminals(c["x"], c["y"], sim.terminals["x"], sim.terminals["y"], RADIUS)
  served = np.diff(offsets) > 0
  assert served.mean() > 0.99
  expected = lam[served].sum() * DAYS * KEEP
  assert abs(sim.n_transactions / expected - 1) < 0.02
  # Without the discarding the count would be ~3 % higher.
  assert sim.n_transactions < 0.99 * lam[served].sum() * DAYS


@pytest.mark.parametrize("kwargs, word", [
    ({"n_customers": 0}, "n_customers"),
    ({"n_terminals": 0}, "n_terminals"),
    ({"days": 0}, "days"),
    ({"days": -3}, "days"),
    ({"radius": 0.0}, "radius"),
    ({"radius": -1.0}, "radius"),
    ({"radius": float("nan")}, "radius"),
    ({"seed": -1}, "seed"),
    ({"start": datetime.datetime(2018, 4, 1, 12)}, "start"),
])
def test_bad_arguments(kwargs, word):
  args = {"n_customers": 10, "n_terminals": 10, "days": 2, "start": START, "seed": 0}
  args.update(kwargs)
  with pytest.raises(ValueError, match=word):
    simulator.simulate(**args)


def test_tiny_population_works():
  s = simulator.simulate(1, 1, 3, START, 0, radius=200.0)
  tx = s.transactions
  assert np.all(tx["customer_id"] == 0) and np.all(tx["terminal_id"] == 0)
  assert np.array_equal(tx["tx_index"], np.arange(s.n_transactions))


def _fraud_runs(fraud_days: np.ndarray, days: int) -> list:
  """Lengths of maximal runs of consecutive fraud days that end before the last day."""
  padded = np.concatenate([[False], fraud_days, [False]]).astype(np.int8)
  edges = np.diff(padded)
  starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
  return [int(e - s) for s, e in zip(starts, ends) if e < days]


def test_scenario2_window_is_28_days():
  # One transaction per terminal per day, so compromise windows show up as runs.
  n_terminals, days = 1000, 100
  tx = {"terminal_id": np.repeat(np.arange(n_terminals), days), "day": np.tile(np.arange(days), n_terminals)}
  scenario = np.zeros(n_terminals * days, dtype=np.int8)
  simulator._scenario2(np.random.default_rng(0), tx, scenario, n_terminals, days)
  fraud = (scenario == 2).reshape(n_terminals, days)
  assert fraud.sum(axis=0)[0] == 2  # two terminals on day 0
  runs = [r for row in fraud for r in _fraud_runs(row, days)]
  # Overlapping windows merge into longer runs; an isolated one is 28 days long.
  assert min(runs) == 28
  assert runs.count(28) > 50


def test_scenario3_takes_a_third_of_a_14_day_window():
  # Three transactions per customer per day: a full window holds 42, a third is 14.
  n_customers, days = 2000, 40
  customer = np.repeat(np.arange(n_customers), 3 * days)
  day = np.tile(np.repeat(np.arange(days), 3), n_customers)
  tx = {"customer_id": customer, "day": day, "amount_cents": np.full(len(day), 1000, dtype=np.int64)}
  scenario = np.zeros(len(day), dtype=np.int8)
  scenario[::97] = 1  # already fraud: must be left alone
  simulator._scenario3(np.random.default_rng(0), tx, scenario, n_customers, days)
  s3 = scenario == 3
  assert np.all(tx["amount_cents"][s3] == 5000)
  assert np.all(tx["amount_cents"][~s3] == 1000)
  assert np.all(scenario[::97] == 1)
  per_customer = np.bincount(customer[s3], minlength=n_customers)
  hit = per_customer[per_customer > 0]
  assert len(hit) <= 3 * days
  # Most compromised customers are drawn once with a full window: 14, minus
  # any already-fraud transactions among the drawn ones.
  assert np.bincount(hit).argmax() == 14
  assert np.isin(hit, (13, 14)).mean() > 0.5
  first_day, last_day = (np.array([f(day[s3 & (customer == c)]) for c in np.nonzero(per_customer)[0]])
                         for f in (np.min, np.max))
  assert np.median(last_day - first_day) <= 13


def test_card_tokens_cannot_be_recomputed_without_the_key(tmp_path, monkeypatch):
  import hashlib
  import hmac
  from txstream.pipelines import generate
  monkeypatch.delenv("TXSTREAM_TOKEN_KEY", raising=False)
  tokens = generate.card_tokens(5)
  guesses = {hmac.new(f"txstream-demo-token-key-{seed}".encode(), generate.card_number(c).encode(),
                      hashlib.sha256).hexdigest() for seed in range(10) for c in range(5)}
  assert not set(tokens) & guesses, "no key derivable from the seed"
  assert generate.token_key_source() == "one-off random key, not stored"
  monkeypatch.setenv("TXSTREAM_TOKEN_KEY", "k1")
  assert generate.card_tokens(5)[0] == hmac.new(b"k1", generate.card_number(0).encode(), hashlib.sha256).hexdigest()
  assert generate.token_key_source() == "TXSTREAM_TOKEN_KEY"
