"""Shared machinery for the storage sinks: batching, retries, a circuit breaker, metrics.

Every sink DoFn derives from ``BatchingWriteFn``. It buffers elements in
``process``, writes a batch when it reaches ``batch_size`` rows or
``max_batch_bytes`` (estimated) bytes, and writes whatever is left in
``finish_bundle``, so a bundle never commits with rows still in memory.
In streaming, bundles are often small and a batch is then no bigger than
its bundle: that is the price of never acknowledging unwritten rows.

A batch write is retried with exponential backoff and jitter for as long as
the error is retryable (connection refused or dropped, timeouts, server
shutting down) and the deadline (default 120 s) has not passed. Only
idempotent writes may use this: every txstream sink writes an upsert keyed on
its record's id (``transaction_id``; ``(source, stage)`` for dead letters),
so a batch applied twice, or half applied and then retried, leaves the same
state as one clean write.

A circuit breaker per DoFn instance opens after a run of consecutive
failures; while open, the writer *waits* for the cool-down instead of calling
the server, then lets one attempt through (half-open). Nothing is dropped: a
batch either lands, becomes dead letters for records the store rejects on
their content (found by splitting the batch), or fails the bundle so the
runner retries it.

Metrics, namespace ``txstream`` (``<name>`` is the tier name, e.g. ``hot``):
  ``tier.<name>``              counter, rows written (the run summary reads these)
  ``sink.<name>.retried``      counter, retried attempts
  ``sink.<name>.failed``       counter, batches given up on (the bundle fails)
  ``sink.<name>.rejected``     counter, records the store rejected (dead letters)
  ``sink.<name>.write_ms``     distribution, wall time per batch including retries
  ``sink.<name>.batch_size``   distribution, rows per batch
"""
import logging
import random
import time
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

import txstream
from txstream.records import DeadLetter, Decision

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"
DEAD_LETTERS = "dead_letters"
WRITTEN = "written"
T = TypeVar("T")


class SinkConfigError(ValueError):
  """A sink misconfiguration (bad URL, unreachable server, missing database); one line."""


class SinkResult(NamedTuple):
  """What every sink returns.

  ``written``: one int per written batch, the rows it wrote (their sum is the
  rows written), in the global window. ``dead_letters``: records the store
  rejected on their content, one ``DeadLetter`` each.
  """
  written: beam.PCollection
  dead_letters: beam.PCollection


class RetryPolicy(NamedTuple):
  """Exponential backoff: ``initial_s`` doubling (``multiplier``) up to ``max_s``,
  each pause shortened by up to ``jitter`` of itself, until ``deadline_s`` has passed."""
  initial_s: float = 0.1
  max_s: float = 5.0
  multiplier: float = 2.0
  jitter: float = 0.5
  deadline_s: float = 120.0
  breaker_failures: int = 5
  breaker_cool_down_s: float = 2.0


class CircuitBreaker:
  """Closed -> open after ``failure_threshold`` consecutive failures -> half-open
  after ``cool_down_s`` -> closed on one success (or open again on a failure).

  ``wait_until_allowed`` blocks while the breaker is open: callers wait, they
  never drop work.
  """

  CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

  def __init__(self, failure_threshold: int = 5, cool_down_s: float = 2.0,
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
    if failure_threshold < 1 or cool_down_s < 0:
      raise ValueError("failure_threshold must be >= 1 and cool_down_s >= 0")
    self._threshold = failure_threshold
    self._cool_down_s = cool_down_s
    self._clock = clock
    self._sleep = sleep
    self._failures = 0
    self._opened_at: Optional[float] = None

  @property
  def state(self) -> str:
    if self._opened_at is None:
      return self.CLOSED
    if self._clock() - self._opened_at < self._cool_down_s:
      return self.OPEN
    return self.HALF_OPEN

  def wait_until_allowed(self, deadline: Optional[float] = None) -> None:
    """Sleeps out the rest of the cool-down if open (but not past ``deadline``)."""
    if self._opened_at is None:
      return
    until = self._opened_at + self._cool_down_s
    if deadline is not None:
      until = min(until, deadline)
    pause = until - self._clock()
    if pause > 0:
      self._sleep(pause)

  def record_success(self) -> None:
    self._failures = 0
    self._opened_at = None

  def record_failure(self) -> None:
    self._failures += 1
    if self._opened_at is not None or self._failures >= self._threshold:
      # A failed half-open trial re-opens for a full cool-down.
      self._opened_at = self._clock()


def retry_with_backoff(fn: Callable[[], T], is_retryable: Callable[[BaseException], bool],
                       policy: RetryPolicy = RetryPolicy(), breaker: Optional[CircuitBreaker] = None,
                       on_retry: Optional[Callable[[int, BaseException, float], None]] = None,
                       clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                       rand: Callable[[], float] = random.random) -> T:
  """Calls ``fn`` until it returns, retrying errors ``is_retryable`` accepts.

  A non-retryable error propagates at once. A retryable one is retried after
  an exponentially growing, jittered pause, or after the breaker's cool-down
  when the breaker is open, until ``policy.deadline_s`` has passed since the
  first call; then the last error propagates. ``on_retry(attempt, error,
  pause_s)`` is called before each pause. ``fn`` must be idempotent.
  """
  deadline = clock() + policy.deadline_s
  delay = policy.initial_s
  attempt = 0
  while True:
    if breaker is not None:
      breaker.wait_until_allowed(deadline)
    try:
      result = fn()
    except Exception as error:  # pylint: disable=broad-except
      if not is_retryable(error):
        raise
      if breaker is not None:
        breaker.record_failure()
      now = clock()
      if now >= deadline:
        raise
      attempt += 1
      if breaker is not None and breaker.state == CircuitBreaker.OPEN:
        pause = 0.0  # the breaker's cool-down is the pause
      else:
        pause = min(delay, policy.max_s) * (1.0 - policy.jitter * rand())
        pause = min(pause, deadline - now)
        delay *= policy.multiplier
      if on_retry is not None:
        on_retry(attempt, error, pause)
      if pause > 0:
        sleep(pause)
      continue
    if breaker is not None:
      breaker.record_success()
    return result


class BatchBuffer:
  """Rows waiting to be written, with their estimated size in bytes."""

  def __init__(self, max_rows: int, max_bytes: int):
    if max_rows < 1 or max_bytes < 1:
      raise ValueError("batch limits must be positive")
    self.max_rows = max_rows
    self.max_bytes = max_bytes
    self.rows: List = []
    self.nbytes = 0

  def add(self, row, nbytes: int) -> bool:
    """Adds a row; True when the buffer should be flushed now."""
    self.rows.append(row)
    self.nbytes += nbytes
    return len(self.rows) >= self.max_rows or self.nbytes >= self.max_bytes

  def drain(self) -> List:
    rows, self.rows, self.nbytes = self.rows, [], 0
    return rows

  def __len__(self) -> int:
    return len(self.rows)


def check_batch_limits(batch_size: int, max_batch_bytes: int) -> None:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise SinkConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
  if not isinstance(max_batch_bytes, int) or max_batch_bytes < 1:
    raise SinkConfigError(f"max_batch_bytes must be a positive integer, got {max_batch_bytes!r}")


def decision_bytes(d: Decision) -> int:
  """A cheap size estimate of a decision as most stores encode it."""
  t = d.transaction
  return 160 + len(t.transaction_id) + len(t.card_token) + len(t.source) + 8 * len(d.features)


def one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return text or type(error).__name__


class BatchingWriteFn(beam.DoFn):
  """Base DoFn of every sink: buffer, flush by rows/bytes/bundle, retry, count.

  Subclasses implement ``open_client()`` (called in ``setup`` and again after
  ``close_client()``), ``close_client()``, ``write_batch(rows)`` (returns
  ``[(DeadLetter, row)]`` for rows the store refused, usually none), ``is_retryable`` and
  optionally ``is_rejected(error)`` (an error caused by a record's content:
  the batch is split until the offending records are isolated as dead
  letters) and ``row_bytes``. ``write_batch`` must be idempotent.

  Main output: rows written per batch (int). Tagged ``dead_letters``: DeadLetter.
  """

  STAGE = "sink"

  def __init__(self, name: str, batch_size: int, max_batch_bytes: int, retry: RetryPolicy):
    self._name = name
    self._batch_size = batch_size
    self._max_batch_bytes = max_batch_bytes
    self._retry = retry
    self._rows = Metrics.counter(NAMESPACE, f"tier.{name}")
    self._retried = Metrics.counter(NAMESPACE, f"sink.{name}.retried")
    self._failed = Metrics.counter(NAMESPACE, f"sink.{name}.failed")
    self._rejected = Metrics.counter(NAMESPACE, f"sink.{name}.rejected")
    self._write_ms = Metrics.distribution(NAMESPACE, f"sink.{name}.write_ms")
    self._batch_sizes = Metrics.distribution(NAMESPACE, f"sink.{name}.batch_size")
    self._buffer: Optional[BatchBuffer] = None
    self._breaker: Optional[CircuitBreaker] = None
    self._client_open = False

  # -- subclass hooks ------------------------------------------------------
  def open_client(self) -> None:
    raise NotImplementedError

  def close_client(self) -> None:
    raise NotImplementedError

  def write_batch(self, rows: List) -> Sequence[Tuple[DeadLetter, object]]:
    raise NotImplementedError

  def is_retryable(self, error: BaseException) -> bool:
    raise NotImplementedError

  def is_rejected(self, error: BaseException) -> bool:
    return False

  def row_bytes(self, row) -> int:
    return decision_bytes(row)

  def dead_letter_for(self, row, error: BaseException, reason: str = "rejected_by_store") -> DeadLetter:
    """A dead letter for a row this sink could not store. Decisions keep their source position."""
    if isinstance(row, Decision):
      source = row.transaction.source
      message = f"transaction_id={row.transaction.transaction_id}: {one_line(error)}"
    else:
      source, message = getattr(row, "source", ""), one_line(error)
    return DeadLetter(source=source, raw=None, stage=f"{self.STAGE}.{self._name}", reason=reason,
                      error_class=type(error).__name__, message=message[:500],
                      pipeline_version=txstream.__version__)

  # -- DoFn lifecycle ------------------------------------------------------
  def setup(self):
    self._buffer = BatchBuffer(self._batch_size, self._max_batch_bytes)
    self._breaker = CircuitBreaker(self._retry.breaker_failures, self._retry.breaker_cool_down_s)
    # A worker that starts during an outage waits for the server like a write would.
    self._call(lambda: None)

  def start_bundle(self):
    self._buffer.drain()

  def process(self, row):
    if self._buffer.add(row, self.row_bytes(row)):
      yield from self._flush()

  def finish_bundle(self):
    yield from self._flush()

  def teardown(self):
    if self._client_open:
      self._client_open = False
      try:
        self.close_client()
      except Exception as error:  # pylint: disable=broad-except
        # Closing a dead connection can fail; the rows are already written.
        _LOGGER.debug("closing %s client: %s", self._name, error)

  # -- internals -----------------------------------------------------------
  def _call(self, fn):
    def attempt():
      if not self._client_open:
        self.open_client()
        self._client_open = True
      try:
        return fn()
      except Exception as error:  # pylint: disable=broad-except
        if self.is_retryable(error):
          self._reset_client()
        raise

    def on_retry(n, error, pause):
      self._retried.inc()
      _LOGGER.warning("%s sink: attempt %d failed (%s); retrying in %.2fs", self._name, n, one_line(error), pause)

    return retry_with_backoff(attempt, self.is_retryable, self._retry, self._breaker, on_retry)

  def _reset_client(self):
    self._client_open = False
    try:
      self.close_client()
    except Exception as error:  # pylint: disable=broad-except
      _LOGGER.debug("closing %s client after an error: %s", self._name, error)

  def _flush(self) -> Iterable:
    rows = self._buffer.drain()
    if not rows:
      return
    start = time.monotonic()
    dead = self._write_isolating(rows)
    self._write_ms.update(int((time.monotonic() - start) * 1000))
    self._batch_sizes.update(len(rows))
    written = len(rows) - len(dead)
    self._rows.inc(written)
    if dead:
      self._rejected.inc(len(dead))
    yield WindowedValue(written, _max_timestamp(rows), (GlobalWindow(),))
    for letter, row in dead:
      yield beam.pvalue.TaggedOutput(DEAD_LETTERS, WindowedValue(letter, _timestamp_of(row), (GlobalWindow(),)))

  def _write_isolating(self, rows: List) -> List:
    """Writes rows; returns [(dead letter, row)] for rows the store rejected."""
    try:
      refused = self._call(lambda: self.write_batch(rows))
    except Exception as error:  # pylint: disable=broad-except
      if not self.is_rejected(error):
        self._failed.inc()
        raise
      if len(rows) == 1:
        return [(self.dead_letter_for(rows[0], error), rows[0])]
      half = len(rows) // 2
      return self._write_isolating(rows[:half]) + self._write_isolating(rows[half:])
    return list(refused)


def _timestamp_of(row) -> Timestamp:
  if isinstance(row, Decision):
    return Timestamp(micros=row.transaction.event_time_ms * 1000)
  return Timestamp(0)


def _max_timestamp(rows: Sequence) -> Timestamp:
  first = rows[0]
  if isinstance(first, Decision):
    return Timestamp(micros=max(r.transaction.event_time_ms for r in rows) * 1000)
  return Timestamp(0)


def write_with(rows: beam.PCollection, label: str, fn: BatchingWriteFn) -> SinkResult:
  """Applies a sink DoFn under ``label`` and splits its outputs into a ``SinkResult``."""
  out = rows | label >> (beam.ParDo(fn).with_output_types(int, **{DEAD_LETTERS: DeadLetter})
                         .with_outputs(DEAD_LETTERS, main=WRITTEN))
  return SinkResult(out[WRITTEN], out[DEAD_LETTERS])
