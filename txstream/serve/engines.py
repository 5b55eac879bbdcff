"""Runs a routed query (``router.Plan``) on its engine, read-only, with a row limit, a timeout and cancellation.

PostgreSQL  each query in ``BEGIN READ ONLY`` under ``SET LOCAL ROLE
            txstream_reader`` (NOLOGIN, SELECT on the exposed tables only:
            ``ensure_reader_role`` creates it at startup) with ``SET LOCAL
            statement_timeout``; connections from a small pool; cancelled with
            the protocol's cancel request (what ``pg_cancel_backend`` sends).
ClickHouse  a native-protocol client per query (clickhouse-driver's is not
            thread-safe) with settings ``max_execution_time``,
            ``enable_optimize_predicate_expression=1`` and ``readonly=1``
            (``readonly`` last: once applied, no other setting may change).
            The predicate setting (off by default on 18.16, on in current
            releases) pushes a WHERE into the pre-aggregates' VIEWs and into
            the ``decisions`` subquery: without it a query on the VIEW merges
            the whole aggregate first (out of memory at 100M decisions), with
            it the operations queries take 5-21 ms; the answers to the
            analyst queries on ``decisions`` are the same either way.
            Cancelled with ``KILL QUERY WHERE query_id = ...``.
cold        the Delta table's current version as an Arrow dataset
            (``deltalake``), registered in a fresh in-memory DuckDB connection
            that then turns external access off and locks its configuration:
            the query sees that dataset and nothing else. No DuckDB extension
            is used (they would be downloaded). Cancelled with ``interrupt()``.

A timer per query also cancels it at its deadline (a backstop to each
engine's own timeout, and DuckDB's only one). Every running query is in
``Running`` under its ``query_id`` until it ends; ``cancel(query_id)`` is how
``DELETE /sql/{query_id}`` reaches it. Errors are ``router.QueryError`` with
one line: 400 for a query the engine refused, 409 cancelled, 502 engine
unreachable, 504 timed out. The calls block: the app runs them in a threadpool.
"""
import contextlib
import logging
import math
import re
import threading
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import psycopg2
import psycopg2.errors
import psycopg2.pool

from txstream.io import cold_table, sinks
from txstream.io.clickhouse_sink import ClickHouseTarget
from txstream.io import postgres_sink
from txstream.serve import router
from txstream.serve.config import ServeConfig
from txstream.serve.router import QueryError

_LOGGER = logging.getLogger(__name__)

READER_ROLE = "txstream_reader"
_PG_QUERY_CANCELED = "57014"
_CH_TIMEOUT, _CH_CANCELLED = 159, 394
TIMEOUT, CANCELLED = "timeout", "cancelled"
_PG_CONNECTIONS = 16
# Query ids go into ClickHouse's KILL QUERY as a literal: nothing that could end it.
QUERY_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Result(NamedTuple):
  columns: List[Tuple[str, str]]  # (name, the engine's type name)
  rows: List[tuple]
  truncated: bool                 # more rows existed than were returned


class _Stopped(Exception):
  """A query stopped (cancelled or timed out) before it reached its engine."""


class _Query:
  def __init__(self, query_id: str):
    self.query_id = query_id
    self.cancel: Optional[Callable[[], None]] = None
    self.reason: Optional[str] = None  # why it was stopped: timeout | cancelled
    self.lock = threading.Lock()

  def set_cancel(self, cancel: Callable[[], None]) -> None:
    """How to stop the query once it runs; ``_Stopped`` if it was stopped before it started."""
    with self.lock:
      self.cancel = cancel
      if self.reason is not None:
        raise _Stopped()

  def stop(self, reason: str) -> bool:
    with self.lock:
      if self.reason is not None:
        return True
      self.reason = reason
      cancel = self.cancel
    if cancel is None:
      return True  # not started yet: set_cancel refuses to start it
    try:
      cancel()
    except Exception as error:  # pylint: disable=broad-except
      # The query may have ended meanwhile; its own outcome is what the caller sees.
      _LOGGER.warning("could not stop query %s: %s", self.query_id, sinks.one_line(error))
    return True


class Running:
  """The queries running now, by ``query_id``."""

  def __init__(self):
    self._queries: Dict[str, _Query] = {}
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def track(self, query_id: str, timeout_s: float):
    if not QUERY_ID.match(query_id):
      raise QueryError("a query id is 1 to 64 letters, digits, '-' or '_'")
    query = _Query(query_id)
    with self._lock:
      if query_id in self._queries:
        raise QueryError(f"query id {query_id} is already running", status=409)
      self._queries[query_id] = query
    timer = threading.Timer(timeout_s + 0.5, query.stop, args=(TIMEOUT,))
    timer.daemon = True
    timer.start()
    try:
      yield query
    finally:
      timer.cancel()
      with self._lock:
        self._queries.pop(query_id, None)

  def cancel(self, query_id: str) -> bool:
    """Stops a running query; False when no query of that id is running."""
    with self._lock:
      query = self._queries.get(query_id)
    return query is not None and query.stop(CANCELLED)

  def __contains__(self, query_id: str) -> bool:
    with self._lock:
      return query_id in self._queries


def _stopped(query: _Query, timeout_s: float) -> QueryError:
  if query.reason == CANCELLED:
    return QueryError(f"query {query.query_id} was cancelled", status=409)
  return QueryError(f"query {query.query_id} timed out after {timeout_s:g} s", status=504)


class Engines:
  """The configured engines and the running queries; thread-safe. ``close()`` releases the connections."""

  def __init__(self, config: ServeConfig):
    self.config = config
    self.running = Running()
    self.available = router.Available(
        postgres=bool(config.postgres_dsn), clickhouse=bool(config.clickhouse_url), cold=bool(config.cold_path),
        clickhouse_database=ClickHouseTarget(config.clickhouse_url).database if config.clickhouse_url else "")
    self._clickhouse = ClickHouseTarget(config.clickhouse_url) if config.clickhouse_url else None
    self._pg_pool = None
    self._pg_types: Dict[int, str] = {}
    self._pool_lock = threading.Lock()

  # -- PostgreSQL --------------------------------------------------------------------------------------------------

  def postgres_pool(self) -> psycopg2.pool.ThreadedConnectionPool:
    with self._pool_lock:
      if self._pg_pool is None:
        self._pg_pool = psycopg2.pool.ThreadedConnectionPool(
            0, _PG_CONNECTIONS, self.config.postgres_dsn, connect_timeout=5, application_name="txstream-serve")
      return self._pg_pool

  @contextlib.contextmanager
  def postgres(self):
    """A pooled autocommit connection; one that failed mid-use is closed rather than returned."""
    pool = self.postgres_pool()
    try:
      conn = pool.getconn()
    except psycopg2.pool.PoolError:
      raise QueryError(f"more than {_PG_CONNECTIONS} PostgreSQL queries at once: try again", status=503) from None
    except psycopg2.OperationalError as error:
      raise QueryError(f"PostgreSQL at {_pg_where(self.config.postgres_dsn)} is unreachable: "
                       f"{sinks.one_line(error)}", status=502) from None
    broken = True
    try:
      conn.autocommit = True
      yield conn
      broken = False
    finally:
      pool.putconn(conn, close=broken or conn.closed != 0)

  def _run_postgres(self, sql: str, limit: int, timeout_s: float, query: _Query) -> Result:
    with self.postgres() as conn:
      query.set_cancel(conn.cancel)
      with conn.cursor() as cur:
        cur.execute("BEGIN TRANSACTION READ ONLY")
        try:
          cur.execute(f"SET LOCAL ROLE {READER_ROLE}")
          cur.execute("SET LOCAL statement_timeout = %s", (max(1, int(timeout_s * 1000)),))
          cur.execute("SET LOCAL TimeZone = 'UTC'")  # times come back in UTC from every engine
          cur.execute(sql)
          rows = cur.fetchmany(limit + 1)
          described = [(d.name, d.type_code) for d in cur.description]
          types = self._postgres_types(cur, [code for _, code in described])
        finally:
          if not conn.closed:
            cur.execute("ROLLBACK")
    return Result([(name, types.get(code, str(code))) for name, code in described], rows[:limit], len(rows) > limit)

  def _postgres_types(self, cur, codes) -> Dict[int, str]:
    missing = sorted(set(codes) - set(self._pg_types))
    if missing:
      cur.execute("SELECT oid, format_type(oid, NULL) FROM pg_catalog.pg_type WHERE oid = ANY(%s)", (missing,))
      self._pg_types.update(dict(cur.fetchall()))
    return self._pg_types

  # -- ClickHouse --------------------------------------------------------------------------------------------------

  def _run_clickhouse(self, sql: str, limit: int, timeout_s: float, query: _Query) -> Result:
    from clickhouse_driver import errors as ch_errors
    target = self._clickhouse
    client = target.client(timeout_s=timeout_s + 10)
    query.set_cancel(lambda: self._kill_clickhouse(query.query_id))
    # readonly last: once it applies, the server refuses to change any other setting.
    settings = {"max_execution_time": max(1, math.ceil(timeout_s)), "enable_optimize_predicate_expression": 1,
                "readonly": 1}
    try:
      data, described = client.execute(sql, with_column_types=True, settings=settings, query_id=query.query_id)
    except ch_errors.ServerException as error:
      if query.reason or error.code in (_CH_TIMEOUT, _CH_CANCELLED):
        query.reason = query.reason or (TIMEOUT if error.code == _CH_TIMEOUT else CANCELLED)
        raise _stopped(query, timeout_s) from None
      raise QueryError(f"ClickHouse: {_clickhouse_message(error)}") from None
    except (ch_errors.Error, OSError, EOFError) as error:
      if query.reason:
        raise _stopped(query, timeout_s) from None
      raise QueryError(f"ClickHouse at {target.where} is unreachable: {_clickhouse_message(error)}",
                       status=502) from None
    finally:
      client.disconnect()
    return Result([(name, type_name) for name, type_name in described], data[:limit], len(data) > limit)

  def _kill_clickhouse(self, query_id: str) -> None:
    client = self._clickhouse.client(timeout_s=10)
    try:
      # query_id matched QUERY_ID in track(): letters, digits, '-' and '_' only.
      client.execute(f"KILL QUERY WHERE query_id = '{query_id}' ASYNC")
    finally:
      client.disconnect()

  # -- cold tier (DuckDB over the Delta table) ---------------------------------------------------------------------

  def cold_dataset(self):
    """The cold Delta table's current version as an Arrow dataset (``QueryError`` 503 when there is none)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import DeltaError
    path = cold_table.table_path(self.config.cold_path)
    storage = self.config.storage_options or {}
    try:
      if not DeltaTable.is_deltatable(path, storage_options=storage):
        raise QueryError(f"cold tier: no Delta table at {sinks.redact(path)} (no run has committed yet?)", status=503)
      return DeltaTable(path, storage_options=storage).to_pyarrow_dataset()
    except (OSError, DeltaError) as error:
      raise QueryError(f"cold tier at {sinks.redact(path)} cannot be read: {sinks.one_line(error)}",
                       status=502) from None

  def _run_cold(self, sql: str, limit: int, timeout_s: float, query: _Query) -> Result:
    import duckdb
    dataset = self.cold_dataset()
    connection = duckdb.connect(":memory:")
    try:
      connection.register("cold_decisions", dataset)
      connection.execute("SET TimeZone = 'UTC'")
      connection.execute("SET enable_external_access = false")
      connection.execute("SET lock_configuration = true")
      query.set_cancel(connection.interrupt)
      try:
        cursor = connection.execute(sql)
        rows = cursor.fetchmany(limit + 1)
        described = [(d[0], str(d[1])) for d in cursor.description]
      except duckdb.InterruptException:
        raise _stopped(query, timeout_s) from None
      except duckdb.Error as error:
        if query.reason:
          raise _stopped(query, timeout_s) from None
        raise QueryError(f"cold tier (DuckDB): {_duckdb_message(error)}") from None
    finally:
      connection.close()
    return Result(described, rows[:limit], len(rows) > limit)

  # -- entry point -------------------------------------------------------------------------------------------------

  def run(self, plan: router.Plan, limit: int, timeout_s: float, query_id: str) -> Result:
    """Runs ``plan`` (translated for ``limit``) for at most ``timeout_s`` seconds under ``query_id``."""
    runner = {router.POSTGRES: self._run_postgres, router.CLICKHOUSE: self._run_clickhouse,
              router.COLD: self._run_cold}[plan.engine]
    with self.running.track(query_id, timeout_s) as query:
      try:
        return runner(plan.sql, limit, timeout_s, query)
      except _Stopped:
        raise _stopped(query, timeout_s) from None
      except psycopg2.Error as error:
        if query.reason or getattr(error, "pgcode", None) == _PG_QUERY_CANCELED:
          query.reason = query.reason or TIMEOUT
          raise _stopped(query, timeout_s) from None
        if isinstance(error, psycopg2.OperationalError) and not getattr(error, "pgcode", None):
          raise QueryError(f"PostgreSQL is unreachable: {_pg_line(error)}", status=502) from None
        raise QueryError(f"PostgreSQL: {_pg_line(error)}") from None

  def close(self) -> None:
    with self._pool_lock:
      if self._pg_pool is not None:
        self._pg_pool.closeall()
        self._pg_pool = None


# pylint: disable=protected-access
_pg_line = postgres_sink._first_line  # the first line of a PostgreSQL error


def _pg_where(dsn: str) -> str:
  return postgres_sink._where(postgres_sink.parse_dsn(dsn))
# pylint: enable=protected-access


def _clickhouse_message(error: BaseException) -> str:
  text = getattr(error, "message", None) or str(error)
  return sinks.one_line(text.split("Stack trace")[0].rstrip(". "))[:500]


def _duckdb_message(error: BaseException) -> str:
  return sinks.one_line(str(error).split("\n\nLINE")[0])[:500]


def ensure_reader_role(dsn: str, tables=router.OPERATIONAL + ("decisions",)) -> None:
  """Applies the warm tier's migrations, then creates ``txstream_reader`` (NOLOGIN) if missing and grants it
  SELECT on ``tables`` and nothing else; the connecting user is made a member so it can ``SET ROLE``.

  Idempotent; ``SinkConfigError`` (one line) when PostgreSQL cannot be reached or refuses.
  """
  postgres_sink.preflight(dsn)
  conn = postgres_sink.connect(dsn, connect_timeout_s=5)
  try:
    with conn, conn.cursor() as cur:
      cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (READER_ROLE,))
      if cur.fetchone() is None:
        try:
          cur.execute("SAVEPOINT role")
          cur.execute(f"CREATE ROLE {READER_ROLE} NOLOGIN")
        except psycopg2.errors.DuplicateObject:  # another serve created it meanwhile
          cur.execute("ROLLBACK TO SAVEPOINT role")
      cur.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
      if not cur.fetchone()[0]:
        cur.execute(f"GRANT {READER_ROLE} TO current_user")
      cur.execute(f"GRANT USAGE ON SCHEMA public TO {READER_ROLE}")
      cur.execute(f"GRANT SELECT ON {', '.join('public.' + t for t in tables)} TO {READER_ROLE}")
  except psycopg2.Error as error:
    raise sinks.SinkConfigError(f"PostgreSQL at {_pg_where(dsn)}: cannot set up the {READER_ROLE} role: "
                                f"{_pg_line(error)}") from None
  finally:
    conn.close()
