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
# 2000-01-01: an event before this is a corrupted timestamp, not history. 2100-01-01: a fixed bound, not "now",
# so a rerun validates as the original run did; every tier stores it (ClickHouse's DateTime ends in 2106).
MIN_EVENT_TIME_MS = 946684800000
MAX_EVENT_TIME_MS = 4102444800000
MAX_AMOUNT_MINOR = 10**11
CARD_TOKEN_CHARS = 64
# Visible ASCII only: no spaces, control characters (NUL, CR) or look-alikes that a store could alter or two
# systems could read differently.
TRANSACTION_ID = r"^[!-~]{1,128}$"
CARD_TOKEN = r"^[0-9a-f]{64}$"  # HMAC-SHA256, lowercase hex
ENTRY_MODES = ("chip", "contactless", "ecommerce", "magstripe")  # or null (schema version 1 has none)

_CURRENCY_SET = pa.array(sorted(CURRENCIES), pa.string())
_ENTRY_MODE_SET = pa.array(ENTRY_MODES, pa.string())


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
  mode = records.column("entry_mode")
  amount_of, currency_of, event_time_of = value("amount_minor"), value("currency"), value("event_time")
  return [
      ("missing_transaction_id", _mask(pc.equal(pc.binary_length(tid), 0)),
       lambda row: "transaction_id is empty"),
      ("invalid_transaction_id", _mask(pc.invert(pc.match_substring_regex(tid, TRANSACTION_ID))),
       lambda row: f"transaction_id {value('transaction_id')(row)[:140]!r} is not 1-128 visible ASCII characters"),
      ("invalid_amount", _mask(pc.invert(pc.and_(pc.greater(amount, 0), pc.less_equal(amount, MAX_AMOUNT_MINOR)))),
       lambda row: f"amount_minor {amount_of(row)} out of range"),
      ("invalid_currency", _mask(pc.invert(pc.is_in(currency, value_set=_CURRENCY_SET))),
       lambda row: f"currency {currency_of(row)!r} is not accepted"),
      ("invalid_event_time", _mask(pc.invert(pc.and_(pc.greater_equal(event_time, MIN_EVENT_TIME_MS),
                                                     pc.less(event_time, MAX_EVENT_TIME_MS)))),
       lambda row: f"event_time {event_time_of(row)} is not between 2000 and 2100"),
      ("invalid_id", _mask(pc.or_(pc.less(records.column("customer_id"), 0),
                                  pc.less(records.column("terminal_id"), 0))),
       lambda row: "customer_id and terminal_id must be non-negative"),
      ("invalid_card_token", _mask(pc.invert(pc.match_substring_regex(records.column("card_token"), CARD_TOKEN))),
       lambda row: "card_token is not a 64-hex-digit token"),
      # Null is the absence of the field (schema version 1), not a fault.
      ("invalid_entry_mode", pc.and_(pc.is_valid(mode), pc.invert(pc.is_in(mode, value_set=_ENTRY_MODE_SET))).to_numpy(
          zero_copy_only=False), lambda row: f"entry_mode {value('entry_mode')(row)[:40]!r} is not one of "
                                              f"{', '.join(ENTRY_MODES)}"),
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
