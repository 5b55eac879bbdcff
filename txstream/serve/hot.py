"""Online lookups for ``txstream serve``: one transaction's decision, a customer's latest decisions.

Redis (the hot tier, ``txstream.io.redis_sink``'s key layout) answers first;
PostgreSQL (the warm tier, ``txstream.io.postgres_queries``) when Redis has
nothing (the key expired, was never written, or Redis is down or not
configured). Each answer says which tier it came from, and has the same
fields from either: ``redis_sink.VALUE_FIELDS`` plus ``transaction_id``.

Built for latency: Redis is reached through ``redis.asyncio`` on one
connection pool (no thread hop), and a hot answer is assembled from the
stored JSON bytes without decoding them. The PostgreSQL fallback is blocking
and runs in the threadpool on ``engines.Engines``'s connection pool.
"""
import json
import logging
from typing import Callable, List, Optional, Tuple

from txstream.io import postgres_queries, redis_sink, sinks

_LOGGER = logging.getLogger(__name__)

HOT, WARM = "hot", "warm"
FIELDS = ("transaction_id",) + redis_sink.VALUE_FIELDS


def _with_id(transaction_id: str, value: bytes) -> bytes:
  """A stored ``txn:`` value (a JSON object) with ``transaction_id`` as its first field."""
  return b'{"transaction_id":' + json.dumps(transaction_id).encode() + b"," + value[1:]


def _warm_record(row: dict) -> dict:
  return {field: row.get(field) for field in FIELDS}


class HotLookups:
  """Lookups on Redis (``redis_url``, may be None) falling back to PostgreSQL (``postgres``: a context manager
  factory yielding a connection, or None). ``close()`` (a coroutine) releases the Redis pool."""

  def __init__(self, redis_url: Optional[str], postgres: Optional[Callable], run_blocking: Callable):
    self._redis = None
    if redis_url:
      import redis.asyncio
      redis_sink._check_url(redis_url)  # pylint: disable=protected-access
      # A blocking pool: past max_connections a request waits for a connection instead of failing.
      pool = redis.asyncio.BlockingConnectionPool.from_url(redis_url, max_connections=64, timeout=1.0,
                                                           socket_timeout=1.0, socket_connect_timeout=1.0,
                                                           health_check_interval=30)
      self._redis = redis.asyncio.Redis(connection_pool=pool)
    self._postgres = postgres
    self._run_blocking = run_blocking

  @property
  def configured(self) -> bool:
    return self._redis is not None or self._postgres is not None

  async def _redis_call(self, call):
    """``call(client)``'s result, or None when Redis is off or failing (then the warm tier answers)."""
    if self._redis is None:
      return None
    import redis
    try:
      return await call(self._redis)
    except redis.exceptions.RedisError as error:
      _LOGGER.warning("hot tier unavailable, answering from the warm tier: %s", sinks.one_line(error))
      return None

  async def transaction(self, transaction_id: str) -> Tuple[Optional[str], Optional[bytes]]:
    """(tier, the decision as JSON bytes), or (None, None) when neither tier has it."""
    value = await self._redis_call(lambda r: r.get(redis_sink.txn_key(transaction_id)))
    if value is not None:
      return HOT, _with_id(transaction_id, value)
    if self._postgres is None:
      return None, None
    row = await self._run_blocking(self._warm_transaction, transaction_id)
    return (WARM, json.dumps(_warm_record(row), default=str).encode()) if row else (None, None)

  def _warm_transaction(self, transaction_id: str) -> Optional[dict]:
    with self._postgres() as conn:
      return postgres_queries.decision_by_id(conn, transaction_id)

  async def customer_recent(self, customer_id: int, limit: int) -> Tuple[Optional[str], List[bytes]]:
    """(tier, the customer's latest decisions as JSON bytes, newest first); (None, []) when no tier has any."""
    async def recent(client):
      ids = await client.zrevrange(redis_sink.recent_key(customer_id), 0, limit - 1)
      ids = [i.decode() if isinstance(i, bytes) else i for i in ids]
      values = await client.mget([redis_sink.txn_key(i) for i in ids]) if ids else []
      return [_with_id(i, v) for i, v in zip(ids, values) if v is not None]

    hot = await self._redis_call(recent)
    if hot:
      return HOT, hot
    if self._postgres is None:
      return None, []
    rows = await self._run_blocking(self._warm_recent, customer_id, limit)
    return (WARM, [json.dumps(_warm_record(r), default=str).encode() for r in rows]) if rows else (None, [])

  def _warm_recent(self, customer_id: int, limit: int) -> List[dict]:
    with self._postgres() as conn:
      return postgres_queries.decisions_for_customer(conn, customer_id, since_ms=0, limit=limit)

  async def ping(self) -> Optional[str]:
    """None when Redis answers (or is not configured), else the one-line reason."""
    if self._redis is None:
      return None
    import redis
    try:
      await self._redis.ping()
      return None
    except redis.exceptions.RedisError as error:
      return sinks.one_line(error)

  async def close(self) -> None:
    if self._redis is not None:
      await self._redis.aclose(close_connection_pool=True)
