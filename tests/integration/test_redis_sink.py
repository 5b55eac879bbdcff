"""WriteToRedis against the real Redis (``services.require("redis")``), database 15, flushed per test."""
import pytest
import redis

from tests.integration import sink_fixtures as fx
from tests.tcp_proxy import TcpProxy
from txstream.io import redis_sink
from txstream.io.redis_sink import WriteToRedis, recent_key, txn_key
from txstream.io.sinks import SinkConfigError

DB = 15  # this module's own database: the only one it flushes


@pytest.fixture(scope="module")
def endpoint(services):
  return services.require("redis")


@pytest.fixture
def url(endpoint):
  return f"redis://{endpoint.host}:{endpoint.port}/{DB}"


@pytest.fixture
def server(endpoint):
  client = redis.Redis(host=endpoint.host, port=endpoint.port, db=DB, decode_responses=True)
  client.flushdb()
  yield client
  client.flushdb()
  client.close()


def state(server) -> dict:
  """Every key with its value (string or sorted set with scores) and whether it has a TTL."""
  out = {}
  for key in server.keys("*"):
    value = server.get(key) if server.type(key) == "string" else server.zrange(key, 0, -1, withscores=True)
    out[key] = (value, 0 < server.ttl(key) <= 7 * 86400)
  return out


def hot_value(d: dict) -> dict:
  """What ``redis_sink.decision`` should return for a fixture row."""
  return {"transaction_id": d["transaction_id"], **{f: d[f] for f in redis_sink.VALUE_FIELDS}}


def test_writes_values_and_recent_sets(server, url):
  decisions = fx.make_decisions(50)
  # One batch of 50 rows, written as 16 + 16 + 16 + 2.
  counts = fx.run_write(WriteToRedis(url, batch_size=16, recent_per_customer=4), decisions, expect_written=50,
                        expect_writes=4)
  assert counts["tier.hot"] == 50

  rows = fx.rows(decisions)
  assert len(server.keys("txn:*")) == 50
  for d in rows:
    assert redis_sink.decision(server, d["transaction_id"]) == hot_value(d)
  d = rows[7]
  assert redis_sink.decision(server, d["transaction_id"])["reason_codes"] == ["HIGH_AMOUNT"]
  assert redis_sink.decision(server, rows[0]["transaction_id"])["reason_codes"] == []
  assert redis_sink.decision(server, rows[3]["transaction_id"])["rules_version"] is None
  assert redis_sink.decision(server, "nope") is None
  assert 0 < server.ttl(txn_key(d["transaction_id"])) <= 7 * 86400

  # Customer 2's four latest transactions by event time, oldest first.
  mine = sorted((x["event_time_ms"], x["transaction_id"]) for x in rows if x["customer_id"] == 2)
  assert server.zrange(recent_key(2), 0, -1, withscores=True) == [(i, float(ms)) for ms, i in mine[-4:]]
  assert 0 < server.ttl(recent_key(2)) <= 7 * 86400
  by_id = {d["transaction_id"]: d for d in rows}
  assert redis_sink.latest_decisions(server, 2, limit=3) == [hot_value(by_id[i]) for _, i in mine[-1:-4:-1]]


def test_rewrite_is_idempotent(server, url):
  decisions = fx.make_decisions(50, batch_rows=10)
  fx.run_write(WriteToRedis(url, batch_size=7), decisions, expect_written=50)
  before = {k: server.get(k) for k in server.keys("txn:*")}
  recent_before = {c: server.zrange(recent_key(c), 0, -1, withscores=True) for c in range(5)}

  # Again, in the reverse order and other batch boundaries: the same state.
  fx.run_write(WriteToRedis(url, batch_size=50), fx.reversed_rows(decisions, batch_rows=13), expect_written=50)
  assert {k: server.get(k) for k in server.keys("txn:*")} == before
  assert {c: server.zrange(recent_key(c), 0, -1, withscores=True) for c in range(5)} == recent_before
  assert server.dbsize() == 50 + 5


def test_same_batch_twice_leaves_the_same_state(server, url):
  decisions = fx.make_decisions(40, customers=3)
  fx.run_write(WriteToRedis(url, recent_per_customer=5), decisions, expect_written=40)
  once = state(server)
  fx.run_write(WriteToRedis(url, recent_per_customer=5), decisions, expect_written=40)
  assert state(server) == once
  assert len(once) == 40 + 3 and all(has_ttl for _, has_ttl in once.values())


def test_text_with_quotes_backslashes_control_characters_and_unicode_round_trips(server, url):
  odd = 'q"uo\\te\tnew\nline\x00\x1f é 💳 \u2028'
  decisions = fx.with_values(fx.make_decisions(3), 1, card_token=odd, model_version="m\\1",
                             reason_codes=['A"B', "C\\D", "", "\x01"], rules_version=odd)
  fx.run_write(WriteToRedis(url), decisions, expect_written=3)
  for d in fx.rows(decisions):
    assert redis_sink.decision(server, d["transaction_id"]) == hot_value(d)


def test_an_old_layout_hash_is_replaced(server, url):
  decisions = fx.make_decisions(2)
  server.hset(txn_key("tx-00001"), mapping={"decision": "approve"})
  fx.run_write(WriteToRedis(url), decisions, expect_written=2)
  assert redis_sink.decision(server, "tx-00001") == hot_value(fx.rows(decisions)[1])


def test_a_row_with_a_score_json_cannot_hold_is_a_dead_letter(server, url):
  decisions = fx.with_values(fx.make_decisions(6), 2, score=float("nan"))
  decisions = fx.with_values(decisions, 4, score=float("inf"))
  fx.run_write(WriteToRedis(url), decisions, expect_written=4,
               expect_dead=["transaction_id=tx-00002", "transaction_id=tx-00004"])
  assert sorted(server.keys("txn:*")) == [txn_key(f"tx-0000{i}") for i in (0, 1, 3, 5)]


def test_an_error_reply_fails_the_write_after_every_reply_is_read(server, url):
  # A recent-set key of the wrong type: the server refuses the ZADD; the rest of the batch lands and the
  # connection stays in step for the next command.
  server.set(recent_key(1), "not a sorted set")
  client = redis.Redis.from_url(url, single_connection_client=True)
  table = fx.table_of(fx.make_decisions(10))
  with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
    redis_sink.execute(client.connection, redis_sink.commands(table, 60, 5), chunk=4)
  assert client.ping() and len(server.keys("txn:*")) == 10 and server.zcard(recent_key(2)) == 2
  client.close()


def test_a_row_with_a_null_value_field_is_a_dead_letter_and_the_rest_lands(server, url):
  decisions = fx.with_values(fx.make_decisions(20, batch_rows=10), 13, card_token=None)
  counts = fx.run_write(WriteToRedis(url, batch_size=8), decisions, expect_written=19,
                        expect_dead=["transaction_id=tx-00013"],
                        expect_dead_letters=[("test.wire#13", "sink.hot", "rejected_by_store",
                                              "transaction_id=tx-00013")])
  assert counts["sink.hot.rejected"] == 1 and counts["tier.hot"] == 19
  assert len(server.keys("txn:*")) == 19 and not server.exists(txn_key("tx-00013"))
  assert "tx-00013" not in server.zrange(recent_key(13 % 5), 0, -1)


def test_preflight_bad_port_is_one_line():
  sink = WriteToRedis(f"redis://127.0.0.1:{fx.free_port()}/0")
  with pytest.raises(SinkConfigError) as info:
    sink.preflight()
  message = str(info.value)
  assert "\n" not in message and message.startswith("cannot connect to Redis at 127.0.0.1:")


def test_preflight_bad_database_and_ok(endpoint, url):
  with pytest.raises(SinkConfigError, match="DB index is out of range"):
    WriteToRedis(f"redis://{endpoint.host}:{endpoint.port}/9999").preflight()
  WriteToRedis(url).preflight()


@pytest.mark.parametrize("bad_url", ["http://127.0.0.1:6379", "redis://127.0.0.1:notaport/0", "redis://host/abc", ""])
def test_bad_url_fails_at_construction(bad_url):
  with pytest.raises(SinkConfigError):
    WriteToRedis(bad_url)


def test_outage_mid_write_loses_and_duplicates_nothing(server, endpoint):
  decisions = fx.make_decisions(400, customers=40, batch_rows=60)
  with TcpProxy(endpoint.host, endpoint.port) as proxy:
    # The first batches land, then the connection is cut for 3 s in the middle of the write.
    proxy.interrupt_after_bytes(40_000, outage_s=3.0)
    sink = WriteToRedis(f"redis://{proxy.url_host_port}/{DB}", batch_size=25, retry=fx.FAST_RETRY)
    counts = fx.run_write(sink, decisions, expect_written=400)
    assert proxy.interruptions == 1
  assert counts["tier.hot"] == 400
  assert counts["sink.hot.retried"] >= 1
  assert counts.get("sink.hot.failed", 0) == 0
  assert len(server.keys("txn:*")) == 400
  assert sum(server.zcard(recent_key(c)) for c in range(40)) == 400
  assert all(redis_sink.decision(server, d["transaction_id"]) == hot_value(d) for d in fx.rows(decisions))
