"""Shared machinery for the storage sinks: batching, retries, a circuit breaker, metrics.

Every sink DoFn derives from ``BatchingWriteFn``. Its elements are batches
(``DecisionBatch``, or ``DeadLetterBatch`` for the dead-letter writer): it
buffers their Arrow tables in ``process``, writes as soon as the buffered rows
reach ``batch_size`` rows or ``max_batch_bytes`` bytes (Arrow's own size of
the rows; an element bigger than that is cut into several writes), and writes
whatever is left in ``finish_bundle``, so a bundle never commits with rows
still in memory. In streaming, bundles are often small and a write is then no
bigger than its bundle: that is the price of never acknowledging unwritten rows.

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
their content (found by splitting the batch in halves, or refused up front by
the sink), or fails the bundle so the runner retries it. Dead letters leave as
one ``DeadLetterBatch`` per write: stage ``sink.<name>``, reason
``rejected_by_store`` (or the sink's own, e.g. ``transaction_id_conflict``),
the row's ``source``, and for decisions a message ``transaction_id=<id>: <error>``.

Metrics, namespace ``txstream`` (``<name>`` is the tier name, e.g. ``hot``):
  ``tier.<name>``              counter, rows written (the run summary reads these)
  ``sink.<name>.retried``      counter, retried attempts
  ``sink.<name>.failed``       counter, batches given up on (the bundle fails)
  ``sink.<name>.rejected``     counter, records the store rejected (dead letters)
  ``sink.<name>.write_ms``     distribution, wall time per batch including retries, and
                               ``sink.<name>.write_ms.le_<bound>`` counters: its histogram (``metrics.bucket_counter``)
  ``sink.<name>.circuit_opened`` counter, times the circuit breaker opened
  ``sink.<name>.batch_size``   distribution, rows per batch write
"""
import concurrent.futures
import functools
import logging
import random
import re
import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

import apache_beam as beam
import pyarrow as pa
import pyarrow.compute as pc
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import Timestamp
from apache_beam.utils.windowed_value import WindowedValue

from txstream import metrics as metrics_lib
from txstream.core import contracts
from txstream.core.batch import Batch, DeadLetterBatch

_LOGGER = logging.getLogger(__name__)
NAMESPACE = contracts.NAMESPACE
DEAD_LETTERS = "dead_letters"
WRITTEN = "written"
REJECTED = "rejected_by_store"
T = TypeVar("T")

# Positions in contracts.DECISION of the feature block.
FEATURE_START = contracts.DECISION.names.index(contracts.FEATURE_COLUMNS[0])
FEATURE_POSITIONS = tuple(range(FEATURE_START, FEATURE_START + len(contracts.FEATURE_COLUMNS)))


def column_position(name: str, schema: pa.Schema = contracts.DECISION) -> int:
  """The position of the column called ``name``."""
  return schema.names.index(name)


class SinkConfigError(ValueError):
  """A sink misconfiguration (bad URL, unreachable server, missing database); one line."""


class SinkResult(NamedTuple):
  """What every sink returns.

  ``written``: one int per batch write, the rows it wrote (their sum is the
  rows written), in the global window. ``dead_letters``: ``DeadLetterBatch``es
  of the rows the store rejected on their content, one batch per write that had any.
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
               clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
               on_change: Optional[Callable[[bool], None]] = None):
    if failure_threshold < 1 or cool_down_s < 0:
      raise ValueError("failure_threshold must be >= 1 and cool_down_s >= 0")
    self._threshold = failure_threshold
    self._cool_down_s = cool_down_s
    self._clock = clock
    self._sleep = sleep
    self._failures = 0
    self._opened_at: Optional[float] = None
    self._on_change = on_change  # called with True when the breaker opens, False when it closes again

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
    was_open = self._opened_at is not None
    self._failures = 0
    self._opened_at = None
    if was_open and self._on_change is not None:
      self._on_change(False)

  def record_failure(self) -> None:
    self._failures += 1
    if self._opened_at is not None or self._failures >= self._threshold:
      # A failed half-open trial re-opens for a full cool-down.
      opening = self._opened_at is None
      self._opened_at = self._clock()
      if opening and self._on_change is not None:
        self._on_change(True)


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
  """Tables waiting to be written, with their rows and Arrow size in bytes."""

  def __init__(self, max_rows: int, max_bytes: int):
    if max_rows < 1 or max_bytes < 1:
      raise ValueError("batch limits must be positive")
    self.max_rows = max_rows
    self.max_bytes = max_bytes
    self.tables: List[pa.Table] = []
    self.rows = 0
    self.nbytes = 0

  def add(self, table: pa.Table) -> bool:
    """Adds a table; True when a write is due."""
    self.tables.append(table)
    self.rows += table.num_rows
    self.nbytes += table.nbytes
    return self.rows >= self.max_rows or self.nbytes >= self.max_bytes

  def take(self, final: bool) -> List[pa.Table]:
    """The buffered rows as writes of at most ``max_rows`` rows and about ``max_bytes``.

    Unless ``final``, rows short of a full write stay buffered for the next
    element: fewer, fuller writes (ClickHouse makes a part per insert).
    """
    if not self.rows:
      return []
    table = pa.concat_tables(self.tables) if len(self.tables) > 1 else self.tables[0]
    per_write = max(1, min(self.max_rows, int(self.max_bytes * self.rows / max(self.nbytes, 1))))
    writes = [table.slice(start, per_write) for start in range(0, self.rows, per_write)]
    self.tables, self.rows, self.nbytes = [], 0, 0
    if not final and writes[-1].num_rows < per_write:
      self.add(writes.pop())
    return writes

  def clear(self) -> None:
    self.tables, self.rows, self.nbytes = [], 0, 0

  def __len__(self) -> int:
    return self.rows


class Refusal(NamedTuple):
  """Rows of a write the store refused on their content: the rows, one error per row, the reason."""
  rows: pa.Table
  errors: Sequence[BaseException]
  reason: str = REJECTED


def refuse_nulls(table: pa.Table, positions: Sequence[int]) -> Tuple[pa.Table, List[Refusal]]:
  """Splits off rows with a null in a column (by position) the store cannot hold null.

  Returns the rows to write and, if any were split off, one ``Refusal`` with
  a ``ValueError("null <column>")`` per row (the first such column).
  """
  nullable = [i for i in positions if table.column(i).null_count]
  if not nullable:
    return table, []
  null = functools.reduce(pc.or_, [pc.is_null(table.column(i)) for i in nullable])
  refused = table.filter(null)
  names = [table.schema.names[i] for i in nullable]
  flags = [refused.column(i).is_null().to_pylist() for i in nullable]
  errors = [ValueError(f"null {next(n for n, f in zip(names, row) if f)}") for row in zip(*flags)]
  return table.filter(pc.invert(null)), [Refusal(refused, errors)]


def check_batch_limits(batch_size: int, max_batch_bytes: int) -> None:
  if not isinstance(batch_size, int) or batch_size < 1:
    raise SinkConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
  if not isinstance(max_batch_bytes, int) or max_batch_bytes < 1:
    raise SinkConfigError(f"max_batch_bytes must be a positive integer, got {max_batch_bytes!r}")


_URL_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")
_KEY_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)


def redact(target: str) -> str:
  """A URL or DSN as it may appear in a message: any password replaced by ``***``."""
  return _KEY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", target))


def one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return text or type(error).__name__


class BatchingWriteFn(beam.DoFn):
  """Base DoFn of every sink: buffer batches, write by rows/bytes/bundle, retry, count.

  Subclasses implement ``open_client()`` (called in ``setup`` and again after
  ``close_client()``), ``close_client()``, ``write_batch(table)`` (one Arrow
  table of the element's schema; returns a ``Refusal`` per group of rows the
  store refused, usually none), ``is_retryable`` and optionally
  ``is_rejected(error)`` (an error caused by a record's content: the table is
  split in halves until the offending records are isolated as dead letters).
  ``write_batch`` must be idempotent.

  Elements: ``Batch``es. Main output: rows written per write (int). Tagged
  ``dead_letters``: ``DeadLetterBatch``.

  Writes run on one background thread per DoFn instance, one at a time, so
  a sink waiting for its server overlaps with the stage's other work and
  with the other sinks; a write is collected (counted, its outputs emitted)
  before the next starts and all are collected before the bundle finishes,
  so nothing is acknowledged unwritten. Errors surface in the bundle.
  """

  STAGE = contracts.SINK

  def __init__(self, name: str, batch_size: int, max_batch_bytes: int, retry: RetryPolicy):
    self._name = name
    self._batch_size = batch_size
    self._max_batch_bytes = max_batch_bytes
    self._retry = retry
    self._rows = Metrics.counter(NAMESPACE, f"tier.{name}")
    self._failed = Metrics.counter(NAMESPACE, f"sink.{name}.failed")
    self._rejected = Metrics.counter(NAMESPACE, f"sink.{name}.rejected")
    self._write_ms = Metrics.distribution(NAMESPACE, f"sink.{name}.write_ms")
    self._batch_sizes = Metrics.distribution(NAMESPACE, f"sink.{name}.batch_size")
    self._buffer: Optional[BatchBuffer] = None
    self._breaker: Optional[CircuitBreaker] = None
    self._client_open = False
    self._writer: Optional[concurrent.futures.ThreadPoolExecutor] = None
    self._in_flight = None  # (future, table, started) of the write on the background thread
    # Counted on the writer thread, reported on the bundle's: Beam's metrics belong to the bundle's thread.
    self._counts: Dict[str, int] = {}

  # -- subclass hooks ------------------------------------------------------
  def open_client(self) -> None:
    raise NotImplementedError

  def close_client(self) -> None:
    raise NotImplementedError

  def write_batch(self, table: pa.Table) -> Sequence[Refusal]:
    raise NotImplementedError

  def is_retryable(self, error: BaseException) -> bool:
    raise NotImplementedError

  def is_rejected(self, error: BaseException) -> bool:
    return False

  def count(self, name: str, n: int = 1) -> None:
    """Adds to counter ``sink.<name>.<name>`` from a write (reported when the write is collected)."""
    self._counts[name] = self._counts.get(name, 0) + n

  # -- DoFn lifecycle ------------------------------------------------------
  def setup(self):
    self._buffer = BatchBuffer(self._batch_size, self._max_batch_bytes)
    self._breaker = CircuitBreaker(self._retry.breaker_failures, self._retry.breaker_cool_down_s,
                                   on_change=self._breaker_changed)
    self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sink-{self._name}")
    # A worker that starts during an outage waits for the server like a write would.
    self._call(lambda: None)
    self._report_counts()

  def start_bundle(self):
    self._buffer.clear()
    self._in_flight = None

  def process(self, batch: Batch):
    table = batch.table
    if table.num_rows and self._buffer.add(table):
      yield from self._flush(final=False)

  def finish_bundle(self):
    yield from self._flush(final=True)
    yield from self._collect()

  def teardown(self):
    if self._writer is not None:
      self._writer.shutdown(wait=True)
    if self._client_open:
      self._client_open = False
      try:
        self.close_client()
      except Exception as error:  # pylint: disable=broad-except
        # Closing a dead connection can fail; the rows are already written.
        _LOGGER.debug("closing %s client: %s", self._name, error)

  # -- internals -----------------------------------------------------------
  def _breaker_changed(self, is_open: bool) -> None:
    if is_open:
      self.count("circuit_opened")
      _LOGGER.warning("%s sink: circuit open after %d consecutive failures; writes wait %.1fs before the next try",
                      self._name, self._retry.breaker_failures, self._retry.breaker_cool_down_s)
    live = metrics_lib.current_live()
    if live is not None:
      live.sink_circuit(self._name, is_open)

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
      self.count("retried")
      live = metrics_lib.current_live()
      if live is not None:
        live.sink_retried(self._name)
      _LOGGER.warning("%s sink: attempt %d failed (%s); retrying in %.2fs", self._name, n, one_line(error), pause)

    return retry_with_backoff(attempt, self.is_retryable, self._retry, self._breaker, on_retry)

  def _reset_client(self):
    self._client_open = False
    try:
      self.close_client()
    except Exception as error:  # pylint: disable=broad-except
      _LOGGER.debug("closing %s client after an error: %s", self._name, error)

  def _flush(self, final: bool) -> Iterable:
    for table in self._buffer.take(final):
      yield from self._collect()
      self._in_flight = (self._writer.submit(self._write_isolating, table), table, time.monotonic())

  def _report_counts(self) -> None:
    counts, self._counts = self._counts, {}
    for name, n in counts.items():
      Metrics.counter(NAMESPACE, f"sink.{self._name}.{name}").inc(n)

  def _collect(self) -> Iterable:
    """Waits for the write in flight; counts it and yields its outputs."""
    if self._in_flight is None:
      return
    future, table, start = self._in_flight
    self._in_flight = None
    try:
      refusals = future.result()
    except Exception:
      self._failed.inc()
      raise
    finally:
      self._report_counts()
    yield from self._written(table, refusals, start)

  def _written(self, table: pa.Table, refusals: List[Refusal], start: float) -> Iterable:
    seconds = time.monotonic() - start
    self._write_ms.update(int(seconds * 1000))
    Metrics.counter(NAMESPACE, metrics_lib.bucket_counter(f"sink.{self._name}.write_ms", seconds * 1000)).inc()
    self._batch_sizes.update(table.num_rows)
    refused = sum(r.rows.num_rows for r in refusals)
    self._rows.inc(table.num_rows - refused)
    live = metrics_lib.current_live()
    if live is not None:
      live.sink_written(self._name, seconds, table.num_rows - refused)
    yield WindowedValue(table.num_rows - refused, _max_timestamp(table), (GlobalWindow(),))
    if refused:
      self._rejected.inc(refused)
      letters = pa.concat_tables([self._dead_letters(r) for r in refusals])
      rows = pa.concat_tables([r.rows for r in refusals])
      yield beam.pvalue.TaggedOutput(
          DEAD_LETTERS, WindowedValue(DeadLetterBatch(letters), _max_timestamp(rows), (GlobalWindow(),)))

  def _write_isolating(self, table: pa.Table) -> List[Refusal]:
    """Writes a table; returns the rows the store refused, with why."""
    try:
      return list(self._call(lambda: self.write_batch(table)))
    except Exception as error:  # pylint: disable=broad-except
      if not self.is_rejected(error):
        raise
      if table.num_rows == 1:
        return [Refusal(table, [error])]
      half = table.num_rows // 2
      return self._write_isolating(table.slice(0, half)) + self._write_isolating(table.slice(half))

  def _dead_letters(self, refusal: Refusal) -> pa.Table:
    """``contracts.DEAD_LETTER`` rows for refused rows; a decision's message names its transaction."""
    rows, n = refusal.rows, refusal.rows.num_rows
    texts = [one_line(e) for e in refusal.errors]
    if "transaction_id" in rows.schema.names:
      ids = rows.column("transaction_id").to_pylist()
      texts = [f"transaction_id={i}: {text}" for i, text in zip(ids, texts)]
    return pa.Table.from_arrays([
        rows.column("source"),
        pa.nulls(n, pa.binary()),
        pa.array([f"{self.STAGE}.{self._name}"] * n, pa.string()),
        pa.array([refusal.reason] * n, pa.string()),
        pa.array([type(e).__name__ for e in refusal.errors], pa.string()),
        pa.array([text[:500] for text in texts], pa.string()),
        pa.array([contracts.PIPELINE_VERSION] * n, pa.string()),
    ], schema=contracts.DEAD_LETTER)


def _max_timestamp(table: pa.Table) -> Timestamp:
  """The latest event time of the rows (decisions), else the epoch (dead letters have none)."""
  if "event_time_ms" in table.schema.names:
    latest = pc.max(table.column("event_time_ms")).as_py()
    if latest is not None:
      return Timestamp(micros=latest * 1000)
  return Timestamp(0)


def write_with(rows: beam.PCollection, label: str, fn: BatchingWriteFn) -> SinkResult:
  """Applies a sink DoFn under ``label`` and splits its outputs into a ``SinkResult``."""
  out = rows | label >> (beam.ParDo(fn).with_output_types(int, **{DEAD_LETTERS: DeadLetterBatch})
                         .with_outputs(DEAD_LETTERS, main=WRITTEN))
  return SinkResult(out[WRITTEN], out[DEAD_LETTERS])
