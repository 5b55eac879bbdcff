"""Business validation of decoded transactions, a whole table at a time.

The checks, their order and their messages are a contract: a row that fails
several checks is reported with the first, with the same reason and message
text the per-record path has always given, so a dead letter reads the same
whichever path produced it. Messages are built only for the invalid rows.
"""
import logging
from typing import Callable, List, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_LOGGER = logging.getLogger(__name__)

# ISO-4217 codes this deployment settles in; others are a data error upstream.
CURRENCIES = frozenset({"EUR", "USD", "GBP", "CHF", "SEK", "NOK", "DKK", "PLN", "CZK", "JPY"})
# 2000-01-01: an event before this is a corrupted timestamp, not history.
MIN_EVENT_TIME_MS = 946684800000
MAX_AMOUNT_MINOR = 10**11
CARD_TOKEN_CHARS = 64

_CURRENCY_SET = pa.array(sorted(CURRENCIES), pa.string())


class InvalidRecord(ValueError):
  """A message that is not a valid record; ``reason`` is its stable dead-letter code."""
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def _mask(condition) -> np.ndarray:
  # A null cannot pass a check: the per-record path would not have accepted it either.
  return pc.fill_null(condition, True).to_numpy(zero_copy_only=False)


def _checks(records: pa.Table) -> List[Tuple[str, np.ndarray, Callable[[int], str]]]:
  """(reason, failing rows mask, message of a failing row) in the order they are applied."""
  def value(name):
    return lambda row: records.column(name)[row].as_py()

  tid, amount = records.column("transaction_id"), records.column("amount_minor")
  currency, event_time = records.column("currency"), records.column("event_time")
  amount_of, currency_of, event_time_of = value("amount_minor"), value("currency"), value("event_time")
  return [
      ("missing_transaction_id", _mask(pc.equal(pc.binary_length(tid), 0)),
       lambda row: "transaction_id is empty"),
      ("invalid_amount", _mask(pc.invert(pc.and_(pc.greater(amount, 0), pc.less_equal(amount, MAX_AMOUNT_MINOR)))),
       lambda row: f"amount_minor {amount_of(row)} out of range"),
      ("invalid_currency", _mask(pc.invert(pc.is_in(currency, value_set=_CURRENCY_SET))),
       lambda row: f"currency {currency_of(row)!r} is not accepted"),
      ("invalid_event_time", _mask(pc.less(event_time, MIN_EVENT_TIME_MS)),
       lambda row: f"event_time {event_time_of(row)} is before 2000"),
      ("invalid_id", _mask(pc.or_(pc.less(records.column("customer_id"), 0),
                                  pc.less(records.column("terminal_id"), 0))),
       lambda row: "customer_id and terminal_id must be non-negative"),
      # Characters, not bytes: the token is checked as the str the per-record path held.
      ("invalid_card_token", _mask(pc.not_equal(pc.utf8_length(records.column("card_token")), CARD_TOKEN_CHARS)),
       lambda row: "card_token is not a 64-hex-digit token"),
  ]


def validate(records: pa.Table) -> Tuple[np.ndarray, List[Tuple[int, InvalidRecord]]]:
  """(boolean mask of the valid rows, [(row, InvalidRecord)] of the others, ascending by row).

  ``records`` has the reader schema's field names (``event_time``, not
  ``event_time_ms``). Each invalid row carries its first failing check.
  """
  valid = np.ones(records.num_rows, dtype=bool)
  invalid = []
  if records.num_rows == 0:
    return valid, invalid
  for reason, fails, message in _checks(records):
    for row in np.flatnonzero(fails & valid).tolist():
      invalid.append((row, InvalidRecord(reason, message(row))))
    valid &= ~fails
  invalid.sort(key=lambda item: item[0])
  return valid, invalid
