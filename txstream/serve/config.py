"""``ServeConfig``: what ``txstream serve`` is pointed at, and its limits.

The API key is a value here, never a flag: the command reads it from the
environment (``TXSTREAM_API_KEY``) and nothing logs it. ``storage_options``
(the cold tier's S3 credentials) is kept out of ``repr`` for the same reason.
"""
import dataclasses
from typing import Optional

API_KEY_ENV = "TXSTREAM_API_KEY"


@dataclasses.dataclass(frozen=True)
class ServeConfig:
  """Tier URLs as ``txstream run`` takes them (any may be None: that tier is off) and the query limits.

  ``clickhouse_retention_days``: ClickHouse holds decisions this many days
  back; a ``decisions`` query reaching further is answered by the cold tier.
  ``row_limit``: the most rows a query returns (a request may ask for fewer).
  ``query_timeout_s``: the longest a query runs (a request may ask for less).
  ``api_key``: when set, every data endpoint needs it (``Authorization:
  Bearer <key>`` or ``X-API-Key``).
  """
  postgres_dsn: Optional[str] = None
  clickhouse_url: Optional[str] = None
  redis_url: Optional[str] = None
  cold_path: Optional[str] = None
  storage_options: dict = dataclasses.field(default_factory=dict, repr=False)
  clickhouse_retention_days: int = 90
  row_limit: int = 10_000
  query_timeout_s: float = 30.0
  api_key: Optional[str] = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self.row_limit < 1:
      raise ValueError(f"row_limit must be at least 1, got {self.row_limit}")
    if self.query_timeout_s <= 0:
      raise ValueError(f"query_timeout_s must be positive, got {self.query_timeout_s}")
    if self.clickhouse_retention_days < 0:
      raise ValueError(f"clickhouse_retention_days must not be negative, got {self.clickhouse_retention_days}")
    if self.api_key is not None and not self.api_key.strip():
      raise ValueError("the API key is empty")
