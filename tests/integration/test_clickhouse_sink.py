"""WriteToClickHouse against the real ClickHouse (``services.require("clickhouse")``), database txstream_test."""
import datetime
from collections import Counter, defaultdict

import pytest
from clickhouse_driver import Client

from tests.integration import sink_fixtures as fx
from tests.tcp_proxy import TcpProxy
from txstream.io import clickhouse_queries as queries
from txstream.io import clickhouse_sink as ch
from txstream.io.clickhouse_sink import WriteToClickHouse
from txstream.core.contracts import FEATURE_COLUMNS
from txstream.io.sinks import SinkConfigError
from txstream.services import CLICKHOUSE_HTTP_PORT

DB = "txstream_test"


@pytest.fixture(scope="module")
def endpoint(services):
  return services.require("clickhouse")


@pytest.fixture
def url(endpoint):
  return f"clickhouse://{endpoint.host}:{endpoint.port}/{DB}"


@pytest.fixture
def client(endpoint):
  """A client of the server, with txstream_test dropped first (the sink must create it)."""
  c = Client(endpoint.host, port=endpoint.port, database="default")
  c.execute(f"DROP DATABASE IF EXISTS {DB}")
  yield c
  c.disconnect()


def final_count(client) -> int:
  return client.execute(f"SELECT count() FROM {DB}.decisions FINAL")[0][0]


def test_creates_database_and_writes_columns(client, url):
  decisions = fx.make_decisions(50)
  # One batch of 50 rows, written as 16 + 16 + 16 + 2.
  counts = fx.run_write(WriteToClickHouse(url, batch_size=16), decisions, expect_written=50, expect_writes=4)
  assert counts["tier.analytics"] == 50
  assert final_count(client) == 50
  d = fx.rows(decisions)[9]
  columns = ["transaction_id", "event_time_ms", "toString(event_date)", "toUInt32(event_time)", "customer_id",
             "terminal_id", "card_token", "amount_minor", "currency", "entry_mode", "merchant_category", "score",
             "decision", "reason_codes", "model_version", "reference_version", "source", "decided_at_ms",
             "rules_version"]
  row = client.execute(f"SELECT {', '.join(columns)} FROM {DB}.decisions FINAL WHERE transaction_id = %(id)s",
                       {"id": d["transaction_id"]})
  day = datetime.datetime.fromtimestamp(d["event_time_ms"] / 1000, tz=datetime.timezone.utc).date().isoformat()
  assert row == [(d["transaction_id"], d["event_time_ms"], day, d["event_time_ms"] // 1000, d["customer_id"],
                  d["terminal_id"], d["card_token"], d["amount_minor"], d["currency"], d["entry_mode"],
                  d["merchant_category"], d["score"], d["decision"], list(d["reason_codes"]), "model-1",
                  d["reference_version"], d["source"], d["decided_at_ms"], d["rules_version"])]
  features = client.execute(f"SELECT {', '.join(FEATURE_COLUMNS)} FROM {DB}.decisions "
                            "WHERE transaction_id = 'tx-00009'")[0]
  assert list(features) == list(d["features"])
  partitions = client.execute(f"SELECT DISTINCT partition FROM system.parts WHERE database = '{DB}' "
                              "AND table = 'decisions' AND active")
  assert partitions == [("201804",)]


def test_nulls_and_empty_values_round_trip(client, url):
  decisions = fx.with_values(fx.make_decisions(4), 1, entry_mode="", reason_codes=None, customer_segment=None)
  long = "é💳\t\n\x00" + "x" * 20_000  # a length that takes three varint bytes
  decisions = fx.with_values(decisions, 3, source=long, reason_codes=["", "y" * 200, "ü"], rules_version=None)
  fx.run_write(WriteToClickHouse(url), decisions, expect_written=4)
  got = client.execute(f"SELECT transaction_id, entry_mode, merchant_category, customer_segment, reason_codes, "
                       f"reference_version, rules_version FROM {DB}.decisions FINAL ORDER BY transaction_id")
  assert got == [("tx-00000", None, None, "retail", [], None, "rules-1"),
                 ("tx-00001", "", 5411, None, [], "ref-1", "rules-1"),
                 ("tx-00002", "chip", 5411, "retail", ["NIGHT", "FAR_FROM_HOME"], "ref-1", "rules-1"),
                 ("tx-00003", "chip", 5411, "retail", ["", "y" * 200, "ü"], "ref-1", None)]
  assert client.execute(f"SELECT source FROM {DB}.decisions WHERE transaction_id = 'tx-00003'") == [(long,)]


def test_rewrites_collapse_to_one_row_per_transaction(client, url):
  decisions = fx.make_decisions(50, batch_rows=10)
  fx.run_write(WriteToClickHouse(url, batch_size=7), decisions, expect_written=50)
  fx.run_write(WriteToClickHouse(url), fx.reversed_rows(decisions, batch_rows=13), expect_written=50)
  assert final_count(client) == 50
  assert queries.count_distinct_transactions(client, database=DB) == 50

  # A later decision for the same transactions (higher decided_at_ms) replaces the earlier one.
  first = fx.take(decisions, range(10))
  later = fx.with_columns(first, score=[0.999] * 10,
                          decided_at_ms=[d["decided_at_ms"] + 1 for d in fx.rows(first)])
  fx.run_write(WriteToClickHouse(url), later, expect_written=10)
  assert final_count(client) == 50
  assert client.execute(f"SELECT countIf(score = 0.999) FROM {DB}.decisions FINAL")[0][0] == 10
  client.execute(f"OPTIMIZE TABLE {DB}.decisions FINAL")
  assert client.execute(f"SELECT count() FROM {DB}.decisions")[0][0] == 50


def test_same_batch_twice_leaves_the_same_state(client, url):
  decisions = fx.make_decisions(40)
  everything = f"SELECT * FROM {DB}.decisions FINAL ORDER BY transaction_id"
  fx.run_write(WriteToClickHouse(url), decisions, expect_written=40)
  once = client.execute(everything)
  fx.run_write(WriteToClickHouse(url), decisions, expect_written=40)
  assert client.execute(everything) == once and len(once) == 40
  client.execute(f"OPTIMIZE TABLE {DB}.decisions FINAL")
  assert client.execute(f"SELECT * FROM {DB}.decisions ORDER BY transaction_id") == once


def test_dashboard_queries(client, url):
  decisions = fx.make_decisions(60, customers=6, days=2)
  fx.run_write(WriteToClickHouse(url), decisions, expect_written=60)
  rows = fx.rows(decisions)

  hours = defaultdict(Counter)
  for d in rows:
    hour = d["event_time_ms"] // 3_600_000 * 3_600_000
    hours[hour]["transactions"] += 1
    hours[hour]["flagged"] += d["decision"] != "approve"
    hours[hour]["declined"] += d["decision"] == "decline"
  got = queries.fraud_rate_per_hour(client, database=DB)
  assert [(r["hour_ms"], r["transactions"], r["flagged"], r["declined"]) for r in got] == [
      (h, c["transactions"], c["flagged"], c["declined"]) for h, c in sorted(hours.items())]
  assert all(r["flagged_rate"] == pytest.approx(r["flagged"] / r["transactions"]) for r in got)
  assert len(queries.fraud_rate_per_hour(client, since_ms=fx.T0 + fx.DAY_MS, database=DB)) == 1

  flagged = Counter()
  for d in rows:
    if d["decision"] != "approve":
      flagged[(d["terminal_id"], d["currency"])] += d["amount_minor"]
  expected = sorted(flagged.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
  got = queries.top_terminals_by_flagged_amount(client, limit=3, database=DB)
  assert [((r["terminal_id"], r["currency"]), r["flagged_amount_minor"]) for r in got] == expected

  since, until = fx.T0, fx.T0 + fx.DAY_MS
  window = [d for d in rows if since <= d["event_time_ms"] < until]
  per_customer = Counter(d["customer_id"] for d in window)
  got = queries.customer_velocity(client, since, until, limit=3, database=DB)
  assert [(r["customer_id"], r["transactions"]) for r in got] == sorted(
      per_customer.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
  assert got[0]["tx_per_hour"] == pytest.approx(got[0]["transactions"] / 24)
  one = queries.customer_velocity(client, since, until, customer_id=4, database=DB)
  assert [(r["customer_id"], r["transactions"]) for r in one] == [(4, per_customer[4])]


def test_undecidable_rows_become_dead_letters(client, url):
  decisions = fx.with_values(fx.make_decisions(10), 4, decision="maybe")
  decisions = fx.with_values(decisions, 7, tx_amount=None)  # a feature column cannot hold null
  decisions = fx.with_values(decisions, 8, decided_at_ms=-1)  # UInt64
  counts = fx.run_write(WriteToClickHouse(url), decisions, expect_written=7,
                        expect_dead=["transaction_id=tx-00004", "transaction_id=tx-00007", "transaction_id=tx-00008"],
                        expect_dead_letters=[(f"test.wire#{i}", "sink.analytics", "rejected_by_store",
                                              f"transaction_id=tx-0000{i}") for i in (4, 7, 8)])
  assert counts["sink.analytics.rejected"] == 3
  assert final_count(client) == 7


def test_preflight(client, url):
  with pytest.raises(SinkConfigError) as info:
    WriteToClickHouse(f"clickhouse://127.0.0.1:{fx.free_port()}/{DB}").preflight()
  assert "\n" not in str(info.value) and str(info.value).startswith("cannot connect to ClickHouse at 127.0.0.1:")
  with pytest.raises(SinkConfigError, match="scheme"):
    WriteToClickHouse(f"http://127.0.0.1:8123/{DB}")
  with pytest.raises(SinkConfigError, match="plain identifier"):
    WriteToClickHouse("clickhouse://127.0.0.1:9000/bad-name")
  with pytest.raises(SinkConfigError, match="only http_port"):
    WriteToClickHouse(f"{url}?compress=1")
  with pytest.raises(SinkConfigError) as info:  # inserts go over HTTP: a dead HTTP port fails at start-up
    WriteToClickHouse(f"{url}?http_port={fx.free_port()}").preflight()
  assert "\n" not in str(info.value) and str(info.value).startswith("ClickHouse HTTP interface at 127.0.0.1:")
  # A missing database is created, with the table.
  WriteToClickHouse(url).preflight()
  assert client.execute(f"EXISTS TABLE {DB}.decisions") == [(1,)]
  WriteToClickHouse(url).preflight()


def test_preflight_adds_feature_columns_a_table_from_an_earlier_version_lacks(client, url):
  WriteToClickHouse(url).preflight()
  newest = ch.FEATURE_COLUMNS[-3:]
  client.execute(f"ALTER TABLE {DB}.decisions " + ", ".join(f"DROP COLUMN {c}" for c in newest + ["rules_version"]))
  decisions = fx.make_decisions(5, customers=2)
  WriteToClickHouse(url).preflight()
  have = {row[0] for row in client.execute(f"DESCRIBE TABLE {DB}.decisions")}
  assert set(newest) | {"rules_version"} <= have
  fx.run_write(WriteToClickHouse(url), decisions, expect_written=5)
  got = client.execute(f"SELECT {newest[-1]} FROM {DB}.decisions FINAL ORDER BY transaction_id")
  by_id = sorted(fx.rows(decisions), key=lambda d: d["transaction_id"])
  assert [row[0] for row in got] == [d["features"][-1] for d in by_id]
  assert client.execute(f"SELECT rules_version FROM {DB}.decisions FINAL ORDER BY transaction_id") == [
      (d["rules_version"],) for d in by_id]
  client.execute(f"ALTER TABLE {DB}.decisions MODIFY COLUMN schema_id Int64")  # another type: an error
  with pytest.raises(SinkConfigError, match="schema_id is Int64, expected Int32"):
    WriteToClickHouse(url).preflight()
  client.execute(f"ALTER TABLE {DB}.decisions DROP COLUMN card_token")  # not addable: an error
  with pytest.raises(SinkConfigError, match="lacks columns card_token"):
    WriteToClickHouse(url).preflight()


def test_outage_mid_write_loses_and_duplicates_nothing(client, endpoint):
  decisions = fx.make_decisions(300, customers=30, batch_rows=40)
  with TcpProxy(endpoint.host, CLICKHOUSE_HTTP_PORT) as proxy:  # inserts go over HTTP
    proxy.interrupt_after_bytes(40_000, outage_s=3.0)
    sink = WriteToClickHouse(f"clickhouse://{endpoint.host}:{endpoint.port}/{DB}?http_port={proxy.port}",
                             batch_size=20, retry=fx.FAST_RETRY)
    counts = fx.run_write(sink, decisions, expect_written=300)
    assert proxy.interruptions == 1
  assert counts["tier.analytics"] == 300 and counts["sink.analytics.retried"] >= 1
  assert counts.get("sink.analytics.failed", 0) == 0
  assert final_count(client) == 300
  assert queries.count_distinct_transactions(client, database=DB) == 300
  assert client.execute(f"SELECT sum(amount_minor) FROM {DB}.decisions FINAL")[0][0] == sum(
      d["amount_minor"] for d in fx.rows(decisions))
