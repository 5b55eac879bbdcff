"""WriteToRedis against the real Redis (``services.require("redis")``), database 15, flushed per test."""
import pytest
import redis

from tests.integration import sink_fixtures as fx
from tests.tcp_proxy import TcpProxy
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
  """Every key with its value (hash or sorted set with scores) and whether it has a TTL."""
  out = {}
  for key in server.keys("*"):
    value = server.hgetall(key) if server.type(key) == "hash" else server.zrange(key, 0, -1, withscores=True)
    out[key] = (value, 0 < server.ttl(key) <= 7 * 86400)
  return out


def test_writes_hashes_and_recent_sets(server, url):
  decisions = fx.make_decisions(50)
  # One batch of 50 rows, written as 16 + 16 + 16 + 2.
  counts = fx.run_write(WriteToRedis(url, batch_size=16, recent_per_customer=4), decisions, expect_written=50,
                        expect_writes=4)
  assert counts["tier.hot"] == 50

  rows = fx.rows(decisions)
  assert len(server.keys("txn:*")) == 50
  d = rows[7]
  assert server.hgetall(txn_key(d["transaction_id"])) == {
      "decision": d["decision"], "score": str(d["score"]), "reason_codes": ",".join(d["reason_codes"]),
      "model_version": "model-1", "event_time_ms": str(d["event_time_ms"]), "customer_id": str(d["customer_id"]),
      "terminal_id": str(d["terminal_id"]), "amount_minor": str(d["amount_minor"]), "currency": d["currency"],
      "card_token": d["card_token"], "decided_at_ms": str(d["decided_at_ms"])}
  assert server.hget(txn_key(rows[0]["transaction_id"]), "reason_codes") == ""
  assert 0 < server.ttl(txn_key(d["transaction_id"])) <= 7 * 86400

  # Customer 2's four latest transactions by event time, oldest first.
  mine = sorted((x["event_time_ms"], x["transaction_id"]) for x in rows if x["customer_id"] == 2)
  assert server.zrange(recent_key(2), 0, -1, withscores=True) == [(i, float(ms)) for ms, i in mine[-4:]]
  assert 0 < server.ttl(recent_key(2)) <= 7 * 86400


def test_rewrite_is_idempotent(server, url):
  decisions = fx.make_decisions(50, batch_rows=10)
  fx.run_write(WriteToRedis(url, batch_size=7), decisions, expect_written=50)
  before = {k: server.hgetall(k) for k in server.keys("txn:*")}
  recent_before = {c: server.zrange(recent_key(c), 0, -1, withscores=True) for c in range(5)}

  # Again, in the reverse order and other batch boundaries: the same state.
  fx.run_write(WriteToRedis(url, batch_size=50), fx.reversed_rows(decisions, batch_rows=13), expect_written=50)
  assert {k: server.hgetall(k) for k in server.keys("txn:*")} == before
  assert {c: server.zrange(recent_key(c), 0, -1, withscores=True) for c in range(5)} == recent_before
  assert server.dbsize() == 50 + 5


def test_same_batch_twice_leaves_the_same_state(server, url):
  decisions = fx.make_decisions(40, customers=3)
  fx.run_write(WriteToRedis(url, recent_per_customer=5), decisions, expect_written=40)
  once = state(server)
  fx.run_write(WriteToRedis(url, recent_per_customer=5), decisions, expect_written=40)
  assert state(server) == once
  assert len(once) == 40 + 3 and all(has_ttl for _, has_ttl in once.values())


def test_a_row_with_a_null_hash_value_is_a_dead_letter_and_the_rest_lands(server, url):
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
  assert all(server.hget(txn_key(d["transaction_id"]), "decided_at_ms") == str(d["decided_at_ms"])
             for d in fx.rows(decisions))
