"""Runner profiles: pick the runner object for the flags a user passed.

``DirectRunner`` (the default) first tries to download Prism, Beam's local
portable runner, and only then falls back to the Python runners; on a machine
without internet that costs a failed download on every run. A bounded run on
the DirectRunner therefore goes straight to the FnApiRunner, which is what the
fallback would pick. Every other runner name passes through unchanged.
"""
import logging

from apache_beam.options.pipeline_options import StandardOptions

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
