"""Sorted histories: the keys, merges, searches and repeat indexes the feature engines are built on.

A history is a set of rows sorted by one int64 key, ``slot(entity) * STRIDE
+ (time - BASE)``: every entity's rows are contiguous and in time order, so a
window (t - w, t] of a row is one ``searchsorted`` away, for every row of a
batch at once. New rows are merged in (``merge``), never re-sorted with the
whole history. Ties on the key are broken by strings (transaction id, source
position) in Python, for the few rows that tie.
"""
from typing import Dict, List, NamedTuple

import numpy as np
import polars as pl
import pyarrow as pa

HASH_SEED = 0x7478  # ids and records are compared by 64-bit hashes; any fixed seed does
# 2**42 ms is 139 years after 2000-01-01 (the earliest valid event), which leaves 2**21 entity slots.
BASE = 946_684_800_000
STRIDE = 1 << 42
MAX_SLOTS = 1 << 21
_SEARCH_CHUNK = 1 << 16  # rows per searchsorted call in a one-pass batch: the keys stay in cache


def prefix(values: np.ndarray, squares: bool = False) -> np.ndarray:
  """[0, v0, v0+v1, ...] (of the squares with ``squares``), int64 while it cannot overflow, else Python ints."""
  peak = int(np.abs(values).max()) if values.size else 0
  if squares:
    peak *= peak
  exact = peak * (len(values) + 1) < 2 ** 62
  values = values.astype(np.int64 if exact else object)
  if squares:
    values = values * values
  out = np.empty(len(values) + 1, dtype=values.dtype)
  out[0] = 0
  np.cumsum(values, out=out[1:])
  return out


class Ties:
  """Tie-break strings of some rows of a table, fetched only for the rows that tie."""

  def __init__(self, table: pa.Table, rows: np.ndarray, columns=("transaction_id", "source")):
    self._table, self._rows, self._columns = table, rows, columns

  def values(self, positions: np.ndarray) -> List[tuple]:
    taken = self._table.select(list(self._columns)).take(pa.array(self._rows[positions]))
    return list(zip(*(("" if v is None else v for v in taken.column(c).to_pylist()) for c in self._columns)))


def order(numeric: List[np.ndarray], ties: Ties) -> np.ndarray:
  """Row order by the numeric keys (most significant first); runs equal on all of them by the ``ties`` strings."""
  order = np.lexsort(numeric[::-1])
  if len(order) < 2:
    return order
  same = np.ones(len(order) - 1, dtype=bool)
  for key in numeric:
    k = key[order]
    same &= k[1:] == k[:-1]
  if not same.any():
    return order
  # Few runs (same entity and millisecond, or a repeated id): order them by the strings in Python.
  flags = np.concatenate(([0], same.astype(np.int8), [0]))
  starts = np.flatnonzero(np.diff(flags) == 1)
  ends = np.flatnonzero(np.diff(flags) == -1)
  spans = list(zip(starts.tolist(), (ends + 1).tolist()))
  members = np.concatenate([order[a:b] for a, b in spans])
  strings = ties.values(members)
  offset = 0
  for a, b in spans:
    run, by = members[offset:offset + b - a], strings[offset:offset + b - a]
    order[a:b] = run[sorted(range(b - a), key=by.__getitem__)]
    offset += b - a
  return order


def hash_strings(array) -> np.ndarray:
  return pl.Series(values=array).hash(seed=HASH_SEED).to_numpy()


def entity_key(entity: np.ndarray, id_hash: np.ndarray) -> np.ndarray:
  """One uint64 per (entity, id hash): what makes a repeat (a 64-bit hash; a false match has odds of 2**-64)."""
  mixed = entity.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
  return id_hash ^ (mixed ^ (mixed >> np.uint64(29)))


def search(keys: np.ndarray, queries: np.ndarray, side: str = "right") -> np.ndarray:
  """``np.searchsorted`` of sorted ``queries``, in cache-sized chunks when both are long."""
  if len(queries) <= _SEARCH_CHUNK or len(keys) <= _SEARCH_CHUNK:
    return np.searchsorted(keys, queries, side=side)
  out = np.empty(len(queries), dtype=np.int64)
  for start in range(0, len(queries), _SEARCH_CHUNK):
    part = queries[start:start + _SEARCH_CHUNK]
    lo = np.searchsorted(keys, part[0], side=side)
    hi = np.searchsorted(keys, part[-1], side=side)
    out[start:start + len(part)] = lo + np.searchsorted(keys[lo:hi + 1], part, side=side)
  return out


class Slots:
  """Dense slots for entity ids (customers or terminals), given at first sight."""

  def __init__(self):
    self._ids = np.zeros(0, np.int64)    # sorted
    self._slots = np.zeros(0, np.int64)  # slot of each id in _ids

  def __len__(self) -> int:
    return len(self._ids)

  def of(self, ids: np.ndarray) -> np.ndarray:
    at = np.searchsorted(self._ids, ids)
    known = at < len(self._ids)
    known[known] = self._ids[at[known]] == ids[known]
    if not known.all():
      fresh = np.unique(ids[~known])
      if len(self._ids) + len(fresh) > MAX_SLOTS:
        raise OverflowError(f"more than {MAX_SLOTS} entities in one feature engine; use more shards")
      ids_all = np.concatenate((self._ids, fresh))
      slots_all = np.concatenate((self._slots, np.arange(len(self._ids), len(self._ids) + len(fresh))))
      order = np.argsort(ids_all, kind="stable")
      self._ids, self._slots = ids_all[order], slots_all[order]
      at = np.searchsorted(self._ids, ids)
    return self._slots[at]


def time_key(slots: np.ndarray, times: np.ndarray) -> np.ndarray:
  offset = times - BASE
  if offset.size and (offset.min() < 0 or offset.max() >= STRIDE):
    raise ValueError("event time outside 2000-01-01 .. 2139: not a valid transaction time")
  return slots * STRIDE + offset


class Merged(NamedTuple):
  """Held rows and new rows in one sorted order; ``at`` is where each new row (in sorted-new order) landed."""
  key: np.ndarray
  columns: Dict[str, np.ndarray]
  at: np.ndarray


def merge(held_key: np.ndarray, held: Dict[str, np.ndarray], new_key: np.ndarray,
           new: Dict[str, np.ndarray]) -> Merged:
  """Inserts sorted new rows after the held rows with an equal key (held rows came first)."""
  ins = np.searchsorted(held_key, new_key, side="right")
  at = ins + np.arange(len(new_key))
  return Merged(np.insert(held_key, ins, new_key), {c: np.insert(held[c], ins, new[c]) for c in held}, at)


class Index:
  """Sorted uint64 keys with a time (for trimming) and a payload column: the repeat detectors' memory."""

  def __init__(self):
    self.key = np.zeros(0, np.uint64)
    self.time = np.zeros(0, np.int64)
    self.payload = np.zeros(0, np.uint64)

  def find(self, keys: np.ndarray) -> np.ndarray:
    """Index of each key in the held keys, -1 where absent."""
    at = np.searchsorted(self.key, keys)
    found = at < len(self.key)
    found[found] = self.key[at[found]] == keys[found]
    return np.where(found, at, -1)

  def add(self, keys: np.ndarray, times: np.ndarray, payload: np.ndarray) -> None:
    if not len(keys):
      return
    order = np.argsort(keys, kind="stable")
    ins = np.searchsorted(self.key, keys[order])
    self.key = np.insert(self.key, ins, keys[order])
    self.time = np.insert(self.time, ins, times[order])
    self.payload = np.insert(self.payload, ins, payload[order])

  def trim(self, horizon: int) -> None:
    keep = self.time > horizon
    if not keep.all():
      self.key, self.time, self.payload = self.key[keep], self.time[keep], self.payload[keep]


def flat(array) -> pa.Array:
  return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
