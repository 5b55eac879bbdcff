"""Analytics tier: decisions in ClickHouse for dashboards.

Table ``<database>.decisions`` (created with the database if missing):
``ENGINE = ReplacingMergeTree(decided_at_ms) PARTITION BY toYYYYMM(event_date)
ORDER BY transaction_id``. A decision written twice (retry, restart, rerun)
is two rows until a background merge keeps the one with the highest
``decided_at_ms``; every query in ``txstream.io.clickhouse_queries`` reads
through ``FINAL`` so it sees one row per ``transaction_id`` at any time.
``event_time`` and ``event_date`` are computed by the server from
``event_time_ms`` (UTC). Features are one ``Float64`` column each, named as in
the cold tier (``FEATURE_NAMES`` lowercased; ``home_distance`` is the
HOME_DISTANCE feature).

The DDL sticks to what ClickHouse 18.16 (Debian's package) already had, and
works unchanged on current releases: no ``LowCardinality``, no ``DateTime64``,
no ``IF NOT EXISTS`` on columns. A table created by an earlier version
without some feature columns or ``rules_version`` gets them at preflight
(``ALTER TABLE ... ADD COLUMN``; earlier rows hold 0 or NULL there); any other
missing column, or a column of another type, is an error.

Batches are inserted over the HTTP interface as ``FORMAT Native`` blocks
built column-wise (``txstream.io.ch_native``) of up to ``batch_size`` rows
(default 100,000). ClickHouse makes one part per insert and month, and a
part costs the server a fixed ~60 ms (measured on 18.16: mostly kernel time
creating its ~90 files), so the default is large: on the local server,
10,000-row inserts top out at 40-80k rows/s, 100,000-row ones at 170-500k
(depending on the machine's load).
Table creation, preflight and the dashboard queries use the native protocol
(clickhouse-driver).

With the table come the pre-aggregated dashboard tables and their
materialised views (``txstream.io.clickhouse_aggregates``:
``decisions_per_minute``, ``flagged_per_hour_terminal``), created by
``create_schema`` wherever the table is; history already in ``decisions`` is
backfilled into a new aggregate once.

URL: ``clickhouse://[user[:password]@]host[:port]/database[?http_port=8123]``
(``clickhouses://`` for TLS: native 9440, HTTPS 8443).
"""
import base64
import contextlib
import http.client
import logging
import re
import urllib.parse
from typing import List, Optional
from urllib.parse import unquote, urlsplit

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from clickhouse_driver import Client
from clickhouse_driver import errors as ch_errors

from txstream.core import contracts
from txstream.core.batch import DecisionBatch
from txstream.io import ch_native, clickhouse_aggregates, sinks
from txstream.io.sinks import BatchingWriteFn, Refusal, RetryPolicy, SinkConfigError, SinkResult, column_position

_LOGGER = logging.getLogger(__name__)

DECISIONS = contracts.ACTIONS
DECISION_TYPE = "Enum8('approve' = 1, 'review' = 2, 'decline' = 3)"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CODE = re.compile(r"Code: (\d+)")
_CODES = ch_errors.ErrorCodes
# Server states that pass: overload, timeouts, too many parts waiting for merges, network trouble.
_RETRYABLE_CODES = {_CODES.UNEXPECTED_END_OF_FILE, _CODES.CANNOT_READ_FROM_ISTREAM, _CODES.CANNOT_WRITE_TO_OSTREAM,
                    _CODES.ATTEMPT_TO_READ_AFTER_EOF, _CODES.TIMEOUT_EXCEEDED, _CODES.TOO_MANY_SIMULTANEOUS_QUERIES,
                    _CODES.SOCKET_TIMEOUT, _CODES.NETWORK_ERROR, _CODES.MEMORY_LIMIT_EXCEEDED,
                    _CODES.TABLE_IS_READ_ONLY, _CODES.TOO_MANY_PARTS, _CODES.ALL_CONNECTION_TRIES_FAILED,
                    _CODES.UNKNOWN_STATUS_OF_INSERT, _CODES.KEEPER_EXCEPTION, 203, 425}
_AUTH_CODES = {_CODES.UNKNOWN_USER, _CODES.WRONG_PASSWORD, 516}
# The server refusing a block for a value in it (type mismatch, out of range, too large a string).
_CONTENT_CODES = {_CODES.TYPE_MISMATCH, _CODES.CANNOT_CONVERT_TYPE, _CODES.TOO_LARGE_STRING_SIZE, 321}
# Raised while encoding a value the column type cannot hold.
_VALUE_ERRORS = (TypeError, ValueError, OverflowError, UnicodeError)

# clickhouse-driver logs each failed connect as a WARNING with the socket error's whole traceback (16 lines),
# then raises the error its caller reports anyway.
_DRIVER_LOGGER = logging.getLogger("clickhouse_driver.connection")


class _OneLineDriverWarnings(logging.Filter):
  """The driver's warnings as one line each: the error's message in place of its traceback."""

  def filter(self, record):
    if record.exc_info and record.exc_info[1] is not None:
      record.msg = f"{record.getMessage()}: {sinks.one_line(record.exc_info[1])}"
      record.args = ()
      record.exc_info = None
      record.exc_text = None
    return True


_DRIVER_LOGGER.addFilter(_OneLineDriverWarnings())


@contextlib.contextmanager
def _driver_warnings_muted():
  """Preflight raises ``SinkConfigError`` with the reason; the driver's own warning would only repeat it."""
  level = _DRIVER_LOGGER.level
  _DRIVER_LOGGER.setLevel(logging.ERROR)
  try:
    yield
  finally:
    _DRIVER_LOGGER.setLevel(level)


FEATURE_COLUMNS = list(contracts.FEATURE_COLUMNS)
# Every column an insert writes, with its type, in insert order.
COLUMNS = [("transaction_id", "String"), ("event_time_ms", "Int64"), ("customer_id", "Int64"),
           ("terminal_id", "Int64"), ("card_token", "String"), ("amount_minor", "Int64"), ("currency", "String"),
           ("entry_mode", "Nullable(String)"), ("merchant_category", "Nullable(Int32)"),
           ("customer_segment", "Nullable(String)"), ("score", "Float64"), ("decision", DECISION_TYPE),
           ("reason_codes", "Array(String)"), ("model_version", "String"), ("rules_version", "Nullable(String)"),
           ("reference_version", "Nullable(String)"), ("pipeline_version", "String"), ("schema_id", "Int32"),
           ("source", "String"), ("decided_at_ms", "UInt64")] + [(c, "Float64") for c in FEATURE_COLUMNS]
INSERT_COLUMNS = [name for name, _ in COLUMNS]
# Columns preflight adds to a table an earlier version created without them.
_ADDABLE = set(FEATURE_COLUMNS) | {"rules_version"}
_POSITIONS = [column_position(c) for c in INSERT_COLUMNS]
_REQUIRED = tuple(p for (_, t), p in zip(COLUMNS, _POSITIONS) if not t.startswith(("Nullable", "Array")))
_DECISION_POSITION = column_position("decision")
_DECIDED_AT_POSITION = column_position("decided_at_ms")
_NUMPY = {"Int64": "<i8", "Int32": "<i4", "UInt64": "<u8", "Float64": "<f8"}
# Schema statements include an aggregate's backfill, one month of decisions per statement.
SCHEMA_TIMEOUT_S = 900.0


def table_ddl(database: str) -> str:
  columns = [f"{name} {type_name}" for name, type_name in COLUMNS]
  columns[2:2] = ["event_time DateTime('UTC') DEFAULT toDateTime(intDiv(event_time_ms, 1000), 'UTC')",
                  "event_date Date DEFAULT toDate(event_time)"]
  body = ",\n  ".join(columns)
  return f"""CREATE TABLE IF NOT EXISTS {database}.decisions (
  {body}
) ENGINE = ReplacingMergeTree(decided_at_ms)
PARTITION BY toYYYYMM(event_date)
ORDER BY transaction_id"""


class ClickHouseHTTPError(Exception):
  """An error the HTTP interface answered with: its ClickHouse code (0 if none) and first line."""

  def __init__(self, code: int, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


class ClickHouseTarget:
  """A parsed ``clickhouse://[user[:password]@]host[:port]/database[?http_port=N]`` URL."""

  def __init__(self, url: str):
    if not url or not isinstance(url, str):
      raise SinkConfigError("a ClickHouse URL is required, e.g. clickhouse://127.0.0.1:9000/txstream")
    parts = urlsplit(url)
    if parts.scheme not in ("clickhouse", "clickhouses"):
      raise SinkConfigError(f"ClickHouse URL {sinks.redact(url)!r}: scheme must be clickhouse:// (native protocol)")
    self.secure = parts.scheme == "clickhouses"
    try:
      self.port = parts.port or (9440 if self.secure else 9000)
      query = urllib.parse.parse_qs(parts.query, strict_parsing=bool(parts.query))
      unknown = set(query) - {"http_port"}
      if unknown:
        raise ValueError(f"unknown parameter {sorted(unknown)[0]!r} (only http_port)")
      self.http_port = int(query.get("http_port", [8443 if self.secure else 8123])[-1])
    except ValueError as error:
      raise SinkConfigError(f"ClickHouse URL {sinks.redact(url)!r}: {error}") from None
    if not parts.hostname:
      raise SinkConfigError(f"ClickHouse URL {sinks.redact(url)!r}: no host")
    self.host = parts.hostname
    self.database = parts.path.strip("/") or "default"
    if not _NAME.match(self.database):
      raise SinkConfigError(f"ClickHouse URL {sinks.redact(url)!r}: database name {self.database!r} "
                            "is not a plain identifier")
    self.user = unquote(parts.username) if parts.username else "default"
    self.password = unquote(parts.password) if parts.password else ""

  @property
  def where(self) -> str:
    return f"{self.host}:{self.port}"

  def client(self, database: Optional[str] = None, timeout_s: float = 60.0) -> Client:
    return Client(self.host, port=self.port, database=database or self.database, user=self.user,
                  password=self.password, secure=self.secure, connect_timeout=5, send_receive_timeout=timeout_s,
                  sync_request_timeout=5, client_name="txstream")

  def http(self, sql: str, body: Optional[bytes] = None, timeout_s: float = 60.0) -> bytes:
    """Runs ``sql`` over the HTTP interface (``body``: the data of an INSERT); returns the response body.

    One connection per call: an idle keep-alive connection is closed by the
    server after a few seconds, and a local connect costs far less than an insert.
    """
    kind = http.client.HTTPSConnection if self.secure else http.client.HTTPConnection
    connection = kind(self.host, self.http_port, timeout=timeout_s)
    headers = {"Connection": "close"}
    if self.user != "default" or self.password:
      token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
      headers["Authorization"] = f"Basic {token}"
    try:
      if body is None:
        connection.request("POST", "/", body=sql.encode(), headers=headers)
      else:
        connection.request("POST", "/?" + urllib.parse.urlencode({"query": sql}), body=body, headers=headers)
      response = connection.getresponse()
      data = response.read()
    finally:
      connection.close()
    if response.status != 200:
      text = data.decode("utf-8", "replace")
      code = _CODE.search(text)
      raise ClickHouseHTTPError(int(code.group(1)) if code else 0, sinks.one_line(text.split(", Stack trace")[0]))
    return data


def is_retryable(error: BaseException) -> bool:
  if isinstance(error, (ch_errors.NetworkError, ch_errors.SocketTimeoutError, ch_errors.UnexpectedPacketFromServerError,
                        EOFError, OSError, http.client.HTTPException)):
    return True
  return isinstance(error, (ch_errors.ServerException, ClickHouseHTTPError)) and error.code in _RETRYABLE_CODES


def is_rejected(error: BaseException) -> bool:
  if isinstance(error, ClickHouseHTTPError):
    return error.code in _CONTENT_CODES
  return isinstance(error, _VALUE_ERRORS) and not is_retryable(error)


def _message(error: BaseException) -> str:
  text = getattr(error, "message", None) or str(error)
  return sinks.one_line(text.split(". Stack trace:")[0])


def create_schema(database: str, run: clickhouse_aggregates.Run) -> None:
  """Creates the database, the ``decisions`` table and the aggregates if missing (idempotent).

  ``run(sql)`` executes one statement and returns its result as text.
  """
  run(f"CREATE DATABASE IF NOT EXISTS {database}")
  run(table_ddl(database))
  clickhouse_aggregates.ensure_aggregates(database, run)


def native_runner(client: Client) -> clickhouse_aggregates.Run:
  """``run(sql)`` for ``create_schema`` over a clickhouse-driver client: rows as tab-separated lines."""
  return lambda sql: "\n".join("\t".join(str(v) for v in row) for row in client.execute(sql) or [])


def ensure_schema(target: ClickHouseTarget) -> None:
  """Creates the database, the ``decisions`` table and the aggregates if missing (idempotent)."""
  admin = target.client(database="default", timeout_s=SCHEMA_TIMEOUT_S)
  try:
    create_schema(target.database, native_runner(admin))
  finally:
    admin.disconnect()


def _add_missing_columns(client: Client, database: str, have: dict) -> None:
  """Adds the addable columns (features, rules_version) a table from an earlier version lacks."""
  added = [(c, t) for c, t in COLUMNS if c in _ADDABLE and c not in have]
  if added and all(c in have for c in INSERT_COLUMNS if c not in _ADDABLE):
    # One ALTER, no IF NOT EXISTS: 18.16 has none. Rows written before hold 0 (features) or NULL there.
    client.execute(f"ALTER TABLE {database}.decisions " + ", ".join(f"ADD COLUMN {c} {t}" for c, t in added))
    _LOGGER.warning("ClickHouse table %s.decisions: added columns %s", database, ", ".join(c for c, _ in added))
    have.update(added)


def _table_columns(target: ClickHouseTarget) -> dict:
  """{column: type} of the decisions table, created (or given its addable columns) first."""
  ensure_schema(target)
  client = target.client()
  try:
    have = {row[0]: row[1] for row in client.execute(f"DESCRIBE TABLE {target.database}.decisions")}
    _add_missing_columns(client, target.database, have)
  finally:
    client.disconnect()
  return have


def preflight(url: str) -> None:
  """Connects once, creates the database and table if missing, checks the table's columns and the HTTP port.

  Raises ``SinkConfigError`` with one line for a bad URL, a refused
  connection, rejected credentials, a table without the expected columns
  (or with other types) or an HTTP interface that does not answer.
  """
  target = ClickHouseTarget(url)
  try:
    with _driver_warnings_muted():
      have = _table_columns(target)
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
  other = [f"{c} is {have[c]}, expected {t}" for c, t in COLUMNS if have[c] != t]
  if other:
    raise SinkConfigError(f"ClickHouse table {target.database}.decisions: {'; '.join(other)}")
  try:
    target.http("SELECT 1")
  except (ClickHouseHTTPError, OSError, http.client.HTTPException) as error:
    raise SinkConfigError(f"ClickHouse HTTP interface at {target.host}:{target.http_port} (inserts go there; "
                          f"set ?http_port= in the URL): {_message(error)}") from None


def native_block(table: pa.Table) -> bytes:
  """A ``contracts.DECISION`` table as one Native block of ``COLUMNS``.

  Rows must have values where the columns are not Nullable, a known
  decision and a non-negative ``decided_at_ms`` (``write_batch`` refuses the others).
  """
  columns = []
  for (name, type_name), position in zip(COLUMNS, _POSITIONS):
    column = table.column(position)
    if type_name in _NUMPY:
      data = ch_native.numbers(column.to_numpy(), _NUMPY[type_name])
    elif type_name == "String":
      data = ch_native.strings(column)
    elif type_name == "Nullable(String)":
      data = ch_native.nullable_strings(column)
    elif type_name == "Nullable(Int32)":
      data = ch_native.nullable_numbers(column, "<i4")
    elif type_name == "Array(String)":
      data = ch_native.string_arrays(column)
    else:
      data = ch_native.enum8(column, DECISIONS, (1, 2, 3))
    columns.append((name, type_name, data))
  return ch_native.block(columns, table.num_rows)


def refuse_unstorable(table: pa.Table) -> tuple:
  """Splits off rows the table cannot hold: a null in a non-Nullable column, an unknown decision (the
  Enum8 refuses it) or a negative ``decided_at_ms`` (UInt64). Returns (rows to write, refusals)."""
  table, refused = sinks.refuse_nulls(table, _REQUIRED)
  decision, decided_at = table.column(_DECISION_POSITION), table.column(_DECIDED_AT_POSITION)
  ok = pc.and_(pc.is_in(decision, pa.array(DECISIONS)), pc.greater_equal(decided_at, 0))
  if not pc.all(ok).as_py():
    odd = table.filter(pc.invert(ok))
    refused.append(Refusal(odd, [ValueError(f"decision {d!r} cannot be stored" if d not in DECISIONS
                                            else f"decided_at_ms {t} is negative")
                                 for d, t in zip(odd.column(_DECISION_POSITION).to_pylist(),
                                                 odd.column(_DECIDED_AT_POSITION).to_pylist())]))
    table = table.filter(ok)
  return table, refused


class _WriteToClickHouseFn(BatchingWriteFn):
  def __init__(self, url: str, name: str, batch_size: int, max_batch_bytes: int, retry: RetryPolicy):
    super().__init__(name, batch_size, max_batch_bytes, retry)
    self._url = url
    self._target = None
    self._insert = None

  def open_client(self):
    self._target = ClickHouseTarget(self._url)
    # A worker may start against a server nobody has run preflight on: create what is missing.
    create_schema(self._target.database, lambda sql: self._target.http(sql, timeout_s=SCHEMA_TIMEOUT_S).decode())
    self._insert = f"INSERT INTO {self._target.database}.decisions ({', '.join(INSERT_COLUMNS)}) FORMAT Native"

  def close_client(self):
    self._target = None

  def is_retryable(self, error):
    return is_retryable(error)

  def is_rejected(self, error):
    return is_rejected(error)

  def write_batch(self, table: pa.Table) -> List[Refusal]:
    table, refused = refuse_unstorable(table)
    if table.num_rows:
      self._target.http(self._insert, native_block(table))
    return refused


class WriteToClickHouse(beam.PTransform[beam.PCollection[DecisionBatch], SinkResult]):
  """DecisionBatches -> ``<database>.decisions`` in ClickHouse (see the module docstring).

  Returns a ``SinkResult``: ``written`` (rows per write) and ``dead_letters``
  (decisions the table cannot hold). Rewrites are deduplicated by the
  ReplacingMergeTree on ``transaction_id``; read with ``FINAL``.
  """

  def __init__(self, url: str, batch_size: int = 100_000, max_batch_bytes: int = 64 << 20,
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
