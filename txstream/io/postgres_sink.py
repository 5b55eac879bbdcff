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

A batch is written in one transaction: ``COPY ... (FORMAT csv)`` into a
temporary staging table, then ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``.
The CSV is written by Arrow from the batch's columns (``stage_table``): text
quoted (so ``""`` is an empty string and an unquoted empty field is NULL), NUL
characters replaced by U+FFFD (text cannot hold them), arrays as PostgreSQL
array literals, floats as their shortest exact text; times stay epoch
milliseconds until the upsert turns them into timestamps. Writing the same
decision again replaces it with itself, so retries, restarts and reruns never
duplicate; within a batch, the last copy of a ``transaction_id`` wins. A
decision whose ``transaction_id`` is already stored under a different event
day (an upstream contract violation: event times never change) is not
written; it becomes a dead letter with reason ``transaction_id_conflict``. A
decision with a null where the table needs a value is a dead letter too.

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
import json
import logging
from typing import Dict, Iterable, List, Optional, Sequence

import apache_beam as beam
import numpy as np
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv

import txstream
from txstream.core import contracts
from txstream.core.batch import DeadLetterBatch, DecisionBatch
from txstream.io import migrations, sinks
from txstream.io.sinks import (FEATURE_POSITIONS, BatchingWriteFn, Refusal, RetryPolicy, SinkConfigError, SinkResult,
                               column_position)

_LOGGER = logging.getLogger(__name__)

DAY_MS = contracts.DAY_MS
_EPOCH = datetime.date(1970, 1, 1)
PARTITION_LOCK_KEY = 0x7478_0002
_PERMANENT_CONNECT = ("password authentication failed", "does not exist", "no pg_hba.conf entry",
                      "permission denied", "invalid connection option", "role ")
_COPY_CHUNK = 1 << 20
_CSV = pyarrow.csv.WriteOptions(include_header=False)

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

# decisions_stage columns the DECISION table cannot leave null (the decisions table's NOT NULL ones).
_DECISION_REQUIRED = tuple(column_position(c) for c in (
    "transaction_id", "event_time_ms", "customer_id", "terminal_id", "card_token", "amount_minor", "currency",
    "score", "decision", "model_version", "pipeline_version", "schema_id", "source", "decided_at_ms")) \
    + FEATURE_POSITIONS
_DEAD_LETTER_REQUIRED = tuple(column_position(c, contracts.DEAD_LETTER) for c in (
    "source", "stage", "reason", "error_class", "message", "pipeline_version"))


def _text(column) -> pa.ChunkedArray:
  """A text column without NUL characters (PostgreSQL text cannot hold them)."""
  return pc.replace_substring(column, "\x00", "\ufffd")


def _text_array(column) -> pa.ChunkedArray:
  """list<string> -> text[] literals: every element quoted, backslash and double quote escaped; null -> {}."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  values = pc.list_flatten(column)
  escaped = pc.replace_substring(pc.replace_substring(_text(values), "\\", "\\\\"), '"', '\\"')
  offsets = pc.list_value_length(column).fill_null(0).to_numpy()
  lists = pa.ListArray.from_arrays(pa.array(np.concatenate(([0], np.cumsum(offsets))), pa.int32()), escaped)
  joined = pc.binary_join_element_wise('{"', pc.binary_join(lists, '","'), '"}', "")
  return pc.if_else(pc.equal(pc.list_value_length(lists), 0), "{}", joined)


def _float_array(columns: Sequence) -> pa.ChunkedArray:
  """double precision[] literals from float columns (shortest exact text; nan, inf as PostgreSQL reads them)."""
  texts = [pc.cast(c, pa.string()) for c in columns]
  return pc.binary_join_element_wise("{", pc.binary_join_element_wise(*texts, ","), "}", "")


def stage_table(table: pa.Table) -> pa.Table:
  """A ``contracts.DECISION`` table as ``decisions_stage`` rows, in ``_STAGE_COLUMNS`` order."""
  def col(name):
    return table.column(column_position(name))

  event_ms = col("event_time_ms")
  columns = {
      "transaction_id": _text(col("transaction_id")),
      "event_day": pa.array(np.floor_divide(event_ms.to_numpy(), DAY_MS)),
      "reason_codes": _text_array(col("reason_codes")),
      "features": _float_array([table.column(i) for i in FEATURE_POSITIONS]),
      # The HOME_DISTANCE feature is -1 where the terminal is not on file: NULL in this column.
      "home_distance": pc.if_else(pc.equal(col("home_distance"), -1.0), None, col("home_distance")),
  }
  for name in _STAGE_COLUMNS:
    if name not in columns:
      column = col(name)
      columns[name] = _text(column) if pa.types.is_string(column.type) else column
  return pa.table([columns[name] for name in _STAGE_COLUMNS], names=list(_STAGE_COLUMNS))


def dead_letter_stage_table(table: pa.Table) -> pa.Table:
  """A ``contracts.DEAD_LETTER`` table as ``dead_letters_stage`` rows (raw as bytea hex text)."""
  raw = ["\\x" + value.hex() if value is not None else None for value in table.column("raw").to_pylist()]
  names = ["source", "stage", "reason", "error_class", "message", "pipeline_version"]
  return pa.table([_text(table.column(n)) for n in names] + [pa.array(raw, pa.string())], names=names + ["raw"])


def _csv(table: pa.Table) -> pa.BufferReader:
  out = pa.BufferOutputStream()
  pyarrow.csv.write_csv(table, out, _CSV)
  return pa.BufferReader(out.getvalue())


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


class _WriteDecisionsFn(_PostgresWriteFn):
  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._partitions = set()

  def write_batch(self, table: pa.Table) -> List[Refusal]:
    table, refused = sinks.refuse_nulls(table, _DECISION_REQUIRED)
    if not table.num_rows:
      return refused
    table = last_per_key(table, ["transaction_id"])
    stage = stage_table(table)
    days = set(np.unique(stage.column("event_day").to_numpy()).tolist())
    missing = days - self._partitions
    if missing:
      ensure_partitions(self._conn, missing)
      self._partitions |= missing
    try:
      with self._conn, self._conn.cursor() as cur:
        cur.copy_expert(f"COPY decisions_stage ({', '.join(_STAGE_COLUMNS)}) FROM STDIN WITH (FORMAT csv)",
                        _csv(stage), size=_COPY_CHUNK)
        cur.execute(_UPSERT_KEYS)
        cur.execute(_DROP_CONFLICTS)
        conflicts = dict(cur.fetchall())
        cur.execute(_UPSERT_DECISIONS)
    except psycopg2.errors.CheckViolation as error:
      if "no partition of relation" in str(error):
        self._partitions.clear()
        raise _PartitionMissing(_first_line(error)) from error
      raise
    if conflicts:
      rows = table.filter(pc.is_in(table.column("transaction_id"), pa.array(list(conflicts), pa.string())))
      errors = [ValueError(f"already stored with event_date {conflicts[i]}")
                for i in rows.column("transaction_id").to_pylist()]
      refused.append(Refusal(rows, errors, reason="transaction_id_conflict"))
    return refused


class _WriteDeadLettersFn(_PostgresWriteFn):
  def write_batch(self, table: pa.Table) -> List[Refusal]:
    table, refused = sinks.refuse_nulls(table, _DEAD_LETTER_REQUIRED)
    if table.num_rows:
      stage = dead_letter_stage_table(last_per_key(table, ["source", "stage"]))
      with self._conn, self._conn.cursor() as cur:
        cur.copy_expert("COPY dead_letters_stage (source, stage, reason, error_class, message, pipeline_version, "
                        "raw) FROM STDIN WITH (FORMAT csv)", _csv(stage), size=_COPY_CHUNK)
        cur.execute(_UPSERT_DEAD)
    return refused


class WriteToPostgres(beam.PTransform[beam.PCollection[DecisionBatch], SinkResult]):
  """DecisionBatches -> the ``decisions`` table (upsert on ``transaction_id``; see the module docstring).

  Returns a ``SinkResult``: ``written`` (rows per write) and ``dead_letters``
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


class WriteDeadLettersToPostgres(beam.PTransform[beam.PCollection[DeadLetterBatch], SinkResult]):
  """DeadLetterBatches -> the ``dead_letters`` table, upserted on ``(source, stage)``.

  Returns a ``SinkResult``; its ``dead_letters`` holds letters that could not
  be stored themselves (a null where the table needs a value), normally none.
  Within a batch, the last letter of a ``(source, stage)`` wins.
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
