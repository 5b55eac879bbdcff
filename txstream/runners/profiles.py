"""Runner profiles: pick the runner object for the flags a user passed.

``DirectRunner`` (the default) first tries to download Prism, Beam's local
portable runner, and only then falls back to the Python runners; on a machine
without internet that costs a failed download on every run. A bounded run on
the DirectRunner therefore goes straight to the FnApiRunner, which is what the
fallback would pick. Every other runner name passes through unchanged.
"""
import contextlib
import logging
import tempfile

from apache_beam.options.pipeline_options import StandardOptions

from txstream.core import batch

_LOGGER = logging.getLogger(__name__)


def runner_for(options):
  """Returns a runner instance or name for ``beam.Pipeline(runner=...)``."""
  standard = options.view_as(StandardOptions)
  name = standard.runner or "DirectRunner"
  if name in ("DirectRunner", "direct") and not standard.streaming:
    from apache_beam.runners.portability.fn_api_runner import fn_runner, worker_handlers
    worker_handlers.STATE_CACHE_SIZE_MB = 0
    return fn_runner.FnApiRunner()
  return name


@contextlib.contextmanager
def run_context(runner):
  """What running on ``runner`` needs around ``pipeline.run()``.

  The in-process FnApiRunner holds every shuffle in memory; there the
  batches are spilled to a temporary directory and the runner holds
  references to them (``core.batch.spilling``), so memory follows the work
  in hand, not the input. Other runners shuffle (and spill) themselves.
  """
  from apache_beam.runners.portability.fn_api_runner import fn_runner
  if not isinstance(runner, fn_runner.FnApiRunner):
    yield
    return
  with tempfile.TemporaryDirectory(prefix="txstream-spill-") as directory, batch.spilling(directory):
    yield
