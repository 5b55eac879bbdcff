"""The contracts every layer shares: column names and types, feature names, reasons, actions.

Batches are Arrow tables with these schemas. Money is integer minor units;
times are UTC epoch milliseconds; the card travels as a keyed token only.
Column order is part of the contract: tables are built and concatenated in
schema order, so a batch from any path can meet a batch from any other.
"""
import pyarrow as pa

import txstream

PIPELINE_VERSION = txstream.__version__
NAMESPACE = "txstream"  # Beam metrics namespace
DAY_MS = 86_400_000
HOUR_MS = 3_600_000

# -- features -----------------------------------------------------------------------------------------------------
WINDOWS_DAYS = (1, 7, 30)
RATIO_WINDOWS_DAYS = (7, 30)
KNOWN_WINDOWS_DAYS = (7, 30)

CUSTOMER_FEATURES = (
    [f"CUSTOMER_ID_{kind}_{n}DAY_WINDOW" for n in WINDOWS_DAYS for kind in ("NB_TX", "AVG_AMOUNT")]
    + ["CUSTOMER_ID_AMOUNT_RATIO_7DAY_WINDOW", "CUSTOMER_ID_AMOUNT_RATIO_30DAY_WINDOW",
       "CUSTOMER_ID_AMOUNT_ZSCORE_30DAY_WINDOW"])
TERMINAL_FEATURES = (
    [f"TERMINAL_ID_{kind}_{n}DAY_WINDOW" for n in WINDOWS_DAYS for kind in ("NB_TX", "RISK")]
    + ["TERMINAL_ID_KNOWN_FRAUDS_7DAY", "TERMINAL_ID_KNOWN_RISK_7DAY", "TERMINAL_ID_KNOWN_FRAUDS_30DAY",
       "TERMINAL_ID_KNOWN_RISK_30DAY", "TERMINAL_ID_DAYS_SINCE_KNOWN_FRAUD"])
# The model's input order; a model artifact records the order it was trained on and must match it.
FEATURE_NAMES = tuple(["TX_AMOUNT", "TX_DURING_WEEKEND", "TX_DURING_NIGHT"] + CUSTOMER_FEATURES
                      + TERMINAL_FEATURES + ["HOME_DISTANCE"])
FEATURE_COLUMNS = tuple(name.lower() for name in FEATURE_NAMES)

# -- decisions ----------------------------------------------------------------------------------------------------
ACTIONS = ("approve", "review", "decline")  # in order of severity
SCORE_HIGH, SCORE_ELEVATED = "MODEL_SCORE_HIGH", "MODEL_SCORE_ELEVATED"

# -- stages and dead-letter reasons -------------------------------------------------------------------------------
READ, DECODE, DECODE_LABEL, ENRICH, FEATURES, SINK = "read", "decode", "decode_label", "enrich", "features", "sink"
WIRE_REASONS = ("null_value", "oversized_message", "truncated_header", "bad_magic_byte")
DECODE_REASONS = WIRE_REASONS + ("unknown_schema_id", "wrong_schema", "avro_decode_error", "trailing_bytes")
VALIDATION_REASONS = ("missing_transaction_id", "invalid_transaction_id", "invalid_amount", "invalid_currency",
                      "invalid_event_time", "invalid_id", "invalid_card_token", "invalid_entry_mode")
FILE_REASONS = ("not_a_frame_file", "truncated_frame", "oversized_frame")
UNKNOWN_CUSTOMER = "unknown_customer"
CONFLICTING_DUPLICATE = "conflicting_duplicate"
LATE = "late"
DUPLICATE = "duplicate"  # an exact repeat: filtered and counted, not a dead letter

# -- schemas ------------------------------------------------------------------------------------------------------
RAW = pa.schema([
    ("source", pa.string()),         # file#index or topic/partition@offset
    ("value", pa.binary()),          # the message as received; null for a Kafka tombstone
    ("timestamp_ms", pa.int64()),    # the broker's record time (null for files)
    ("history", pa.bool_()),         # read for feature state only: an earlier run decided it
])

TRANSACTION = pa.schema([
    ("transaction_id", pa.string()),
    ("event_time_ms", pa.int64()),
    ("customer_id", pa.int64()),
    ("terminal_id", pa.int64()),
    ("card_token", pa.string()),
    ("amount_minor", pa.int64()),
    ("currency", pa.string()),
    ("entry_mode", pa.string()),
    ("merchant_category", pa.int32()),
    ("schema_id", pa.int32()),
    ("source", pa.string()),
    ("history", pa.bool_()),
    # Filled by enrich.
    ("customer_segment", pa.string()),
    ("home_distance", pa.float64()),
    ("reference_version", pa.string()),
])

# An accepted input message as received, for the raw archive (``io.raw_archive``): transactions with their
# event time, labels with their label time.
ARCHIVE = pa.schema([
    ("transaction_id", pa.string()),
    ("source", pa.string()),
    ("value", pa.binary()),
    ("timestamp_ms", pa.int64()),    # the broker's record time (null for files)
    ("event_time_ms", pa.int64()),
    ("schema_id", pa.int32()),
])

LABEL = pa.schema([
    ("transaction_id", pa.string()),
    ("label_time_ms", pa.int64()),   # when the fraud became known
    ("tx_time_ms", pa.int64()),      # when the labelled transaction happened
    ("customer_id", pa.int64()),
    ("terminal_id", pa.int64()),
    ("is_fraud", pa.bool_()),
    ("source", pa.string()),
    ("history", pa.bool_()),
])

DEAD_LETTER = pa.schema([
    ("source", pa.string()),
    ("raw", pa.binary()),            # the original bytes when there were any
    ("stage", pa.string()),
    ("reason", pa.string()),
    ("error_class", pa.string()),
    ("message", pa.string()),
    ("pipeline_version", pa.string()),
])

_DECIDED = [
    ("score", pa.float64()),
    ("decision", pa.string()),
    ("reason_codes", pa.list_(pa.string())),
    ("model_version", pa.string()),
    ("rules_version", pa.string()),
    ("pipeline_version", pa.string()),
    ("decided_at_ms", pa.int64()),
]
# History rows (feature state only) travel with their features until scoring drops them. The enriched
# home_distance becomes the HOME_DISTANCE feature (-1 when the terminal is not on file).
FEATURED = pa.schema([f for f in TRANSACTION if f.name != "home_distance"]
                     + [(name, pa.float64()) for name in FEATURE_COLUMNS])
DECISION = pa.schema([f for f in FEATURED if f.name != "history"] + _DECIDED)


def empty(schema: pa.Schema) -> pa.Table:
  return schema.empty_table()
