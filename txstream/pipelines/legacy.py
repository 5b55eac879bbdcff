"""What a legacy batch system would have decided for the same transactions: a counterpart to reconcile against.

``txstream generate --legacy_extract`` writes ``OUT/legacy/decisions.csv``
beside the wire-format files. The legacy system is deliberately foreign, so
that reconciling against it exercises a column mapping and value conversions
rather than a join on identical columns:

=============  ==========================================  ======================
Column         Content                                     Ours
=============  ==========================================  ======================
TXN_REF        transaction id                              transaction_id
TXN_TS_LOCAL   event time in Europe/Paris, ISO-8601 with   event_time_ms
               its UTC offset (``+01:00`` in winter,
               ``+02:00`` in summer), whole seconds, or
               milliseconds when the event time has them
CUST_NO        customer number                             customer_id
TERM_NO        terminal number                             terminal_id
AMT            amount in major units, two decimals         amount_minor
               (``"12.34"``), exact from the minor units
CCY            ISO-4217 currency                           currency
DECISION       ``APPROVED``, ``REFERRED`` or ``DECLINED``  decision (approve,
                                                           review, decline)
RULE_HIT       the rule behind a decision other than       (none)
               APPROVED, empty otherwise
=============  ==========================================  ======================

Its rule engine is a fixed rule table, not our model; the first rule that
matches decides:

1. ``DECLINED`` / ``HIGH_AMOUNT``: amount above 220.00 (the Fraud Detection
   Handbook's fraud scenario 1 threshold);
2. ``REFERRED`` / ``NIGHT_HIGH_AMOUNT``: amount from 150.00 to 220.00, both
   included, at night: local time (Europe/Paris) from 00:00 to 05:59:59.999;
3. ``APPROVED``, no rule hit.

It only sees what ``txstream run`` accepts: the caller passes valid records
only (``generate`` leaves out the messages it damaged and any record
validation would dead-letter). Rows keep the caller's order, and the output
depends on nothing but the records, so a seed gives the same bytes.

``RECONCILE_MAP`` is the ``txstream reconcile`` mapping of these columns to
ours.
"""
import logging
from typing import Tuple

import polars as pl
import pyarrow as pa

from txstream.pipelines import simulator

_LOGGER = logging.getLogger(__name__)

TIME_ZONE = "Europe/Paris"
COLUMNS = ("TXN_REF", "TXN_TS_LOCAL", "CUST_NO", "TERM_NO", "AMT", "CCY", "DECISION", "RULE_HIT")
DECLINE_ABOVE_MINOR = simulator.SCENARIO1_LIMIT_CENTS
REFER_FROM_MINOR = 15_000
NIGHT_BEFORE_HOUR = 6
RECONCILE_MAP = ('--map TXN_REF=transaction_id --map TXN_TS_LOCAL=event_time_ms:epoch_ms '
                 '--map AMT=amount_minor:minor_units '
                 '--map "DECISION=decision:values(APPROVED=approve,REFERRED=review,DECLINED=decline)" '
                 '--map CUST_NO=customer_id --map TERM_NO=terminal_id --map CCY=currency')


def _local_time() -> Tuple[pl.Expr, pl.Expr]:
  """(ISO-8601 text, hour) of the event time in the legacy time zone."""
  # chrono's "%:z" writes the offset as +HH:MM, which ISO-8601 readers (datetime.fromisoformat) take back.
  utc = pl.from_epoch(pl.col("event_time"), time_unit="ms").dt.replace_time_zone("UTC")
  local = utc.dt.convert_time_zone(TIME_ZONE)
  whole = local.dt.strftime("%Y-%m-%dT%H:%M:%S%:z")
  with_ms = local.dt.strftime("%Y-%m-%dT%H:%M:%S%.3f%:z")
  return pl.when(pl.col("event_time") % 1000 == 0).then(whole).otherwise(with_ms), local.dt.hour()


def _amount() -> pl.Expr:
  # Integer division of the minor units: a float would round some cents away on large amounts.
  minor = pl.col("amount_minor")
  return (minor // 100).cast(pl.String) + "." + (minor % 100).cast(pl.String).str.zfill(2)


def extract(records: pa.Table) -> pl.DataFrame:
  """The legacy extract of ``records``, one row each, in their order; columns ``COLUMNS``.

  ``records`` has the reader schema's field names (``transaction_id``,
  ``event_time`` in UTC epoch ms, ``customer_id``, ``terminal_id``,
  ``amount_minor``, ``currency``) and holds valid transactions only: a
  positive amount, an event time after 2000.
  """
  local, hour = _local_time()
  amount = pl.col("amount_minor")
  declined = amount > DECLINE_ABOVE_MINOR
  referred = amount.is_between(REFER_FROM_MINOR, DECLINE_ABOVE_MINOR) & (hour < NIGHT_BEFORE_HOUR)
  return pl.from_arrow(records.select(["transaction_id", "event_time", "customer_id", "terminal_id",
                                       "amount_minor", "currency"])).select(
      pl.col("transaction_id").alias("TXN_REF"),
      local.alias("TXN_TS_LOCAL"),
      pl.col("customer_id").alias("CUST_NO"),
      pl.col("terminal_id").alias("TERM_NO"),
      _amount().alias("AMT"),
      pl.col("currency").alias("CCY"),
      pl.when(declined).then(pl.lit("DECLINED")).when(referred).then(pl.lit("REFERRED"))
      .otherwise(pl.lit("APPROVED")).alias("DECISION"),
      pl.when(declined).then(pl.lit("HIGH_AMOUNT")).when(referred).then(pl.lit("NIGHT_HIGH_AMOUNT"))
      .otherwise(pl.lit(None, pl.String)).alias("RULE_HIT"))


def write(records: pa.Table, path: str) -> int:
  """Writes the legacy extract of ``records`` to the CSV file ``path`` (replacing it); returns its row count.

  A header line, comma-separated, quoted only where a value needs it; an
  APPROVED row's RULE_HIT is an empty field.
  """
  frame = extract(records)
  frame.write_csv(path)
  _LOGGER.info("wrote %d legacy decisions to %s", frame.height, path)
  return frame.height
