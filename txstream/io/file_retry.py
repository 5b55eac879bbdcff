"""Retries for whole-file writes through Beam's ``FileSystems`` (a local folder or ``s3://``).

The cold tier and the dead-letter files are written as whole files with
names that are deterministic per partition (or stage), so writing one again
replaces it: a write that failed half way, or landed and then failed to
report it, is simply repeated. ``RetryingFileWrite`` repeats such a write with
the sinks' exponential backoff (``sinks.retry_with_backoff``) while the error
is a transient one of the store, and counts ``sink.<name>.retried`` and
``sink.<name>.failed`` in the ``txstream`` namespace.

Beam's S3 client re-raises every boto3 failure as ``S3ClientError(message,
http_status)`` while handling it, so the cause is found on the exception
chain (``__cause__``/``__context__``); ``BeamIOError`` carries its causes in
``exception_details``. Retryable: botocore connection errors and timeouts
(endpoint down, connection refused, reset or closed, read and connect
timeouts), Python's ``ConnectionError``/``TimeoutError``, and HTTP 5xx, 408
and 429. Everything else (no such bucket, access denied, a full local disk)
fails at once. A multipart upload abandoned by a failed attempt leaves no
object behind; only a completed upload creates one.
"""
import logging
from typing import Callable, Iterator, TypeVar

from apache_beam.io.filesystem import BeamIOError
from apache_beam.metrics import Metrics

from txstream.io.sinks import NAMESPACE, RetryPolicy, one_line, retry_with_backoff

try:
  from botocore import exceptions as _boto
except ImportError:  # pragma: no cover - botocore comes with apache-beam[aws]
  _boto = None

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
_RETRYABLE_HTTP = (408, 429)


def _causes(error: BaseException, depth: int = 0) -> Iterator[BaseException]:
  """The error, then what it wraps: its chain and a BeamIOError's per-path errors."""
  if error is None or depth > 8:
    return
  yield error
  if isinstance(error, BeamIOError) and isinstance(getattr(error, "exception_details", None), dict):
    for inner in error.exception_details.values():
      if isinstance(inner, BaseException):
        yield from _causes(inner, depth + 1)
  yield from _causes(error.__cause__ or error.__context__, depth + 1)


def _http_status(error: BaseException):
  if _boto is not None and isinstance(error, _boto.ClientError):
    return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
  # Beam's S3ClientError and GCS errors keep the HTTP status in ``code``.
  code = getattr(error, "code", None)
  return code if isinstance(code, int) and 100 <= code < 600 else None


def _is_transient(error: BaseException) -> bool:
  if _boto is not None:
    if isinstance(error, _boto.SSLError):
      return False  # a certificate problem does not go away by waiting
    if isinstance(error, (_boto.ConnectionError, _boto.HTTPClientError)):
      return True
  return isinstance(error, (ConnectionError, TimeoutError))


def is_retryable(error: BaseException) -> bool:
  """True for an outage of the store (connection lost or refused, timeout, HTTP 5xx/408/429)."""
  for cause in _causes(error):
    status = _http_status(cause)
    if status is not None:
      # The store answered: its status decides, whatever lower layers saw.
      return status >= 500 or status in _RETRYABLE_HTTP
    if _is_transient(cause):
      return True
  return False


class RetryingFileWrite:
  """Calls an idempotent file write, retrying store outages; counts retries and failures.

  Create it in a DoFn's ``__init__`` (it holds Beam counters) and call it from
  ``process``: ``self._write(lambda: write_file(...), path)``.
  """

  def __init__(self, name: str, retry: RetryPolicy = RetryPolicy()):
    self._name = name
    self._retry = retry
    self._retried = Metrics.counter(NAMESPACE, f"sink.{name}.retried")
    self._failed = Metrics.counter(NAMESPACE, f"sink.{name}.failed")

  def __call__(self, write: Callable[[], T], what: str) -> T:
    def on_retry(attempt, error, pause):
      self._retried.inc()
      _LOGGER.warning("%s: writing %s, attempt %d failed (%s); retrying in %.2fs",
                      self._name, what, attempt, one_line(error), pause)

    try:
      return retry_with_backoff(write, is_retryable, self._retry, on_retry=on_retry)
    except Exception:
      self._failed.inc()
      raise
