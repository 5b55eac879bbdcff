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
whatever the order the batches arrive in. Writes are pipelined without
MULTI/EXEC (what redis-py calls ``transaction=False``), one round trip per
batch; a batch half applied when the connection dropped is simply applied
again. The commands are packed here rather than by redis-py's generic
packer, which costs ~10-40 µs per command in Python and made this tier the
slowest step of the graph; redis-py still owns connections, AUTH and SELECT.

The TTL counts from the write, not from the event time: a replay of old
events makes them hot again for a week.
"""
import logging
from typing import List, Tuple
from urllib.parse import urlsplit

import apache_beam as beam
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from txstream.io import sinks
from txstream.io.sinks import BatchingWriteFn, RetryPolicy, SinkConfigError, SinkResult
from txstream.records import Decision

_LOGGER = logging.getLogger(__name__)

TXN_PREFIX = "txn:"
HASH_FIELDS = ("decision", "score", "reason_codes", "model_version", "event_time_ms", "customer_id", "terminal_id",
               "amount_minor", "currency", "card_token", "decided_at_ms")
_SCHEMES = ("redis", "rediss", "unix")

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


def _bulk(value) -> str:
  """One RESP bulk string. Built as text and encoded once per batch; the length counts UTF-8 bytes."""
  text = value if isinstance(value, str) else str(value)
  size = len(text) if text.isascii() else len(text.encode())
  return f"${size}\r\n{text}\r\n"


def pack_command(*args) -> str:
  """One command in RESP (as text: encode as UTF-8 to send)."""
  return f"*{len(args)}\r\n" + "".join([_bulk(a) for a in args])


_HSET_HEAD = f"*{2 + 2 * len(HASH_FIELDS)}\r\n$4\r\nHSET\r\n"
_EXPIRE_HEAD = "*3\r\n$6\r\nEXPIRE\r\n"
_TRIM_HEAD = "*4\r\n$15\r\nZREMRANGEBYRANK\r\n"
_FIELD_BULKS = tuple(_bulk(f) for f in HASH_FIELDS)


def hash_values(d: Decision) -> tuple:
  """The ``txn:`` hash's values, in ``HASH_FIELDS`` order."""
  t = d.transaction
  return (d.decision, str(d.score), ",".join(d.reason_codes), d.model_version, t.event_time_ms, t.customer_id,
          t.terminal_id, t.amount_minor, t.currency, t.card_token, d.decided_at_ms)


def batch_commands(rows: List[Decision], ttl_seconds: int, recent_per_customer: int) -> Tuple[bytes, int]:
  """The whole batch as one RESP payload, and the number of commands (= replies) in it.

  Per decision: HSET txn:<id> ... and EXPIRE; per customer in the batch:
  ZADD cust:<id>:recent, ZREMRANGEBYRANK (keep the latest N) and EXPIRE.
  """
  expire_tail = _bulk(ttl_seconds)
  trim_tail = _bulk(0) + _bulk(-(recent_per_customer + 1))
  parts = []
  recent = {}
  for d in rows:
    t = d.transaction
    key = _bulk(TXN_PREFIX + t.transaction_id)
    parts.append(_HSET_HEAD + key + "".join([f + _bulk(v) for f, v in zip(_FIELD_BULKS, hash_values(d))]))
    parts.append(_EXPIRE_HEAD + key + expire_tail)
    members = recent.get(t.customer_id)
    if members is None:
      members = recent[t.customer_id] = []
    members.append(_bulk(t.event_time_ms))
    members.append(_bulk(t.transaction_id))
  for customer_id, members in recent.items():
    key = _bulk(recent_key(customer_id))
    parts.append(f"*{2 + len(members)}\r\n$4\r\nZADD\r\n{key}{''.join(members)}")
    parts.append(_TRIM_HEAD + key + trim_tail)
    parts.append(_EXPIRE_HEAD + key + expire_tail)
  return "".join(parts).encode(), len(parts)


def execute_pipeline(client: redis.Redis, payload: bytes, replies: int) -> None:
  """Sends packed commands in one round trip (a pipeline without MULTI) and reads every reply.

  Raises the first error reply after reading them all, so the connection stays
  in step; any other failure discards the connection.
  """
  pool = client.connection_pool
  conn = pool.get_connection()
  try:
    conn.send_packed_command([payload])
    first_error = None
    for _ in range(replies):
      try:
        conn.read_response(disable_decoding=True)
      except redis.exceptions.ResponseError as error:
        first_error = first_error or error
    if first_error is not None:
      raise first_error
  except redis.exceptions.ResponseError:
    raise
  except BaseException:
    conn.disconnect()
    raise
  finally:
    pool.release(conn)


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
    # A value that cannot be encoded as UTF-8 (a lone surrogate); the batch is split to find it.
    return isinstance(error, UnicodeError)

  def write_batch(self, rows: List[Decision]):
    payload, replies = batch_commands(rows, self._ttl, self._recent)
    execute_pipeline(self._client, payload, replies)
    return []


class WriteToRedis(beam.PTransform[beam.PCollection[Decision], SinkResult]):
  """Decisions -> the hot tier in Redis (see the module docstring for the key layout).

  Returns a ``SinkResult``: ``written`` holds rows per batch, ``dead_letters``
  stays empty in practice (Redis accepts any decision). Idempotent: safe to
  retry, rerun and replay. Works in batch and streaming.
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
