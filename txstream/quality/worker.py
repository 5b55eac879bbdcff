"""A bounded run's data-quality validation in a process of its own, so it costs the run little.

Great Expectations takes about 2 s to import, and the validation of a
million decisions about 1.5 s more (reading the staged rows, building the
frames, the suites). Done in the run's process, the import would compete with
the pipeline for the interpreter lock and the validation would follow it:
a third more time on a 1M-event run. Here:

  1. ``Validator()`` starts ``python -m txstream.quality.worker`` as the run
     starts (a plain child: it imports neither Beam nor the pipeline); it
     imports Great Expectations and builds the suites on the other core
     while the pipeline runs.
  2. Once the pipeline has finished, ``submit`` sends the job: where the
     run's staged decisions are, the run's counts, the thresholds file, the
     rules' score thresholds and the window. The child reads the staged rows
     (the feature columns' ranges from the Parquet statistics alone) and
     answers ``read``; the driver may then publish (move) the staged files,
     the cold-tier commit, while the child validates.
  3. ``result`` waits for the ``data_quality`` result.

Messages are pickles over the child's stdin and its original stdout (its
``sys.stdout`` goes to stderr, so nothing else reaches the channel). A child
that dies or fails answers with an error, which the run reports as a failed
validation (exit 3): the decisions are written regardless.
"""
import logging
import os
import pickle
import subprocess
import sys
from typing import Optional, Tuple

_LOGGER = logging.getLogger(__name__)
# What the row-level suite reads of the staged decisions.
COLUMNS = ("transaction_id", "amount_minor", "currency", "event_time", "score", "decision", "reason_codes",
           "model_version")


def _serve(requests, replies) -> None:
  """The child: import and build the suites, then answer one job."""
  def reply(*message):
    pickle.dump(message, replies)
    replies.flush()

  try:
    from txstream.core import contracts
    from txstream.io import object_store
    from txstream.quality import validate
    validate.preload().join()
    job = pickle.load(requests)
    if job is None:
      return
    decisions = ranges = None
    if job["staging"]:
      fs, where = object_store.filesystem(job["staging"], job["storage"])
      paths = object_store.parquet_files(fs, where)
      # The feature suite checks ranges only: from the Parquet statistics, without reading 26 columns of floats.
      ranges = object_store.column_ranges(fs, paths, contracts.FEATURE_COLUMNS)
      decisions = object_store.read_columns(fs, paths, COLUMNS) if paths else None
    reply("read", decisions.num_rows if decisions is not None else 0)
    config = validate.QualityConfig.load(job["config_path"])
    result = validate.check(decisions, job["counts"], config, job["review_score"], job["decline_score"],
                            job["window"], ranges=ranges)
    reply("result", result)
  except EOFError:
    return  # the run ended before sending a job
  except Exception as e:  # pylint: disable=broad-except
    import traceback
    reply("error", f"{type(e).__name__}: {e}".splitlines()[0][:500], traceback.format_exc())


class Validator:
  """One run's validation in a child process (see the module docstring)."""

  def __init__(self):
    self._process = subprocess.Popen([sys.executable, "-m", "txstream.quality.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
    self._error: Optional[str] = None

  def _receive(self) -> tuple:
    try:
      return pickle.load(self._process.stdout)
    except (EOFError, OSError, pickle.UnpicklingError) as e:
      return ("error", f"the data-quality process ended (status {self._process.poll()}): "
                       f"{type(e).__name__}", "")

  def submit(self, staging: Optional[str], storage: dict, counts: dict, config_path: Optional[str],
             review_score: float, decline_score: float, window: Optional[Tuple[int, int]]) -> None:
    """Sends the job and waits until the child has read the staged rows (they may then be moved).

    ``staging``: the run's staging folder (``cold_table.staging_path``), None without a cold tier.
    """
    try:
      pickle.dump({"staging": staging, "storage": storage, "counts": counts, "config_path": config_path,
                   "review_score": review_score, "decline_score": decline_score, "window": window},
                  self._process.stdin)
      self._process.stdin.flush()
      answer = self._receive()
    except OSError as e:
      answer = ("error", f"the data-quality process ended: {type(e).__name__}", "")
    if answer[0] == "error":
      self._error = answer[1]
      _LOGGER.error("data quality: %s\n%s", answer[1], answer[2])

  def result(self) -> dict:
    """The ``data_quality`` result; ``{"success": False, "error": ...}`` if the child could not validate."""
    if self._error is None:
      answer = self._receive()
      if answer[0] == "result":
        self.close()
        return answer[1]
      self._error = answer[1]
      _LOGGER.error("data quality: %s\n%s", answer[1], answer[2])
    self.close()
    return {"success": False, "error": self._error}

  def close(self) -> None:
    """Ends the child (one that has no job yet sees its input close and exits)."""
    for stream in (self._process.stdin, self._process.stdout):
      try:
        stream.close()
      except OSError:
        pass
    try:
      self._process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._process.kill()
      self._process.wait()


def main() -> None:
  # Below the pipeline's priority: on a busy machine the import waits for idle time rather than taking the
  # pipeline's (the run's wall time is the pipeline's; the validation comes after it anyway).
  os.nice(10)
  replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr, not into the channel
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  _serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
  main()
