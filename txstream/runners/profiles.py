"""Runner profiles: pick the runner object for the flags a user passed, and fill in what a local runner needs.

``DirectRunner`` (the default) first tries to download Prism, Beam's local
portable runner, and only then falls back to the Python runners; on a machine
without internet that costs a failed download on every run. A bounded run on
the DirectRunner therefore goes straight to the FnApiRunner, which is what the
fallback would pick.

The local runners need no extra flag after ``txstream services up``:
``PrismRunner`` gets ``--prism_location`` (the binary the services step
built), ``FlinkRunner`` ``--flink_job_server_jar`` (the jar it fetched),
``--flink_master=[local]`` and ``--environment_type=LOOPBACK``, and
``PortableRunner --job_endpoint=embed`` ``--environment_type=LOOPBACK``
(there is no Docker for the default environment). A flag given explicitly
wins. A runner whose artifact is missing is one line (``RunnerError``).
"""
import contextlib
import logging
import tempfile

from apache_beam.options.pipeline_options import (FlinkRunnerOptions, PortableOptions, PrismRunnerOptions,
                                                  StandardOptions)

from txstream.core import batch

_LOGGER = logging.getLogger(__name__)


class RunnerError(ValueError):
  """A runner that cannot run here, and why; one line."""


def runner_for(options):
  """Returns a runner instance or name for ``beam.Pipeline(runner=...)``, completing ``options`` in place."""
  standard = options.view_as(StandardOptions)
  name = standard.runner or "DirectRunner"
  if name in ("DirectRunner", "direct") and not standard.streaming:
    from apache_beam.runners.portability.fn_api_runner import fn_runner, worker_handlers
    worker_handlers.STATE_CACHE_SIZE_MB = 0
    return fn_runner.FnApiRunner()
  portable = options.view_as(PortableOptions)
  if name in ("PrismRunner", "prism"):
    prism = options.view_as(PrismRunnerOptions)
    prism.prism_location = prism.prism_location or _installed("prism")
  elif name in ("FlinkRunner", "flink"):
    flink = options.view_as(FlinkRunnerOptions)
    flink.flink_job_server_jar = flink.flink_job_server_jar or _installed("flink")
    flink.flink_master = flink.flink_master if flink.flink_master != "[auto]" else "[local]"
    portable.environment_type = portable.environment_type or "LOOPBACK"
  elif name in ("PortableRunner", "portable") and portable.job_endpoint == "embed":
    portable.environment_type = portable.environment_type or "LOOPBACK"
  return name


def _installed(runner: str) -> str:
  from txstream.runners import install
  path = install.installed(install.RUNNERS[runner][1]())
  if path is None:
    raise RunnerError(f"--runner needs {runner}, which is not installed: run `txstream services up {runner}`")
  return path


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
