"""The typed records that flow between the stages of the graph.

NamedTuples with a registered ``RowCoder`` where they cross a shuffle, so
Beam encodes them schema-aware instead of pickling. Money is integer minor
units; times are UTC epoch milliseconds; the card is a keyed token only.
"""
from typing import NamedTuple, Optional, Sequence

import apache_beam as beam

import txstream


class RawRecord(NamedTuple):
  """One undecoded message and where it came from (file#index or topic/partition@offset)."""
  source: str
  value: Optional[bytes]


class Transaction(NamedTuple):
  transaction_id: str
  event_time_ms: int
  customer_id: int
  terminal_id: int
  card_token: str
  amount_minor: int
  currency: str
  entry_mode: Optional[str]
  merchant_category: Optional[int]
  schema_id: int
  source: str
  # Filled by Enrich.
  customer_segment: Optional[str] = None
  home_distance: Optional[float] = None
  reference_version: Optional[str] = None


class Label(NamedTuple):
  """A confirmed fraud, known from ``label_time_ms`` on."""
  transaction_id: str
  label_time_ms: int
  tx_time_ms: int
  customer_id: int
  terminal_id: int
  is_fraud: bool


class Featured(NamedTuple):
  """A transaction with its feature vector, in ``features.FEATURE_NAMES`` order."""
  transaction: Transaction
  features: Sequence[float]


class Decision(NamedTuple):
  transaction: Transaction
  features: Sequence[float]
  score: float
  model_version: str
  reason_codes: Sequence[str]
  decision: str
  pipeline_version: str
  decided_at_ms: int


class DeadLetter(NamedTuple):
  """Where a bad input ended and why. ``raw`` keeps the original bytes when there were any."""
  source: str
  raw: Optional[bytes]
  stage: str
  reason: str
  error_class: str
  message: str
  pipeline_version: str


def dead_letter(source: str, raw, stage: str, reason: str, error: Optional[BaseException] = None,
                message: str = "") -> DeadLetter:
  return DeadLetter(
      source=source,
      raw=bytes(raw) if raw is not None else None,
      stage=stage,
      reason=reason,
      error_class=type(error).__name__ if error is not None else "",
      message=(str(error) if error is not None else message)[:500],
      pipeline_version=txstream.__version__)


for _record in (RawRecord, Transaction, Label, Featured, Decision, DeadLetter):
  beam.coders.registry.register_coder(_record, beam.coders.RowCoder)
