"""The warm tier's rows: Arrow batches as PostgreSQL binary COPY streams, and the rows PostgreSQL cannot hold.

``copy_decisions`` and ``copy_keys`` turn a ``contracts.DECISION`` table into
the rows of ``decisions`` and ``decision_keys``; ``copy_dead_letters`` a
``contracts.DEAD_LETTER`` table into ``dead_letters`` rows. Encoding is
column-wise (``txstream.io.pg_copy``). ``refuse_unstorable`` splits off, as
refusals, rows with a null where a column needs a value or a time outside
what the table can hold; ``last_per_key`` keeps one row per key.
"""
import logging
from typing import List, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from txstream.core import contracts
from txstream.io import pg_copy, sinks
from txstream.io.sinks import FEATURE_POSITIONS, Refusal, column_position

_LOGGER = logging.getLogger(__name__)

# COPY column order: the fixed-width, never-null columns first (one numpy record per row), then the rest.
_FIXED_COLUMNS = ("event_date", "event_time", "customer_id", "terminal_id", "amount_minor", "score", "schema_id",
                  "decided_at", "features")
_VARIABLE_COLUMNS = ("transaction_id", "card_token", "currency", "entry_mode", "merchant_category",
                     "customer_segment", "home_distance", "decision", "reason_codes", "model_version",
                     "rules_version", "reference_version", "pipeline_version", "source")
DECISION_COLUMNS = _FIXED_COLUMNS + _VARIABLE_COLUMNS
DEAD_LETTER_COLUMNS = ("source", "stage", "reason", "error_class", "message", "pipeline_version", "raw")

_ID = column_position("transaction_id")
_EVENT_MS = column_position("event_time_ms")
# decisions columns that cannot be null.
DECISION_REQUIRED = tuple(column_position(c) for c in (
    "transaction_id", "event_time_ms", "customer_id", "terminal_id", "card_token", "amount_minor", "currency",
    "score", "decision", "model_version", "pipeline_version", "schema_id", "source", "decided_at_ms")) \
    + FEATURE_POSITIONS
DEAD_LETTER_REQUIRED = tuple(column_position(c, contracts.DEAD_LETTER) for c in (
    "source", "stage", "reason", "error_class", "message", "pipeline_version"))
# Times the table can hold: event days must also be dates Python can name (partitions are named by day).
_TIME_RANGES = {column_position("event_time_ms"): (-62_135_596_800_000, 253_402_300_800_000),  # years 1 to 9999
                column_position("decided_at_ms"): (pg_copy.TIMESTAMP_MIN_MS, pg_copy.TIMESTAMP_END_MS)}


def refuse_out_of_range(table: pa.Table) -> Tuple[pa.Table, List[Refusal]]:
  """Splits off rows with a time outside what ``_TIME_RANGES`` allows; returns (rows to write, refusals)."""
  outside = None
  for position, (low, end) in _TIME_RANGES.items():
    column = table.column(position)
    bad = pc.or_(pc.less(column, low), pc.greater_equal(column, end))
    outside = bad if outside is None else pc.or_(outside, bad)
  if not pc.any(outside).as_py():
    return table, []
  refused = table.filter(outside)
  errors = []
  for row in refused.select(list(_TIME_RANGES)).to_pylist():
    name, value = next((n, v) for (n, v), (low, end) in zip(row.items(), _TIME_RANGES.values())
                       if not low <= v < end)
    errors.append(ValueError(f"{name} {value} is out of range"))
  return table.filter(pc.invert(outside)), [Refusal(refused, errors)]


def refuse_nul(table: pa.Table) -> Tuple[pa.Table, List[Refusal]]:
  """Splits off rows with a NUL character in a string: ``text`` cannot hold one, and changing it would store
  another value than the other tiers (validation keeps NUL out of every input field; this is the backstop)."""
  bad = None
  for column in table.columns:
    if pa.types.is_string(column.type):
      found = pc.fill_null(pc.match_substring(column, "\x00"), False)
    elif pa.types.is_list(column.type) and pa.types.is_string(column.type.value_type):
      found = _list_has_nul(column)
    else:
      continue
    bad = found if bad is None else pc.or_(bad, found)
  if bad is None or not pc.any(bad).as_py():
    return table, []
  refused = table.filter(bad)
  return table.filter(pc.invert(bad)), [Refusal(refused, [ValueError("a text value holds a NUL character")]
                                                * refused.num_rows, reason="nul_in_text")]


def _list_has_nul(column) -> pa.Array:
  """Per row of a list<string> column, whether any element holds NUL."""
  column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
  flat = pc.fill_null(pc.match_substring(pc.list_flatten(column), "\x00"), False)
  rows = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
  hit = np.zeros(len(column), dtype=bool)
  hit[rows[flat.to_numpy(zero_copy_only=False)]] = True
  return pa.array(hit)


def refuse_unstorable(table: pa.Table) -> Tuple[pa.Table, List[Refusal]]:
  """Splits off decisions with a null where ``decisions`` needs a value, a time out of range, or a NUL."""
  table, refused = sinks.refuse_nulls(table, DECISION_REQUIRED)
  table, outside = refuse_out_of_range(table)
  table, nul = refuse_nul(table)
  return table, refused + outside + nul


def copy_decisions(table: pa.Table) -> bytes:
  """A ``contracts.DECISION`` table (no nulls where ``decisions`` needs values, times in range) as the
  binary COPY of its ``decisions`` rows, columns in ``DECISION_COLUMNS`` order.

  The HOME_DISTANCE feature is -1 where the terminal is not on file: NULL in the ``home_distance`` column.
  """
  def col(name):
    return table.column(column_position(name))

  def numbers(name):
    return col(name).to_numpy()

  event_ms = numbers("event_time_ms")
  features = np.column_stack([table.column(i).to_numpy() for i in FEATURE_POSITIONS])
  fixed = pg_copy.fixed([
      pg_copy.date(event_ms), pg_copy.timestamptz(event_ms), pg_copy.scalar(numbers("customer_id"), pg_copy.INT8),
      pg_copy.scalar(numbers("terminal_id"), pg_copy.INT8), pg_copy.scalar(numbers("amount_minor"), pg_copy.INT8),
      pg_copy.scalar(numbers("score"), pg_copy.FLOAT8), pg_copy.scalar(numbers("schema_id"), pg_copy.INT4),
      pg_copy.timestamptz(numbers("decided_at_ms")), pg_copy.float8_array(features)])
  home = col("home_distance")
  variable = {
      "merchant_category": pg_copy.nullable(col("merchant_category"), pg_copy.INT4),
      "home_distance": pg_copy.nullable(pc.if_else(pc.equal(home, -1.0), None, home), pg_copy.FLOAT8),
      "reason_codes": pg_copy.text_array(col("reason_codes")),
  }
  fields = [fixed] + [variable[c] if c in variable else pg_copy.text(col(c)) for c in _VARIABLE_COLUMNS]
  return pg_copy.stream(fields, len(DECISION_COLUMNS))


def copy_keys(table: pa.Table) -> bytes:
  """The binary COPY of the ``decision_keys`` rows (transaction_id, event_date) of a DECISION table."""
  event_day = pg_copy.fixed([pg_copy.date(table.column(_EVENT_MS).to_numpy())])
  return pg_copy.stream([pg_copy.text(table.column(_ID)), event_day], 2)


def copy_dead_letters(table: pa.Table) -> bytes:
  """The binary COPY of a ``contracts.DEAD_LETTER`` table, columns in ``DEAD_LETTER_COLUMNS`` order."""
  return pg_copy.stream([pg_copy.text(table.column(c)) for c in DEAD_LETTER_COLUMNS], len(DEAD_LETTER_COLUMNS))


def last_per_key(table: pa.Table, keys: Sequence[str]) -> pa.Table:
  """The last row of each key (``ON CONFLICT`` cannot touch a row twice in one statement)."""
  key_table = pa.table([table.column(k) for k in keys], names=list(keys))
  if len(keys) == 1:
    unique = pc.count_distinct(key_table.column(0), mode="all").as_py()
  else:
    unique = key_table.group_by(list(keys)).aggregate([]).num_rows
  if unique == table.num_rows:
    return table
  position = "__position"
  last = key_table.append_column(position, pa.array(np.arange(table.num_rows))) \
      .group_by(list(keys), use_threads=False).aggregate([(position, "max")])
  return table.take(pa.array(np.sort(last.column(f"{position}_max").to_numpy())))
