"""The sink machinery without servers: backoff, deadline, circuit breaker, batching, isolating rejected rows."""
import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.pvalue import TaggedOutput

from tests.integration import sink_fixtures as fx
from txstream.core import contracts
from txstream.core.batch import DeadLetterBatch, DecisionBatch
from txstream.io.clickhouse_sink import WriteToClickHouse
from txstream.io.postgres_sink import WriteDeadLettersToPostgres, WriteToPostgres
from txstream.io.redis_sink import WriteToRedis
from txstream.io.sinks import (FEATURE_POSITIONS, BatchBuffer, BatchingWriteFn, CircuitBreaker, Refusal, RetryPolicy,
                               SinkConfigError, refuse_nulls, retry_with_backoff)


class FakeTime:
  def __init__(self):
    self.now = 0.0
    self.sleeps = []

  def clock(self):
    return self.now

  def sleep(self, seconds):
    assert seconds >= 0
    self.sleeps.append(seconds)
    self.now += seconds


class Flaky:
  """Fails with ``error`` until the fake clock reaches ``until_s``."""

  def __init__(self, clock, until_s, error=ConnectionError("refused")):
    self.clock, self.until_s, self.error, self.calls = clock, until_s, error, 0

  def __call__(self):
    self.calls += 1
    if self.clock.now < self.until_s:
      raise self.error
    return "ok"


def retry(fn, t, policy=RetryPolicy(), breaker=None, retryable=lambda e: isinstance(e, ConnectionError)):
  return retry_with_backoff(fn, retryable, policy, breaker, clock=t.clock, sleep=t.sleep, rand=lambda: 0.5)


def test_non_retryable_error_propagates_at_once():
  t = FakeTime()
  fn = Flaky(t, until_s=10, error=ValueError("bad row"))
  with pytest.raises(ValueError):
    retry(fn, t)
  assert fn.calls == 1 and t.sleeps == []


def test_backoff_grows_exponentially_with_jitter_and_caps():
  t = FakeTime()
  policy = RetryPolicy(initial_s=0.1, max_s=1.0, multiplier=2.0, jitter=0.5, breaker_failures=100)
  assert retry(Flaky(t, until_s=3.0), t, policy) == "ok"
  # rand() = 0.5 -> each pause is 75 % of its step: 0.1, 0.2, 0.4, 0.8, then capped at 1.0.
  assert t.sleeps[:6] == pytest.approx([0.075, 0.15, 0.3, 0.6, 0.75, 0.75])


def test_a_20_second_outage_is_survived_with_the_default_policy():
  t = FakeTime()
  fn = Flaky(t, until_s=20.0)
  assert retry(fn, t, breaker=CircuitBreaker(5, 2.0, clock=t.clock, sleep=t.sleep)) == "ok"
  assert 20.0 <= t.now < 27.0  # back within a pause or cool-down of the server's return
  assert fn.calls < 30


def test_gives_up_after_the_deadline_with_the_last_error():
  t = FakeTime()
  fn = Flaky(t, until_s=1e9)
  with pytest.raises(ConnectionError):
    retry(fn, t, RetryPolicy(deadline_s=120.0))
  assert 120.0 <= t.now <= 120.0 + 1e-6


def test_breaker_opens_waits_and_half_opens():
  t = FakeTime()
  breaker = CircuitBreaker(failure_threshold=3, cool_down_s=2.0, clock=t.clock, sleep=t.sleep)
  for _ in range(2):
    breaker.record_failure()
  assert breaker.state == "closed"
  breaker.record_failure()
  assert breaker.state == "open"
  t.now += 0.5
  breaker.wait_until_allowed()  # waits out the cool-down rather than refusing
  assert t.now == pytest.approx(2.0) and breaker.state == "half_open"
  breaker.record_failure()  # the trial failed: open again for a full cool-down
  assert breaker.state == "open"
  breaker.wait_until_allowed(deadline=3.0)  # never past the caller's deadline
  assert t.now == pytest.approx(3.0)
  t.now = 10.0
  breaker.record_success()
  assert breaker.state == "closed"


def test_open_breaker_replaces_the_backoff_pause():
  t = FakeTime()
  breaker = CircuitBreaker(failure_threshold=2, cool_down_s=5.0, clock=t.clock, sleep=t.sleep)
  fn = Flaky(t, until_s=4.0)
  assert retry(fn, t, RetryPolicy(initial_s=0.1), breaker) == "ok"
  # One backoff pause, then the breaker opens and the cool-down is the only wait.
  assert t.sleeps == pytest.approx([0.075, 5.0])
  assert fn.calls == 3 and breaker.state == "closed"


def rows_table(n: int, start: int = 0) -> pa.Table:
  return pa.table({"x": list(range(start, start + n)), "pad": ["y" * 10] * n})


def test_buffer_writes_by_rows_and_keeps_the_remainder():
  buf = BatchBuffer(max_rows=4, max_bytes=1 << 20)
  assert not buf.add(rows_table(3))
  assert buf.add(rows_table(6, start=3))
  writes = buf.take(final=False)
  assert [w.column("x").to_pylist() for w in writes] == [[0, 1, 2, 3], [4, 5, 6, 7]]
  assert len(buf) == 1  # short of a full write: waits for the next element
  assert [w.column("x").to_pylist() for w in buf.take(final=True)] == [[8]]
  assert len(buf) == 0 and buf.nbytes == 0 and buf.take(final=True) == []


def test_buffer_writes_by_bytes():
  table = rows_table(100)
  buf = BatchBuffer(max_rows=1000, max_bytes=table.nbytes // 4)
  assert buf.add(table)
  writes = buf.take(final=True)
  assert len(writes) >= 4 and sum(w.num_rows for w in writes) == 100
  assert all(w.nbytes <= table.nbytes // 4 + 1 for w in writes)
  assert [x for w in writes for x in w.column("x").to_pylist()] == list(range(100))


def test_feature_positions_are_the_feature_block_of_the_decision_schema():
  names = contracts.DECISION.names
  assert tuple(names[p] for p in FEATURE_POSITIONS) == contracts.FEATURE_COLUMNS
  assert names.count("home_distance") == 1


def test_refuse_nulls_splits_off_rows_with_a_null_where_the_store_needs_a_value():
  table = fx.table_of(fx.with_values(fx.make_decisions(6), 2, card_token=None))
  table = fx.table_of(fx.with_values([DecisionBatch(table)], 4, score=None))
  kept, refused = refuse_nulls(table, [table.schema.names.index(c) for c in ("card_token", "score")])
  assert kept.column("transaction_id").to_pylist() == ["tx-00000", "tx-00001", "tx-00003", "tx-00005"]
  [refusal] = refused
  assert refusal.rows.column("transaction_id").to_pylist() == ["tx-00002", "tx-00004"]
  assert [str(e) for e in refusal.errors] == ["null card_token", "null score"]
  assert refuse_nulls(kept, [0, 1]) == (kept, [])


class _StoreFn(BatchingWriteFn):
  """A sink over an in-memory dict: upserts on transaction_id, refuses decisions "maybe" (a content error)."""

  def __init__(self, batch_size: int, max_batch_bytes: int = 1 << 30):
    super().__init__("test", batch_size, max_batch_bytes, RetryPolicy())
    self.store, self.writes = {}, []

  def open_client(self):
    pass

  def close_client(self):
    pass

  def is_retryable(self, error):
    return False

  def is_rejected(self, error):
    return isinstance(error, ValueError)

  def write_batch(self, table):
    ids = table.column("transaction_id").to_pylist()
    decisions = table.column("decision").to_pylist()
    if "maybe" in decisions:
      raise ValueError("decision out of range")
    self.writes.append(len(ids))
    self.store.update(zip(ids, decisions))
    return []


def drive(fn: BatchingWriteFn, batches):
  """Runs a sink DoFn over batches as one bundle; returns (written ints, dead-letter batches)."""
  fn.setup()
  fn.start_bundle()
  out = [o for b in batches for o in fn.process(b)] + list(fn.finish_bundle())
  written = [o.value for o in out if not isinstance(o, TaggedOutput)]
  letters = [o.value.value for o in out if isinstance(o, TaggedOutput)]
  return written, letters


def test_a_batch_bigger_than_batch_size_is_several_writes():
  fn = _StoreFn(batch_size=16)
  written, letters = drive(fn, fx.make_decisions(50))
  assert fn.writes == [16, 16, 16, 2] and written == fn.writes and letters == []
  assert sorted(fn.store) == [f"tx-{i:05d}" for i in range(50)]


def test_small_batches_are_gathered_into_full_writes():
  fn = _StoreFn(batch_size=16)
  written, _ = drive(fn, fx.make_decisions(50, batch_rows=5))
  assert written == [16, 16, 16, 2]


def test_a_rejected_row_is_isolated_as_a_dead_letter_and_the_rest_lands():
  fn = _StoreFn(batch_size=16)
  batches = fx.with_values(fx.make_decisions(20, batch_rows=10), 13, decision="maybe")
  written, letters = drive(fn, batches)
  assert sum(written) == 19 and len(fn.store) == 19 and "tx-00013" not in fn.store
  [letter] = letters
  assert isinstance(letter, DeadLetterBatch) and letter.table.schema.equals(contracts.DEAD_LETTER)
  row = letter.table.to_pylist()[0]
  assert row["message"] == "transaction_id=tx-00013: decision out of range"
  assert (row["source"], row["stage"], row["reason"], row["error_class"], row["raw"]) == (
      "test.wire#13", "sink.test", "rejected_by_store", "ValueError", None)
  assert row["pipeline_version"] == contracts.PIPELINE_VERSION


def test_refusals_from_write_batch_become_dead_letters_with_their_reason():
  class RefusingFn(_StoreFn):
    def write_batch(self, table):
      refused = table.slice(0, 1)
      super().write_batch(table.slice(1))
      return [Refusal(refused, [ValueError("taken")], reason="transaction_id_conflict")]

  written, letters = drive(RefusingFn(batch_size=100), fx.make_decisions(9))
  assert written == [8]
  rows = letters[0].table.to_pylist()
  assert [(r["reason"], r["message"], r["source"]) for r in rows] == [
      ("transaction_id_conflict", "transaction_id=tx-00000: taken", "odd\tsource\\0\"q\"")]


def test_dead_letter_batches_flow_through_the_same_machinery():
  letters = DeadLetterBatch(pa.Table.from_pylist(
      [{"source": f"f#{i}", "raw": b"x", "stage": "decode", "reason": "r", "error_class": "E", "message": "m",
        "pipeline_version": "0"} for i in range(5)], schema=contracts.DEAD_LETTER))

  class LetterFn(_StoreFn):
    def write_batch(self, table):
      if "f#3" in table.column("source").to_pylist():
        raise ValueError("bad letter")
      self.writes.append(table.num_rows)
      return []

  fn = LetterFn(batch_size=5)
  written, dead = drive(fn, [letters])
  assert sum(written) == 4
  assert [(r["source"], r["message"]) for r in dead[0].table.to_pylist()] == [("f#3", "bad letter")]


def test_sinks_return_typed_results_without_connecting():
  # Constructing and expanding a sink never touches its server (the ports here are closed).
  p = beam.Pipeline()
  decisions = p | beam.Create([]).with_output_types(DecisionBatch)
  for label, sink in [("hot", WriteToRedis("redis://127.0.0.1:1/0")),
                      ("warm", WriteToPostgres("host=127.0.0.1 port=1 dbname=x")),
                      ("analytics", WriteToClickHouse("clickhouse://127.0.0.1:1/x"))]:
    result = decisions | label >> sink
    assert (result.written.element_type, result.dead_letters.element_type) == (int, DeadLetterBatch)
  letters = p | "Letters" >> beam.Create([]).with_output_types(DeadLetterBatch)
  assert (letters | WriteDeadLettersToPostgres("dbname=x")).dead_letters.element_type == DeadLetterBatch


@pytest.mark.parametrize("make", [lambda: WriteToRedis("redis://127.0.0.1:6379/0", batch_size=0),
                                  lambda: WriteToPostgres("dbname=x", max_batch_bytes=-1),
                                  lambda: WriteToClickHouse("clickhouse://h:9000/db", batch_size="10")])
def test_bad_batch_limits_fail_at_construction(make):
  with pytest.raises(SinkConfigError):
    make()


def test_pg_copy_writes_postgresql_binary_copy_rows():
  import struct
  import numpy as np
  from txstream.io import pg_copy
  ints = pg_copy.fixed([pg_copy.scalar(np.array([7, -1]), pg_copy.INT4), pg_copy.date(np.array([0, 86_400_000]))])
  texts = pg_copy.text(pa.array(["é\x00", None]))
  blobs = pg_copy.text(pa.array([b"\x00\x01", b""]))
  lists = pg_copy.text_array(pa.array([["a", "bc"], None], pa.list_(pa.string())))
  floats = pg_copy.fixed([pg_copy.float8_array(np.array([[1.5, -2.0], [0.0, 3.0]]))])
  got = pg_copy.stream([ints, texts, blobs, lists, floats], 6)

  def field(payload):
    return struct.pack(">i", len(payload)) + payload

  def float_array(values):
    return field(struct.pack(">5i", 1, 0, 701, len(values), 1) + b"".join(field(struct.pack(">d", v)) for v in values))

  text_array = struct.pack(">5i", 1, 0, 25, 2, 1) + field(b"a") + field(b"bc")
  rows = [
      struct.pack(">h", 6) + field(struct.pack(">i", 7)) + field(struct.pack(">i", -10_957))
      + field("é\ufffd".encode()) + field(b"\x00\x01") + field(text_array) + float_array([1.5, -2.0]),
      struct.pack(">h", 6) + field(struct.pack(">i", -1)) + field(struct.pack(">i", -10_956))
      + struct.pack(">i", -1) + field(b"") + field(struct.pack(">3i", 0, 0, 25)) + float_array([0.0, 3.0]),
  ]
  assert got == b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"".join(rows) + b"\xff\xff"
  empty = pg_copy.stream([pg_copy.text(pa.array([], pa.string()))], 1)
  assert empty == b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"\xff\xff"


def test_pg_copy_timestamps_and_nullable_numbers():
  import struct
  import numpy as np
  from txstream.io import pg_copy
  stamps = pg_copy.fixed([pg_copy.timestamptz(np.array([946_684_800_001]))])  # 2000-01-01T00:00:00.001Z
  numbers = pg_copy.nullable(pa.array([None, 2.5]), pg_copy.FLOAT8)
  assert stamps.to_pylist() == [struct.pack(">ii", 8, 0) + struct.pack(">i", 1000)]
  assert numbers.to_pylist() == [b"\xff\xff\xff\xff", struct.pack(">id", 8, 2.5)]


def _leb128(n: int) -> bytes:
  out = b""
  while True:
    n, low = n >> 7, n & 0x7F
    if not n:
      return out + bytes([low])
    out += bytes([low | 0x80])


def test_ch_native_varints_and_block():
  import struct
  import numpy as np
  from txstream.io import ch_native
  values = [0, 1, 127, 128, 300, 16_383, 16_384, 2 ** 21, 2 ** 35, 2 ** 63]
  assert ch_native.varints(np.array(values, dtype=np.uint64)).to_pylist() == [_leb128(v) for v in values]
  assert ch_native.varints(np.array([5, 0], dtype=np.uint64)).to_pylist() == [b"\x05", b"\x00"]

  long = "é" * 100  # 200 bytes: a two-byte length
  got = ch_native.block([
      ("n", "Int64", ch_native.numbers(np.array([1, -2]), "<i8")),
      ("s", "String", ch_native.strings(pa.array(["a", long]))),
      ("o", "Nullable(String)", ch_native.nullable_strings(pa.array([None, "b"]))),
      ("m", "Nullable(Int32)", ch_native.nullable_numbers(pa.array([7, None], pa.int32()), "<i4")),
      ("l", "Array(String)", ch_native.string_arrays(pa.array([["x", "yz"], None], pa.list_(pa.string())))),
      ("e", "Enum8('a' = 1, 'b' = 2)", ch_native.enum8(pa.array(["b", "a"]), ["a", "b"], [1, 2])),
  ], 2)

  def string(text):
    data = text.encode() if isinstance(text, str) else text
    return _leb128(len(data)) + data

  def column(name, type_name, data):
    return string(name) + string(type_name) + data

  assert got == b"".join([
      b"\x06\x02",
      column("n", "Int64", struct.pack("<2q", 1, -2)),
      column("s", "String", string("a") + string(long)),
      column("o", "Nullable(String)", b"\x01\x00" + string("") + string("b")),
      column("m", "Nullable(Int32)", b"\x00\x01" + struct.pack("<2i", 7, 0)),
      column("l", "Array(String)", struct.pack("<2Q", 2, 2) + string("x") + string("yz")),
      column("e", "Enum8('a' = 1, 'b' = 2)", bytes([2, 1])),
  ])


def test_redact_hides_passwords_in_urls_and_dsns():
  from txstream.io.sinks import redact
  assert redact("clickhouse://ann:s3cr%40t@h:9000/db?http_port=1") == "clickhouse://ann:***@h:9000/db?http_port=1"
  assert redact("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
  assert redact("host=h password='a b\\' c' user=u") == "host=h password=*** user=u"
  assert redact("postgresql://u@h/db?sslmode=require&password=pw&x=1") == (
      "postgresql://u@h/db?sslmode=require&password=***&x=1")
  assert redact("host=h dbname=d") == "host=h dbname=d"


@pytest.mark.parametrize("make", [lambda: WriteToRedis("redis://:hunter2@127.0.0.1:notaport/0"),
                                  lambda: WriteToPostgres("host=127.0.0.1 password=hunter2 this is not a dsn"),
                                  lambda: WriteToClickHouse("clickhouse://u:hunter2@127.0.0.1:9000/bad-name")])
def test_configuration_errors_never_show_a_password(make):
  with pytest.raises(SinkConfigError) as info:
    make()
  assert "hunter2" not in str(info.value) and "***" in str(info.value)


def test_breaker_reports_opening_and_closing_once_each():
  t = FakeTime()
  changes = []
  breaker = CircuitBreaker(failure_threshold=2, cool_down_s=1.0, clock=t.clock, sleep=t.sleep,
                           on_change=changes.append)
  breaker.record_failure()
  assert changes == []
  breaker.record_failure()
  breaker.record_failure()  # a failed half-open trial re-opens: not a second opening
  assert changes == [True]
  breaker.record_success()
  breaker.record_success()
  assert changes == [True, False]


class _OutageFn(_StoreFn):
  """Fails its first ``failures`` writes with a retryable error, then writes."""

  def __init__(self, failures: int):
    super().__init__(batch_size=100)
    self._retry = RetryPolicy(deadline_s=30.0, breaker_failures=2, breaker_cool_down_s=0.01)
    self.failures = failures

  def is_retryable(self, error):
    return isinstance(error, ConnectionError)

  def write_batch(self, table):
    if self.failures:
      self.failures -= 1
      raise ConnectionError("server away")
    return super().write_batch(table)


def test_a_live_run_s_metrics_get_sink_writes_retries_and_the_circuit_state():
  from txstream import metrics
  live = metrics.LiveMetrics().install()
  try:
    fn = _OutageFn(failures=3)
    written, _ = drive(fn, fx.make_decisions(30))
    assert written == [30]
  finally:
    live.uninstall()
  assert metrics.current_live() is None
  value = live.registry.get_sample_value
  assert value("txstream_sink_retries_total", {"sink": "test"}) == 3
  assert value("txstream_sink_circuit_opened_total", {"sink": "test"}) == 1
  assert value("txstream_sink_circuit_open", {"sink": "test"}) == 0  # closed again once the write landed
  assert value("txstream_tier_rows_total", {"tier": "test"}) == 30
  assert value("txstream_sink_write_seconds_count", {"sink": "test"}) == 1
