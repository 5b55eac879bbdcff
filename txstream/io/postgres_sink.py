"""Warm tier: decisions and dead letters in PostgreSQL, for operational queries.

Schema (``txstream/io/migrations/``, applied by ``preflight`` and by every
writer when it connects):

``decisions``      partitioned by ``event_date`` (UTC day), one partition per
                   day created on demand; key ``(event_date, transaction_id)``.
``decision_keys``  ``transaction_id`` -> ``event_date``, the day its stored
                   decision is under; makes ``transaction_id`` unique
                   across partitions.
``dead_letters``   key ``(source, stage)``.
``runs``           one row per run (``txstream.io.postgres_runs``).
Operational queries: ``txstream.io.postgres_queries``.

A batch is written in one transaction, its rows sorted by ``transaction_id``
(every writer takes key locks in that order, so concurrent writers cannot
deadlock) and encoded once, column-wise, in PostgreSQL's binary COPY format
(``txstream.io.postgres_rows``):

1. New transactions (the usual case), under a savepoint: ``COPY`` of the keys
   into ``decision_keys``, then ``COPY`` of the rows into ``decisions``.
2. If any key is already stored (a retry, rerun or replay: the COPY fails on
   the key's uniqueness), back to the savepoint and upsert instead: ``COPY``
   into a temporary staging table, ``INSERT ... ON CONFLICT DO NOTHING`` of
   the keys, the rows whose key holds another event day moved (old row
   deleted, key updated), then ``INSERT ... SELECT ... ON CONFLICT DO
   UPDATE`` of the decisions.

Writing the same decision again replaces it with itself, so retries,
restarts and reruns never duplicate; within a batch, the last copy of a
``transaction_id`` wins. A decision whose ``transaction_id`` is stored under
a different event day (an upstream correction of the event time, or an id
reused) replaces it too, as in every other tier (the last write wins): in the
same transaction the old row is deleted and the key moved to the new day,
the key row locked first, so ``transaction_id`` stays unique across
partitions (counted as ``sink.<name>.moved``). A ``decisions`` row is only
written in the transaction that holds its key's lock; a concurrent writer of
the same new key waits for the first to commit and then takes the upsert
path. (Until migration 0002 a foreign key checked this per row, at ~9 µs a
row: other writers of ``decisions`` must follow the same protocol.) A
decision with a null where the table needs a value, a time ``timestamptz``
cannot hold, or a NUL in its text is a dead letter.

Commits are synchronous: the runner acknowledges a bundle once its writes
return, and a commit acknowledged before it is on disk could be lost.
Counter ``sink.<name>.upserts``: batch writes that took the upsert path.

DSN: a libpq keyword string (``host=127.0.0.1 dbname=txstream user=postgres``)
or a URL (``postgresql://postgres@127.0.0.1:5432/txstream``).
"""
import contextlib
import datetime
import io
import logging
import os
import socket
import threading
from typing import Dict, Iterable, List

import apache_beam as beam
import numpy as np
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pyarrow as pa
import pyarrow.compute as pc

from txstream.core import contracts
from txstream.core.batch import DeadLetterBatch, DecisionBatch
from txstream.io import migrations, sinks
from txstream.io import postgres_rows as rows
from txstream.io.sinks import BatchingWriteFn, Refusal, RetryPolicy, SinkConfigError, SinkResult

_LOGGER = logging.getLogger(__name__)

DAY_MS = contracts.DAY_MS
_EPOCH = datetime.date(1970, 1, 1)
PARTITION_LOCK_KEY = 0x7478_0002
_PERMANENT_CONNECT = ("password authentication failed", "does not exist", "no pg_hba.conf entry",
                      "permission denied", "invalid connection option", "role ")
_COPY_CHUNK = 1 << 20

_COLUMN_LIST = ", ".join(rows.DECISION_COLUMNS)
_COPY_KEYS = "COPY decision_keys (transaction_id, event_date) FROM STDIN (FORMAT binary)"
_COPY_DECISIONS = f"COPY decisions ({_COLUMN_LIST}) FROM STDIN (FORMAT binary)"
_COPY_STAGE = f"COPY decisions_stage ({_COLUMN_LIST}) FROM STDIN (FORMAT binary)"
_COPY_DEAD = f"COPY dead_letters_stage ({', '.join(rows.DEAD_LETTER_COLUMNS)}) FROM STDIN (FORMAT binary)"

_CREATE_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS decisions_stage (LIKE decisions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS dead_letters_stage (
  source text, stage text, reason text, error_class text, message text, pipeline_version text, raw bytea
) ON COMMIT DELETE ROWS"""
_UPSERT_KEYS = """
INSERT INTO decision_keys (transaction_id, event_date)
SELECT transaction_id, event_date FROM decisions_stage ORDER BY transaction_id
ON CONFLICT (transaction_id) DO NOTHING"""
# Rows stored under another event day: the old row goes and the key points at the new day, key rows locked
# first (in key order) so a concurrent writer of the same key waits.
_MOVE_DAYS = """
WITH moved AS (
  SELECT k.transaction_id, k.event_date AS old_date, s.event_date AS new_date
  FROM decision_keys k JOIN decisions_stage s ON s.transaction_id = k.transaction_id
  WHERE k.event_date <> s.event_date
  ORDER BY k.transaction_id FOR UPDATE OF k
), gone AS (
  DELETE FROM decisions d USING moved m WHERE d.transaction_id = m.transaction_id AND d.event_date = m.old_date
)
UPDATE decision_keys k SET event_date = m.new_date FROM moved m WHERE k.transaction_id = m.transaction_id"""
_UPSERT_DECISIONS = f"""
INSERT INTO decisions ({_COLUMN_LIST})
SELECT {_COLUMN_LIST} FROM decisions_stage ORDER BY transaction_id
ON CONFLICT (event_date, transaction_id) DO UPDATE SET
  {", ".join(f"{c} = EXCLUDED.{c}" for c in rows.DECISION_COLUMNS if c not in ("event_date", "transaction_id"))},
  written_at = now()"""
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
    raise SinkConfigError(f"PostgreSQL DSN {sinks.redact(dsn)!r} is invalid: {sinks.one_line(error)}") from None


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


# -- writers -------------------------------------------------------------------------------------

ANSWER_TIMEOUT_S = 30.0


@contextlib.contextmanager
def answer_within(conn, seconds: float):
  """Cuts ``conn`` if the block has not finished within ``seconds``: the blocked call then fails as a lost
  connection (retried, under the writer's deadline) instead of waiting forever on a server that keeps the
  connection open but answers nothing. Keepalives cannot tell: the server's kernel still acknowledges."""
  fired = threading.Event()

  def cut():
    fired.set()
    _LOGGER.warning("PostgreSQL has not answered for %.0f s; cutting the connection to retry", seconds)
    try:
      with socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
      pass  # already closed: the blocked call has its error

  timer = threading.Timer(seconds, cut)
  timer.daemon = True
  timer.start()
  try:
    yield
  except psycopg2.Error as error:
    if fired.is_set():
      raise psycopg2.OperationalError(f"PostgreSQL did not answer within {seconds:.0f} s") from error
    raise
  finally:
    timer.cancel()

class _PostgresWriteFn(BatchingWriteFn):
  """Connection handling shared by the decision and dead-letter writers."""

  def __init__(self, dsn: str, name: str, batch_size: int, max_batch_bytes: int, retry: RetryPolicy,
               answer_timeout_s: float = ANSWER_TIMEOUT_S):
    super().__init__(name, batch_size, max_batch_bytes, retry)
    self._dsn = dsn
    self._conn = None
    self._answer_timeout_s = answer_timeout_s

  def open_client(self):
    conn = connect(self._dsn)
    try:
      with answer_within(conn, self._answer_timeout_s):
        migrations.apply(conn)
        with conn, conn.cursor() as cur:
          cur.execute(_CREATE_STAGE)
    except Exception:
      conn.close()
      raise
    self._conn = conn

  def write_batch(self, table: pa.Table) -> List[Refusal]:
    with answer_within(self._conn, self._answer_timeout_s):
      return self._write(table)

  def _write(self, table: pa.Table) -> List[Refusal]:
    raise NotImplementedError

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

  def _write(self, table: pa.Table) -> List[Refusal]:
    table, refused = rows.refuse_unstorable(table)
    if not table.num_rows:
      return refused
    table = rows.last_per_key(table, ["transaction_id"])
    table = table.take(pc.sort_indices(table.column("transaction_id")))  # every writer locks keys in this order
    days = set(np.unique(np.floor_divide(table.column("event_time_ms").to_numpy(), DAY_MS)).tolist())
    missing = days - self._partitions
    if missing:
      ensure_partitions(self._conn, missing)
      self._partitions |= missing
    decisions = rows.copy_decisions(table)
    try:
      with self._conn, self._conn.cursor() as cur:
        if not _insert_new(cur, rows.copy_keys(table), decisions):
          self.count("upserts")
          self.count("moved", _upsert(cur, decisions))
    except psycopg2.errors.CheckViolation as error:
      if "no partition of relation" in str(error):
        self._partitions.clear()
        raise _PartitionMissing(_first_line(error)) from error
      raise
    return refused


def _insert_new(cur, keys: bytes, decisions: bytes) -> bool:
  """COPYs keys and decisions if none of the keys is stored yet (True); else leaves nothing written (False)."""
  cur.execute("SAVEPOINT new_decisions")
  try:
    cur.copy_expert(_COPY_KEYS, io.BytesIO(keys), size=_COPY_CHUNK)
    cur.copy_expert(_COPY_DECISIONS, io.BytesIO(decisions), size=_COPY_CHUNK)
  except psycopg2.errors.UniqueViolation:
    # A stored key, or (with a key removed by hand) a stored row: the upsert handles both.
    cur.execute("ROLLBACK TO SAVEPOINT new_decisions")
    return False
  cur.execute("RELEASE SAVEPOINT new_decisions")
  return True


def _upsert(cur, decisions: bytes) -> int:
  """Upserts keys and decisions through the staging table; returns how many moved to another event day."""
  cur.copy_expert(_COPY_STAGE, io.BytesIO(decisions), size=_COPY_CHUNK)
  cur.execute(_UPSERT_KEYS)
  cur.execute(_MOVE_DAYS)
  moved = cur.rowcount
  cur.execute(_UPSERT_DECISIONS)
  return moved


class _WriteDeadLettersFn(_PostgresWriteFn):
  def _write(self, table: pa.Table) -> List[Refusal]:
    table, refused = sinks.refuse_nulls(table, rows.DEAD_LETTER_REQUIRED)
    if table.num_rows:
      letters = rows.copy_dead_letters(rows.last_per_key(table, ["source", "stage"]))
      with self._conn, self._conn.cursor() as cur:
        cur.copy_expert(_COPY_DEAD, io.BytesIO(letters), size=_COPY_CHUNK)
        cur.execute(_UPSERT_DEAD)
    return refused


class WriteToPostgres(beam.PTransform[beam.PCollection[DecisionBatch], SinkResult]):
  """DecisionBatches -> the ``decisions`` table (upsert on ``transaction_id``; see the module docstring).

  Returns a ``SinkResult``: ``written`` (rows per write) and ``dead_letters``
  (decisions the database refused, e.g. a ``transaction_id`` stored under
  another event day). Idempotent; batch and streaming.
  """

  def __init__(self, dsn: str, batch_size: int = 10_000, max_batch_bytes: int = 16 << 20, name: str = "warm",
               retry: RetryPolicy = RetryPolicy(), answer_timeout_s: float = ANSWER_TIMEOUT_S):
    super().__init__()
    parse_dsn(dsn)
    sinks.check_batch_limits(batch_size, max_batch_bytes)
    self._dsn = dsn
    self._fn = _WriteDecisionsFn(dsn, name, batch_size, max_batch_bytes, retry, answer_timeout_s)

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
