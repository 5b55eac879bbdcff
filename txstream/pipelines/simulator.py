"""Seeded, vectorised card-transaction simulator.

The design is the published one from the Fraud Detection Handbook (Le Borgne
et al., "Reproducible Machine Learning for Credit Card Fraud Detection",
chapter "Transaction data simulator"), re-implemented here from its
description with numpy:

* customers live at a uniform point of a 100 x 100 square and have a spending
  profile: mean amount ~ U(5, 100), std = mean / 2, mean number of
  transactions per day ~ U(0, 4);
* terminals sit at uniform points of the same square; a customer uses the
  terminals strictly within ``radius`` of home (none: no transactions);
* each day a customer makes Poisson(mean per day) transactions; time of day
  ~ N(12 h, 20000 s), draws outside the day are discarded (about 3 %);
  amount ~ N(mean, std), a negative draw is replaced by U(0, 2 * mean);
  amounts are rounded to cents; the terminal is uniform among the
  customer's available terminals.

Fraud scenarios, applied in this order (a transaction keeps the scenario that
marked it first):

1. any amount above 220 is fraud;
2. each day 2 terminals are compromised: every transaction on them during
   that day and the 27 following days is fraud;
3. each day 3 customers are compromised: over that day and the 13 following
   days, floor(n / 3) of each one's n transactions, drawn without
   replacement, get their amount multiplied by 5 and are fraud (those already
   fraud are left as they are).

Every fraud gets a label (chargeback) time 1 to 7 days (uniform, millisecond
resolution) after the transaction; genuine transactions get -1.

All randomness comes from one seed through ``np.random.SeedSequence``
children, one per stage, so the same arguments give byte-identical arrays.
"""
import dataclasses
import datetime
import logging
import math
import time

import numpy as np

_LOGGER = logging.getLogger(__name__)

DAY_SECONDS = 86_400
DAY_MS = DAY_SECONDS * 1000
GRID = 100.0
TIME_MEAN_S = DAY_SECONDS / 2
TIME_STD_S = 20_000.0
SCENARIO1_LIMIT_CENTS = 22_000
TERMINALS_PER_DAY = 2
TERMINAL_WINDOW_DAYS = 28
CUSTOMERS_PER_DAY = 3
CUSTOMER_WINDOW_DAYS = 14
SCENARIO3_FACTOR = 5
LABEL_DELAY_MS = (DAY_MS, 7 * DAY_MS)
# Bounds the number of grid cells when the radius is tiny; cells may be larger
# than the radius (the 3x3 neighbourhood still covers it), never smaller.
_MAX_CELLS_PER_AXIS = 1024
# Bounds the candidate (customer, terminal) pairs held at once.
_PAIR_BUDGET = 4_000_000
_STAGES = ("customers", "terminals", "transactions", "scenario2", "scenario3", "labels")


@dataclasses.dataclass(frozen=True, eq=False)
class Simulation:
  """Result of ``simulate``; arrays are read-only.

  ``transactions`` columns (same length, sorted by (event_time_ms, tx_index)):
  tx_index, event_time_ms, customer_id, terminal_id, amount_cents (int64),
  is_fraud (bool), fraud_scenario (int8, 0 = genuine), label_time_ms (int64,
  -1 for genuine).
  """
  start: datetime.date
  seed: int
  customers: dict[str, np.ndarray]
  terminals: dict[str, np.ndarray]
  transactions: dict[str, np.ndarray]

  @property
  def n_transactions(self) -> int:
    return int(len(self.transactions["tx_index"]))


def _check_args(n_customers, n_terminals, days, start, seed, radius) -> None:
  for name, value in (("n_customers", n_customers), ("n_terminals", n_terminals), ("days", days)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
      raise ValueError(f"{name} must be at least 1, got {value}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if not isinstance(radius, (int, float, np.integer, np.floating)) or not radius > 0 or not math.isfinite(radius):
    raise ValueError(f"radius must be a positive finite number, got {radius!r}")
  # A datetime would silently lose its time of day; only calendar dates are meaningful.
  if not isinstance(start, datetime.date) or isinstance(start, datetime.datetime):
    raise ValueError(f"start must be a datetime.date, got {start!r}")


def _customers(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
  x = rng.uniform(0, GRID, n)
  y = rng.uniform(0, GRID, n)
  mean = rng.uniform(5, 100, n)
  per_day = rng.uniform(0, 4, n)
  return {"customer_id": np.arange(n, dtype=np.int64), "x": x, "y": y, "mean_amount": mean,
          "std_amount": mean / 2, "mean_nb_tx_per_day": per_day}


def _terminals(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
  x = rng.uniform(0, GRID, n)
  y = rng.uniform(0, GRID, n)
  return {"terminal_id": np.arange(n, dtype=np.int64), "x": x, "y": y}


def _cell_index(values: np.ndarray, origin: float, cell: float) -> np.ndarray:
  # +1 leaves an empty border row/column so neighbour cells never go negative.
  return np.floor((values - origin) / cell).astype(np.int64) + 1


def available_terminals(cx: np.ndarray, cy: np.ndarray, tx: np.ndarray, ty: np.ndarray,
                        radius: float) -> tuple[np.ndarray, np.ndarray]:
  """Terminals strictly within ``radius`` of each customer, as CSR arrays.

  Returns (offsets, terminal_ids): customer i's terminals, in increasing id
  order, are terminal_ids[offsets[i]:offsets[i + 1]]. Terminals are bucketed
  in a grid of cells at least ``radius`` wide, so only the 3x3 surrounding
  cells are candidates; customers are processed in chunks bounded by the
  number of candidate pairs, never as a dense customers x terminals matrix.
  """
  n_c = len(cx)
  if n_c == 0 or len(tx) == 0:
    return np.zeros(n_c + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
  ox, oy = min(cx.min(), tx.min()), min(cy.min(), ty.min())
  span = max(cx.max(), tx.max()) - ox, max(cy.max(), ty.max()) - oy
  cell = max(float(radius), max(span) / _MAX_CELLS_PER_AXIS, 1e-12)
  t_i, t_j = _cell_index(tx, ox, cell), _cell_index(ty, oy, cell)
  c_i, c_j = _cell_index(cx, ox, cell), _cell_index(cy, oy, cell)
  n_j = int(max(t_j.max(), c_j.max())) + 2
  n_cells = (int(max(t_i.max(), c_i.max())) + 2) * n_j
  t_cell = t_i * n_j + t_j
  by_cell = np.argsort(t_cell, kind="stable")
  cell_start = np.zeros(n_cells + 1, dtype=np.int64)
  np.cumsum(np.bincount(t_cell, minlength=n_cells), out=cell_start[1:])
  # (customer, neighbour cell) start and count of candidate terminals.
  shifts = np.array([di * n_j + dj for di in (-1, 0, 1) for dj in (-1, 0, 1)], dtype=np.int64)
  keys = (c_i * n_j + c_j)[:, None] + shifts[None, :]
  first, count = cell_start[keys], cell_start[keys + 1] - cell_start[keys]
  per_customer = count.sum(axis=1)
  bounds = _chunk_bounds(per_customer, _PAIR_BUDGET)
  chunks = [_near_pairs(lo, hi, first, count, by_cell, cx, cy, tx, ty, radius)
            for lo, hi in zip(bounds[:-1], bounds[1:])]
  owner = np.concatenate([c[0] for c in chunks])
  terminal = np.concatenate([c[1] for c in chunks])
  offsets = np.zeros(n_c + 1, dtype=np.int64)
  np.cumsum(np.bincount(owner, minlength=n_c), out=offsets[1:])
  return offsets, terminal


def _chunk_bounds(weights: np.ndarray, budget: int) -> np.ndarray:
  cum = np.cumsum(weights)
  total = int(cum[-1]) if len(cum) else 0
  cuts = np.searchsorted(cum, np.arange(budget, total, budget), side="right")
  return np.unique(np.concatenate([[0], cuts, [len(weights)]]))


def _near_pairs(lo, hi, first, count, by_cell, cx, cy, tx, ty, radius):
  """(customer, terminal) pairs within radius for customers lo..hi-1, sorted by both."""
  cnt = count[lo:hi].ravel()
  total = int(cnt.sum())
  owner = np.repeat(np.repeat(np.arange(lo, hi, dtype=np.int64), 9), cnt)
  # Position inside each neighbour cell's run of terminals, shifted to the run's start.
  run_start = np.repeat(np.cumsum(cnt) - cnt, cnt)
  pos = np.arange(total, dtype=np.int64) - run_start + np.repeat(first[lo:hi].ravel(), cnt)
  terminal = by_cell[pos]
  near = np.sqrt((tx[terminal] - cx[owner]) ** 2 + (ty[terminal] - cy[owner]) ** 2) < radius
  owner, terminal = owner[near], terminal[near]
  order = np.lexsort((terminal, owner))
  return owner[order], terminal[order].astype(np.int64)


def _transactions(rng: np.random.Generator, customers: dict[str, np.ndarray], offsets: np.ndarray,
                  terminal_ids: np.ndarray, days: int) -> dict[str, np.ndarray]:
  """Genuine transactions in (customer, day) order, before any fraud."""
  n_c = len(customers["customer_id"])
  n_available = np.diff(offsets)
  counts = rng.poisson(customers["mean_nb_tx_per_day"][:, None], size=(n_c, days))
  # Customers without a terminal cannot transact at all.
  counts[n_available == 0] = 0
  slot = np.repeat(np.arange(n_c * days, dtype=np.int64), counts.ravel())
  seconds = rng.normal(TIME_MEAN_S, TIME_STD_S, len(slot))
  # Out-of-day times are dropped, not redrawn, as in the published design.
  keep = (seconds >= 0) & (seconds < DAY_SECONDS)
  slot, seconds = slot[keep], np.floor(seconds[keep]).astype(np.int64)
  customer, day = slot // days, slot % days
  mean = customers["mean_amount"][customer]
  amount = rng.normal(mean, customers["std_amount"][customer])
  negative = amount < 0
  amount[negative] = rng.uniform(0, 2 * mean[negative])
  pick = rng.integers(0, n_available[customer])
  terminal = terminal_ids[offsets[customer] + pick]
  return {"customer_id": customer, "day": day, "seconds": seconds, "terminal_id": terminal,
          "amount_cents": np.rint(amount * 100).astype(np.int64)}


def _scenario2(rng: np.random.Generator, tx: dict[str, np.ndarray], scenario: np.ndarray,
               n_terminals: int, days: int) -> None:
  """Marks transactions on compromised terminals during their compromise window."""
  per_day = min(TERMINALS_PER_DAY, n_terminals)
  drawn = np.stack([rng.choice(n_terminals, size=per_day, replace=False) for _ in range(days)])
  # Sparse set of compromised (terminal, day) keys, so memory does not grow with terminals x days.
  start_day = np.repeat(np.arange(days, dtype=np.int64), per_day)
  window_day = start_day[:, None] + np.arange(TERMINAL_WINDOW_DAYS)[None, :]
  window_terminal = np.broadcast_to(drawn.reshape(-1, 1), window_day.shape)
  inside = window_day < days
  keys = np.unique(window_terminal[inside] * days + window_day[inside])
  tx_keys = tx["terminal_id"] * days + tx["day"]
  pos = np.minimum(np.searchsorted(keys, tx_keys), len(keys) - 1)
  hit = (keys[pos] == tx_keys) & (scenario == 0)
  scenario[hit] = 2


def _scenario3(rng: np.random.Generator, tx: dict[str, np.ndarray], scenario: np.ndarray,
               n_customers: int, days: int) -> None:
  """Multiplies a third of compromised customers' transactions by 5 and marks them.

  Relies on ``tx`` being in (customer, day) order, so each customer's window
  is one contiguous slice found by binary search.
  """
  per_day = min(CUSTOMERS_PER_DAY, n_customers)
  cd_key = tx["customer_id"] * days + tx["day"]
  amount = tx["amount_cents"]
  for d in range(days):
    for c in rng.choice(n_customers, size=per_day, replace=False):
      lo, hi = np.searchsorted(cd_key, [c * days + d, c * days + min(d + CUSTOMER_WINDOW_DAYS, days)])
      n = int(hi - lo)
      if n < 3:
        continue
      chosen = lo + rng.choice(n, size=n // 3, replace=False)
      # Earlier scenarios (and earlier scenario-3 windows) take precedence.
      chosen = chosen[scenario[chosen] == 0]
      amount[chosen] *= SCENARIO3_FACTOR
      scenario[chosen] = 3


def _epoch_ms(day: datetime.date) -> int:
  return (day - datetime.date(1970, 1, 1)).days * DAY_MS


def _finalise(rng: np.random.Generator, tx: dict[str, np.ndarray], scenario: np.ndarray,
              start: datetime.date) -> dict[str, np.ndarray]:
  """Sorts by event time (stable, so ties keep generation order) and adds labels."""
  event = _epoch_ms(start) + tx["day"] * DAY_MS + tx["seconds"] * 1000
  order = np.argsort(event, kind="stable")
  scenario = scenario[order]
  is_fraud = scenario > 0
  event = event[order]
  label = np.full(len(event), -1, dtype=np.int64)
  delay = rng.integers(LABEL_DELAY_MS[0], LABEL_DELAY_MS[1], size=int(is_fraud.sum()), endpoint=True)
  label[is_fraud] = event[is_fraud] + delay
  return {"tx_index": np.arange(len(event), dtype=np.int64), "event_time_ms": event.astype(np.int64),
          "customer_id": tx["customer_id"][order], "terminal_id": tx["terminal_id"][order],
          "amount_cents": tx["amount_cents"][order], "is_fraud": is_fraud, "fraud_scenario": scenario.astype(np.int8),
          "label_time_ms": label}


def _freeze(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for name, values in columns.items():
    values = np.ascontiguousarray(values)
    values.setflags(write=False)
    out[name] = values
  return out


def simulate(n_customers: int, n_terminals: int, days: int, start: datetime.date, seed: int,
             radius: float = 5.0) -> Simulation:
  """Simulates ``days`` days of card transactions from ``start`` (00:00 UTC).

  The same arguments always give byte-identical arrays; each stage draws
  from its own child of ``SeedSequence(seed)``.
  """
  _check_args(n_customers, n_terminals, days, start, seed, radius)
  n_customers, n_terminals, days, seed = int(n_customers), int(n_terminals), int(days), int(seed)
  t0 = time.monotonic()
  rngs = dict(zip(_STAGES, (np.random.Generator(np.random.PCG64(s))
                            for s in np.random.SeedSequence(seed).spawn(len(_STAGES)))))
  customers = _customers(rngs["customers"], n_customers)
  terminals = _terminals(rngs["terminals"], n_terminals)
  offsets, terminal_ids = available_terminals(customers["x"], customers["y"], terminals["x"], terminals["y"],
                                              float(radius))
  tx = _transactions(rngs["transactions"], customers, offsets, terminal_ids, days)
  scenario = np.zeros(len(tx["day"]), dtype=np.int8)
  scenario[tx["amount_cents"] > SCENARIO1_LIMIT_CENTS] = 1
  _scenario2(rngs["scenario2"], tx, scenario, n_terminals, days)
  _scenario3(rngs["scenario3"], tx, scenario, n_customers, days)
  transactions = _finalise(rngs["labels"], tx, scenario, start)
  n = len(scenario)
  _LOGGER.info("simulated %d transactions (%d customers, %d terminals, %d days, seed %d): "
               "fraud rate %.4f, scenarios 1/2/3 = %s, %.2fs", n, n_customers, n_terminals, days, seed,
               float(np.count_nonzero(scenario)) / max(n, 1), np.bincount(scenario, minlength=4)[1:].tolist(),
               time.monotonic() - t0)
  return Simulation(start, seed, _freeze(customers), _freeze(terminals), _freeze(transactions))
