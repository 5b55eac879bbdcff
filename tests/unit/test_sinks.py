"""The sink machinery without servers: backoff, deadline, circuit breaker, batching."""
import apache_beam as beam
import pytest

from txstream.io.clickhouse_sink import WriteToClickHouse
from txstream.io.postgres_sink import WriteDeadLettersToPostgres, WriteToPostgres
from txstream.io.redis_sink import WriteToRedis
from txstream.io.sinks import BatchBuffer, CircuitBreaker, RetryPolicy, SinkConfigError, retry_with_backoff
from txstream.records import DeadLetter, Decision


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


def test_buffer_flushes_by_rows_and_by_bytes():
  buf = BatchBuffer(max_rows=3, max_bytes=100)
  assert not buf.add("a", 10) and not buf.add("b", 10)
  assert buf.add("c", 10)
  assert buf.drain() == ["a", "b", "c"] and len(buf) == 0 and buf.nbytes == 0
  assert buf.add("big", 150)
  assert buf.drain() == ["big"]


def test_sinks_return_typed_results_without_connecting():
  # Constructing and expanding a sink never touches its server (the ports here are closed).
  p = beam.Pipeline()
  decisions = p | beam.Create([]).with_output_types(Decision)
  for label, sink in [("hot", WriteToRedis("redis://127.0.0.1:1/0")),
                      ("warm", WriteToPostgres("host=127.0.0.1 port=1 dbname=x")),
                      ("analytics", WriteToClickHouse("clickhouse://127.0.0.1:1/x"))]:
    result = decisions | label >> sink
    assert (result.written.element_type, result.dead_letters.element_type) == (int, DeadLetter)
  letters = p | "Letters" >> beam.Create([]).with_output_types(DeadLetter)
  assert (letters | WriteDeadLettersToPostgres("dbname=x")).dead_letters.element_type == DeadLetter


@pytest.mark.parametrize("make", [lambda: WriteToRedis("redis://127.0.0.1:6379/0", batch_size=0),
                                  lambda: WriteToPostgres("dbname=x", max_batch_bytes=-1),
                                  lambda: WriteToClickHouse("clickhouse://h:9000/db", batch_size="10")])
def test_bad_batch_limits_fail_at_construction(make):
  with pytest.raises(SinkConfigError):
    make()
