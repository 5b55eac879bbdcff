"""The SQL router of `txstream serve`: refusals, routing by table and time predicate, translation.

Pure functions, no servers; the cold-tier translation is run on an in-memory
DuckDB over a table in the cold layout, as the engine does.
"""
import datetime

import duckdb
import pyarrow as pa
import pytest

from txstream.io import parquet
from txstream.serve import router
from txstream.serve.router import QueryError

NOW = datetime.datetime(2026, 12, 1, 12, 0, tzinfo=datetime.timezone.utc)
ALL = router.Available(postgres=True, clickhouse=True, cold=True, clickhouse_database="txs")


def _plan(sql, available=ALL, engine=None, limit=100, retention_days=90):
  return router.plan(sql, available, retention_days, limit, engine, now=NOW)


def _refusal(sql, **kwargs):
  with pytest.raises(QueryError) as caught:
    _plan(sql, **kwargs)
  return str(caught.value)


@pytest.mark.parametrize("sql,message", [
    ("INSERT INTO runs (run_id) VALUES ('x')", "only SELECT queries are allowed (read-only API), got INSERT"),
    ("UPDATE runs SET status = 'x'", "only SELECT queries are allowed (read-only API), got UPDATE"),
    ("DELETE FROM dead_letters", "only SELECT queries are allowed (read-only API), got DELETE"),
    ("DROP TABLE runs", "only SELECT queries are allowed (read-only API), got DROP"),
    ("CREATE TABLE x (a int)", "only SELECT queries are allowed (read-only API), got CREATE"),
    ("ALTER TABLE runs ADD COLUMN x int", "only SELECT queries are allowed (read-only API), got ALTER"),
    ("TRUNCATE runs", "only SELECT queries are allowed (read-only API), got TRUNCATETABLE"),
    ("SET statement_timeout = 0", "only SELECT queries are allowed (read-only API), got SET"),
    ("COPY runs TO '/tmp/runs.csv'", "only SELECT queries are allowed (read-only API), got COPY"),
    ("SELECT 1; SELECT 2", "one statement per request, got 2"),
    ("", "empty query: send one SELECT"),
    ("SELECT * FROM read_parquet('/etc/x.parquet')", "table functions are not allowed: READ_PARQUET('/etc/x.parquet')"),
    ("SELECT * FROM generate_series(1, 10)", "table functions are not allowed: GENERATE_SERIES(1, 10)"),
    ("SELECT * FROM customers", "unknown table customers: the tables are decisions, decisions_per_minute, "
                                "flagged_per_hour_terminal, dead_letters, runs, dq_results, dashboards"),
    ("SELECT * FROM system.numbers", "unknown table system.numbers: use the logical tables decisions, "
                                     "decisions_per_minute, flagged_per_hour_terminal, dead_letters, runs, "
                                     "dq_results, dashboards"),
    ("SELECT set_config('role', 'postgres', true)", "function set_config() is not allowed (it reaches outside the "
                                                    "query)"),
    ("SELECT pg_read_file('/etc/passwd')", "function pg_read_file() is not allowed (it reaches outside the query)"),
    ("SELECT * FROM runs FOR UPDATE", "SELECT ... FOR UPDATE/SHARE and SELECT INTO write or lock: not allowed"),
    ("SELECT * INTO copy_of_runs FROM runs", "SELECT ... FOR UPDATE/SHARE and SELECT INTO write or lock: not allowed"),
    ("SELECT d.score FROM decisions d JOIN runs r ON r.model_version = d.model_version",
     "decisions and runs live on different servers: query them separately"),
    ("SELECT * FROM runs", None),  # the control: a plain read passes
])
def test_refusals_are_one_clear_line(sql, message):
  if message is None:
    assert _plan(sql).engine == "postgres"
    return
  assert _refusal(sql) == message


def test_a_parse_error_names_the_place():
  text = _refusal("SELECT (1 FROM runs")
  assert text.startswith("cannot parse the query: ") and "line 1" in text and "\n" not in text


@pytest.mark.parametrize("where,engine", [
    ("event_time >= now() - interval '7 days'", "clickhouse"),
    ("event_time >= now() - interval '120 days'", "cold"),
    ("event_date >= current_date - 30", "clickhouse"),
    ("event_date >= current_date - 91", "cold"),
    ("event_date BETWEEN DATE '2026-11-01' AND DATE '2026-11-30'", "clickhouse"),
    ("event_date BETWEEN '2026-08-01' AND '2026-11-30'", "cold"),
    ("event_time > TIMESTAMP '2026-10-01 00:00:00'", "clickhouse"),
    ("'2026-10-01' <= event_time AND decision = 'decline'", "clickhouse"),
    ("event_time_ms >= 1793000000000", "clickhouse"),   # 2026-10-25
    ("event_time_ms >= 1522540800000", "cold"),         # 2018-04-01
    ("event_time < now() - interval '1 day'", "cold"),  # no lower bound
    ("event_time >= now() - interval '1 day' OR score > 0.9", "cold"),
    ("score > 0.9", "cold"),
])
def test_decisions_route_by_the_lower_event_time_bound(where, engine):
  plan = _plan(f"SELECT count(*) FROM decisions WHERE {where}")
  assert plan.engine == engine, plan.reason


def test_routing_follows_the_retention_window_and_what_is_configured():
  sql = "SELECT count(*) FROM decisions WHERE event_date >= current_date - 30"
  assert _plan(sql, retention_days=29).engine == "cold"
  assert _plan(sql, retention_days=31).engine == "clickhouse"
  assert _plan(sql, available=ALL._replace(clickhouse=False)).engine == "cold"
  assert _plan(sql, engine="postgres").engine == "postgres"
  assert _refusal(sql, available=ALL._replace(clickhouse=False, cold=False)) == \
      "decisions needs the cold tier, which serve was not started with (--cold_path)"


def test_every_decisions_reference_needs_a_recent_bound():
  recent = "SELECT transaction_id FROM decisions WHERE event_date >= current_date - 1"
  assert _plan(f"{recent} UNION ALL {recent}").engine == "clickhouse"
  assert _plan(f"{recent} UNION ALL SELECT transaction_id FROM decisions").engine == "cold"
  cte = "WITH d AS (SELECT * FROM decisions WHERE event_date >= current_date - 2) SELECT count(*) FROM d"
  assert _plan(cte).engine == "clickhouse"
  assert _plan(cte).since == datetime.datetime(2026, 11, 29, tzinfo=datetime.timezone.utc)


def test_tables_pick_their_server():
  assert _plan("SELECT count(*) FROM dead_letters").engine == "postgres"
  assert _plan("SELECT * FROM dq_results, dashboards").engine == "postgres"
  assert _plan("SELECT * FROM decisions_per_minute").engine == "clickhouse"
  assert _plan("SELECT * FROM flagged_per_hour_terminal").engine == "clickhouse"
  assert _refusal("SELECT * FROM flagged_per_hour_terminal", engine="cold") == \
      "flagged_per_hour_terminal is a ClickHouse table: engine cold cannot answer it"
  assert _refusal("SELECT * FROM runs", engine="clickhouse") == \
      "runs are PostgreSQL tables: engine clickhouse cannot answer them"
  assert _refusal("SELECT * FROM decisions_per_minute", available=ALL._replace(clickhouse=False)) == \
      "decisions_per_minute needs the clickhouse tier, which serve was not started with (--clickhouse_url)"
  assert _refusal("SELECT 1", engine="oracle") == "unknown engine 'oracle': choose one of clickhouse, cold, postgres"


def test_clickhouse_translation():
  plan = _plan("SELECT date_trunc('minute', d.event_time) AS m, count(*) FROM decisions d, decisions e "
               "WHERE d.event_time >= '2026-11-20' AND d.event_time >= now() - interval '7 days' GROUP BY 1")
  source = router.decisions_source("clickhouse", ALL, plan.since)
  assert source.endswith("FROM txs.decisions FINAL PREWHERE event_date >= toDate('2026-11-24'))")
  assert "toString(decision) AS decision" in source
  # A join: nothing pushed into either side (a bare column could be the other table's).
  assert plan.sql.replace(source, "<D>") == (
      "SELECT toStartOfMinute(d.event_time) AS m, COUNT(*) FROM <D> AS d CROSS JOIN <D> AS e "
      "WHERE d.event_time >= '2026-11-20 00:00:00' AND d.event_time >= now() - INTERVAL 604800 SECOND "
      "GROUP BY toStartOfMinute(d.event_time) LIMIT 101")
  assert _plan("SELECT * FROM decisions_per_minute m").sql == "SELECT * FROM txs.decisions_per_minute AS m LIMIT 101"
  assert _plan("SELECT * FROM flagged_per_hour_terminal").sql == \
      "SELECT * FROM txs.flagged_per_hour_terminal AS flagged_per_hour_terminal LIMIT 101"


def _pushed(sql):
  """The PREWHERE of the (one) decisions subquery and the query around it."""
  inner, outer = _plan(sql).sql.split(" FINAL PREWHERE ", 1)[1].split(") AS ", 1)
  return inner, outer


def test_event_field_conditions_go_before_final_and_the_rest_after():
  inner, outer = _pushed("SELECT * FROM decisions d WHERE d.transaction_id = 'tx-1' AND decision = 'review' "
                         "AND event_time >= now() - interval '2 days' AND (customer_id = 7 OR terminal_id IN (1, 2)) "
                         "AND score > 0.5 AND amount_minor BETWEEN 10 AND 20")
  assert inner == ("event_date >= toDate('2026-11-29') AND (transaction_id = 'tx-1') "
                   "AND (event_time >= now() - INTERVAL 172800 SECOND) AND (customer_id = 7 OR terminal_id IN (1, 2)) "
                   "AND (amount_minor BETWEEN 10 AND 20)")
  # The whole WHERE still applies after de-duplication: decision and score only there.
  assert outer.startswith("d WHERE d.transaction_id = 'tx-1' AND decision = 'review'")
  assert "score > 0.5" in outer


@pytest.mark.parametrize("where", [
    "(customer_id = 7 OR decision = 'decline')",                # a mutable column inside an OR
    "customer_id IN (SELECT customer_id FROM decisions_per_minute)",  # a subquery
    "decided_at >= now() - interval '1 day'",                    # changes with each version
    "e.customer_id = 7",                                         # another table's column
])
def test_conditions_that_could_change_between_versions_are_not_pushed(where):
  inner, _ = _pushed(f"SELECT * FROM decisions WHERE event_time >= now() - interval '1 day' AND {where}")
  assert inner == "event_date >= toDate('2026-11-30') AND (event_time >= now() - INTERVAL 86400 SECOND)"


def test_each_decisions_reference_gets_its_own_conditions():
  sql = _plan("SELECT count(*) FROM decisions WHERE event_time >= now() - interval '1 day' AND customer_id = 1 "
              "UNION ALL SELECT count(*) FROM decisions WHERE event_time >= now() - interval '1 day' "
              "AND customer_id = 2").sql
  assert "(customer_id = 1)) AS decisions" in sql and "(customer_id = 2)) AS decisions" in sql


@pytest.mark.parametrize("sql,translated", [
    ("SELECT event_date, count(*) AS n FROM decisions_per_minute GROUP BY 1 ORDER BY 2 DESC, 1",
     "SELECT event_date, COUNT(*) AS n FROM txs.decisions_per_minute AS decisions_per_minute GROUP BY event_date "
     "ORDER BY COUNT(*) DESC NULLS FIRST, event_date LIMIT 101"),
    ("SELECT count(*) FILTER (WHERE decision = 'decline') AS declined, count(DISTINCT terminal_id) FILTER "
     "(WHERE decision <> 'approve') AS t, sum(decisions) FILTER (WHERE decision = 'review') AS r, "
     "avg(decisions) FILTER (WHERE minute > '2026-11-30') FROM decisions_per_minute",
     "SELECT countIf(decision = 'decline') AS declined, uniqExactIf(terminal_id, decision <> 'approve') AS t, "
     "sumIf(decisions, decision = 'review') AS r, avgIf(decisions, minute > '2026-11-30') "
     "FROM txs.decisions_per_minute AS decisions_per_minute LIMIT 101"),
    ("SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY flagged_amount_minor) AS p95 "
     "FROM flagged_per_hour_terminal",
     "SELECT quantileExact(0.95)(flagged_amount_minor) AS p95 "
     "FROM txs.flagged_per_hour_terminal AS flagged_per_hour_terminal LIMIT 101"),
])
def test_standard_forms_clickhouse_18_lacks_are_rewritten(sql, translated):
  assert _plan(sql).sql == translated


def test_positional_forms_are_kept_on_the_other_engines():
  assert _plan("SELECT stage, count(*) FROM dead_letters GROUP BY 1 ORDER BY 2").sql == \
      "SELECT stage, COUNT(*) FROM public.dead_letters AS dead_letters GROUP BY 1 ORDER BY 2 LIMIT 101"


@pytest.mark.parametrize("sql,message", [
    ("SELECT * FROM decisions_per_minute GROUP BY 1", "GROUP BY 1 with SELECT *: name the column"),
    ("SELECT minute FROM decisions_per_minute ORDER BY 3", "ORDER BY 3: the select has 1 columns"),
    ("SELECT max(decisions) FILTER (WHERE decision = 'x') FROM decisions_per_minute", None),
    ("SELECT stddev_samp(decisions) FILTER (WHERE decision = 'x') FROM decisions_per_minute",
     "STDDEV_SAMP(decisions) FILTER (WHERE ...) is not supported on ClickHouse: use sum(CASE WHEN ... END)"),
    ("SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY decisions) FROM decisions_per_minute",
     "PERCENTILE_DISC(0.5) WITHIN GROUP is not supported on ClickHouse: use percentile_cont(p) WITHIN GROUP "
     "(ORDER BY x) or quantile(x, p)"),
])
def test_clickhouse_rewrites_refuse_what_they_cannot_translate(sql, message):
  if message is None:
    assert "maxIf(decisions, decision = 'x')" in _plan(sql).sql
    return
  assert _refusal(sql) == message


def test_postgres_translation_and_limits():
  assert _plan("SELECT * FROM runs ORDER BY started_at").sql == \
      "SELECT * FROM public.runs AS runs ORDER BY started_at LIMIT 101"
  assert _plan("SELECT * FROM runs LIMIT 5").sql == "SELECT * FROM public.runs AS runs LIMIT 5"
  assert _plan("SELECT * FROM runs LIMIT 500").sql == "SELECT * FROM public.runs AS runs LIMIT 101"
  assert _plan("SELECT * FROM runs LIMIT 5 OFFSET 10").sql == \
      "SELECT * FROM (SELECT * FROM public.runs AS runs LIMIT 5 OFFSET 10) AS _txstream_q LIMIT 101"
  assert _plan("SELECT 1 UNION SELECT 2", limit=1).sql == \
      "SELECT * FROM (SELECT 1 UNION SELECT 2) AS _txstream_q LIMIT 2"
  forced = _plan("SELECT tx_amount, event_time_ms FROM decisions", engine="postgres").sql
  assert "features[1] AS tx_amount" in forced and "FROM public.decisions) AS decisions" in forced


def _ms(*day) -> int:
  return int(datetime.datetime(*day, tzinfo=datetime.timezone.utc).timestamp() * 1000)


def _cold_rows() -> pa.Table:
  """Three decisions in the cold layout (what the Delta table holds)."""
  rows = []
  for i, (day, decision) in enumerate([(1, "approve"), (2, "decline"), (40, "review")]):
    moment = datetime.datetime(2026, 10, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(days=day, seconds=i)
    row = {f.name: None for f in parquet.COLD_SCHEMA}
    row.update(transaction_id=f"t{i}", event_time=moment, event_date=moment.date(), customer_id=7, terminal_id=9,
               card_token="tok", amount_minor=100 * (i + 1), currency="EUR", score=0.5 + i / 10, decision=decision,
               reason_codes=["R"] * i, model_version="m", pipeline_version="p", schema_id=2, source="s",
               decided_at=moment, tx_amount=1.0 + i)
    rows.append(row)
  return pa.Table.from_pylist(rows, schema=parquet.COLD_SCHEMA)


@pytest.mark.parametrize("sql,expected", [
    ("SELECT decision, count(*) AS n, sum(amount_minor) FROM decisions GROUP BY decision ORDER BY decision",
     [("approve", 1, 100), ("decline", 1, 200), ("review", 1, 300)]),
    ("SELECT transaction_id, event_time_ms, cardinality(reason_codes) FROM decisions "
     "WHERE event_date BETWEEN DATE '2026-10-02' AND '2026-10-03' ORDER BY 1",
     [("t0", _ms(2026, 10, 2), 0), ("t1", _ms(2026, 10, 3) + 1000, 1)]),
    ("SELECT date_trunc('day', event_time)::date AS day, max(tx_amount) FROM decisions "
     "WHERE event_time >= '2026-11-01' GROUP BY 1", [(datetime.date(2026, 11, 10), 3.0)]),
    ("WITH s AS (SELECT customer_id, avg(score) AS a FROM decisions GROUP BY 1) SELECT round(a, 2) FROM s",
     [(0.6,)]),
])
def test_cold_translation_runs_on_duckdb(sql, expected):
  plan = _plan(sql, engine="cold")
  assert plan.engine == "cold"
  connection = duckdb.connect(":memory:")
  connection.register("cold_decisions", _cold_rows())
  connection.execute("SET TimeZone = 'UTC'")
  assert [tuple(r) for r in connection.execute(plan.sql).fetchall()] == expected
