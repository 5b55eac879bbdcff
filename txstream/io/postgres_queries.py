"""Operational queries on the warm tier (PostgreSQL), each on an open psycopg2 connection, returning dicts.

  ``decision_by_id(conn, transaction_id)``          one decision, reading one partition
  ``decisions_for_customer(conn, customer_id, since_ms, until_ms=None, limit=1000)``
                                                    a customer's decisions, newest first
  ``review_queue(conn, limit=100, since_ms=None)``  decisions awaiting review, highest score first
  ``daily_counts(conn, since_ms=None)``             rows per event day and decision
  ``dead_letter_counts(conn)``                      dead letters per stage and reason

Times are epoch milliseconds (UTC). Each query names the event days it
reads, so PostgreSQL prunes the ``decisions`` partitions it does not need.
"""
import datetime
import logging
from typing import List, Optional

import psycopg2.extras

from txstream.core import contracts

_LOGGER = logging.getLogger(__name__)

DAY_MS = contracts.DAY_MS
_EPOCH = datetime.date(1970, 1, 1)

_SELECT = """SELECT transaction_id, event_date, (extract(epoch FROM event_time) * 1000)::bigint AS event_time_ms,
  customer_id, terminal_id, card_token, amount_minor, currency, entry_mode, merchant_category, score, decision,
  reason_codes, features, model_version, rules_version, reference_version, pipeline_version, schema_id, source,
  (extract(epoch FROM decided_at) * 1000)::bigint AS decided_at_ms FROM decisions"""


def _day(ms: int) -> datetime.date:
  return _EPOCH + datetime.timedelta(days=ms // DAY_MS)


def _query(conn, sql: str, params) -> List[dict]:
  with conn, conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
    cur.execute(sql, params)
    return [dict(r) for r in cur.fetchall()]


def decision_by_id(conn, transaction_id: str) -> Optional[dict]:
  """The stored decision of one transaction, or None. Reads only the partition of its day."""
  rows = _query(conn, f"{_SELECT} WHERE event_date = (SELECT event_date FROM decision_keys "
                      "WHERE transaction_id = %s) AND transaction_id = %s", (transaction_id, transaction_id))
  return rows[0] if rows else None


def decisions_for_customer(conn, customer_id: int, since_ms: int, until_ms: Optional[int] = None,
                           limit: int = 1000) -> List[dict]:
  """A customer's decisions with ``since_ms <= event time < until_ms``, newest first (ties by id)."""
  where = ["customer_id = %s", "event_date >= %s", "event_time >= TIMESTAMPTZ 'epoch' + %s * INTERVAL '1 ms'"]
  params = [customer_id, _day(since_ms), since_ms]
  if until_ms is not None:
    where += ["event_date <= %s", "event_time < TIMESTAMPTZ 'epoch' + %s * INTERVAL '1 ms'"]
    params += [_day(until_ms), until_ms]
  return _query(conn, f"{_SELECT} WHERE {' AND '.join(where)} ORDER BY event_time DESC, transaction_id LIMIT %s",
                params + [limit])


def review_queue(conn, limit: int = 100, since_ms: Optional[int] = None) -> List[dict]:
  """Decisions with decision ``review``, highest score first, then oldest first."""
  since_ms = since_ms if since_ms is not None else 0
  return _query(conn, f"""{_SELECT}
    WHERE decision = 'review' AND event_date >= %s ORDER BY score DESC, event_time, transaction_id LIMIT %s""",
                (_day(since_ms), limit))


def daily_counts(conn, since_ms: Optional[int] = None) -> List[dict]:
  """Rows per event day and decision, oldest day first."""
  return _query(conn, """SELECT event_date, decision, count(*) AS rows FROM decisions WHERE event_date >= %s
    GROUP BY event_date, decision ORDER BY event_date, decision""", (_day(since_ms if since_ms is not None else 0),))


def dead_letter_counts(conn) -> List[dict]:
  """Dead letters per stage and reason."""
  return _query(conn, """SELECT stage, reason, count(*) AS rows FROM dead_letters
    GROUP BY stage, reason ORDER BY stage, reason""", ())
