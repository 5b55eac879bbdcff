"""The ``txstream serve`` HTTP API: ``create_app(config)`` builds it, ``run_sql`` is the same query from Python.

  POST   /sql                          a read-only SQL query over the logical tables (``router``), JSON or Arrow
  DELETE /sql/{query_id}               cancel a running query
  GET    /transactions/{id}            a decision from Redis, else PostgreSQL (``hot``)
  GET    /customers/{id}/recent        a customer's latest decisions, from Redis, else PostgreSQL
  GET    /health                       which tiers are configured and answer
  GET    /openapi.json, /docs          FastAPI's spec and its browser

``POST /sql`` takes ``{"sql", "limit", "timeout_s", "engine"}`` and answers
``{"engine", "elapsed_ms", "columns": [{"name", "type"}], "rows": [[...]],
"row_count", "truncated", "query_id", "reason"}``, or with ``Accept:
application/vnd.apache.arrow.stream`` an Arrow IPC stream (engine, timing, id
and truncation in ``X-Txstream-*`` headers). At most ``limit`` (never more
than the server's ``row_limit``) rows come back; ``truncated`` says whether
there were more. Times are ISO 8601 strings in JSON. The query id is the
client's ``X-Query-Id`` header (letters, digits, ``-``, ``_``) or a new UUID.
Errors are ``{"error": "<one line>", "query_id"}``: 400 refused or failed
query, 401 missing or wrong API key, 404 nothing found, 409 cancelled, 502
engine unreachable, 503 tier not configured, 504 timed out.

With ``config.api_key`` every endpoint but ``/health`` (then without error
details) and the docs needs the key (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``); it is compared
in constant time and never logged.
"""
import contextlib
import gc
import datetime
import decimal
import hmac
import json
import logging
import math
import time
import uuid
from typing import Literal, Optional, Union

import pyarrow as pa
from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, Field

import txstream
from txstream.serve import engines as engines_lib
from txstream.serve import router
from txstream.serve.config import ServeConfig
from txstream.serve.hot import HotLookups
from txstream.serve.router import QueryError

_LOGGER = logging.getLogger(__name__)

ARROW_STREAM = "application/vnd.apache.arrow.stream"


class SqlRequest(BaseModel):
  sql: str = Field(description="One SELECT (standard SQL) over decisions, decisions_per_minute, "
                               "flagged_per_hour_terminal, dead_letters, runs, dq_results, dashboards.")
  limit: Optional[int] = Field(None, ge=1, description="At most this many rows (capped by the server's row limit).")
  timeout_s: Optional[float] = Field(None, gt=0, description="Stop the query after this many seconds (capped).")
  engine: Optional[Literal["clickhouse", "cold", "postgres"]] = Field(None, description="Force an engine.")


class Service:
  """What the app holds: the config, the engines (running queries included) and the hot lookups."""

  def __init__(self, config: ServeConfig):
    self.config = config
    self.engines = engines_lib.Engines(config)
    self.hot = HotLookups(config.redis_url, self.engines.postgres if config.postgres_dsn else None,
                          run_in_threadpool)

  def execute(self, sql: str, limit: Optional[int] = None, timeout_s: Optional[float] = None,
              engine: Optional[str] = None, query_id: Optional[str] = None) -> dict:
    """Plans and runs one query; the ``POST /sql`` JSON answer as a dict (rows as Python values). Blocking."""
    query_id = query_id or uuid.uuid4().hex
    limit = min(limit or self.config.row_limit, self.config.row_limit)
    timeout_s = min(timeout_s or self.config.query_timeout_s, self.config.query_timeout_s)
    start = time.perf_counter()
    plan = router.plan(sql, self.engines.available, self.config.clickhouse_retention_days, limit, engine)
    result = self.engines.run(plan, limit, timeout_s, query_id)
    elapsed_ms = round((time.perf_counter() - start) * 1000, 3)
    _LOGGER.info("query %s: %s (%s), %d rows%s in %.1f ms", query_id, plan.engine, plan.reason,
                 len(result.rows), " (truncated)" if result.truncated else "", elapsed_ms)
    return {"engine": plan.engine, "elapsed_ms": elapsed_ms,
            "columns": [{"name": n, "type": t} for n, t in result.columns], "rows": [list(r) for r in result.rows],
            "row_count": len(result.rows), "truncated": result.truncated, "query_id": query_id,
            "reason": plan.reason}

  async def close(self) -> None:
    await self.hot.close()
    self.engines.close()


def run_sql(config_or_state: Union[ServeConfig, Service, FastAPI], sql: str, limit: Optional[int] = None,
            timeout_s: Optional[float] = None, engine: Optional[str] = None) -> dict:
  """Runs ``sql`` as ``POST /sql`` would and returns its answer as a dict (rows as Python values: datetimes,
  Decimals, lists; ``json_values`` makes them JSON's).

  ``config_or_state``: the app from ``create_app`` or its ``app.state.serve``
  (shares its connections and running queries: ``DELETE /sql/{id}`` reaches
  it), or a ``ServeConfig`` (engines for this call only, closed after it;
  the PostgreSQL reader role must exist: ``create_app`` or ``txstream serve``
  made it). Raises ``router.QueryError`` (``.status``, one-line message).
  Blocking: from async code, call it in a thread.
  """
  if isinstance(config_or_state, FastAPI):
    config_or_state = config_or_state.state.serve
  if isinstance(config_or_state, Service):
    return config_or_state.execute(sql, limit, timeout_s, engine)
  service = Service(config_or_state)
  try:
    return service.execute(sql, limit, timeout_s, engine)
  finally:
    service.engines.close()


# -- values ------------------------------------------------------------------------------------------------------

def json_value(value):
  """A result value as JSON has it: times as ISO 8601, decimals and non-finite floats as numbers or null."""
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
    return value.isoformat()
  if isinstance(value, decimal.Decimal):
    return float(value) if value.is_finite() else None
  if isinstance(value, (list, tuple)):
    return [json_value(v) for v in value]
  if isinstance(value, dict):
    return {str(k): json_value(v) for k, v in value.items()}
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value).hex()
  if isinstance(value, datetime.timedelta):
    return value.total_seconds()
  return str(value)


def json_values(answer: dict) -> dict:
  return {**answer, "rows": [[json_value(v) for v in row] for row in answer["rows"]]}


def arrow_table(answer: dict) -> pa.Table:
  """The answer's rows as an Arrow table (a column Arrow cannot type from its values becomes strings)."""
  names = [c["name"] for c in answer["columns"]]
  columns = list(zip(*answer["rows"])) if answer["rows"] else [()] * len(names)
  arrays = []
  for values in columns:
    values = [float(v) if isinstance(v, decimal.Decimal) else v for v in values]
    try:
      arrays.append(pa.array(values))
    except (pa.ArrowException, TypeError, ValueError):
      arrays.append(pa.array([None if v is None else json.dumps(json_value(v)) for v in values], pa.string()))
  # Duplicate names are allowed in Arrow schemas; keep the engine's.
  return pa.Table.from_arrays(arrays, schema=pa.schema([pa.field(n, a.type) for n, a in zip(names, arrays)]))


def arrow_stream(table: pa.Table) -> bytes:
  sink = pa.BufferOutputStream()
  with pa.ipc.new_stream(sink, table.schema) as writer:
    writer.write_table(table)
  return sink.getvalue().to_pybytes()


def _json(body, status: int = 200) -> Response:
  return Response(json.dumps(body, separators=(",", ":")), status_code=status, media_type="application/json")


def _error(message: str, status: int, query_id: Optional[str] = None) -> Response:
  body = {"error": message}
  if query_id:
    body["query_id"] = query_id
  headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
  return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


# -- the app -----------------------------------------------------------------------------------------------------

def _auth(config: ServeConfig):
  async def require_key(request: Request) -> None:
    if config.api_key is None:
      return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if not given or not hmac.compare_digest(given.encode(), config.api_key.encode()):
      raise QueryError("an API key is required: Authorization: Bearer <key> or X-API-Key", status=401)
  return require_key


def create_app(config: ServeConfig) -> FastAPI:
  """The API over ``config``'s tiers. Sets up PostgreSQL's reader role first (``SinkConfigError``, one line,
  when PostgreSQL cannot be reached); the other tiers are reached per request (see ``/health``)."""
  if config.postgres_dsn:
    engines_lib.ensure_reader_role(config.postgres_dsn)
  service = Service(config)
  if config.cold_path:
    try:
      service.engines.cold_dataset()
    except QueryError as error:
      _LOGGER.warning("%s: decisions older than ClickHouse's window cannot be answered yet", error)

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    # What exists at startup (modules, the app, pools) lives as long as the process: frozen out of the
    # collector's generations, a full collection no longer walks it (bench_queries' hot lookups at 1,000
    # req/s, three runs each: p99 2.2-2.5 ms frozen, 2.5-7.2 ms not).
    gc.freeze()
    yield
    await service.close()

  app = FastAPI(title="txstream", version=txstream.__version__, lifespan=lifespan,
                description="Read-only SQL over every txstream storage tier, and online decision lookups.")
  app.state.serve = service
  app.state.require_key = _auth(config)
  keyed = [Depends(app.state.require_key)]

  @app.exception_handler(QueryError)
  async def query_error(request: Request, error: QueryError):
    return _error(str(error), error.status, request.headers.get("x-query-id"))

  @app.exception_handler(RequestValidationError)
  async def bad_request(_request: Request, error: RequestValidationError):
    first = error.errors()[0] if error.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    return _error(f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid"), 422)

  @app.post("/sql", dependencies=keyed, summary="Run a read-only SQL query over the logical tables")
  async def sql(body: SqlRequest, request: Request):
    query_id = request.headers.get("x-query-id") or uuid.uuid4().hex
    if not engines_lib.QUERY_ID.match(query_id):
      raise QueryError("X-Query-Id: 1 to 64 letters, digits, '-' or '_'")
    try:
      answer = await run_in_threadpool(service.execute, body.sql, body.limit, body.timeout_s, body.engine, query_id)
    except QueryError as error:
      return _error(str(error), error.status, query_id)
    if ARROW_STREAM in request.headers.get("accept", ""):
      data = await run_in_threadpool(lambda: arrow_stream(arrow_table(answer)))
      return Response(data, media_type=ARROW_STREAM, headers={
          "X-Txstream-Engine": answer["engine"], "X-Txstream-Elapsed-Ms": str(answer["elapsed_ms"]),
          "X-Txstream-Query-Id": query_id, "X-Txstream-Truncated": str(answer["truncated"]).lower()})
    return _json(json_values(answer))

  @app.delete("/sql/{query_id}", dependencies=keyed, summary="Cancel a running query")
  async def cancel(query_id: str):
    if not await run_in_threadpool(service.engines.running.cancel, query_id):
      return _error(f"no running query {query_id}", 404, query_id)
    return _json({"query_id": query_id, "cancelled": True})

  @app.get("/transactions/{transaction_id}", dependencies=keyed, summary="One decision, hot tier first")
  async def transaction(transaction_id: str = Path(max_length=200)):
    if not service.hot.configured:
      raise QueryError("no Redis or PostgreSQL tier configured (--redis_url, --postgres_dsn)", status=503)
    tier, value = await service.hot.transaction(transaction_id)
    if value is None:
      return _error(f"no decision for transaction {transaction_id}", 404)
    return Response(b'{"tier":"' + tier.encode() + b'","decision":' + value + b"}", media_type="application/json")

  @app.get("/customers/{customer_id}/recent", dependencies=keyed, summary="A customer's latest decisions")
  async def recent(customer_id: int, limit: int = Query(20, ge=1, le=1000)):
    if not service.hot.configured:
      raise QueryError("no Redis or PostgreSQL tier configured (--redis_url, --postgres_dsn)", status=503)
    tier, values = await service.hot.customer_recent(customer_id, limit)
    body = (b'{"tier":' + (json.dumps(tier).encode()) + b',"customer_id":' + str(customer_id).encode()
            + b',"decisions":[' + b",".join(values) + b"]}")
    return Response(body, media_type="application/json")

  @app.get("/health", summary="Which tiers are configured and reachable")
  async def health():
    tiers = await run_in_threadpool(_tier_health, service)
    tiers["hot"] = _state(bool(config.redis_url), await service.hot.ping())
    ok = all(t["reachable"] for t in tiers.values() if t["configured"])
    if config.api_key:  # open to anyone: no server addresses in the errors
      tiers = {name: {k: v for k, v in state.items() if k != "error"} for name, state in tiers.items()}
    return _json({"status": "ok" if ok else "degraded", "version": txstream.__version__, "tiers": tiers},
                 200 if ok else 503)

  from txstream.serve import dashboard  # pylint: disable=import-outside-toplevel
  dashboard.install(app, config)
  return app


def _state(configured: bool, error: Optional[str]) -> dict:
  state = {"configured": configured, "reachable": configured and error is None}
  if configured and error:
    state["error"] = error
  return state


def _tier_health(service: Service) -> dict:
  checks = {"warm": (router.POSTGRES, "SELECT 1"), "analytics": (router.CLICKHOUSE, "SELECT 1"),
            "cold": (router.COLD, None)}
  out = {}
  for tier, (engine, sql) in checks.items():
    if not getattr(service.engines.available, engine):
      out[tier] = _state(False, None)
      continue
    try:
      if engine == router.COLD:
        service.engines.cold_dataset()
      else:
        plan = router.Plan(engine, sql, (), None, "health")
        service.engines.run(plan, 1, 5.0, f"health-{uuid.uuid4().hex}")
      out[tier] = _state(True, None)
    except QueryError as error:
      out[tier] = _state(True, str(error))
  return out


def listen_warning(host: str, auth: bool) -> Optional[str]:
  """The warning to log when serving beyond this machine without an API key, else None."""
  import ipaddress
  if auth:
    return None
  try:
    loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
  except ValueError:
    loopback = False
  return None if loopback else (f"serving on {host} without --auth: anyone who can reach it can read every tier; "
                                "set TXSTREAM_API_KEY and pass --auth")
