"""Analytics tier: decisions in ClickHouse for dashboards, over the native protocol.

Table ``<database>.decisions`` (created with the database if missing):
``ENGINE = ReplacingMergeTree(decided_at_ms) PARTITION BY toYYYYMM(event_date)
ORDER BY transaction_id``. A decision written twice (retry, restart, rerun)
is two rows until a background merge keeps the one with the highest
``decided_at_ms``; every query here reads through ``FINAL`` so it sees one row
per ``transaction_id`` at any time. ``event_time`` and ``event_date`` are
computed by the server from ``event_time_ms`` (UTC). Features are one
``Float64`` column each, named as in the cold tier (``FEATURE_NAMES``
lowercased; ``home_distance`` is the HOME_DISTANCE feature).

The DDL sticks to what ClickHouse 18.16 (Debian's package) already had, and
works unchanged on current releases: no ``LowCardinality``, no ``DateTime64``,
no ``IF NOT EXISTS`` on columns. A table created by an earlier version with
fewer feature columns gets the new ones at preflight (``ALTER TABLE ... ADD
COLUMN``; earlier rows hold 0 there); any other missing column is an error.

Batches are columnar inserts of up to ``batch_size`` rows; ClickHouse makes
one part per insert, so bigger batches mean fewer merges. The columns go
from the Arrow table to the driver as numpy arrays (the driver's
``use_numpy`` mode: numbers are written as whole buffers, not per value);
the driver has no numpy form of ``Enum8`` and ``Array(String)`` and writes
those two per value, as it says in a warning we filter out.

Dashboard queries (each takes a ``clickhouse_driver.Client``; times are epoch ms, UTC):
  ``fraud_rate_per_hour(client, since_ms=None, until_ms=None)``
  ``top_terminals_by_flagged_amount(client, limit=10, since_ms=None, until_ms=None)``
  ``customer_velocity(client, since_ms, until_ms, limit=20, customer_id=None)``
  ``count_distinct_transactions(client)``
"""
import logging
import re
import struct
from typing import List, Optional
from urllib.parse import unquote, urlsplit

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from txstream.core import contracts
from txstream.core.batch import DecisionBatch
from txstream.io import sinks
from txstream.io.sinks import (FEATURE_POSITIONS, BatchingWriteFn, Refusal, RetryPolicy, SinkConfigError, SinkResult,
                               column_position)

_LOGGER = logging.getLogger(__name__)

DECISIONS = contracts.ACTIONS
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODES = ch_errors.ErrorCodes
# Server states that pass: overload, timeouts, too many parts waiting for merges, network trouble.
_RETRYABLE_CODES = {_CODES.UNEXPECTED_END_OF_FILE, _CODES.CANNOT_READ_FROM_ISTREAM, _CODES.CANNOT_WRITE_TO_OSTREAM,
                    _CODES.ATTEMPT_TO_READ_AFTER_EOF, _CODES.TIMEOUT_EXCEEDED, _CODES.TOO_MANY_SIMULTANEOUS_QUERIES,
                    _CODES.SOCKET_TIMEOUT, _CODES.NETWORK_ERROR, _CODES.MEMORY_LIMIT_EXCEEDED,
                    _CODES.TABLE_IS_READ_ONLY, _CODES.TOO_MANY_PARTS, _CODES.ALL_CONNECTION_TRIES_FAILED,
                    _CODES.UNKNOWN_STATUS_OF_INSERT, _CODES.KEEPER_EXCEPTION, 203, 425}
_AUTH_CODES = {_CODES.UNKNOWN_USER, _CODES.WRONG_PASSWORD, 516}
# Raised by the driver while serialising a value the column type cannot hold.
_VALUE_ERRORS = (ch_errors.LogicalError, ch_errors.TypeMismatchError, ch_errors.TooLargeStringSize, TypeError,
                 ValueError, OverflowError, UnicodeError, struct.error)

FEATURE_COLUMNS = list(contracts.FEATURE_COLUMNS)
_PLAIN_COLUMNS = ["transaction_id", "event_time_ms", "customer_id", "terminal_id", "card_token", "amount_minor",
                  "currency", "entry_mode", "merchant_category", "customer_segment", "score",
                  "decision", "reason_codes", "model_version", "reference_version", "pipeline_version",
                  "schema_id", "source", "decided_at_ms"]
INSERT_COLUMNS = _PLAIN_COLUMNS + FEATURE_COLUMNS
# Where each insert column is in contracts.DECISION.
_POSITIONS = [column_position(c) for c in _PLAIN_COLUMNS] + list(FEATURE_POSITIONS)
_NULLABLE = {"entry_mode", "merchant_category", "customer_segment", "reference_version", "reason_codes"}
_REQUIRED = tuple(p for c, p in zip(INSERT_COLUMNS, _POSITIONS) if c not in _NULLABLE)
_DECISION_POSITION = column_position("decision")
# Types the driver writes per value even in numpy mode; it warns about them on every insert.
_GENERIC_SPECS = ("Enum8(", "Array(String)")


class _QuietNumpyFallback(logging.Filter):
  """Drops the driver's per-insert warning that it writes our Enum8 and Array(String) columns per value."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.msg.startswith("NumPy support is not implemented") and record.args
                and str(record.args[0]).startswith(_GENERIC_SPECS))


_QUIET = _QuietNumpyFallback()


def table_ddl(database: str) -> str:
  features = ",\n  ".join(f"{c} Float64" for c in FEATURE_COLUMNS)
  return f"""CREATE TABLE IF NOT EXISTS {database}.decisions (
  transaction_id String,
  event_time_ms Int64,
  event_time DateTime('UTC') DEFAULT toDateTime(intDiv(event_time_ms, 1000), 'UTC'),
  event_date Date DEFAULT toDate(event_time),
  customer_id Int64,
  terminal_id Int64,
  card_token String,
  amount_minor Int64,
  currency String,
  entry_mode Nullable(String),
  merchant_category Nullable(Int32),
  customer_segment Nullable(String),
  score Float64,
  decision Enum8('approve' = 1, 'review' = 2, 'decline' = 3),
  reason_codes Array(String),
  model_version String,
  reference_version Nullable(String),
  pipeline_version String,
  schema_id Int32,
  source String,
  decided_at_ms UInt64,
  {features}
) ENGINE = ReplacingMergeTree(decided_at_ms)
PARTITION BY toYYYYMM(event_date)
ORDER BY transaction_id"""


class ClickHouseTarget:
  """A parsed ``clickhouse://[user[:password]@]host[:port]/database`` URL."""

  def __init__(self, url: str):
    if not url or not isinstance(url, str):
      raise SinkConfigError("a ClickHouse URL is required, e.g. clickhouse://127.0.0.1:9000/txstream")
    parts = urlsplit(url)
    if parts.scheme not in ("clickhouse", "clickhouses"):
      raise SinkConfigError(f"ClickHouse URL {url!r}: scheme must be clickhouse:// (native protocol)")
    try:
      self.port = parts.port or (9440 if parts.scheme == "clickhouses" else 9000)
    except ValueError as error:
      raise SinkConfigError(f"ClickHouse URL {url!r}: {error}") from None
    if not parts.hostname:
      raise SinkConfigError(f"ClickHouse URL {url!r}: no host")
    self.host = parts.hostname
    self.database = parts.path.strip("/") or "default"
    if not _NAME.match(self.database):
      raise SinkConfigError(f"ClickHouse URL {url!r}: database name {self.database!r} is not a plain identifier")
    self.user = unquote(parts.username) if parts.username else "default"
    self.password = unquote(parts.password) if parts.password else ""
    self.secure = parts.scheme == "clickhouses"

  @property
  def where(self) -> str:
    return f"{self.host}:{self.port}"

  def client(self, database: Optional[str] = None, timeout_s: float = 60.0, use_numpy: bool = False) -> Client:
    return Client(self.host, port=self.port, database=database or self.database, user=self.user,
                  password=self.password, secure=self.secure, connect_timeout=5, send_receive_timeout=timeout_s,
                  sync_request_timeout=5, client_name="txstream", settings={"use_numpy": use_numpy})


def is_retryable(error: BaseException) -> bool:
  if isinstance(error, (ch_errors.NetworkError, ch_errors.SocketTimeoutError,
                        ch_errors.UnexpectedPacketFromServerError, EOFError, ConnectionError, TimeoutError)):
    return True
  return isinstance(error, ch_errors.ServerException) and error.code in _RETRYABLE_CODES


def is_rejected(error: BaseException) -> bool:
  return isinstance(error, _VALUE_ERRORS) and not is_retryable(error)


def _message(error: BaseException) -> str:
  text = getattr(error, "message", None) or str(error)
  return sinks.one_line(text.split(". Stack trace:")[0])


def ensure_schema(target: ClickHouseTarget) -> None:
  """Creates the database and the ``decisions`` table if missing (idempotent)."""
  admin = target.client(database="default")
  try:
    admin.execute(f"CREATE DATABASE IF NOT EXISTS {target.database}")
    admin.execute(table_ddl(target.database))
  finally:
    admin.disconnect()


def preflight(url: str) -> None:
  """Connects once, creates the database and table if missing, checks the table's columns.

  Raises ``SinkConfigError`` with one line for a bad URL, a refused
  connection, rejected credentials or a table without the expected columns.
  """
  target = ClickHouseTarget(url)
  try:
    ensure_schema(target)
    client = target.client()
    try:
      have = {row[0] for row in client.execute(f"DESCRIBE TABLE {target.database}.decisions")}
      added = [c for c in FEATURE_COLUMNS if c not in have]
      if added and all(c in have for c in INSERT_COLUMNS if c not in FEATURE_COLUMNS):
        # A table from a version with fewer features: add the new ones (rows
        # written before hold 0 there). One ALTER, no IF NOT EXISTS: 18.16 has none.
        client.execute(f"ALTER TABLE {target.database}.decisions "
                       + ", ".join(f"ADD COLUMN {c} Float64" for c in added))
        _LOGGER.warning("ClickHouse table %s.decisions: added feature columns %s", target.database,
                        ", ".join(added))
        have.update(added)
    finally:
      client.disconnect()
  except ch_errors.ServerException as error:
    if error.code in _AUTH_CODES:
      raise SinkConfigError(f"ClickHouse at {target.where} refused user {target.user!r}: {_message(error)}") from None
    raise SinkConfigError(f"ClickHouse at {target.where}: {_message(error)}") from None
  except (ch_errors.Error, OSError, EOFError) as error:
    raise SinkConfigError(f"cannot connect to ClickHouse at {target.where}: {_message(error)}") from None
  missing = [c for c in INSERT_COLUMNS if c not in have]
  if missing:
    raise SinkConfigError(f"ClickHouse table {target.database}.decisions lacks columns {', '.join(missing)} "
                          "(created by another txstream version; add them with ALTER TABLE ... ADD COLUMN)")


def decision_columns(table: pa.Table) -> List[np.ndarray]:
  """A ``contracts.DECISION`` table's columns in ``INSERT_COLUMNS`` order, as the driver's numpy mode takes them.

  Numbers as numeric arrays (zero-copy where Arrow allows; a nullable one as
  float64 with NaN for null, which the driver writes as NULL), text and
  arrays as object arrays (None for null; a null ``reason_codes`` is empty).
  """
  out = []
  for name, position in zip(INSERT_COLUMNS, _POSITIONS):
    column = table.column(position)
    if name == "reason_codes":
      # fromiter: assigning a list of lists to an object array would let numpy broadcast it as 2-D.
      out.append(np.fromiter((codes or [] for codes in column.to_pylist()), dtype=object, count=table.num_rows))
    elif pa.types.is_string(column.type):
      out.append(column.to_numpy(zero_copy_only=False))
    else:
      out.append(column.to_numpy())
  return out


class _WriteToClickHouseFn(BatchingWriteFn):
  def __init__(self, url: str, name: str, batch_size: int, max_batch_bytes: int, retry: RetryPolicy):
    super().__init__(name, batch_size, max_batch_bytes, retry)
    self._url = url
    self._target = None
    self._client = None
    self._insert = None

  def open_client(self):
    self._target = ClickHouseTarget(self._url)
    ensure_schema(self._target)
    self._client = self._target.client(use_numpy=True)
    self._insert = f"INSERT INTO {self._target.database}.decisions ({', '.join(INSERT_COLUMNS)}) VALUES"
    driver_log = logging.getLogger("clickhouse_driver.columns.service")
    if _QUIET not in driver_log.filters:
      driver_log.addFilter(_QUIET)

  def close_client(self):
    if self._client is not None:
      client, self._client = self._client, None
      client.disconnect()

  def is_retryable(self, error):
    return is_retryable(error)

  def is_rejected(self, error):
    return is_rejected(error)

  def write_batch(self, table: pa.Table) -> List[Refusal]:
    table, refused = sinks.refuse_nulls(table, _REQUIRED)
    # The Enum8 column refuses other decisions; catch them here rather than by splitting the batch.
    known = pc.is_in(table.column(_DECISION_POSITION), pa.array(DECISIONS))
    if not pc.all(known).as_py():
      odd = table.filter(pc.invert(known))
      refused.append(Refusal(odd, [ValueError(f"decision {d!r} cannot be stored")
                                   for d in odd.column(_DECISION_POSITION).to_pylist()]))
      table = table.filter(known)
    if table.num_rows:
      self._client.execute(self._insert, decision_columns(table), columnar=True)
    return refused


class WriteToClickHouse(beam.PTransform[beam.PCollection[DecisionBatch], SinkResult]):
  """DecisionBatches -> ``<database>.decisions`` in ClickHouse (see the module docstring).

  Returns a ``SinkResult``: ``written`` (rows per write) and ``dead_letters``
  (decisions the table cannot hold). Rewrites are deduplicated by the
  ReplacingMergeTree on ``transaction_id``; read with ``FINAL``.
  """

  def __init__(self, url: str, batch_size: int = 20_000, max_batch_bytes: int = 32 << 20,
               name: str = "analytics", retry: RetryPolicy = RetryPolicy()):
    super().__init__()
    ClickHouseTarget(url)
    sinks.check_batch_limits(batch_size, max_batch_bytes)
    self._url = url
    self._fn = _WriteToClickHouseFn(url, name, batch_size, max_batch_bytes, retry)

  def preflight(self) -> None:
    """Connects once, creates the database and table if missing; ``SinkConfigError`` (one line) on failure."""
    preflight(self._url)

  def expand(self, decisions) -> SinkResult:
    return sinks.write_with(decisions, "Write", self._fn)


# -- dashboard queries ---------------------------------------------------------------------------

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
