"""Builders for test inputs: wire-format messages and reference data."""
import hashlib

from txstream.io import schema_registry, wire
from txstream.records import RawRecord

REGISTRY = schema_registry.FileSchemaRegistry()
T0 = 1_522_540_800_000  # 2018-04-01T00:00:00Z
HOUR_MS = 3_600_000
DAY_MS = 86_400_000


def token(customer_id: int) -> str:
  return hashlib.sha256(f"card-{customer_id}".encode()).hexdigest()


def tx_record(i: int, t: int, customer: int = 1, terminal: int = 10, amount: int = 5_000, **extra) -> dict:
  record = {"transaction_id": f"tx-{i:05d}", "event_time": t, "customer_id": customer, "terminal_id": terminal,
            "card_token": token(customer), "amount_minor": amount, "currency": "EUR",
            "entry_mode": "chip", "merchant_category": 5411}
  record.update(extra)
  return record


def message(record: dict, schema_id: int = 2) -> bytes:
  if schema_id == 1:
    record = {k: v for k, v in record.items() if k not in ("entry_mode", "merchant_category")}
  return wire.encode(schema_id, REGISTRY.parsed(schema_id), record)


def raw(i: int, value: bytes) -> RawRecord:
  return RawRecord(f"test.wire#{i}", value)


def label_message(tx_id: str, label_time: int, tx_time: int, customer: int, terminal: int) -> bytes:
  return wire.encode(3, REGISTRY.parsed(3), {"transaction_id": tx_id, "label_time": label_time, "tx_time": tx_time,
                                              "customer_id": customer, "terminal_id": terminal, "is_fraud": True})


CUSTOMERS = [(c, (50.0, 50.0, "retail")) for c in range(5)]
TERMINALS = [(t, (53.0, 54.0, 5411)) for t in range(20)]
