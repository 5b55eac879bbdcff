"""``txstream generate``: realistic, seeded card transactions in the wire format.

The simulation itself is ``simulator.simulate`` (the Fraud Detection
Handbook's published design). This module turns it into what the pipeline
reads: framed Confluent wire-format files, one per day, under
``OUT/transactions/``; the delayed fraud labels (chargebacks) under
``OUT/labels/``; customer and terminal reference data as Avro files under
``OUT/reference/``; and ``OUT/manifest.json``.

Card numbers are synthetic and never written: only their HMAC-SHA256 token
under the key in ``TXSTREAM_TOKEN_KEY``. Unset, the key is random, made once
per process and never stored, so tokens cannot be reversed by enumerating
card numbers (synthetic numbers are few and predictable); the manifest and a
warning say so, and set the variable for tokens that repeat across runs.

``--corrupt_fraction`` damages that share of messages (garbage bytes, wrong
magic byte, unknown schema id, truncated body) and lists each damaged source
position with its expected dead-letter reason in ``OUT/corrupted.json``.

``--legacy_extract`` also writes ``OUT/legacy/decisions.csv``, what a legacy
batch system decided for the transactions ``txstream run`` accepts (see
``legacy``), to reconcile against.
"""
import datetime
import hashlib
import heapq
import hmac
import json
import logging
import os
import secrets
import time
from typing import Dict, Iterator, List, Optional, Tuple

import fastavro
import numpy as np
import pyarrow as pa

from txstream.core import validate
from txstream.io import schema_registry, wire
from txstream.pipelines import legacy, simulator

_LOGGER = logging.getLogger(__name__)
DAY_MS = 86_400_000
ENTRY_MODES = validate.ENTRY_MODES
MERCHANT_CATEGORIES = (5411, 5812, 5541, 5999, 4111, 5732, 5311, 7011)
SEGMENTS = ("retail", "premium", "student", "business")
CURRENCY = "EUR"
DAMAGE = ("garbage", "bad_magic", "unknown_schema", "truncated")
EXPECTED_REASON = {"garbage": "bad_magic_byte", "bad_magic": "bad_magic_byte",
                   "unknown_schema": "unknown_schema_id", "truncated": "avro_decode_error"}


_ONE_OFF_KEY = secrets.token_bytes(32)


def token_key() -> bytes:
  """The tokenisation key: ``TXSTREAM_TOKEN_KEY``, else this process's random one."""
  key = os.environ.get("TXSTREAM_TOKEN_KEY")
  return key.encode() if key else _ONE_OFF_KEY


def token_key_source() -> str:
  if os.environ.get("TXSTREAM_TOKEN_KEY"):
    return "TXSTREAM_TOKEN_KEY"
  _LOGGER.warning("TXSTREAM_TOKEN_KEY is not set: card tokens use a one-off random key (not stored), so they "
                  "differ from run to run; set it for tokens that repeat")
  return "one-off random key, not stored"


def card_number(customer_id: int) -> str:
  """A synthetic, Luhn-valid 16-digit card number in a test range."""
  body = f"400000{customer_id:09d}"
  total = 0
  for i, ch in enumerate(reversed(body)):
    d = int(ch)
    if i % 2 == 0:
      d = d * 2 - 9 if d * 2 > 9 else d * 2
    total += d
  return body + str((10 - total % 10) % 10)


def card_tokens(n_customers: int) -> List[str]:
  key = token_key()
  return [hmac.new(key, card_number(c).encode(), hashlib.sha256).hexdigest() for c in range(n_customers)]


def transaction_ids(seed: int, n: int) -> List[str]:
  out = []
  for i in range(n):
    h = hashlib.blake2b(f"{seed}:{i}".encode(), digest_size=16).hexdigest()
    out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
  return out


def amount_minor(tx: Dict[str, np.ndarray]) -> np.ndarray:
  """The amounts as written: the simulator rounds a few to 0 cents, and a charge is at least one minor unit."""
  return np.maximum(tx["amount_cents"], 1)


def _damage(message: bytes, kind: str, rng: np.random.Generator) -> bytes:
  if kind == "garbage":
    # A first byte other than 0 guarantees the header check catches it.
    return bytes([1 + int(rng.integers(0, 255))]) + rng.bytes(int(rng.integers(4, 120)))
  if kind == "bad_magic":
    return b"\x07" + message[1:]
  if kind == "unknown_schema":
    return message[:1] + (999_999).to_bytes(4, "big") + message[5:]
  return message[:max(6, len(message) // 2)]


class Writer:
  """Writes one simulation into an output directory."""
  def __init__(self, out: str, schema_version: int = 2, corrupt_fraction: float = 0.0,
               legacy_extract: bool = False):
    if schema_version not in (1, 2):
      raise ValueError("--schema_version must be 1 or 2")
    if not 0 <= corrupt_fraction < 1:
      raise ValueError("--corrupt_fraction must be in [0, 1)")
    self.out = out
    self.schema_id = schema_version
    self.corrupt_fraction = corrupt_fraction
    self.legacy_extract = legacy_extract
    self.registry = schema_registry.FileSchemaRegistry()

  def write(self, sim: simulator.Simulation) -> dict:
    for sub in ("transactions", "labels", "reference"):
      os.makedirs(os.path.join(self.out, sub), exist_ok=True)
    refs = self._write_reference(sim)
    ids = transaction_ids(sim.seed, sim.n_transactions)
    counts, damaged = self._write_transactions(sim, refs, ids)
    counts["labels"] = self._write_labels(sim, ids)
    if self.legacy_extract:
      counts["legacy_extract"] = self._write_legacy(sim, ids, damaged)
    manifest = {"seed": sim.seed, "start": sim.start.isoformat(), "customers": len(sim.customers["customer_id"]),
                "card_token_key": token_key_source(),
                "terminals": len(sim.terminals["terminal_id"]), "schema_id": self.schema_id, **counts}
    with open(os.path.join(self.out, "manifest.json"), "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=2, sort_keys=True)
    return manifest

  def _write_reference(self, sim) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([sim.seed, 1])
    c = sim.customers
    segments = rng.integers(0, len(SEGMENTS), len(c["customer_id"]))
    with open(os.path.join(self.out, "reference", "customers.avro"), "wb") as f:
      fastavro.writer(f, schema_registry.load_schema_file("customer_v1.avsc"), (
          {"customer_id": int(i), "home_x": float(x), "home_y": float(y), "segment": SEGMENTS[s]}
          for i, x, y, s in zip(c["customer_id"], c["x"], c["y"], segments)))
    t = sim.terminals
    mcc = rng.choice(MERCHANT_CATEGORIES, len(t["terminal_id"]))
    with open(os.path.join(self.out, "reference", "terminals.avro"), "wb") as f:
      fastavro.writer(f, schema_registry.load_schema_file("terminal_v1.avsc"), (
          {"terminal_id": int(i), "x": float(x), "y": float(y), "merchant_category": int(m)}
          for i, x, y, m in zip(t["terminal_id"], t["x"], t["y"], mcc)))
    return {"mcc": mcc}

  def _write_transactions(self, sim, refs, ids: List[str]) -> Tuple[dict, np.ndarray]:
    """(counts, mask of the damaged messages)."""
    tx = sim.transactions
    n = len(tx["tx_index"])
    rng = np.random.default_rng([sim.seed, 2])
    modes = rng.integers(0, len(ENTRY_MODES), n)
    damaged = rng.random(n) < self.corrupt_fraction
    kinds = rng.integers(0, len(DAMAGE), n)
    tokens = card_tokens(len(sim.customers["customer_id"]))
    amount = amount_minor(tx)
    schema = self.registry.parsed(self.schema_id)
    start_ms = int(datetime.datetime.combine(sim.start, datetime.time(), datetime.timezone.utc).timestamp() * 1000)
    day = (tx["event_time_ms"] - start_ms) // DAY_MS
    corrupted = []
    for d in np.unique(day):
      name = f"day-{sim.start + datetime.timedelta(days=int(d))}.wire"
      rows = np.nonzero(day == d)[0]
      messages = []
      for index, i in enumerate(rows):
        record = {"transaction_id": ids[i], "event_time": int(tx["event_time_ms"][i]),
                  "customer_id": int(tx["customer_id"][i]), "terminal_id": int(tx["terminal_id"][i]),
                  "card_token": tokens[tx["customer_id"][i]], "amount_minor": int(amount[i]),
                  "currency": CURRENCY, "entry_mode": ENTRY_MODES[modes[i]],
                  "merchant_category": int(refs["mcc"][tx["terminal_id"][i]])}
        message = wire.encode(self.schema_id, schema, record)
        if damaged[i]:
          kind = DAMAGE[kinds[i]]
          message = _damage(message, kind, rng)
          corrupted.append({"source": f"{name}#{index}", "kind": kind, "reason": EXPECTED_REASON[kind],
                            "transaction_id": ids[i]})
        messages.append(message)
      with open(os.path.join(self.out, "transactions", name), "wb") as f:
        wire.write_frames(f, messages)
    if self.corrupt_fraction:
      with open(os.path.join(self.out, "corrupted.json"), "w", encoding="utf-8") as f:
        json.dump(corrupted, f, indent=1)
    return {"transactions": n, "frauds": int(tx["is_fraud"].sum()), "corrupted": len(corrupted)}, damaged

  def _write_labels(self, sim, ids: List[str]) -> int:
    tx = sim.transactions
    schema_id, _ = self.registry.latest(schema_registry.LABEL_SUBJECT)
    schema = self.registry.parsed(schema_id)
    frauds = np.nonzero(tx["is_fraud"])[0]
    frauds = frauds[np.lexsort((frauds, tx["label_time_ms"][frauds]))]
    messages = [wire.encode(schema_id, schema, {
        "transaction_id": ids[i], "label_time": int(tx["label_time_ms"][i]), "tx_time": int(tx["event_time_ms"][i]),
        "customer_id": int(tx["customer_id"][i]), "terminal_id": int(tx["terminal_id"][i]), "is_fraud": True})
        for i in frauds]
    with open(os.path.join(self.out, "labels", "labels.wire"), "wb") as f:
      wire.write_frames(f, messages)
    return len(messages)

  def _write_legacy(self, sim, ids: List[str], damaged: np.ndarray) -> dict:
    """Writes the legacy extract of what ``txstream run`` accepts; returns its path and row count.

    The damaged messages never decode, and the validation is the run's own, so
    a start date before 2000 leaves those days out here as the run
    dead-letters them.
    """
    tx = sim.transactions
    tokens = pa.array(card_tokens(len(sim.customers["customer_id"])), pa.string())
    records = pa.table({
        "transaction_id": pa.array(ids, pa.string()), "event_time": tx["event_time_ms"],
        "customer_id": tx["customer_id"], "terminal_id": tx["terminal_id"],
        "card_token": tokens.take(tx["customer_id"]), "amount_minor": amount_minor(tx),
        "currency": pa.repeat(CURRENCY, len(ids)),
        "entry_mode": pa.nulls(len(ids), pa.string())})  # every generated mode is valid; null is not checked
    valid, _ = validate.validate(records)
    os.makedirs(os.path.join(self.out, "legacy"), exist_ok=True)
    path = os.path.join(self.out, "legacy", "decisions.csv")
    return {"path": path, "rows": legacy.write(records.filter(valid & ~damaged), path)}


def generate(out: str, customers: int, terminals: int, days: int, start: datetime.date, seed: int,
             schema_version: int = 2, corrupt_fraction: float = 0.0, legacy_extract: bool = False) -> dict:
  """Simulates and writes under ``out``; returns the manifest (also written as ``OUT/manifest.json``)."""
  writer = Writer(out, schema_version, corrupt_fraction, legacy_extract)
  t0 = time.monotonic()
  sim = simulator.simulate(customers, terminals, days, start, seed)
  _LOGGER.info("simulated %d transactions in %.1fs", sim.n_transactions, time.monotonic() - t0)
  manifest = writer.write(sim)
  manifest["wall_seconds"] = round(time.monotonic() - t0, 2)
  return manifest


def _messages(directory: str):
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      for _, message in wire.read_frames(f):
        yield None, message, None


def _keyed(directory: str, subject: str, time_field: str) -> Iterator[Tuple[int, Optional[str], bytes]]:
  """(time, customer key, message) of each message under ``directory``, in file order.

  A damaged message cannot be read: it keeps the time of the one before it and
  goes out without a key.
  """
  from txstream.core import decode, validate
  decoder = decode.Decoder(schema_registry.FileSchemaRegistry(), subject)
  last = 0
  for _, message, _ in _messages(directory):
    key = None
    try:
      _, record = decoder.decode_message(message)
      last, key = record[time_field], str(record["customer_id"])
    except (wire.WireFormatError, validate.InvalidRecord):  # damaged on purpose (--corrupt_fraction)
      pass
    yield last, key, message


def timeline(out: str, topic: str, labels_topic: Optional[str], start_ms: Optional[int] = None,
             stop_ms: Optional[int] = None):
  """``(key, value, None, topic)`` of every transaction, and label when ``labels_topic`` is set, in time order.

  ``start_ms``/``stop_ms`` keep only what falls in [start_ms, stop_ms).

  Transactions at their event time, labels at their label time (when the
  chargeback becomes known), so a live consumer sees a label no earlier than a
  real one would arrive. Keys are the customer id: one customer's
  transactions stay in one partition, in order.
  """
  streams = [((t, 1, key, m, topic) for t, key, m in
              _keyed(os.path.join(out, "transactions"), schema_registry.TRANSACTION_SUBJECT, "event_time"))]
  if labels_topic:
    streams.append(((t, 0, key, m, labels_topic) for t, key, m in
                    _keyed(os.path.join(out, "labels"), schema_registry.LABEL_SUBJECT, "label_time")))
  for t, _, key, message, to in heapq.merge(*streams, key=lambda item: item[:2]):
    if (start_ms is None or t >= start_ms) and (stop_ms is None or t < stop_ms):
      yield key, message, None, to


def produce_to_kafka(out: str, bootstrap_servers: str, topic: str, labels_topic: Optional[str] = None,
                     partitions: int = 3, rate: Optional[float] = None) -> dict:
  """Produces what ``generate`` wrote under ``out`` to Kafka in time order (``timeline``), at ``rate`` msgs/s.

  Transactions go to ``topic`` (damaged ones included, as written), labels to
  ``labels_topic``. Record timestamps are the produce times, so a consumer can
  measure produce-to-decision latency.
  """
  from txstream.io import kafka
  config = kafka.KafkaConfig.from_env(bootstrap_servers=bootstrap_servers, topic=topic)
  kafka.ensure_topic(config, topic, num_partitions=partitions)
  if labels_topic:
    kafka.ensure_topic(config, labels_topic, num_partitions=1)
  start = time.monotonic()

  def progress(sent, elapsed_s):
    _LOGGER.info("produced %d messages in %.0f s", sent, elapsed_s)

  sent = kafka.produce_messages(config, topic, timeline(out, topic, labels_topic), rate=rate, progress=progress)
  return {"messages": sent, "seconds": round(time.monotonic() - start, 2)}
