"""A bounded run's data-quality validation in a process of its own, so it costs the run little.

Great Expectations takes about 2 s to import, and the validation of a
million decisions about 2.5 s more (reading the staged rows, building the
frames, the suites). Done in the run's process, the import would compete with
the pipeline for the interpreter lock and the validation would come after it,
one after the other: a third more time on a 1M-event run. Here:

  1. ``Validator()`` starts a child process (``spawn``: nothing of the
     pipeline's threads is copied) as the run starts; it imports Great
     Expectations and builds its suites on the other core while the
     pipeline runs.
  2. Once the pipeline has finished, ``submit`` sends the job: the staged
     decisions' location, the run's counts, the thresholds file, the rules'
     score thresholds and the window. The child reads the staged rows and
     answers ``read``; the driver may then publish (move) the staged files,
     the cold-tier commit, while the child validates.
  3. ``result`` waits for the ``data_quality`` result.

A child that dies or fails answers with an error, which the run reports as
a failed validation (exit 3): the decisions are written regardless.
"""
import logging
import multiprocessing
import traceback
from typing import Optional, Tuple

_LOGGER = logging.getLogger(__name__)
# What the row-level and feature suites read of the staged decisions.
COLUMNS = ("transaction_id", "amount_minor", "currency", "event_time", "score", "decision", "reason_codes",
           "model_version")


def _child(conn) -> None:
  """The child's loop: import and build the suites, then answer one job."""
  try:
    from txstream.core import contracts
    from txstream.io import cold_table
    from txstream.quality import validate
    validate.preload().join()
    job = conn.recv()
    if job is None:
      return
    decisions = ranges = None
    if job["cold_path"]:
      # The feature suite checks ranges only: from the Parquet statistics, without reading 26 columns of floats.
      ranges = cold_table.staged_ranges(job["cold_path"], job["run_id"], contracts.FEATURE_COLUMNS, job["storage"])
      decisions = cold_table.staged_rows(job["cold_path"], job["run_id"], columns=COLUMNS, storage=job["storage"])
    conn.send(("read", decisions.num_rows if decisions is not None else 0))
    config = validate.QualityConfig.load(job["config_path"])
    result = validate.check(decisions, job["counts"], config, job["review_score"], job["decline_score"],
                            job["window"], ranges=ranges)
    conn.send(("result", result))
  except Exception as e:  # pylint: disable=broad-except
    conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0][:500], traceback.format_exc()))
  finally:
    conn.close()


class Validator:
  """One run's validation in a child process (see the module docstring)."""

  def __init__(self):
    context = multiprocessing.get_context("spawn")
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_child, args=(child,), name="txstream-data-quality", daemon=True)
    self._process.start()
    child.close()
    self._error: Optional[str] = None

  def submit(self, cold_path: Optional[str], run_id: str, storage: dict, counts: dict, config_path: Optional[str],
             review_score: float, decline_score: float, window: Optional[Tuple[int, int]]) -> None:
    """Sends the job and waits until the child has read the staged rows (they may then be moved)."""
    try:
      self._conn.send({"cold_path": cold_path, "run_id": run_id, "storage": storage, "counts": counts,
                       "config_path": config_path, "review_score": review_score, "decline_score": decline_score,
                       "window": window})
      answer = self._conn.recv()
    except (EOFError, OSError) as e:
      answer = ("error", f"the data-quality process ended: {e or type(e).__name__}", "")
    if answer[0] == "error":
      self._error = answer[1]
      _LOGGER.error("data quality: %s\n%s", answer[1], answer[2])

  def result(self) -> dict:
    """The ``data_quality`` result; ``{"success": False, "error": ...}`` if the child could not validate."""
    if self._error is None:
      try:
        answer = self._conn.recv()
      except (EOFError, OSError) as e:
        answer = ("error", f"the data-quality process ended: {e or type(e).__name__}", "")
      if answer[0] == "result":
        self.close()
        return answer[1]
      self._error = answer[1]
      _LOGGER.error("data quality: %s\n%s", answer[1], answer[2])
    self.close()
    return {"success": False, "error": self._error}

  def close(self) -> None:
    """Ends the child (a run that failed before ``submit`` tells it there is no job)."""
    if self._process.is_alive():
      try:
        self._conn.send(None)
      except (OSError, ValueError):
        pass
      self._process.join(timeout=10)
      if self._process.is_alive():
        self._process.kill()
    self._conn.close()
