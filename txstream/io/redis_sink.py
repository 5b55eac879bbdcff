"""Hot tier: the latest decisions in Redis, for online lookups by transaction and customer.

Key layout (all keys carry a TTL, default 7 days from the write):

``txn:<transaction_id>``  string, one per transaction: a JSON object with
    decision        "approve" | "review" | "decline"
    score           model score, a number (shortest text of the float)
    reason_codes    rule hits, an array of strings ([] when none)
    model_version, rules_version (null when unknown), currency,
    card_token (the keyed token, never a card number)       strings
    event_time_ms, customer_id, terminal_id, amount_minor, decided_at_ms  integers
    Read it with ``decision(client, transaction_id)``.

``cust:<customer_id>:recent``  sorted set: member ``transaction_id``, score
    ``event_time_ms``; trimmed to the ``recent_per_customer`` (default 100)
    latest by event time (ties: the larger transaction_id is kept). Read with
    ``latest_decisions(client, customer_id, limit)``.

Why a string and not a hash: ``SET key value EX ttl`` is one command, where a
hash needs HSET and EXPIRE; measured on the local server, ~2.8 µs of server
CPU a row against ~7.7 for the pair (see README, "Storage tiers").

Idempotency: SET of the same value and ZADD of the same member with the same
score are no-ops when repeated, and the trim keeps the top N of whatever set
was written, so a replayed or retried batch leaves the same state, whatever
the order the batches arrive in. A batch is sent pipelined, without
MULTI/EXEC: the ``txn:`` values first, then per customer in the batch one
ZADD (all its transactions), one ZREMRANGEBYRANK (keep the latest N) and one
EXPIRE; a batch half applied when the connection dropped is simply applied
again, and a reader never finds a recent-set member whose ``txn:`` value has
not been written.

Cost: the values are built column-wise by Arrow; each command is packed by
hiredis' C ``pack_command`` and sent over redis-py's own connection in chunks,
reading one chunk's replies while the server works on the next (redis-py's
``Pipeline`` spends ~7-9 µs of Python per command, more than the server does).
What remains on the client is ~1.3 µs per reply in redis-py's
``read_response``, ~0.8 µs per command packed and ~1.6 µs a row of Arrow.

The TTL counts from the write, not from the event time: a replay of old
events makes them hot again for a week.
"""
import itertools
import json
import logging
from typing import Iterable, Iterator, List, Optional
from urllib.parse import urlsplit

import apache_beam as beam
import hiredis
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
VALUE_FIELDS = ("decision", "score", "reason_codes", "model_version", "rules_version", "event_time_ms", "customer_id",
                "terminal_id", "amount_minor", "currency", "card_token", "decided_at_ms")
_NULLABLE = ("reason_codes", "rules_version")
_SCHEMES = ("redis", "rediss", "unix")
# The columns a txn: value or a recent set is built from: a null there cannot be written.
_REQUIRED = tuple(column_position(c) for c in ("transaction_id",) + VALUE_FIELDS if c not in _NULLABLE)
_CONTROL = [chr(c) for c in range(0x20)]
# Commands per send: big enough to amortise a system call, small enough that the server starts early.
_CHUNK = 2000

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


# -- values ------------------------------------------------------------------------------------------------------

def _json_strings(column) -> pa.ChunkedArray:
  """Each text as a JSON string literal (quoted and escaped); null stays null."""
  text = column
  if pc.any(pc.match_substring_regex(text, r'["\\\x00-\x1f]')).as_py():  # rare: escaping costs 34 passes
    text = pc.replace_substring(pc.replace_substring(text, "\\", "\\\\"), '"', '\\"')
    for char in _CONTROL:
      text = pc.replace_substring(text, char, f"\\u{ord(char):04x}")
  return pc.binary_join_element_wise('"', text, '"', "")


def _json_string_lists(column) -> pa.Array:
  """list<string> -> JSON arrays of strings; a null list is []."""
  if isinstance(column, pa.ChunkedArray):
    column = column.combine_chunks()
  lengths = pc.list_value_length(column).fill_null(0).to_numpy()
  offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))), pa.int32())
  lists = pa.ListArray.from_arrays(offsets, _json_strings(pc.list_flatten(column)))
  joined = pc.binary_join_element_wise("[", pc.binary_join(lists, ","), "]", "")
  return pc.if_else(pc.equal(pc.list_value_length(lists), 0), "[]", joined)


def decision_values(table: pa.Table) -> pa.ChunkedArray:
  """The ``txn:`` value of each row: a JSON object of ``VALUE_FIELDS``, built column-wise.

  Rows must have a finite score and no null in the required fields (see
  ``write_batch``); a null ``rules_version`` is JSON null.
  """
  parts = []
  for i, field in enumerate(VALUE_FIELDS):
    column = table.column(column_position(field))
    if field == "reason_codes":
      text = _json_string_lists(column)
    elif pa.types.is_string(column.type):
      text = pc.fill_null(_json_strings(column), "null")
    else:  # integers, and the score as the shortest text of the float
      text = pc.cast(column, pa.string())
    parts += [pa.scalar(("{" if i == 0 else ",") + f'"{field}":'), text]
  return pc.binary_join_element_wise(*parts, pa.scalar("}"), "")


def commands(table: pa.Table, ttl_seconds: int, recent_per_customer: int) -> Iterator[bytes]:
  """The batch's commands, each packed by hiredis, produced as they are consumed.

  Per decision ``SET txn:<id> <json> EX ttl``; then per customer in the
  batch ``ZADD cust:<id>:recent`` (all its transactions),
  ``ZREMRANGEBYRANK`` (keep the latest N) and ``EXPIRE``.
  """
  pack = hiredis.pack_command
  ttl = str(ttl_seconds).encode()
  ids = table.column(column_position("transaction_id"))
  keys = pc.binary_join_element_wise(TXN_PREFIX, ids, "").to_pylist()
  sets = map(pack, zip(itertools.repeat(b"SET"), keys, decision_values(table).to_pylist(), itertools.repeat(b"EX"),
                       itertools.repeat(ttl)))

  customers = table.column(column_position("customer_id")).to_numpy()
  order = np.argsort(customers, kind="stable")
  ordered = customers[order]
  starts = np.flatnonzero(np.concatenate(([True], ordered[1:] != ordered[:-1]))).tolist()
  ends = starts[1:] + [len(ordered)]
  members = [None] * (2 * len(order))  # score, member, score, member, ... in customer order
  members[0::2] = table.column(column_position("event_time_ms")).to_numpy()[order].tolist()
  members[1::2] = ids.take(pa.array(order)).to_pylist()
  recent = [recent_key(c) for c in ordered[starts].tolist()]
  adds = (pack((b"ZADD", key, *members[2 * start:2 * end])) for key, start, end in zip(recent, starts, ends))
  trims = map(pack, zip(itertools.repeat(b"ZREMRANGEBYRANK"), recent, itertools.repeat(b"0"),
                        itertools.repeat(str(-(recent_per_customer + 1)).encode())))
  expires = map(pack, zip(itertools.repeat(b"EXPIRE"), recent, itertools.repeat(ttl)))
  return itertools.chain(sets, adds, trims, expires)


def execute(connection, packed: Iterable[bytes], chunk: int = _CHUNK) -> int:
  """Sends packed commands over a redis-py connection, pipelined; returns how many were sent.

  Chunk k is sent before chunk k-1's replies are read, so the server works
  while the client packs and reads. Every reply is read before the first
  error reply is raised (the connection stays in step); any other failure
  disconnects, so the next call starts on a clean connection.
  """
  sent, unread, first_error = 0, 0, None
  try:
    packed = iter(packed)
    while True:
      part = list(itertools.islice(packed, chunk))
      if part:
        connection.send_packed_command([b"".join(part)], check_health=not sent)
        sent += len(part)
      for _ in range(unread):
        try:
          connection.read_response()
        except redis.exceptions.ResponseError as error:
          first_error = first_error or error
      unread = len(part)
      if not part:
        break
  except BaseException:
    connection.disconnect()
    raise
  if first_error is not None:
    raise first_error
  return sent


# -- reading -----------------------------------------------------------------------------------------------------

def decision(client: redis.Redis, transaction_id: str) -> Optional[dict]:
  """The hot decision of one transaction (``VALUE_FIELDS`` plus ``transaction_id``), or None."""
  value = client.get(txn_key(transaction_id))
  return None if value is None else {"transaction_id": transaction_id, **json.loads(value)}


def latest_decisions(client: redis.Redis, customer_id: int, limit: int = 100) -> List[dict]:
  """A customer's latest decisions by event time, newest first (ties: larger transaction_id first)."""
  ids = [i.decode() if isinstance(i, bytes) else i for i in client.zrevrange(recent_key(customer_id), 0, limit - 1)]
  values = client.mget([txn_key(i) for i in ids]) if ids else []
  return [{"transaction_id": i, **json.loads(v)} for i, v in zip(ids, values) if v is not None]


# -- configuration -----------------------------------------------------------------------------------------------

def _check_url(url: str) -> None:
  if not url or not isinstance(url, str):
    raise SinkConfigError("a Redis URL is required, e.g. redis://127.0.0.1:6379/0")
  parts = urlsplit(url)
  if parts.scheme not in _SCHEMES:
    raise SinkConfigError(f"Redis URL {sinks.redact(url)!r}: scheme must be one of {', '.join(_SCHEMES)}")
  try:
    parts.port  # pylint: disable=pointless-statement
  except ValueError as error:
    raise SinkConfigError(f"Redis URL {sinks.redact(url)!r}: {error}") from None
  if parts.scheme != "unix" and not parts.hostname:
    raise SinkConfigError(f"Redis URL {sinks.redact(url)!r}: no host")
  db = parts.path.lstrip("/")
  if db and not db.isdigit():
    raise SinkConfigError(f"Redis URL {sinks.redact(url)!r}: database must be a number, got {db!r}")


def _client(url: str, timeout_s: float, single_connection: bool = False) -> redis.Redis:
  # redis-py's own retries are off: the sink's backoff and deadline govern every retry.
  return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 5.0),
                              retry=Retry(NoBackoff(), 0), health_check_interval=30,
                              single_connection_client=single_connection)


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
    self._client = _client(self._url, self._timeout_s, single_connection=True)

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
    finite = pc.is_finite(table.column(column_position("score")))
    if not pc.all(finite).as_py():  # JSON has no NaN or infinity
      odd = table.filter(pc.invert(finite))
      refused.append(Refusal(odd, [ValueError(f"score {s} is not a finite number")
                                   for s in odd.column(column_position("score")).to_pylist()]))
      table = table.filter(finite)
    if table.num_rows:
      execute(self._client.connection, commands(table, self._ttl, self._recent))
    return refused


class WriteToRedis(beam.PTransform[beam.PCollection[DecisionBatch], SinkResult]):
  """DecisionBatches -> the hot tier in Redis (see the module docstring for the key layout).

  Returns a ``SinkResult``: ``written`` holds rows per write, ``dead_letters``
  holds decisions with a null where the value needs one or a score that is
  not a finite number (none in practice). Idempotent: safe to retry, rerun
  and replay. Works in batch and streaming.
  """

  def __init__(self, url: str, ttl_seconds: int = 7 * 86400, recent_per_customer: int = 100,
               batch_size: int = 10_000, max_batch_bytes: int = 16 << 20, name: str = "hot",
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
