"""Hot tier: the latest decisions in Redis, for online lookups by transaction and customer.

Key layout (all keys carry a TTL, default 7 days from the write):

``txn:<transaction_id>``  hash, one per transaction:
    decision        approve | review | decline
    score           model score, shortest decimal text of the float
    reason_codes    rule hits, comma-joined ("" when none)
    model_version, event_time_ms, customer_id, terminal_id, amount_minor,
    currency, card_token (the keyed token, never a card number), decided_at_ms

``cust:<customer_id>:recent``  sorted set: member ``transaction_id``, score
    ``event_time_ms``; trimmed to the ``recent_per_customer`` (default 100)
    latest by event time (ties: the larger transaction_id is kept).

Idempotency: HSET of the same fields and ZADD of the same member with the
same score are no-ops when repeated, and the trim keeps the top N of whatever
set was written, so a replayed or retried batch leaves the same state,
whatever the order the batches arrive in. Writes go through a redis-py
pipeline without MULTI/EXEC (``transaction=False``), one round trip per
batch; a batch half applied when the connection dropped is simply applied
again. Per batch, the values are read column by column from the Arrow table.

Cost: with hiredis (>= 3.2) installed, redis-py packs each command with
hiredis' C ``pack_command`` and parses replies with its C reader, but still
spends ~7-9 µs of Python per command in the pipeline, and a batch needs two
commands per decision and three per customer in it: this tier is bound by
that, and then by the server (HSET of 11 fields is ~3 µs of Redis' one thread).

The TTL counts from the write, not from the event time: a replay of old
events makes them hot again for a week.
"""
import logging
from itertools import repeat
from typing import List
from urllib.parse import urlsplit

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from txstream.core.batch import DecisionBatch
from txstream.io import sinks
from txstream.io.sinks import BatchingWriteFn, Refusal, RetryPolicy, SinkConfigError, SinkResult, column_position

_LOGGER = logging.getLogger(__name__)

TXN_PREFIX = "txn:"
HASH_FIELDS = ("decision", "score", "reason_codes", "model_version", "event_time_ms", "customer_id", "terminal_id",
               "amount_minor", "currency", "card_token", "decided_at_ms")
_SCHEMES = ("redis", "rediss", "unix")
# The columns a txn: hash or a recent set is built from: a null there cannot be written.
_REQUIRED = tuple(column_position(c) for c in ("transaction_id",) + HASH_FIELDS if c != "reason_codes")

# Connection-level failures and transient server states; a write is idempotent so these are safe
# to repeat. AuthenticationError / AuthorizationError subclass ConnectionError but never heal.
_RETRYABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.ReadOnlyError,
              redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)
_PERMANENT = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
              redis.exceptions.NoPermissionError)


def txn_key(transaction_id: str) -> str:
  return f"{TXN_PREFIX}{transaction_id}"


def recent_key(customer_id: int) -> str:
  return f"cust:{customer_id}:recent"


def hash_columns(table: pa.Table) -> List[list]:
  """The ``txn:`` hash's values, one list per field in ``HASH_FIELDS`` order.

  ``score`` is the shortest text of the float (``str``), ``reason_codes``
  comma-joined ("" when none); integers go as integers (sent as decimal text).
  """
  columns = []
  for field in HASH_FIELDS:
    column = table.column(column_position(field))
    if field == "score":
      columns.append(list(map(str, column.to_pylist())))
    elif field == "reason_codes":
      columns.append(pc.fill_null(pc.binary_join(column, ","), "").to_pylist())
    else:
      columns.append(column.to_pylist())
  return columns


def queue_writes(pipe, table: pa.Table, ttl_seconds: int, recent_per_customer: int) -> None:
  """Queues a batch's commands on a redis-py pipeline.

  Per decision: HSET txn:<id> ... and EXPIRE; per customer in the batch:
  ZADD cust:<id>:recent (every one of its transactions), ZREMRANGEBYRANK (keep
  the latest N) and EXPIRE. Rows must have no null in the hash's columns.
  """
  execute = pipe.execute_command
  ids = table.column("transaction_id").to_pylist()
  keys = [TXN_PREFIX + i for i in ids]
  # zip assembles each HSET's arguments (field names interleaved with the values) in C.
  pairs = []
  for field, values in zip(HASH_FIELDS, hash_columns(table)):
    pairs += [repeat(field), values]
  for args in zip(keys, *pairs):
    execute("HSET", *args)
  for key in keys:
    execute("EXPIRE", key, ttl_seconds)

  customers = table.column("customer_id").to_numpy()
  order = np.argsort(customers, kind="stable")
  ordered = customers[order]
  starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1])))
  ends = np.append(starts[1:], len(ordered))
  members = [None] * (2 * len(ids))  # score, member, score, member, ... in customer order
  members[0::2] = table.column("event_time_ms").to_numpy()[order].tolist()
  members[1::2] = [ids[i] for i in order.tolist()]
  trim = -(recent_per_customer + 1)
  for customer, start, end in zip(ordered[starts].tolist(), starts.tolist(), ends.tolist()):
    key = recent_key(customer)
    execute("ZADD", key, *members[2 * start:2 * end])
    execute("ZREMRANGEBYRANK", key, 0, trim)
    execute("EXPIRE", key, ttl_seconds)


def _check_url(url: str) -> None:
  if not url or not isinstance(url, str):
    raise SinkConfigError("a Redis URL is required, e.g. redis://127.0.0.1:6379/0")
  parts = urlsplit(url)
  if parts.scheme not in _SCHEMES:
    raise SinkConfigError(f"Redis URL {url!r}: scheme must be one of {', '.join(_SCHEMES)}")
  try:
    parts.port  # pylint: disable=pointless-statement
  except ValueError as error:
    raise SinkConfigError(f"Redis URL {url!r}: {error}") from None
  if parts.scheme != "unix" and not parts.hostname:
    raise SinkConfigError(f"Redis URL {url!r}: no host")
  db = parts.path.lstrip("/")
  if db and not db.isdigit():
    raise SinkConfigError(f"Redis URL {url!r}: database must be a number, got {db!r}")


def _client(url: str, timeout_s: float) -> redis.Redis:
  # redis-py's own retries are off: the sink's backoff and deadline govern every retry.
  return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 5.0),
                              retry=Retry(NoBackoff(), 0), health_check_interval=30)


def _describe(url: str) -> str:
  parts = urlsplit(url)
  return parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port or 6379}"


def is_retryable(error: BaseException) -> bool:
  return isinstance(error, _RETRYABLE) and not isinstance(error, _PERMANENT)


def preflight(url: str, timeout_s: float = 5.0) -> None:
  """Connects once and PINGs; raises ``SinkConfigError`` with one line if that fails."""
  _check_url(url)
  client = _client(url, timeout_s)
  where = _describe(url)
  try:
    client.ping()
  except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError) as error:
    raise SinkConfigError(f"Redis at {where} refused the credentials: {sinks.one_line(error)}") from None
  except redis.exceptions.ConnectionError as error:
    raise SinkConfigError(f"cannot connect to Redis at {where}: {sinks.one_line(error)}") from None
  except redis.exceptions.RedisError as error:
    # e.g. "DB index is out of range" for a database number the server does not have.
    raise SinkConfigError(f"Redis at {where}: {sinks.one_line(error)}") from None
  finally:
    client.close()


class _WriteToRedisFn(BatchingWriteFn):
  def __init__(self, url: str, ttl_seconds: int, recent_per_customer: int, name: str, batch_size: int,
               max_batch_bytes: int, retry: RetryPolicy, timeout_s: float):
    super().__init__(name, batch_size, max_batch_bytes, retry)
    self._url = url
    self._ttl = ttl_seconds
    self._recent = recent_per_customer
    self._timeout_s = timeout_s
    self._client = None

  def open_client(self):
    self._client = _client(self._url, self._timeout_s)

  def close_client(self):
    if self._client is not None:
      client, self._client = self._client, None
      client.close()

  def is_retryable(self, error):
    return is_retryable(error)

  def is_rejected(self, error):
    # A value that cannot be encoded as UTF-8 (Arrow does not check every path); the batch is split to find it.
    return isinstance(error, UnicodeError)

  def write_batch(self, table: pa.Table) -> List[Refusal]:
    table, refused = sinks.refuse_nulls(table, _REQUIRED)
    if table.num_rows:
      # The pipeline reads every reply before raising the first error reply, so the connection stays in step.
      pipe = self._client.pipeline(transaction=False)
      queue_writes(pipe, table, self._ttl, self._recent)
      pipe.execute()
    return refused


class WriteToRedis(beam.PTransform[beam.PCollection[DecisionBatch], SinkResult]):
  """DecisionBatches -> the hot tier in Redis (see the module docstring for the key layout).

  Returns a ``SinkResult``: ``written`` holds rows per write, ``dead_letters``
  holds decisions with a null where the hash needs a value (none in practice).
  Idempotent: safe to retry, rerun and replay. Works in batch and streaming.
  """

  def __init__(self, url: str, ttl_seconds: int = 7 * 86400, recent_per_customer: int = 100,
               batch_size: int = 1000, max_batch_bytes: int = 4 << 20, name: str = "hot",
               retry: RetryPolicy = RetryPolicy(), timeout_s: float = 10.0):
    super().__init__()
    _check_url(url)
    sinks.check_batch_limits(batch_size, max_batch_bytes)
    if not isinstance(ttl_seconds, int) or ttl_seconds < 1:
      raise SinkConfigError(f"ttl_seconds must be a positive integer, got {ttl_seconds!r}")
    if not isinstance(recent_per_customer, int) or recent_per_customer < 1:
      raise SinkConfigError(f"recent_per_customer must be a positive integer, got {recent_per_customer!r}")
    self._url = url
    self._fn = _WriteToRedisFn(url, ttl_seconds, recent_per_customer, name, batch_size, max_batch_bytes, retry,
                               timeout_s)

  def preflight(self) -> None:
    """Connects once; raises ``SinkConfigError`` (one line) for a bad URL, refused connection or auth."""
    preflight(self._url)

  def expand(self, decisions) -> SinkResult:
    return sinks.write_with(decisions, "Write", self._fn)
