"""Warm tier: decisions, dead letters and run records in PostgreSQL, for operational queries.

Schema (``txstream/io/migrations/0001_initial.sql``, applied by ``preflight``
and by every writer when it connects):

``decisions``      partitioned by ``event_date`` (UTC day), one partition per
                   day created on demand; key ``(event_date, transaction_id)``.
``decision_keys``  ``transaction_id`` -> ``event_date``; makes
                   ``transaction_id`` unique across partitions.
``dead_letters``   key ``(source, stage)``.
``runs``           one row per run: versions of code, model, reference data
                   and schemas, and the run summary.

A batch is written in one transaction: ``COPY`` into a temporary staging
table, then ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``. Writing the same
decision again replaces it with itself, so retries, restarts and reruns never
duplicate. A decision whose ``transaction_id`` is already stored under a
different event day (an upstream contract violation: event times never
change) is not written; it becomes a dead letter with reason
``transaction_id_conflict``.

Operational queries (each takes an open psycopg2 connection and returns dicts):
  ``decision_by_id(conn, transaction_id)``          one decision, reading one partition
  ``decisions_for_customer(conn, customer_id, since_ms, until_ms=None, limit=1000)``
                                                    a customer's decisions, newest first
  ``review_queue(conn, limit=100, since_ms=None)``  decisions awaiting review, highest score first
  ``daily_counts(conn, since_ms=None)``             rows per event day and decision
  ``dead_letter_counts(conn)``                      dead letters per stage and reason

DSN: a libpq keyword string (``host=127.0.0.1 dbname=txstream user=postgres``)
or a URL (``postgresql://postgres@127.0.0.1:5432/txstream``).
"""
import datetime
import io
import json
import logging
import re
from typing import Dict, Iterable, List, Optional

import apache_beam as beam
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras

import txstream
from txstream.io import migrations, sinks
from txstream.io.sinks import BatchingWriteFn, RetryPolicy, SinkConfigError, SinkResult
from txstream.records import DeadLetter, Decision

_LOGGER = logging.getLogger(__name__)

DAY_MS = 86_400_000
_EPOCH = datetime.date(1970, 1, 1)
PARTITION_LOCK_KEY = 0x7478_0002
_PERMANENT_CONNECT = ("password authentication failed", "does not exist", "no pg_hba.conf entry",
                      "permission denied", "invalid connection option", "role ")
# COPY text format: backslash, tab, newline and CR are escaped; NUL cannot be stored in text.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": "\ufffd"})
_NEEDS_ESCAPE = re.compile("[\\\\\t\n\r\x00]").search
_NEEDS_ARRAY_ESCAPE = re.compile('[\\\\"]').search
_ARRAY_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"'})
_NULL = "\\N"
_COPY_CHUNK = 1 << 20
# Errors building a row from a malformed record: that record becomes a dead letter, the rest are written.
_ROW_ERRORS = (TypeError, ValueError, AttributeError, UnicodeError, OverflowError)

_STAGE_COLUMNS = ("transaction_id", "event_day", "event_time_ms", "customer_id", "terminal_id", "card_token",
                  "amount_minor", "currency", "entry_mode", "merchant_category", "customer_segment",
                  "home_distance", "score", "decision", "reason_codes", "features", "model_version",
                  "reference_version", "pipeline_version", "schema_id", "source", "decided_at_ms")
_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS decisions_stage (
  transaction_id text, event_day integer, event_time_ms bigint, customer_id bigint, terminal_id bigint,
  card_token text, amount_minor bigint, currency text, entry_mode text, merchant_category integer,
  customer_segment text, home_distance double precision, score double precision, decision text,
  reason_codes text[], features double precision[], model_version text, reference_version text,
  pipeline_version text, schema_id integer, source text, decided_at_ms bigint
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS dead_letters_stage (
  source text, stage text, reason text, error_class text, message text, pipeline_version text, raw bytea
) ON COMMIT DELETE ROWS"""
_UPSERT_KEYS = """
INSERT INTO decision_keys (transaction_id, event_date)
SELECT transaction_id, DATE '1970-01-01' + event_day FROM decisions_stage ORDER BY transaction_id
ON CONFLICT (transaction_id) DO NOTHING"""
_DROP_CONFLICTS = """
DELETE FROM decisions_stage s USING decision_keys k
WHERE k.transaction_id = s.transaction_id AND k.event_date <> DATE '1970-01-01' + s.event_day
RETURNING s.transaction_id, k.event_date"""
_DECISION_COLUMNS = ("event_date", "transaction_id", "event_time", "customer_id", "terminal_id", "card_token",
                     "amount_minor", "currency", "entry_mode", "merchant_category", "customer_segment",
                     "home_distance", "score", "decision", "reason_codes", "features", "model_version",
                     "reference_version", "pipeline_version", "schema_id", "source", "decided_at")
_UPSERT_DECISIONS = f"""
INSERT INTO decisions ({", ".join(_DECISION_COLUMNS)})
SELECT DATE '1970-01-01' + event_day, transaction_id, TIMESTAMPTZ 'epoch' + event_time_ms * INTERVAL '1 ms',
       customer_id, terminal_id, card_token, amount_minor, currency, entry_mode, merchant_category,
       customer_segment, home_distance, score, decision, reason_codes, features, model_version,
       reference_version, pipeline_version, schema_id, source, TIMESTAMPTZ 'epoch' + decided_at_ms * INTERVAL '1 ms'
FROM decisions_stage ORDER BY transaction_id
ON CONFLICT (event_date, transaction_id) DO UPDATE SET
  {", ".join(f"{c} = EXCLUDED.{c}" for c in _DECISION_COLUMNS[2:])}, written_at = now()"""
_UPSERT_DEAD = """
INSERT INTO dead_letters (source, stage, reason, error_class, message, pipeline_version, raw)
SELECT source, stage, reason, error_class, message, pipeline_version, raw FROM dead_letters_stage
ORDER BY source, stage
ON CONFLICT (source, stage) DO UPDATE SET
  reason = EXCLUDED.reason, error_class = EXCLUDED.error_class, message = EXCLUDED.message,
  pipeline_version = EXCLUDED.pipeline_version, raw = EXCLUDED.raw, last_seen_at = now()"""


class _PartitionMissing(Exception):
  """A day partition the writer believed existed is gone (dropped by retention); recreate and retry."""


# -- connections, errors, preflight --------------------------------------------------------------

def parse_dsn(dsn: str) -> Dict[str, str]:
  if not dsn or not isinstance(dsn, str):
    raise SinkConfigError("a PostgreSQL DSN is required, e.g. 'host=127.0.0.1 dbname=txstream user=postgres'")
  try:
    return psycopg2.extensions.parse_dsn(dsn)
  except psycopg2.ProgrammingError as error:
    raise SinkConfigError(f"PostgreSQL DSN {dsn!r} is invalid: {sinks.one_line(error)}") from None


def connect(dsn: str, connect_timeout_s: int = 10):
  """A psycopg2 connection with keepalives, so a dead server is noticed instead of waited on forever."""
  return psycopg2.connect(dsn, connect_timeout=connect_timeout_s, application_name="txstream",
                          keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)


def _first_line(error: BaseException) -> str:
  lines = [x.strip() for x in str(error).splitlines() if x.strip()]
  return lines[0] if lines else type(error).__name__


def is_retryable(error: BaseException) -> bool:
  """Connection loss, server restarts, lock and serialisation conflicts, exhausted resources."""
  if isinstance(error, (psycopg2.InterfaceError, _PartitionMissing)):
    return True
  code = getattr(error, "pgcode", None)
  if code is None:
    # libpq-level failure (refused, reset, timed out) unless it is a permanent connect error.
    text = str(error)
    return isinstance(error, psycopg2.OperationalError) and not any(p in text for p in _PERMANENT_CONNECT)
  if code == "57P04":  # database dropped
    return False
  return code[:2] in ("08", "53", "57") or code in ("40001", "40P01", "55P03")


def is_rejected(error: BaseException) -> bool:
  """Errors caused by a record's content: data exceptions (22) and constraint violations (23)."""
  code = getattr(error, "pgcode", None) or ""
  return code[:2] in ("22", "23")


def _where(info: Dict[str, str]) -> str:
  return f"{info.get('host', 'localhost')}:{info.get('port', '5432')}"


def preflight(dsn: str) -> List[str]:
  """Connects once and applies migrations; returns the versions it applied.

  Raises ``SinkConfigError`` with one line for a bad DSN, a refused
  connection, rejected credentials or a missing database (with a ``createdb`` hint).
  """
  info = parse_dsn(dsn)
  where = _where(info)
  try:
    conn = connect(dsn, connect_timeout_s=5)
  except psycopg2.OperationalError as error:
    text = _first_line(error)
    dbname = info.get("dbname", info.get("user", ""))
    if f'database "{dbname}" does not exist' in text:
      raise SinkConfigError(f'PostgreSQL at {where}: database "{dbname}" does not exist '
                            f"(create it: createdb -h {info.get('host', 'localhost')} -p {info.get('port', '5432')} "
                            f"-U {info.get('user', 'postgres')} {dbname})") from None
    if any(p in text for p in _PERMANENT_CONNECT):
      raise SinkConfigError(f"PostgreSQL at {where} refused the connection: {text}") from None
    raise SinkConfigError(f"cannot connect to PostgreSQL at {where}: {text}") from None
  try:
    return migrations.apply(conn)
  except psycopg2.Error as error:
    raise SinkConfigError(f"PostgreSQL at {where}: migrations failed: {_first_line(error)}") from None
  finally:
    conn.close()


def ensure_partitions(conn, days: Iterable[int]) -> None:
  """Creates the ``decisions`` partitions of the given days (days since 1970-01-01 UTC) if missing."""
  days = sorted(set(days))
  if not days:
    return
  with conn, conn.cursor() as cur:
    cur.execute("SELECT pg_advisory_xact_lock(%s)", (PARTITION_LOCK_KEY,))
    for day in days:
      start = _EPOCH + datetime.timedelta(days=day)
      cur.execute(f"CREATE TABLE IF NOT EXISTS decisions_p{start:%Y%m%d} PARTITION OF decisions "
                  f"FOR VALUES FROM ('{start.isoformat()}') TO ('{start + datetime.timedelta(days=1)}')")


# -- COPY rows -----------------------------------------------------------------------------------

def _text(value) -> str:
  if value is None:
    return _NULL
  text = value if isinstance(value, str) else str(value)
  # str.translate costs ~2 µs a call; most values need no escaping, and the search is ~0.2 µs.
  return text.translate(_COPY_ESCAPES) if _NEEDS_ESCAPE(text) else text


def _floats(values) -> str:
  """A float8[] literal. float.__repr__ is the fast path (Python and numpy float64 values)."""
  try:
    return "{" + ",".join(map(float.__repr__, values)) + "}"
  except TypeError:
    return "{" + ",".join([repr(float(x)) for x in values]) + "}"


def _num(value) -> str:
  return _NULL if value is None else str(value)


def _text_array(values) -> str:
  """A text[] literal: every element quoted, backslash and double quote escaped."""
  if not values:
    return "{}"
  joined = '","'.join(values)
  if _NEEDS_ARRAY_ESCAPE(joined):
    joined = '","'.join([str(v).translate(_ARRAY_ESCAPES) for v in values])
  return '{"' + joined + '"}'


def decision_line(d: Decision) -> str:
  """One ``decisions_stage`` row in COPY text format."""
  t = d.transaction
  return "\t".join((
      _text(t.transaction_id), str(t.event_time_ms // DAY_MS), str(int(t.event_time_ms)), str(int(t.customer_id)),
      str(int(t.terminal_id)), _text(t.card_token), str(int(t.amount_minor)), _text(t.currency),
      _text(t.entry_mode), _num(t.merchant_category), _text(t.customer_segment), _num(t.home_distance),
      str(float(d.score)), _text(d.decision), _text(_text_array(d.reason_codes)),
      _floats(d.features), _text(d.model_version),
      _text(t.reference_version), _text(d.pipeline_version), str(int(t.schema_id)), _text(t.source),
      str(int(d.decided_at_ms))))


def dead_letter_line(x: DeadLetter) -> str:
  raw = _NULL if x.raw is None else "\\\\x" + bytes(x.raw).hex()
  return "\t".join((_text(x.source), _text(x.stage), _text(x.reason), _text(x.error_class), _text(x.message),
                    _text(x.pipeline_version), raw))


# -- writers -------------------------------------------------------------------------------------

class _PostgresWriteFn(BatchingWriteFn):
  """Connection handling shared by the decision and dead-letter writers."""

  def __init__(self, dsn: str, name: str, batch_size: int, max_batch_bytes: int, retry: RetryPolicy):
    super().__init__(name, batch_size, max_batch_bytes, retry)
    self._dsn = dsn
    self._conn = None

  def open_client(self):
    conn = connect(self._dsn)
    try:
      migrations.apply(conn)
      with conn, conn.cursor() as cur:
        cur.execute(_CREATE_STAGE)
    except Exception:
      conn.close()
      raise
    self._conn = conn

  def close_client(self):
    if self._conn is not None:
      conn, self._conn = self._conn, None
      conn.close()

  def is_retryable(self, error):
    return is_retryable(error)

  def is_rejected(self, error):
    return is_rejected(error)

  def _lines(self, rows, line_fn, key_fn):
    """COPY lines for rows (the last row wins per key) and dead letters for rows that cannot be encoded."""
    latest, dead = {}, []
    for row in rows:
      try:
        latest[key_fn(row)] = (line_fn(row), row)
      except _ROW_ERRORS as error:
        dead.append((self.dead_letter_for(row, error), row))
    return latest, dead


class _WriteDecisionsFn(_PostgresWriteFn):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._partitions = set()

  def write_batch(self, rows: List[Decision]):
    # Later copies of a transaction in one batch win (ON CONFLICT cannot touch a row twice).
    latest, dead = self._lines(rows, decision_line, lambda d: d.transaction.transaction_id)
    if not latest:
      return dead
    days = {row.transaction.event_time_ms // DAY_MS for _, row in latest.values()}
    missing = days - self._partitions
    if missing:
      ensure_partitions(self._conn, missing)
      self._partitions |= missing
    buf = io.StringIO("\n".join(line for line, _ in latest.values()) + "\n")
    try:
      with self._conn, self._conn.cursor() as cur:
        cur.copy_expert(f"COPY decisions_stage ({', '.join(_STAGE_COLUMNS)}) FROM STDIN", buf, size=_COPY_CHUNK)
        cur.execute(_UPSERT_KEYS)
        cur.execute(_DROP_CONFLICTS)
        conflicts = cur.fetchall()
        cur.execute(_UPSERT_DECISIONS)
    except psycopg2.errors.CheckViolation as error:
      if "no partition of relation" in str(error):
        self._partitions.clear()
        raise _PartitionMissing(_first_line(error)) from error
      raise
    for transaction_id, stored_date in conflicts:
      row = latest[transaction_id][1]
      error = ValueError(f"already stored with event_date {stored_date}")
      dead.append((self.dead_letter_for(row, error, reason="transaction_id_conflict"), row))
    return dead


class _WriteDeadLettersFn(_PostgresWriteFn):
  def row_bytes(self, row: DeadLetter) -> int:
    return 96 + len(row.source) + len(row.message) + (2 * len(row.raw) if row.raw else 0)

  def write_batch(self, rows: List[DeadLetter]):
    latest, dead = self._lines(rows, dead_letter_line, lambda x: (x.source, x.stage))
    if latest:
      buf = io.StringIO("\n".join(line for line, _ in latest.values()) + "\n")
      with self._conn, self._conn.cursor() as cur:
        cur.copy_expert("COPY dead_letters_stage (source, stage, reason, error_class, message, pipeline_version, "
                        "raw) FROM STDIN", buf, size=_COPY_CHUNK)
        cur.execute(_UPSERT_DEAD)
    return dead


class WriteToPostgres(beam.PTransform[beam.PCollection[Decision], SinkResult]):
  """Decisions -> the ``decisions`` table (upsert on ``transaction_id``; see the module docstring).

  Returns a ``SinkResult``: ``written`` (rows per batch) and ``dead_letters``
  (decisions the database refused, e.g. a ``transaction_id`` stored under
  another event day). Idempotent; batch and streaming.
  """

  def __init__(self, dsn: str, batch_size: int = 5000, max_batch_bytes: int = 16 << 20, name: str = "warm",
               retry: RetryPolicy = RetryPolicy()):
    super().__init__()
    parse_dsn(dsn)
    sinks.check_batch_limits(batch_size, max_batch_bytes)
    self._dsn = dsn
    self._fn = _WriteDecisionsFn(dsn, name, batch_size, max_batch_bytes, retry)

  def preflight(self) -> List[str]:
    """Connects once and applies migrations; ``SinkConfigError`` (one line) on any problem."""
    return preflight(self._dsn)

  def expand(self, decisions) -> SinkResult:
    return sinks.write_with(decisions, "Write", self._fn)


class WriteDeadLettersToPostgres(beam.PTransform[beam.PCollection[DeadLetter], SinkResult]):
  """DeadLetters -> the ``dead_letters`` table, upserted on ``(source, stage)``.

  Returns a ``SinkResult``; its ``dead_letters`` holds letters that could not
  be stored themselves (malformed fields), normally none.
  """

  def __init__(self, dsn: str, batch_size: int = 2000, max_batch_bytes: int = 16 << 20,
               name: str = "warm_dead_letters", retry: RetryPolicy = RetryPolicy()):
    super().__init__()
    parse_dsn(dsn)
    sinks.check_batch_limits(batch_size, max_batch_bytes)
    self._dsn = dsn
    self._fn = _WriteDeadLettersFn(dsn, name, batch_size, max_batch_bytes, retry)

  def preflight(self) -> List[str]:
    return preflight(self._dsn)

  def expand(self, letters) -> SinkResult:
    return sinks.write_with(letters, "Write", self._fn)


# -- run records ---------------------------------------------------------------------------------

def _moment(value) -> Optional[datetime.datetime]:
  if value is None or isinstance(value, datetime.datetime):
    return value
  if isinstance(value, (int, float)):
    return datetime.datetime.fromtimestamp(value / 1000, tz=datetime.timezone.utc)
  return datetime.datetime.fromisoformat(str(value))


def record_run(dsn: str, run_record: dict) -> None:
  """Upserts one ``runs`` row (call at start, and again at the end with ``finished_at`` and ``summary``).

  Keys: ``run_id`` (required), ``started_at`` (required on first call),
  ``finished_at``, ``pipeline_version`` (default: this package's),
  ``code_version``, ``model_version``, ``reference_version``, ``schema_ids``
  (list of int), ``summary`` (JSON-able dict). Times are datetimes, ISO
  strings or epoch milliseconds. Keys left out keep their stored value.
  Idempotent: recording the same values again changes nothing.
  """
  unknown = set(run_record) - {"run_id", "started_at", "finished_at", "pipeline_version", "code_version",
                               "model_version", "reference_version", "schema_ids", "summary"}
  if unknown or not run_record.get("run_id"):
    raise ValueError(f"run record needs run_id and only known keys; unknown: {sorted(unknown)}")
  row = dict(run_record)
  row.setdefault("pipeline_version", txstream.__version__)
  for key in ("started_at", "finished_at"):
    if key in row:
      row[key] = _moment(row[key])
  if "summary" in row:
    row["summary"] = json.dumps(row["summary"], sort_keys=True, default=str)
  if "schema_ids" in row:
    row["schema_ids"] = [int(x) for x in row["schema_ids"]]
  columns = list(row)
  if "started_at" in row:
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in columns if c != "run_id")
    sql = (f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}) "
           f"ON CONFLICT (run_id) DO UPDATE SET {updates}")
    params = [row[c] for c in columns]
  else:
    columns.remove("run_id")
    sql = f"UPDATE runs SET {', '.join(f'{c} = %s' for c in columns)} WHERE run_id = %s"
    params = [row[c] for c in columns] + [row["run_id"]]
  conn = connect(dsn)
  try:
    migrations.apply(conn)
    with conn, conn.cursor() as cur:
      cur.execute(sql, params)
      if cur.rowcount == 0:
        raise ValueError(f"run {row['run_id']!r} is not recorded yet; its first record needs started_at")
  finally:
    conn.close()


# -- operational queries -------------------------------------------------------------------------

_SELECT = """SELECT transaction_id, event_date, (extract(epoch FROM event_time) * 1000)::bigint AS event_time_ms,
  customer_id, terminal_id, card_token, amount_minor, currency, entry_mode, merchant_category, score, decision,
  reason_codes, features, model_version, reference_version, pipeline_version, schema_id, source,
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
