"""WriteToPostgres and friends against the real PostgreSQL (services.require("postgres")), db txstream_test."""
import datetime
import threading
import time

import psycopg2
import pytest

from tests.integration import sink_fixtures as fx
from tests.tcp_proxy import TcpProxy
from txstream.io import migrations
from txstream.io import postgres_queries as queries
from txstream.io import postgres_runs as runs
from txstream.io import postgres_sink as pg
from txstream.io.postgres_sink import WriteDeadLettersToPostgres, WriteToPostgres
from txstream.io.sinks import SinkConfigError

DB = "txstream_test"


@pytest.fixture(scope="module")
def endpoint(services):
  return services.require("postgres")


@pytest.fixture(scope="module")
def database(endpoint):
  """A fresh txstream_test database; returns its DSN."""
  admin = psycopg2.connect(host=endpoint.host, port=endpoint.port, user="postgres", dbname="postgres",
                           connect_timeout=5)
  admin.autocommit = True
  with admin.cursor() as cur:
    cur.execute(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE)")
    cur.execute(f"CREATE DATABASE {DB}")
  yield f"host={endpoint.host} port={endpoint.port} user=postgres dbname={DB}"
  admin.close()


@pytest.fixture
def dsn(database):
  return database


@pytest.fixture
def conn(database):
  pg.preflight(database)
  c = psycopg2.connect(database)
  with c, c.cursor() as cur:
    cur.execute("TRUNCATE decisions, decision_keys, dead_letters, runs")
  yield c
  c.close()


def scalar(conn, sql, params=()):
  with conn, conn.cursor() as cur:
    cur.execute(sql, params)
    return cur.fetchone()[0]


def stored(conn) -> list:
  """Every stored decision and key, without the time of the write."""
  with conn, conn.cursor() as cur:
    cur.execute("SELECT to_jsonb(d) - 'written_at' FROM decisions d ORDER BY transaction_id")
    decisions = [r[0] for r in cur.fetchall()]
    cur.execute("SELECT transaction_id, event_date FROM decision_keys ORDER BY transaction_id")
    return decisions + cur.fetchall()


def test_writes_decisions_into_day_partitions(conn, dsn):
  decisions = fx.with_values(fx.make_decisions(50), 13, reason_codes=['QUOTE"D', "BACK\\SLASH", "A,B", "{BRACE}"])
  # One batch of 50 rows, written as 16 + 16 + 16 + 2.
  counts = fx.run_write(WriteToPostgres(dsn, batch_size=16), decisions, expect_written=50, expect_writes=4)
  assert counts["tier.warm"] == 50
  assert scalar(conn, "SELECT count(*) FROM decisions") == 50
  assert scalar(conn, "SELECT count(*) FROM decision_keys") == 50
  assert scalar(conn, "SELECT array_agg(c.relname::text ORDER BY c.relname) FROM pg_inherits i "
                      "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = 'decisions'::regclass") == [
                          "decisions_p20180401", "decisions_p20180402", "decisions_p20180403"]

  rows = fx.rows(decisions)
  assert counts.get("sink.warm.upserts", 0) == 0  # all new: COPY, no staging
  for d in (rows[0], rows[3], rows[9], rows[13]):
    row = queries.decision_by_id(conn, d["transaction_id"])
    assert row["event_date"] == datetime.date(1970, 1, 1) + datetime.timedelta(days=d["event_time_ms"] // fx.DAY_MS)
    assert (row["event_time_ms"], row["decided_at_ms"]) == (d["event_time_ms"], d["decided_at_ms"])
    assert (row["customer_id"], row["terminal_id"], row["amount_minor"], row["currency"]) == (
        d["customer_id"], d["terminal_id"], d["amount_minor"], d["currency"])
    assert (row["entry_mode"], row["merchant_category"], row["reference_version"]) == (
        d["entry_mode"], d["merchant_category"], d["reference_version"])
    assert (row["score"], row["decision"], row["reason_codes"], row["features"]) == (
        d["score"], d["decision"], list(d["reason_codes"]), list(d["features"]))
    assert (row["source"], row["card_token"], row["model_version"], row["rules_version"]) == (
        d["source"], d["card_token"], "model-1", d["rules_version"])
  assert rows[13]["reason_codes"] == ['QUOTE"D', "BACK\\SLASH", "A,B", "{BRACE}"]
  assert rows[3]["rules_version"] is None and queries.decision_by_id(conn, "tx-00003")["rules_version"] is None
  assert "\t" in queries.decision_by_id(conn, "tx-00009")["source"]
  assert queries.decision_by_id(conn, "nope") is None


def test_text_nulls_empties_and_nul_characters(conn, dsn):
  # An empty string stays an empty string (not NULL) and a null optional stays NULL. NUL cannot be stored in
  # text: a decision holding one is refused (a dead letter), never stored changed.
  # A HOME_DISTANCE of -1 (terminal not on file) is NULL in home_distance and stays -1 in the feature vector.
  decisions = fx.with_values(fx.make_decisions(6), 1, entry_mode="")
  decisions = fx.with_values(decisions, 2, reason_codes=None)
  decisions = fx.with_values(decisions, 3, customer_segment="a\x00b")
  decisions = fx.with_values(decisions, 5, reason_codes=["", "x\x00"])
  fx.run_write(WriteToPostgres(dsn), decisions, expect_written=4,
               expect_dead=["transaction_id=tx-00003", "transaction_id=tx-00005"],
               expect_dead_letters=[(f"test.wire#{i}", "sink.warm", "nul_in_text", f"transaction_id=tx-{i:05d}")
                                    for i in (3, 5)])
  with conn, conn.cursor() as cur:
    cur.execute("SELECT transaction_id, entry_mode, customer_segment, reason_codes, home_distance, features[24] "
                "FROM decisions ORDER BY transaction_id")
    assert cur.fetchall() == [("tx-00000", None, "retail", [], 0.0, 0.0),
                              ("tx-00001", "", "retail", ["HIGH_AMOUNT"], 1.0, 1.0),
                              ("tx-00002", "chip", "retail", [], 2.0, 2.0),
                              ("tx-00004", "chip", "retail", ["HIGH_AMOUNT"], None, -1.0)]


def test_rewrite_is_idempotent_and_upserts(conn, dsn):
  decisions = fx.make_decisions(50, batch_rows=10)
  fx.run_write(WriteToPostgres(dsn, batch_size=7), decisions, expect_written=50)
  before = queries.decision_by_id(conn, "tx-00011")
  fx.run_write(WriteToPostgres(dsn, batch_size=50), fx.reversed_rows(decisions, batch_rows=13), expect_written=50)
  assert scalar(conn, "SELECT count(*) FROM decisions") == 50
  assert scalar(conn, "SELECT count(DISTINCT transaction_id) FROM decisions") == 50
  assert queries.decision_by_id(conn, "tx-00011") == before

  # A rerun that decides differently replaces the stored decision instead of adding one.
  fx.run_write(WriteToPostgres(dsn), fx.make_decisions(50, score_offset=0.001), expect_written=50)
  assert scalar(conn, "SELECT count(*) FROM decisions") == 50
  assert queries.decision_by_id(conn, "tx-00011")["score"] == pytest.approx(before["score"] + 0.001)


def test_same_batch_twice_leaves_the_same_state(conn, dsn):
  decisions = fx.make_decisions(40)
  fx.run_write(WriteToPostgres(dsn), decisions, expect_written=40)
  once = stored(conn)
  assert fx.run_write(WriteToPostgres(dsn), decisions, expect_written=40)["sink.warm.upserts"] == 1
  assert stored(conn) == once and len(once) == 80


def test_a_batch_mixing_stored_and_new_transactions_upserts_all(conn, dsn):
  decisions = fx.make_decisions(30)
  fx.run_write(WriteToPostgres(dsn), fx.take(decisions, range(0, 30, 2)), expect_written=15)
  counts = fx.run_write(WriteToPostgres(dsn), decisions, expect_written=30)
  assert counts["sink.warm.upserts"] == 1
  assert scalar(conn, "SELECT count(*) FROM decisions") == 30 == scalar(conn, "SELECT count(*) FROM decision_keys")


def test_a_stored_row_whose_key_was_removed_is_upserted(conn, dsn):
  # Not something the sink does; the fast path's COPY then fails on the row, and the upsert takes over.
  decisions = fx.make_decisions(10)
  fx.run_write(WriteToPostgres(dsn), decisions, expect_written=10)
  with conn, conn.cursor() as cur:
    cur.execute("DELETE FROM decision_keys WHERE transaction_id = 'tx-00004'")
  changed = fx.with_values(decisions, 4, score=0.875)
  assert fx.run_write(WriteToPostgres(dsn), changed, expect_written=10)["sink.warm.upserts"] == 1
  assert scalar(conn, "SELECT count(*) FROM decisions") == 10 == scalar(conn, "SELECT count(*) FROM decision_keys")
  assert queries.decision_by_id(conn, "tx-00004")["score"] == 0.875


def test_later_copy_of_a_transaction_in_one_batch_wins(conn, dsn):
  first = fx.make_decisions(5)
  later = fx.make_decisions(5, score_offset=0.5)
  both = fx.take(first + later, [0, 1, 5, 2, 6, 3, 4])  # tx-00000 and tx-00001 twice, the later ones after
  assert fx.run_write(WriteToPostgres(dsn), both, expect_written=7)["tier.warm"] == 7
  assert scalar(conn, "SELECT count(*) FROM decisions") == 5
  assert queries.decision_by_id(conn, "tx-00001")["score"] == fx.rows(later)[1]["score"]
  assert queries.decision_by_id(conn, "tx-00002")["score"] == fx.rows(first)[2]["score"]


def test_a_transaction_written_under_another_day_moves_there(conn, dsn):
  # The last write wins, as in every tier: the old row goes, the key points at the new day, one row remains.
  first = fx.make_decisions(10)
  fx.run_write(WriteToPostgres(dsn), first, expect_written=10)
  stored_ms = fx.rows(first)[3]["event_time_ms"]
  moved = fx.with_values(fx.take(first, [3, 4, 5]), 0, event_time_ms=stored_ms + 5 * fx.DAY_MS)
  counts = fx.run_write(WriteToPostgres(dsn), moved, expect_written=3)
  assert counts["sink.warm.moved"] == 1 and counts.get("sink.warm.rejected", 0) == 0
  assert scalar(conn, "SELECT count(*) FROM decisions WHERE transaction_id = 'tx-00003'") == 1
  assert queries.decision_by_id(conn, "tx-00003")["event_time_ms"] == stored_ms + 5 * fx.DAY_MS
  assert scalar(conn, "SELECT event_date FROM decision_keys WHERE transaction_id = 'tx-00003'") == (
      datetime.date(1970, 1, 1) + datetime.timedelta(days=(stored_ms + 5 * fx.DAY_MS) // fx.DAY_MS))
  assert scalar(conn, "SELECT count(*) FROM decisions") == 10


def test_concurrent_writers_of_a_new_transaction_under_two_days_store_one(conn, dsn):
  # Another writer has inserted tx-00003's key under a later day and not committed yet: the sink's COPY
  # waits for it, finds the key stored once it commits, and moves the key to its own row's day.
  decisions = fx.make_decisions(6)
  row = fx.rows(decisions)[3]
  later = datetime.date(1970, 1, 1) + datetime.timedelta(days=row["event_time_ms"] // fx.DAY_MS + 5)
  other = psycopg2.connect(dsn)
  with other.cursor() as cur:
    cur.execute("INSERT INTO decision_keys (transaction_id, event_date) VALUES ('tx-00003', %s)", (later,))
  result = {}
  writer = threading.Thread(target=lambda: result.update(fx.run_write(
      WriteToPostgres(dsn), decisions, expect_written=6)))
  writer.start()
  time.sleep(1.0)
  assert writer.is_alive()  # waiting on the uncommitted key
  other.commit()
  other.close()
  writer.join(60)
  assert result["sink.warm.moved"] == 1 and result["sink.warm.upserts"] == 1
  assert scalar(conn, "SELECT count(*) FROM decisions WHERE transaction_id = 'tx-00003'") == 1
  assert scalar(conn, "SELECT event_date FROM decision_keys WHERE transaction_id = 'tx-00003'") == (
      datetime.date(1970, 1, 1) + datetime.timedelta(days=row["event_time_ms"] // fx.DAY_MS))


def test_bad_records_become_dead_letters_and_the_rest_is_written(conn, dsn):
  decisions = fx.make_decisions(20, batch_rows=10)
  decisions = fx.with_values(decisions, 5, decision="maybe")  # the table's CHECK refuses it
  decisions = fx.with_values(decisions, 12, decided_at_ms=2 ** 62)  # a timestamp out of range
  decisions = fx.with_values(decisions, 17, card_token=None)  # NOT NULL
  counts = fx.run_write(WriteToPostgres(dsn, batch_size=8), decisions, expect_written=17,
                        expect_dead=["transaction_id=tx-00005", "transaction_id=tx-00012", "transaction_id=tx-00017"],
                        expect_dead_letters=[(f"test.wire#{i}", "sink.warm", "rejected_by_store",
                                              f"transaction_id=tx-{i:05d}") for i in (5, 12, 17)])
  assert counts["tier.warm"] == 17 and counts["sink.warm.rejected"] == 3
  assert scalar(conn, "SELECT count(*) FROM decisions") == 17
  assert scalar(conn, "SELECT count(*) FROM decisions WHERE transaction_id IN ('tx-00004', 'tx-00006')") == 2


def test_dead_letters_upsert_on_source_and_stage(conn, dsn):
  letters = [{"source": f"topic/0@{i}", "raw": bytes([0, 1, 2, i]) if i % 2 else None, "stage": "decode",
              "reason": "bad_magic_byte", "error_class": "ValueError",
              "message": f"line one\nline\ttwo \\ \x00 {i}", "pipeline_version": "0.1.0"} for i in range(30)]
  sink = WriteDeadLettersToPostgres(dsn, batch_size=8)
  assert fx.run_write(sink, [fx.dead_letter_batch(letters)], expect_written=30,
                      expect_writes=4)["tier.warm_dead_letters"] == 30
  # Repeats within a batch and across runs: every input counts as written, each key is stored once.
  fx.run_write(WriteDeadLettersToPostgres(dsn), [fx.dead_letter_batch(letters[:20]),
                                                 fx.dead_letter_batch(letters[20:] + letters[:5])],
               expect_written=35)
  assert scalar(conn, "SELECT count(*) FROM dead_letters") == 30
  with conn, conn.cursor() as cur:
    cur.execute("SELECT raw, message FROM dead_letters WHERE source = 'topic/0@3'")
    raw, message = cur.fetchone()
  assert bytes(raw) == bytes([0, 1, 2, 3]) and message == "line one\nline\ttwo \\ \ufffd 3"
  assert scalar(conn, "SELECT raw IS NULL FROM dead_letters WHERE source = 'topic/0@4'")
  assert queries.dead_letter_counts(conn) == [{"stage": "decode", "reason": "bad_magic_byte", "rows": 30}]


def test_operational_queries(conn, dsn):
  decisions = fx.make_decisions(50)
  fx.run_write(WriteToPostgres(dsn), decisions, expect_written=50)
  rows = fx.rows(decisions)
  since = fx.T0 + fx.DAY_MS
  mine = sorted((d for d in rows if d["customer_id"] == 1 and d["event_time_ms"] >= since),
                key=lambda d: -d["event_time_ms"])
  got = queries.decisions_for_customer(conn, 1, since)
  assert [r["transaction_id"] for r in got] == [d["transaction_id"] for d in mine]
  bounded = queries.decisions_for_customer(conn, 1, since, until_ms=since + fx.DAY_MS, limit=2)
  assert [r["transaction_id"] for r in bounded] == [d["transaction_id"] for d in mine
                                                    if d["event_time_ms"] < since + fx.DAY_MS][:2]

  reviews = sorted((d for d in rows if d["decision"] == "review"), key=lambda d: (-d["score"], d["event_time_ms"]))
  assert [r["transaction_id"] for r in queries.review_queue(conn, limit=5)] == [
      d["transaction_id"] for d in reviews[:5]]

  expected = {}
  for d in rows:
    day = datetime.date(1970, 1, 1) + datetime.timedelta(days=d["event_time_ms"] // fx.DAY_MS)
    expected[(day, d["decision"])] = expected.get((day, d["decision"]), 0) + 1
  assert {(r["event_date"], r["decision"]): r["rows"] for r in queries.daily_counts(conn)} == expected


def test_record_run(conn, dsn):
  runs.record_run(dsn, {"run_id": "run-1", "started_at": fx.T0, "code_version": "abc123", "model_version": "model-1",
                      "reference_version": "ref-1", "schema_ids": [1, 2]})
  runs.record_run(dsn, {"run_id": "run-1", "finished_at": "2018-04-01T00:05:00+00:00",
                      "summary": {"events_in": 50, "scored": 50}})
  with conn, conn.cursor() as cur:
    cur.execute("SELECT started_at, finished_at, pipeline_version, code_version, model_version, schema_ids, "
                "summary FROM runs")
    rows = cur.fetchall()
  utc = datetime.timezone.utc
  assert rows == [(datetime.datetime(2018, 4, 1, tzinfo=utc), datetime.datetime(2018, 4, 1, 0, 5, tzinfo=utc),
                   "0.1.0", "abc123", "model-1", [1, 2], {"events_in": 50, "scored": 50})]
  with pytest.raises(ValueError):
    runs.record_run(dsn, {"run_id": "run-2", "colour": "blue"})


def test_migrations_are_recorded_once(conn, dsn):
  assert migrations.apply(conn) == []
  assert pg.preflight(dsn) == []
  assert scalar(conn, "SELECT array_agg(version ORDER BY version) FROM schema_migrations") == ["0001", "0002", "0003", "0004"]


def test_preflight_errors_are_one_line(endpoint):
  with pytest.raises(SinkConfigError) as info:
    WriteToPostgres(f"host=127.0.0.1 port={fx.free_port()} user=postgres dbname={DB}").preflight()
  assert "\n" not in str(info.value) and str(info.value).startswith("cannot connect to PostgreSQL at 127.0.0.1:")

  with pytest.raises(SinkConfigError) as info:
    WriteToPostgres(f"postgresql://postgres@{endpoint.host}:{endpoint.port}/txstream_no_such_db").preflight()
  assert "\n" not in str(info.value)
  assert 'database "txstream_no_such_db" does not exist' in str(info.value)
  assert "createdb" in str(info.value) and str(info.value).endswith(" txstream_no_such_db)")

  with pytest.raises(SinkConfigError, match="is invalid"):
    WriteToPostgres("host=127.0.0.1 this is not a dsn")


def test_a_stalled_server_is_cut_and_the_write_completes(conn, endpoint, caplog):
  # The server holds the connection open and passes nothing for 8 s: the writer gives up on the connection
  # after its answer timeout, reconnects once the server answers again, and writes every row once.
  decisions = fx.make_decisions(200, customers=20, days=3, batch_rows=40)
  with TcpProxy(endpoint.host, endpoint.port) as proxy:
    proxy.stall_after_bytes(20_000, stall_s=8.0)
    sink = WriteToPostgres(f"host=127.0.0.1 port={proxy.port} user=postgres dbname={DB}", batch_size=20,
                           retry=fx.FAST_RETRY, answer_timeout_s=2.0)
    started = time.monotonic()
    counts = fx.run_write(sink, decisions, expect_written=200)
  assert time.monotonic() - started < 60
  assert counts["sink.warm.retried"] >= 1 and counts.get("sink.warm.failed", 0) == 0
  assert any("has not answered for 2 s" in r.getMessage() for r in caplog.records)
  assert scalar(conn, "SELECT count(*) FROM decisions") == 200
  assert scalar(conn, "SELECT count(DISTINCT transaction_id) FROM decisions") == 200


def test_outage_mid_write_loses_and_duplicates_nothing(conn, endpoint):
  decisions = fx.make_decisions(300, customers=30, days=4, batch_rows=40)
  with TcpProxy(endpoint.host, endpoint.port) as proxy:
    proxy.interrupt_after_bytes(30_000, outage_s=3.0)
    sink = WriteToPostgres(f"host=127.0.0.1 port={proxy.port} user=postgres dbname={DB}", batch_size=20,
                           retry=fx.FAST_RETRY)
    counts = fx.run_write(sink, decisions, expect_written=300)
    assert proxy.interruptions == 1
  assert counts["tier.warm"] == 300 and counts["sink.warm.retried"] >= 1
  assert counts.get("sink.warm.failed", 0) == 0
  assert scalar(conn, "SELECT count(*) FROM decisions") == 300
  assert scalar(conn, "SELECT count(DISTINCT transaction_id) FROM decisions") == 300
  assert scalar(conn, "SELECT sum(amount_minor) FROM decisions") == sum(d["amount_minor"] for d in fx.rows(decisions))
