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
     validates them while the driver publishes (moves) the staged files, the
     cold-tier commit: a local staging folder is snapshotted as hard links
     first, so the commit need not wait for the read; on S3 ``submit`` waits
     until the child has read the rows.
  3. ``result`` waits for the ``data_quality`` result.

Messages are pickles over the child's stdin and its original stdout (its
``sys.stdout`` goes to stderr, so nothing else reaches the channel). A child
that dies or fails answers with an error, which the run reports as a failed
validation (exit 3): the decisions are written regardless.
"""
import logging
import os
import pickle
import shutil
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
      try:
        fs, where = object_store.filesystem(job["staging"], job["storage"])
        paths = object_store.parquet_files(fs, where)
        # The feature suite checks ranges only: from the Parquet statistics, without reading 26 columns of floats.
        ranges = object_store.column_ranges(fs, paths, contracts.FEATURE_COLUMNS)
        decisions = object_store.read_columns(fs, paths, COLUMNS) if paths else None
      finally:
        if job.get("remove"):
          shutil.rmtree(job["staging"], ignore_errors=True)  # the snapshot of hard links
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
    self._read_pending = False

  def _receive(self) -> tuple:
    try:
      return pickle.load(self._process.stdout)
    except (EOFError, OSError, pickle.UnpicklingError) as e:
      return ("error", f"the data-quality process ended (status {self._process.poll()}): "
                       f"{type(e).__name__}", "")

  def submit(self, staging: Optional[str], storage: dict, counts: dict, config_path: Optional[str],
             review_score: float, decline_score: float, window: Optional[Tuple[int, int]]) -> None:
    """Sends the job; returns once the staged files may be moved (the commit).

    ``staging``: the run's staging folder (``cold_table.staging_path``), None
    without a cold tier. A local one is snapshotted as hard links beside it
    (instant; the child reads and removes them), so the commit need not wait
    for the read; otherwise (S3) this waits until the child has read the rows.
    """
    snapshot = _snapshot(staging) if staging and "://" not in staging else None
    try:
      pickle.dump({"staging": snapshot or staging, "remove": snapshot is not None, "storage": storage,
                   "counts": counts, "config_path": config_path, "review_score": review_score,
                   "decline_score": decline_score, "window": window}, self._process.stdin)
      self._process.stdin.flush()
      answer = self._receive() if snapshot is None else ("read", None)
    except OSError as e:
      answer = ("error", f"the data-quality process ended: {type(e).__name__}", "")
    self._read_pending = snapshot is not None and answer[0] != "error"
    if answer[0] == "error":
      self._error = answer[1]
      _LOGGER.error("data quality: %s\n%s", answer[1], answer[2])

  def result(self) -> dict:
    """The ``data_quality`` result; ``{"success": False, "error": ...}`` if the child could not validate."""
    if self._error is None and self._read_pending:
      answer = self._receive()
      if answer[0] == "error":
        self._error = answer[1]
        _LOGGER.error("data quality: %s\n%s", answer[1], answer[2])
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


def _snapshot(staging: str) -> Optional[str]:
  """Hard links of a local staging folder's Parquet files in a folder beside it; None if that cannot be done."""
  if not os.path.isdir(staging):
    return None
  snapshot = staging.rstrip("/") + "-dq"
  try:
    shutil.rmtree(snapshot, ignore_errors=True)
    os.makedirs(snapshot)
    for folder, _, names in os.walk(staging):
      for name in names:
        if name.endswith(".parquet") and not name.startswith((".", "_")):
          source = os.path.join(folder, name)
          target = os.path.join(snapshot, os.path.relpath(source, staging).replace(os.sep, "__"))
          os.link(source, target)
    return snapshot
  except OSError as e:
    _LOGGER.debug("data quality: no hard-link snapshot of %s (%s); the commit waits for the read", staging, e)
    shutil.rmtree(snapshot, ignore_errors=True)
    return None


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
