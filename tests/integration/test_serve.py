"""`txstream serve` against the real servers: the same decisions written to every tier by the project's sinks.

Recent decisions (the last few days) and old ones (2018) go to Redis,
PostgreSQL, ClickHouse and a local cold Delta table through ``WriteTiers``;
the API must route by the query's time predicate, answer the same aggregate
from ClickHouse and the cold tier, equal to what was written, limit, time out,
cancel, refuse writes, check the API key and fall back from Redis to PostgreSQL.
"""
import datetime
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import psycopg2
import pyarrow as pa
import pytest
import redis
from clickhouse_driver import Client
from fastapi.testclient import TestClient

from tests.integration.sink_fixtures import DAY_MS, T0, decision_table, free_port
from txstream.io import cold_table, parquet
from txstream.serve.app import ARROW_STREAM, create_app, run_sql
from txstream.serve.config import ServeConfig
from txstream.transforms.tiers import TierConfig

REDIS_DB = 11
KEY = "s3cret-key-for-tests"


def _recent_start_ms() -> int:
  today = datetime.datetime.now(datetime.timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
  return int(today.timestamp() * 1000) - 5 * DAY_MS


@pytest.fixture(scope="module")
def written(services, fresh_postgres, tmp_path_factory):
  """Writes 60 recent and 30 old decisions to every tier; yields the config and the written table."""
  servers = services.require("redis", "postgres", "clickhouse")
  suffix = uuid.uuid4().hex[:8]
  base_customer = int(uuid.uuid4().int % 10**9) * 10
  recent = decision_table(60, prefix=f"new{suffix}", customers=5, days=3, start_ms=_recent_start_ms())
  old = decision_table(30, prefix=f"old{suffix}", customers=5, days=3, start_ms=T0)
  table = pa.concat_tables([recent, old])
  position = table.schema.names.index("customer_id")
  customers = pa.array([base_customer + c for c in table.column(position).to_pylist()], pa.int64())
  table = table.set_column(position, table.schema.field(position), customers)
  ch = servers["clickhouse"]
  database = f"txstream_serve_{suffix}"
  cold = str(tmp_path_factory.mktemp("cold"))
  config = TierConfig(cold_path=cold, dead_letter_path=str(tmp_path_factory.mktemp("dead")),
                      redis_url=f"redis://{servers['redis'].host}:{servers['redis'].port}/{REDIS_DB}",
                      postgres_dsn=fresh_postgres("txstream_serve"),
                      clickhouse_url=f"clickhouse://{ch.host}:{ch.port}/{database}", run_id=f"serve-{suffix}")
  _write_tiers(config, table)
  _ensure_per_minute(Client(host=ch.host, port=ch.port), database)
  with psycopg2.connect(config.postgres_dsn) as conn, conn.cursor() as cur:
    cur.execute("INSERT INTO runs (run_id, started_at, pipeline_version) VALUES ('r1', now(), '0.1.0'), "
                "('r2', now(), '0.1.0')")
  serve = ServeConfig(postgres_dsn=config.postgres_dsn, clickhouse_url=config.clickhouse_url,
                      redis_url=config.redis_url, cold_path=cold, clickhouse_retention_days=30, row_limit=50,
                      query_timeout_s=20)
  yield {"config": serve, "table": table, "suffix": suffix, "customers": sorted(set(customers.to_pylist())),
         "recent": recent.num_rows, "old": old.num_rows, "database": database, "clickhouse": ch}
  hot = redis.Redis.from_url(config.redis_url)
  keys = [f"txn:{t}" for t in table.column("transaction_id").to_pylist()]
  hot.delete(*keys, *[f"cust:{c}:recent" for c in set(customers.to_pylist())])
  Client(host=ch.host, port=ch.port).execute(f"DROP DATABASE IF EXISTS {database}")


def _write_tiers(config: TierConfig, table: pa.Table) -> None:
  """Each tier written by its sink's own batch writer (what the DoFns call per batch), the cold tier staged by
  ``parquet.DayFiles`` and committed by ``cold_table.commit`` as a run does."""
  from txstream.io.clickhouse_sink import WriteToClickHouse
  from txstream.io.postgres_sink import WriteToPostgres
  from txstream.io.redis_sink import WriteToRedis
  for sink in (WriteToRedis(config.redis_url), WriteToPostgres(config.postgres_dsn),
               WriteToClickHouse(config.clickhouse_url)):
    sink.preflight()
    writer = sink._fn  # pylint: disable=protected-access
    writer.open_client()
    try:
      assert not writer.write_batch(table)
    finally:
      writer.close_client()
  files = parquet.DayFiles(cold_table.staging_path(config.cold_path, config.run_id))
  days = parquet.event_days(table)
  for day in sorted(set(days.tolist())):
    files.write(day, table.filter(pa.array(days == day)))
  files.publish("serve", lambda copy, _path: copy())
  cold_table.commit(config.cold_path, config.run_id)


def _ensure_per_minute(client: Client, database: str) -> None:
  """The pre-aggregate comes with the ClickHouse schema; made here only if this checkout's sink lacks it."""
  if not client.execute(f"EXISTS TABLE {database}.decisions_per_minute")[0][0]:
    client.execute(f"CREATE TABLE {database}.decisions_per_minute (minute DateTime, decision String, "
                   "decisions UInt64, flagged_amount_minor Int64, score_sum Float64) ENGINE = Memory")
    client.execute(f"INSERT INTO {database}.decisions_per_minute SELECT toStartOfMinute(event_time), "
                   "toString(decision), count(), sumIf(amount_minor, decision != 'approve'), sum(score) "
                   f"FROM {database}.decisions FINAL GROUP BY toStartOfMinute(event_time), toString(decision)")


@pytest.fixture(scope="module")
def client(written):
  with TestClient(create_app(written["config"])) as c:
    yield c


def _sql(client, sql, status=200, **body):
  response = client.post("/sql", json={"sql": sql, **body})
  assert response.status_code == status, response.text
  return response.json()


def _expected(table: pa.Table, since_ms: int = 0):
  rows = [r for r in table.select(["event_time_ms", "decision", "amount_minor", "transaction_id"]).to_pylist()
          if r["event_time_ms"] >= since_ms]
  out = {}
  for r in rows:
    n, amount = out.get(r["decision"], (0, 0))
    out[r["decision"]] = (n + 1, amount + r["amount_minor"])
  return out


AGGREGATE = ("SELECT decision, count(*) AS n, sum(amount_minor) AS amount FROM decisions "
             "WHERE event_time >= now() - interval '10 days' GROUP BY decision ORDER BY decision")


def test_same_aggregate_from_clickhouse_and_cold_equals_what_was_written(client, written):
  expected = _expected(written["table"], _recent_start_ms())
  routed = _sql(client, AGGREGATE)
  cold = _sql(client, AGGREGATE, engine="cold")
  assert routed["engine"] == "clickhouse" and cold["engine"] == "cold"
  for answer in (routed, cold):
    assert {d: (int(n), int(a)) for d, n, a in answer["rows"]} == expected
    assert [c["name"] for c in answer["columns"]] == ["decision", "n", "amount"]
  assert sum(n for n, _ in expected.values()) == written["recent"]


def test_old_time_predicate_routes_to_cold_and_reads_all_history(client, written):
  answer = _sql(client, "SELECT count(*), min(event_time_ms) FROM decisions WHERE event_date >= '2018-01-01'")
  assert answer["engine"] == "cold"
  assert answer["rows"][0] == [written["recent"] + written["old"], T0]
  unbounded = _sql(client, "SELECT count(DISTINCT transaction_id) FROM decisions")
  assert unbounded["engine"] == "cold" and unbounded["rows"] == [[written["recent"] + written["old"]]]
  recent = _sql(client, f"SELECT count(*) FROM decisions d WHERE d.event_time_ms >= {_recent_start_ms()} "
                        "AND d.decision = 'decline'")
  assert recent["engine"] == "clickhouse"
  assert recent["rows"] == [[_expected(written["table"], _recent_start_ms())["decline"][0]]]


def test_every_engine_has_the_same_columns_and_row(client, written):
  tx = f"new{written['suffix']}-00007"
  sql = f"SELECT * FROM decisions WHERE transaction_id = '{tx}' AND event_date >= current_date - 20"
  answers = {e: _sql(client, sql, engine=e) for e in ("clickhouse", "cold", "postgres")}
  names = [[c["name"] for c in a["columns"]] for a in answers.values()]
  assert names[0] == names[1] == names[2]
  rows = {e: dict(zip(names[0], a["rows"][0])) for e, a in answers.items()}
  stored = written["table"].filter(pa.compute.equal(written["table"].column("transaction_id"), tx)).to_pylist()[0]
  for engine, row in rows.items():
    assert (row["event_time_ms"], row["amount_minor"], row["decision"], row["reason_codes"], row["decided_at_ms"]) \
        == (stored["event_time_ms"], stored["amount_minor"], stored["decision"], stored["reason_codes"],
            stored["decided_at_ms"]), engine
    assert row["tx_amount"] == stored["tx_amount"], engine


def test_decisions_per_minute_passes_through_to_clickhouse(client, written):
  answer = _sql(client, "SELECT sum(decisions) FROM decisions_per_minute")
  assert answer["engine"] == "clickhouse"
  assert int(answer["rows"][0][0]) == written["recent"] + written["old"]
  refused = _sql(client, "SELECT * FROM decisions_per_minute", status=400, engine="cold")
  assert refused["error"] == "decisions_per_minute is a ClickHouse table: engine cold cannot answer it"


def test_operational_tables_are_answered_by_postgres(client):
  answer = _sql(client, "SELECT run_id, pipeline_version FROM runs ORDER BY run_id")
  assert answer["engine"] == "postgres" and answer["rows"] == [["r1", "0.1.0"], ["r2", "0.1.0"]]
  assert answer["columns"] == [{"name": "run_id", "type": "text"}, {"name": "pipeline_version", "type": "text"}]
  assert _sql(client, "SELECT count(*) FROM dead_letters")["rows"] == [[0]]
  assert _sql(client, "SELECT count(*) FROM dq_results, dashboards")["rows"] == [[0]]


def test_arrow_stream_answer(client, written):
  response = client.post("/sql", json={"sql": AGGREGATE}, headers={"Accept": ARROW_STREAM})
  assert response.status_code == 200, response.text
  assert response.headers["content-type"] == ARROW_STREAM
  assert response.headers["x-txstream-engine"] == "clickhouse"
  assert float(response.headers["x-txstream-elapsed-ms"]) > 0
  table = pa.ipc.open_stream(response.content).read_all()
  assert table.column_names == ["decision", "n", "amount"]
  got = {d: (n, a) for d, n, a in zip(*[table.column(i).to_pylist() for i in range(3)])}
  assert got == _expected(written["table"], _recent_start_ms())


def test_row_limit_and_truncation(client, written):
  total = written["recent"] + written["old"]
  capped = _sql(client, "SELECT transaction_id FROM decisions ORDER BY transaction_id")
  assert capped["row_count"] == 50 and capped["truncated"] is True  # the server's row_limit
  ids = sorted(written["table"].column("transaction_id").to_pylist())
  assert [r[0] for r in capped["rows"]] == ids[:50]
  asked = _sql(client, "SELECT transaction_id FROM decisions ORDER BY transaction_id LIMIT 7", limit=5)
  assert asked["row_count"] == 5 and asked["truncated"] is True
  exact = _sql(client, "SELECT transaction_id FROM decisions ORDER BY 1 DESC LIMIT 4", limit=5)
  assert exact["row_count"] == 4 and exact["truncated"] is False and [r[0] for r in exact["rows"]] == ids[::-1][:4]
  union = _sql(client, "SELECT run_id FROM runs UNION ALL SELECT run_id FROM runs", limit=3)
  assert union["row_count"] == 3 and union["truncated"] is True
  assert total > 50


@pytest.mark.parametrize("sql,message", [
    ("DELETE FROM runs", "only SELECT queries are allowed (read-only API), got DELETE"),
    ("UPDATE runs SET status = 'x'", "only SELECT queries are allowed (read-only API), got UPDATE"),
    ("DROP TABLE runs", "only SELECT queries are allowed (read-only API), got DROP"),
    ("SELECT 1; DELETE FROM runs", "one statement per request, got 2"),
    ("SELECT * FROM pg_catalog.pg_authid", "unknown table pg_catalog.pg_authid: use the logical tables decisions, "
                                           "decisions_per_minute, flagged_per_hour_terminal, dead_letters, runs, "
                                           "dq_results, dashboards"),
    ("SELECT set_config('role', 'postgres', true)", "function set_config() is not allowed (it reaches outside "
                                                    "the query)"),
])
def test_writes_and_escapes_are_refused(client, sql, message):
  assert _sql(client, sql, status=400)["error"] == message
  assert _sql(client, "SELECT count(*) FROM runs")["rows"] == [[2]]


def test_engines_are_read_only_even_past_the_router(written, tmp_path):
  from txstream.serve import engines, router
  state = engines.Engines(written["config"])
  database = written["database"]
  refused = [
      ("postgres", "WITH x AS (DELETE FROM runs RETURNING 1) SELECT * FROM x", "read-only transaction"),
      ("postgres", "SELECT * FROM decision_keys", "permission denied"),
      ("clickhouse", f"INSERT INTO {database}.decisions_per_minute (decision) VALUES ('x')", "readonly"),
      ("clickhouse", "SET max_execution_time = 0", "readonly"),
      ("cold", f"COPY (SELECT 1) TO '{tmp_path}/out.csv'", "disabled by configuration"),
      ("cold", "SET enable_external_access = true", "Cannot change configuration option"),
  ]
  try:
    for engine, sql, message in refused:
      with pytest.raises(router.QueryError, match=message):
        state.run(router.Plan(engine, sql, (), None, "test"), 10, 5, f"ro-{uuid.uuid4().hex}")
  finally:
    state.close()
  assert not os.path.exists(tmp_path / "out.csv")
  assert _sql_count(written) == 2


def _sql_count(written) -> int:
  with psycopg2.connect(written["config"].postgres_dsn) as conn, conn.cursor() as cur:
    cur.execute("SELECT count(*) FROM runs")
    return cur.fetchone()[0]


# 8100^3 rows: minutes on any engine, a legitimate query over the logical table alone (ClickHouse 18.16 takes
# one JOIN per SELECT, hence the nesting).
_PAIRS = "(SELECT a.score * b.score AS s FROM decisions a, decisions b)"
CROSS_JOIN = f"SELECT sum(pq.s * r.s) FROM (SELECT p.s * q.s AS s FROM {_PAIRS} p, {_PAIRS} q) pq, {_PAIRS} r"
# ClickHouse 18.16 checks its time limit and KILL QUERY between blocks only, and that cross join makes giant
# blocks: this sleeps 2.7 s in one block (the server's per-block maximum is 3 s) and is stopped after it.
CLICKHOUSE_SLEEP = "SELECT sum(sleepEachRow(0.03)) FROM decisions"


def test_timeouts_answer_504(client):
  start = time.monotonic()
  answer = _sql(client, "SELECT pg_sleep(5)", status=504, timeout_s=1)
  assert answer["error"].endswith("timed out after 1 s") and time.monotonic() - start < 4
  for engine, sql in (("cold", CROSS_JOIN), ("clickhouse", CLICKHOUSE_SLEEP)):
    start = time.monotonic()
    assert _sql(client, sql, status=504, timeout_s=1, engine=engine)["error"].endswith("timed out after 1 s")
    assert time.monotonic() - start < 5, engine


@pytest.mark.parametrize("engine,sql", [
    ("postgres", "SELECT pg_sleep(10)"),
    ("cold", CROSS_JOIN), ("clickhouse", CLICKHOUSE_SLEEP),
])
def test_delete_cancels_a_running_query(client, engine, sql):
  query_id = f"cancel-{engine}-{uuid.uuid4().hex[:6]}"
  outcome = {}

  def post():
    outcome["response"] = client.post("/sql", json={"sql": sql, "engine": engine}, headers={"X-Query-Id": query_id})

  worker = threading.Thread(target=post)
  start = time.monotonic()
  worker.start()
  deadline = time.monotonic() + 10
  while query_id not in client.app.state.serve.engines.running and time.monotonic() < deadline:
    time.sleep(0.02)
  time.sleep(0.3)
  cancelled = client.delete(f"/sql/{query_id}")
  assert cancelled.status_code == 200 and cancelled.json() == {"query_id": query_id, "cancelled": True}
  worker.join(10)
  assert outcome["response"].status_code == 409, outcome["response"].text
  assert outcome["response"].json()["error"] == f"query {query_id} was cancelled"
  assert time.monotonic() - start < 5
  assert client.delete(f"/sql/{query_id}").status_code == 404


def test_query_ids(client):
  answer = client.post("/sql", json={"sql": "SELECT 1"}, headers={"X-Query-Id": "mine-1"}).json()
  assert answer["query_id"] == "mine-1" and answer["rows"] == [[1]]
  refused = client.post("/sql", json={"sql": "SELECT 1"}, headers={"X-Query-Id": "x'; KILL"})
  assert refused.status_code == 400 and refused.json()["error"] == "X-Query-Id: 1 to 64 letters, digits, '-' or '_'"
  failed = client.post("/sql", json={"sql": "SELECT nope FROM runs"}, headers={"X-Query-Id": "mine-2"})
  assert failed.status_code == 400 and failed.json()["query_id"] == "mine-2"
  assert failed.json()["error"].startswith("PostgreSQL: column \"nope\" does not exist")


def test_api_key(written):
  config = written["config"]
  keyed = ServeConfig(**{**config.__dict__, "api_key": KEY})
  with TestClient(create_app(keyed)) as c:
    body = {"sql": "SELECT count(*) FROM runs"}
    assert c.post("/sql", json=body).status_code == 401
    assert c.post("/sql", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert c.post("/sql", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()["rows"] == [[2]]
    assert c.post("/sql", json=body, headers={"X-API-Key": KEY}).json()["rows"] == [[2]]
    assert c.get("/transactions/x").status_code == 401
    assert c.get("/health").status_code == 200
  with TestClient(create_app(config)) as c:
    assert c.post("/sql", json={"sql": "SELECT count(*) FROM runs"}).json()["rows"] == [[2]]


def test_hot_lookups_fall_back_to_warm(client, written):
  table = written["table"]
  first, second = table.slice(0, 2).to_pylist()
  hot = client.get(f"/transactions/{first['transaction_id']}")
  assert hot.status_code == 200 and hot.json()["tier"] == "hot"
  decision = hot.json()["decision"]
  assert (decision["transaction_id"], decision["amount_minor"], decision["decision"], decision["score"]) == \
      (first["transaction_id"], first["amount_minor"], first["decision"], first["score"])
  redis.Redis.from_url(written["config"].redis_url).delete(f"txn:{second['transaction_id']}")
  warm = client.get(f"/transactions/{second['transaction_id']}")
  assert warm.status_code == 200 and warm.json()["tier"] == "warm"
  assert set(warm.json()["decision"]) == set(decision)
  assert {k: warm.json()["decision"][k] for k in ("transaction_id", "amount_minor", "decision", "event_time_ms",
                                                  "customer_id", "reason_codes")} == \
      {k: second[k] for k in ("transaction_id", "amount_minor", "decision", "event_time_ms", "customer_id",
                              "reason_codes")}
  assert client.get("/transactions/no-such-transaction").status_code == 404

  customer = written["customers"][0]
  mine = sorted((r for r in table.to_pylist() if r["customer_id"] == customer),
                key=lambda r: (r["event_time_ms"], r["transaction_id"]), reverse=True)
  recent = client.get(f"/customers/{customer}/recent", params={"limit": 3}).json()
  assert recent["tier"] == "hot"
  assert [d["transaction_id"] for d in recent["decisions"]] == [r["transaction_id"] for r in mine[:3]]
  redis.Redis.from_url(written["config"].redis_url).delete(f"cust:{customer}:recent")
  fallback = client.get(f"/customers/{customer}/recent", params={"limit": 3}).json()
  assert fallback["tier"] == "warm"
  assert [d["transaction_id"] for d in fallback["decisions"]] == [r["transaction_id"] for r in mine[:3]]
  assert client.get("/customers/1/recent").json() == {"tier": None, "customer_id": 1, "decisions": []}


def test_listening_beyond_loopback_without_auth_warns():
  from txstream.serve.app import listen_warning
  assert listen_warning("127.0.0.1", auth=False) is None
  assert listen_warning("::1", auth=False) is None
  assert listen_warning("localhost", auth=False) is None
  assert listen_warning("0.0.0.0", auth=True) is None
  assert listen_warning("0.0.0.0", auth=False) == (
      "serving on 0.0.0.0 without --auth: anyone who can reach it can read every tier; set TXSTREAM_API_KEY and "
      "pass --auth")


def test_health_and_openapi(client):
  health = client.get("/health").json()
  assert health["status"] == "ok"
  assert {t: s["reachable"] for t, s in health["tiers"].items()} == {"hot": True, "warm": True, "analytics": True,
                                                                   "cold": True}
  spec = client.get("/openapi.json").json()
  assert {"/sql", "/sql/{query_id}", "/transactions/{transaction_id}", "/customers/{customer_id}/recent",
          "/health"} <= set(spec["paths"])


def test_run_sql_from_python(client, written):
  answer = run_sql(client.app, "SELECT count(*) FROM decisions WHERE event_date >= current_date - 10")
  assert answer["engine"] == "clickhouse" and answer["rows"] == [[written["recent"]]]
  answer = run_sql(written["config"], "SELECT count(*) FROM runs")
  assert answer["engine"] == "postgres" and answer["rows"] == [[2]]


def test_serve_command(written):
  config = written["config"]
  port = free_port()
  env = {**os.environ, "TXSTREAM_API_KEY": KEY}
  process = subprocess.Popen([sys.executable, "-m", "txstream.cli", "serve", "--port", str(port), "--auth",
                              f"--postgres_dsn={config.postgres_dsn}", f"--clickhouse_url={config.clickhouse_url}",
                              f"--cold_path={config.cold_path}", "--clickhouse_retention_days=30"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      try:
        if httpx.get(f"{url}/health", timeout=1).status_code in (200, 503):
          break
      except httpx.TransportError:
        time.sleep(0.2)
    curl = subprocess.run(["curl", "-s", f"{url}/sql", "-H", "content-type: application/json",
                           "-H", f"X-API-Key: {KEY}", "-d",
                           '{"sql": "SELECT count(*) FROM decisions WHERE event_date >= current_date - 10"}'],
                          capture_output=True, text=True, timeout=30, check=True)
    import json
    answer = json.loads(curl.stdout)
    assert answer["engine"] == "clickhouse" and answer["rows"] == [[written["recent"]]]
    assert httpx.post(f"{url}/sql", json={"sql": "SELECT 1"}).status_code == 401
  finally:
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=20)
  assert KEY not in stderr


def test_serve_refuses_auth_without_a_key():
  env = {k: v for k, v in os.environ.items() if k != "TXSTREAM_API_KEY"}
  done = subprocess.run([sys.executable, "-m", "txstream.cli", "serve", "--auth"], env=env, capture_output=True,
                        text=True, timeout=60, check=False)
  assert done.returncode == 2
  assert done.stderr == "txstream: error: --auth needs the API key in the environment variable TXSTREAM_API_KEY\n"


# -- re-decided transactions: one row per transaction, its latest version, whatever is pushed before FINAL --------

REDECIDED = 6


@pytest.fixture(scope="module")
def redecided(services):
  """``REDECIDED`` recent transactions written to a fresh ClickHouse database twice (two inserts, so two parts
  FINAL must merge): first approved, then declined with another score a minute later; yields a serve client."""
  from txstream.io.clickhouse_sink import WriteToClickHouse
  ch = services.require("clickhouse")
  suffix = uuid.uuid4().hex[:8]
  database = f"txstream_serve_redo_{suffix}"
  url = f"clickhouse://{ch.host}:{ch.port}/{database}"
  first = decision_table(REDECIDED, prefix=f"re{suffix}", customers=2, days=2, start_ms=_recent_start_ms())
  position = first.schema.names.index("decision")
  first = first.set_column(position, first.schema.field(position), pa.array(["approve"] * REDECIDED))
  later = first.set_column(position, first.schema.field(position), pa.array(["decline"] * REDECIDED))
  for name, change in (("decided_at_ms", 60_000), ("score", 0.5)):
    position = later.schema.names.index(name)
    field = later.schema.field(position)
    later = later.set_column(position, field, pa.compute.add(later.column(position), pa.scalar(change, field.type)))
  sink = WriteToClickHouse(url)
  sink.preflight()
  writer = sink._fn  # pylint: disable=protected-access
  writer.open_client()
  try:
    for version in (first, later):
      assert not writer.write_batch(version)
  finally:
    writer.close_client()
  stored = Client(host=ch.host, port=ch.port).execute(f"SELECT count() FROM {database}.decisions")[0][0]
  config = ServeConfig(clickhouse_url=url, clickhouse_retention_days=30, row_limit=50, query_timeout_s=20)
  with TestClient(create_app(config)) as client:
    yield {"client": client, "prefix": f"re{suffix}", "table": later, "stored": stored}
  Client(host=ch.host, port=ch.port).execute(f"DROP DATABASE IF EXISTS {database}")


RECENT = "event_time >= now() - interval '10 days'"


@pytest.mark.parametrize("where,expected", [
    ("transaction_id = '{prefix}-00001'", 1),                                           # a point lookup
    ("customer_id = {customer}", REDECIDED // 2),                                       # a customer's history
    ("(terminal_id IN (100, 101) OR currency = 'USD') AND amount_minor BETWEEN 0 AND 5000", None),
    ("event_time_ms >= 0 AND card_token = 'tok0000'", REDECIDED // 2),
    ("entry_mode = 'chip' AND merchant_category = 5411", 4),                        # Nullable columns
    ("decision = 'decline'", REDECIDED),                                                # only after FINAL
    ("decision = 'approve'", 0),                                                        # the superseded version
    ("customer_id = {customer} AND decision = 'approve'", 0),
    ("score >= 0.5 AND transaction_id = '{prefix}-00002'", 1),
])
def test_redecided_transactions_count_once_with_their_latest_decision(redecided, where, expected):
  assert redecided["stored"] == 2 * REDECIDED  # both versions are on disk
  table = redecided["table"]
  customer = table.column("customer_id")[0].as_py()
  where = where.format(prefix=redecided["prefix"], customer=customer)
  answer = _sql(redecided["client"], f"SELECT transaction_id, decision, score FROM decisions "
                                     f"WHERE {RECENT} AND {where} ORDER BY transaction_id")
  assert answer["engine"] == "clickhouse"
  assert len({r[0] for r in answer["rows"]}) == len(answer["rows"])  # one row per transaction
  assert {r[1] for r in answer["rows"]} <= {"decline"}
  if expected is not None:
    assert len(answer["rows"]) == expected
  latest = {t["transaction_id"]: t["score"] for t in table.to_pylist()}
  assert all(score == pytest.approx(latest[tx]) for tx, _, score in answer["rows"])


def test_standard_forms_run_on_clickhouse_18(redecided):
  table, client = redecided["table"], redecided["client"]
  answer = _sql(client, "SELECT customer_id, count(*) FILTER (WHERE decision = 'decline') AS declined, "
                        "sum(amount_minor) FILTER (WHERE decision = 'approve') AS approved_amount, "
                        "percentile_cont(1.0) WITHIN GROUP (ORDER BY amount_minor) AS largest "
                        f"FROM decisions WHERE {RECENT} GROUP BY 1 ORDER BY 1")
  customers = sorted(set(table.column("customer_id").to_pylist()))
  assert [r[0] for r in answer["rows"]] == customers
  for customer, declined, approved, largest in answer["rows"]:
    mine = [t for t in table.to_pylist() if t["customer_id"] == customer]
    assert (declined, approved, largest) == (len(mine), 0, max(t["amount_minor"] for t in mine))


def test_flagged_per_hour_terminal_passes_through_to_clickhouse(redecided):
  table = redecided["table"]
  answer = _sql(redecided["client"], "SELECT terminal_id, sum(flagged) AS flagged, "
                                     "sum(flagged_amount_minor) AS amount FROM flagged_per_hour_terminal "
                                     "WHERE hour >= now() - interval '10 days' GROUP BY terminal_id ORDER BY 1")
  assert answer["engine"] == "clickhouse"
  expected = {}
  for row in table.to_pylist():
    n, amount = expected.get(row["terminal_id"], (0, 0))
    expected[row["terminal_id"]] = (n + 1, amount + row["amount_minor"])
  assert {t: (int(n), int(a)) for t, n, a in answer["rows"]} == expected
