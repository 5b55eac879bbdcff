"""Dashboard queries on the analytics tier (ClickHouse), each on a ``clickhouse_driver.Client``.

  ``fraud_rate_per_hour(client, since_ms=None, until_ms=None)``
  ``top_terminals_by_flagged_amount(client, limit=10, since_ms=None, until_ms=None)``
  ``customer_velocity(client, since_ms, until_ms, limit=20, customer_id=None)``
  ``count_distinct_transactions(client)``

Times are epoch milliseconds (UTC). Every query reads ``decisions`` through
``FINAL``, so it sees one row per ``transaction_id`` before merges catch up.

Pre-aggregated (``txstream.io.clickhouse_aggregates``), for the operations view:

  ``decisions_per_minute(client, since_ms=None, until_ms=None)``
  ``decision_rates(client, since_ms=None, until_ms=None)``
  ``fraud_rate_per_hour_aggregated(client, since_ms=None, until_ms=None)``
  ``top_terminals_by_flagged_amount_aggregated(client, limit=10, since_ms=None, until_ms=None)``

These read the ``*_agg`` tables with their ``-Merge`` combinators and the
time filter inside (so it prunes on every server version), and count each
transaction once however often it was inserted. Windows are whole cells: a
minute (an hour for terminals) is in when its start is in ``[since, until)``.
See the aggregates' module for the one caveat (a transaction re-decided
differently counts under both decisions).
"""
import logging
from typing import List, Optional

from clickhouse_driver import Client

_LOGGER = logging.getLogger(__name__)


def _window(since_ms: Optional[int], until_ms: Optional[int]) -> str:
  # event_date bounds let ClickHouse skip partitions; event_time_ms bounds are exact. Both are the
  # same in every version of a row (event times never change), so filtering before FINAL is safe.
  where = []
  if since_ms is not None:
    where += [f"event_date >= toDate(toDateTime(intDiv({int(since_ms)}, 1000), 'UTC'))",
              f"event_time_ms >= {int(since_ms)}"]
  if until_ms is not None:
    where += [f"event_date <= toDate(toDateTime(intDiv({int(until_ms)}, 1000), 'UTC'))",
              f"event_time_ms < {int(until_ms)}"]
  return ("WHERE " + " AND ".join(where)) if where else ""


def _rows(client: Client, sql: str) -> List[dict]:
  data, columns = client.execute(sql, with_column_types=True)
  names = [c[0] for c in columns]
  return [dict(zip(names, row)) for row in data]


def fraud_rate_per_hour(client: Client, since_ms: Optional[int] = None, until_ms: Optional[int] = None,
                        database: Optional[str] = None) -> List[dict]:
  """Per event hour: ``hour_ms``, ``transactions``, ``flagged`` (review + decline), ``declined``, ``flagged_rate``."""
  table = f"{database}.decisions" if database else "decisions"
  return _rows(client, f"""
    SELECT toUInt64(toStartOfHour(event_time)) * 1000 AS hour_ms, count() AS transactions,
           countIf(decision != 'approve') AS flagged, countIf(decision = 'decline') AS declined,
           flagged / transactions AS flagged_rate
    FROM {table} FINAL {_window(since_ms, until_ms)}
    GROUP BY hour_ms ORDER BY hour_ms""")


def top_terminals_by_flagged_amount(client: Client, limit: int = 10, since_ms: Optional[int] = None,
                                    until_ms: Optional[int] = None, database: Optional[str] = None) -> List[dict]:
  """Terminals with the largest flagged (review + decline) amount, per currency (amounts never mix currencies)."""
  table = f"{database}.decisions" if database else "decisions"
  # The decision is filtered by the aggregate, not in WHERE: a WHERE on a column that differs between
  # versions of a row could be applied before FINAL picks the latest version (PREWHERE on old servers).
  return _rows(client, f"""
    SELECT terminal_id, currency, sumIf(amount_minor, decision != 'approve') AS flagged_amount_minor,
           countIf(decision != 'approve') AS flagged
    FROM {table} FINAL {_window(since_ms, until_ms)}
    GROUP BY terminal_id, currency HAVING flagged > 0
    ORDER BY flagged_amount_minor DESC, terminal_id, currency LIMIT {int(limit)}""")


def customer_velocity(client: Client, since_ms: int, until_ms: int, limit: int = 20,
                      customer_id: Optional[int] = None, database: Optional[str] = None) -> List[dict]:
  """Customers by number of transactions in ``[since_ms, until_ms)``: ``transactions``,
  ``terminals`` (distinct), ``tx_per_hour`` over the window, first and last event time."""
  table = f"{database}.decisions" if database else "decisions"
  where = _window(since_ms, until_ms)
  if customer_id is not None:
    where += f" AND customer_id = {int(customer_id)}"
  hours = max(until_ms - since_ms, 1) / 3_600_000
  return _rows(client, f"""
    SELECT customer_id, count() AS transactions, uniqExact(terminal_id) AS terminals,
           transactions / {hours!r} AS tx_per_hour, min(event_time_ms) AS first_ms, max(event_time_ms) AS last_ms
    FROM {table} FINAL {where}
    GROUP BY customer_id ORDER BY transactions DESC, customer_id LIMIT {int(limit)}""")


def count_distinct_transactions(client: Client, database: Optional[str] = None) -> int:
  """Distinct ``transaction_id`` values stored, whether or not duplicates are merged yet."""
  table = f"{database}.decisions" if database else "decisions"
  return client.execute(f"SELECT uniqExact(transaction_id) FROM {table}")[0][0]


def _cells(column: str, since_ms: Optional[int], until_ms: Optional[int]) -> str:
  where = []
  if since_ms is not None:
    where.append(f"{column} >= toDateTime(intDiv({int(since_ms) + 999}, 1000), 'UTC')")
  if until_ms is not None:
    where.append(f"{column} < toDateTime(intDiv({int(until_ms) + 999}, 1000), 'UTC')")
  return ("WHERE " + " AND ".join(where)) if where else ""


def _table(name: str, database: Optional[str]) -> str:
  return f"{database}.{name}" if database else name


_AMOUNT = "arraySum(arrayMap(t -> tupleElement(t, 2), groupUniqArrayMerge(amounts_scores)))"
_SCORE = "arraySum(arrayMap(t -> tupleElement(t, 3), groupUniqArrayMerge(amounts_scores)))"


def decisions_per_minute(client: Client, since_ms: Optional[int] = None, until_ms: Optional[int] = None,
                         database: Optional[str] = None) -> List[dict]:
  """Per minute, decision and currency: ``minute_ms``, ``decision``, ``currency``, ``decisions``
  (distinct transactions), ``amount_minor``, ``flagged_amount_minor`` (0 for approve), ``score_sum``."""
  return _rows(client, f"""
    SELECT toUInt64(minute) * 1000 AS minute_ms, decision, currency, uniqExactMerge(transactions) AS decisions,
           {_AMOUNT} AS amount_minor, if(decision = 'approve', toInt64(0), amount_minor) AS flagged_amount_minor,
           {_SCORE} AS score_sum
    FROM {_table("decisions_per_minute_agg", database)} {_cells("minute", since_ms, until_ms)}
    GROUP BY minute, decision, currency ORDER BY minute_ms, decision, currency""")


def decision_rates(client: Client, since_ms: Optional[int] = None, until_ms: Optional[int] = None,
                   database: Optional[str] = None) -> dict:
  """Over the window: ``transactions``, ``reviewed``, ``declined``, ``review_rate``, ``decline_rate`` (0 when empty)."""
  # Per decision first: a transaction has one decision per cell, so the per-decision counts add up.
  rows = _rows(client, f"""
    SELECT decision, sum(n) AS transactions FROM (
      SELECT decision, uniqExactMerge(transactions) AS n
      FROM {_table("decisions_per_minute_agg", database)} {_cells("minute", since_ms, until_ms)}
      GROUP BY minute, decision, currency)
    GROUP BY decision""")
  by_decision = {r["decision"]: r["transactions"] for r in rows}
  total = sum(by_decision.values())
  reviewed, declined = by_decision.get("review", 0), by_decision.get("decline", 0)
  return {"transactions": total, "reviewed": reviewed, "declined": declined,
          "review_rate": reviewed / total if total else 0.0, "decline_rate": declined / total if total else 0.0}


def fraud_rate_per_hour_aggregated(client: Client, since_ms: Optional[int] = None, until_ms: Optional[int] = None,
                                   database: Optional[str] = None) -> List[dict]:
  """``fraud_rate_per_hour``'s rows from the per-minute aggregate (hours whose minutes are in the window)."""
  return _rows(client, f"""
    SELECT toUInt64(toStartOfHour(minute)) * 1000 AS hour_ms, sum(n) AS transactions,
           sumIf(n, decision != 'approve') AS flagged, sumIf(n, decision = 'decline') AS declined,
           flagged / transactions AS flagged_rate
    FROM (SELECT minute, decision, uniqExactMerge(transactions) AS n
          FROM {_table("decisions_per_minute_agg", database)} {_cells("minute", since_ms, until_ms)}
          GROUP BY minute, decision, currency)
    GROUP BY hour_ms ORDER BY hour_ms""")


def top_terminals_by_flagged_amount_aggregated(client: Client, limit: int = 10, since_ms: Optional[int] = None,
                                               until_ms: Optional[int] = None,
                                               database: Optional[str] = None) -> List[dict]:
  """``top_terminals_by_flagged_amount``'s rows from the hourly terminal aggregate (whole hours)."""
  return _rows(client, f"""
    SELECT terminal_id, currency, sum(amount) AS flagged_amount_minor, sum(n) AS flagged
    FROM (SELECT terminal_id, currency, uniqExactMerge(transactions) AS n,
                 arraySum(arrayMap(t -> tupleElement(t, 2), groupUniqArrayMerge(amounts))) AS amount
          FROM {_table("flagged_per_hour_terminal_agg", database)} {_cells("hour", since_ms, until_ms)}
          GROUP BY hour, terminal_id, currency, decision)
    GROUP BY terminal_id, currency
    ORDER BY flagged_amount_minor DESC, terminal_id, currency LIMIT {int(limit)}""")
