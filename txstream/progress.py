"""Progress of a bounded run on stderr: events read, decisions, events/s and time left.

Beam's metrics cannot be queried while the in-process runners (DirectRunner,
FnApiRunner) run, so stages also count into a process-local ``Tally``
(``record``) that a ``ProgressReporter`` thread reads. On a runner whose
workers are other processes the tally stays at zero: the reporter says once
that progress is not available there, and the final line, taken from the
run's own summary, is exact on every runner.

On a terminal the reporter redraws one line (``\\r``); otherwise it writes a
plain line every interval, so a log file stays readable. Nothing goes to
stdout, where the run's summary JSON is printed.
"""
import collections
import logging
import sys
import threading
import time
from typing import Callable, Iterable, Mapping, Optional, TextIO

_LOGGER = logging.getLogger(__name__)

EVENTS = "events_in"
DECISIONS = "scored"
PREFIX = "txstream: progress:"


class Tally:
  """Thread-safe counters by name; bumped from worker threads, read by the reporter."""
  def __init__(self):
    self._lock = threading.Lock()
    self._counts = collections.Counter()

  def add(self, name: str, n: int = 1) -> None:
    if n:
      with self._lock:
        self._counts[name] += n

  def snapshot(self) -> Mapping[str, int]:
    with self._lock:
      return dict(self._counts)


# One per process: the in-process runners' workers are threads of it.
TALLY = Tally()


def record(name: str, n: int = 1) -> None:
  """Counts ``n`` under ``name`` in this process's tally (a stage's ``events_in``, ``scored``)."""
  TALLY.add(name, n)


def expected_events(inputs: Iterable[Mapping]) -> Optional[int]:
  """Transactions a run will read, from its manifest's inputs (file record ranges or Kafka offset ranges).

  None when unknown (no inputs listed, as for a rerun reading the raw archive).
  """
  total = None
  for entry in inputs:
    if entry.get("stream") != "transactions":
      continue
    start, stop = entry.get("records") or entry.get("offsets") or (0, 0)
    total = (total or 0) + stop - start
  return total


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def time_left(done: int, total: Optional[int], elapsed: float) -> Optional[float]:
  """Seconds left at the average rate so far; None while unknown (no total, nothing done yet)."""
  if not total or done <= 0 or elapsed <= 0:
    return None
  return max(total - done, 0) * elapsed / done


def line(events: int, decisions: int, elapsed: float, total: Optional[int] = None, final: bool = False) -> str:
  """``events read [of total], decisions [(pct)], events/s, elapsed[, time left | done]``.

  The share done and the time left go by decisions, not by events read: a
  runner may read the whole input in its first stage and decide afterwards
  (the FnApiRunner runs fused stages one after another). Dead letters and
  filtered events are never decided, so a run can end a little short of 100%.
  """
  read = f"{events:,}" + (f" of {total:,}" if total else "")
  decided = f"{decisions:,}" + (f" ({100.0 * min(decisions, total) / total:.0f}%)" if total else "")
  rate = events / elapsed if elapsed > 0 else 0.0
  text = (f"{PREFIX} {read} events read, {decided} decisions, {rate:,.0f} events/s, "
          f"{_duration(elapsed)} elapsed")
  if final:
    return text + ", done"
  left = time_left(decisions, total, elapsed)
  return text + (f", about {_duration(left)} left" if left is not None else "")


class ProgressReporter:
  """Writes a bounded run's progress every ``interval_s`` seconds from a daemon thread.

  ``start()`` before the pipeline runs, ``stop()`` once it has finished (or
  failed), then ``finish(events, decisions)`` with the summary's exact totals
  for the one final line. ``interval_s <= 0`` disables every line. Counts are
  taken relative to the tally at ``start()``: the tally is per process and
  outlives a run.
  """
  def __init__(self, interval_s: float, total: Optional[int] = None, stream: Optional[TextIO] = None,
               tally: Tally = TALLY, clock: Callable[[], float] = time.monotonic,
               terminal: Optional[bool] = None):
    self._interval_s = interval_s
    self._total = total
    self._stream = stream or sys.stderr
    self._tally = tally
    self._clock = clock
    self._terminal = self._isatty() if terminal is None else terminal
    self._base: Mapping[str, int] = {}
    self._started = 0.0
    self._drawn = 0  # width of the line on the terminal, 0 when none is drawn
    self._said_unavailable = False
    self._stopped = threading.Event()
    self._thread: Optional[threading.Thread] = None

  @property
  def enabled(self) -> bool:
    return self._interval_s > 0

  def _isatty(self) -> bool:
    try:
      return self._stream.isatty()
    except (AttributeError, ValueError):
      return False

  def start(self) -> None:
    self._base = self._tally.snapshot()
    self._started = self._clock()
    if self.enabled:
      self._thread = threading.Thread(target=self._loop, name="txstream-progress", daemon=True)
      self._thread.start()

  def _loop(self) -> None:
    while not self._stopped.wait(self._interval_s):
      self.tick()

  def _counts(self):
    now = self._tally.snapshot()
    return tuple(now.get(name, 0) - self._base.get(name, 0) for name in (EVENTS, DECISIONS))

  def tick(self) -> None:
    """Writes one progress line for the counts now."""
    events, decisions = self._counts()
    if not events and not decisions:
      # Nothing counted in this process: the workers may be other processes.
      if not self._said_unavailable:
        self._said_unavailable = True
        self._write_line(f"{PREFIX} no counts from the workers yet (progress is not available on a runner "
                         "whose workers are other processes; the totals follow at the end)")
      return
    self._show(line(events, decisions, self._clock() - self._started, self._total))

  def stop(self) -> None:
    """Stops the thread; ends a redrawn terminal line so later output starts on its own line."""
    self._stopped.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._drawn:
      self._stream.write("\n")
      self._stream.flush()
      self._drawn = 0

  def finish(self, events: int, decisions: int, elapsed: Optional[float] = None) -> None:
    """The final line, once, with the run's exact totals."""
    if self.enabled:
      elapsed = self._clock() - self._started if elapsed is None else elapsed
      self._write_line(line(events, decisions, elapsed, self._total, final=True))

  def _show(self, text: str) -> None:
    if not self._terminal:
      self._write_line(text)
      return
    # Pad over the previous, possibly longer, line: a terminal redraws only what is written.
    self._stream.write("\r" + text.ljust(self._drawn))
    self._stream.flush()
    self._drawn = len(text)

  def _write_line(self, text: str) -> None:
    if self._drawn:
      self._stream.write("\r" + " " * self._drawn + "\r")
      self._drawn = 0
    self._stream.write(text + "\n")
    self._stream.flush()
