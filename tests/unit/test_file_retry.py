"""Which FileSystems errors the cold tier retries, and that it retries only those."""
import errno

import pytest
from apache_beam.io.aws.clients.s3.messages import S3ClientError
from apache_beam.io.filesystem import BeamIOError
from botocore import exceptions as boto

from txstream.io.file_retry import RetryingFileWrite, is_retryable
from txstream.io.sinks import RetryPolicy


def _wrapped(cause: BaseException, code=None) -> S3ClientError:
  """What Beam's S3 client raises: S3ClientError(str(e), status) while handling ``cause``."""
  try:
    try:
      raise cause
    except Exception as e:  # pylint: disable=broad-except
      raise S3ClientError(str(e), code)
  except S3ClientError as outer:
    return outer


@pytest.mark.parametrize("error", [
    _wrapped(boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:1")),
    _wrapped(boto.ConnectionClosedError(endpoint_url="http://127.0.0.1:1")),
    _wrapped(boto.ReadTimeoutError(endpoint_url="http://127.0.0.1:1")),
    _wrapped(boto.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1")),
    _wrapped(ValueError("whatever"), code=503),
    _wrapped(ValueError("slow down"), code=429),
    BeamIOError("Rename operation failed", {"s3://b/k": _wrapped(ConnectionResetError(104, "reset"))}),
    ConnectionRefusedError(111, "refused"),
    TimeoutError("timed out"),
])
def test_outages_are_retryable(error):
  assert is_retryable(error)


@pytest.mark.parametrize("error", [
    _wrapped(ValueError("NoSuchBucket"), code=404),
    _wrapped(ValueError("AccessDenied"), code=403),
    # The store answered 403: a connection error further down the chain does not matter.
    _wrapped(ConnectionResetError(104, "reset"), code=403),
    _wrapped(boto.SSLError(endpoint_url="https://x", error="certificate verify failed")),
    S3ClientError("no cause", None),
    OSError(errno.ENOSPC, "No space left on device"),
    PermissionError(errno.EACCES, "Permission denied"),
    BeamIOError("Delete operation failed", {"s3://b/k": _wrapped(ValueError("x"), code=400)}),
    ValueError("bad row"),
])
def test_everything_else_fails_at_once(error):
  assert not is_retryable(error)


def test_retrying_write_repeats_until_the_store_is_back():
  calls = []

  def write():
    calls.append(1)
    if len(calls) < 3:
      raise _wrapped(boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"))
    return 7

  assert RetryingFileWrite("cold", RetryPolicy(initial_s=0.001, max_s=0.002))(write, "p") == 7
  assert len(calls) == 3


def test_retrying_write_does_not_repeat_a_permanent_error():
  calls = []

  def write():
    calls.append(1)
    raise _wrapped(ValueError("NoSuchBucket"), code=404)

  with pytest.raises(S3ClientError):
    RetryingFileWrite("cold", RetryPolicy(initial_s=0.001))(write, "p")
  assert len(calls) == 1
