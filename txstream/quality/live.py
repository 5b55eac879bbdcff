"""Data quality of a live run: the decisions of each fixed processing-time window, validated off the hot path.

The hot path hands every decided batch to ``LiveQuality.add``, which keeps
the columns the suites read. When the wall clock crosses into the next
window (``live_window_s`` of ``quality.yaml``), the window's decisions go to a
single background thread that validates the ``decisions`` and
``window_distribution`` suites (``validate.check`` with ``run_scope=False``)
and reports the result: the live metrics' ``txstream_dq_*`` gauges, one
``dq_results`` row per suite with the window's bounds, the run's data-docs page
(rewritten with the latest window), and a log line. The hot path never waits
for a validation; ``close`` validates the last, partial window and waits.
Memory: one window of decisions, about 0.3 KB a decision (60 s at 5,000
decisions/s: 90 MB); a faster stream wants a shorter window.
"""
import concurrent.futures
import logging
import threading
import time
from typing import NamedTuple, Optional

import pyarrow as pa

from txstream.core import contracts
from txstream.quality import report
from txstream.quality import validate

_LOGGER = logging.getLogger(__name__)
COLUMNS = ("transaction_id", "amount_minor", "currency", "event_time_ms", "score", "decision", "reason_codes",
           "model_version", "decided_at_ms") + contracts.FEATURE_COLUMNS


class LiveQualitySettings(NamedTuple):
  """What a live run's validation needs (picklable: it travels with the DoFn)."""
  config_path: Optional[str]
  postgres_dsn: Optional[str]
  docs_dir: str
  run_id: str


class LiveQuality:
  """Collects a live run's decisions per window and validates each finished window on a thread."""

  def __init__(self, settings: LiveQualitySettings, review_score: float, decline_score: float, metrics=None,
               clock=time.time):
    self._settings = settings
    self._config = validate.QualityConfig.load(settings.config_path)
    self._scores = (review_score, decline_score)
    self._metrics = metrics
    self._clock = clock
    self._window_ms = int(self._config.live_window_s * 1000)
    self._window: Optional[int] = None
    self._tables = []
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="txstream-dq")
    self._lock = threading.Lock()
    self.validated = 0
    self.failed = 0
    self.last: Optional[dict] = None
    validate.preload()

  def add(self, decisions: pa.Table) -> None:
    """Takes a decided batch (``contracts.DECISION``); a window that has ended goes to validation first."""
    window = int(self._clock() * 1000) // self._window_ms
    if self._window is not None and window != self._window:
      self._submit()
    self._window = window
    if decisions.num_rows:
      self._tables.append(decisions.select(list(COLUMNS)))

  def tick(self) -> None:
    """Called between batches: a window with no traffic since it ended is validated now, not at the next batch."""
    if self._window is not None and int(self._clock() * 1000) // self._window_ms != self._window:
      self._submit()
      self._window = None

  def close(self) -> None:
    """Validates the last window and waits for every validation."""
    if self._tables:
      self._submit()
    self._pool.shutdown(wait=True)

  def summary(self) -> dict:
    """For the stream's summary: windows validated and failed, the last result's page."""
    with self._lock:
      return {"success": self.failed == 0, "windows_validated": self.validated, "windows_failed": self.failed,
              "window_s": self._window_ms / 1000, "docs": (self.last or {}).get("docs"),
              "last": {k: v for k, v in (self.last or {}).items() if k != "suites"} or None}

  def _submit(self) -> None:
    tables, self._tables = self._tables, []
    if not tables:
      return
    start = self._window * self._window_ms
    self._pool.submit(self._validate, pa.concat_tables(tables), (start, start + self._window_ms))

  def _validate(self, decisions: pa.Table, window) -> None:
    try:
      result = validate.check(decisions, {}, self._config, *self._scores, window_ms=self._window_ms,
                              run_scope=False)
      result["window"] = {"from_ms": window[0], "to_ms": window[1]}
      result["docs"] = report.write_page(self._settings.docs_dir, self._settings.run_id, result)
      if self._settings.postgres_dsn:
        report.record(self._settings.postgres_dsn, self._settings.run_id, result, result["docs"], window)
    except Exception:  # pylint: disable=broad-except
      # The hot path goes on: a validation that cannot run is logged and counted as a failed window.
      _LOGGER.exception("data quality: validating the live window from %d failed", window[0])
      result = {"success": False, "suites": [], "error": "validation did not run"}
    with self._lock:
      self.validated += 1
      self.failed += 0 if result["success"] else 1
      self.last = result
    if self._metrics is not None:
      self._metrics.data_quality(result)
    _LOGGER.log(logging.INFO if result["success"] else logging.WARNING,
                "data quality: window of %d decisions from %s: %s, %d expectations, %d failed",
                decisions.num_rows, time.strftime("%H:%M:%S", time.gmtime(window[0] / 1000)),
                "passed" if result["success"] else "FAILED", result.get("evaluated", 0), result.get("failed", 0))
