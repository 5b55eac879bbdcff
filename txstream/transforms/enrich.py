"""Enrich: join each transaction with customer and terminal reference data.

Reference data arrives as side inputs (``AsDict``), so the same transform
works whether the tables come from files, a database snapshot or ``Create`` in
a test. The reference-data version (a content hash) is stamped on every
transaction for lineage. A transaction whose customer is not on file is a dead
letter (a card the bank never issued); an unknown terminal (a new merchant) is
kept with no distance, and counted.
"""
import hashlib
import logging
import math
import os
from typing import NamedTuple, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from txstream.records import DeadLetter, Transaction, dead_letter

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "txstream"
DEAD = "dead_letters"
STAGE = "enrich"


class EnrichResult(NamedTuple):
  enriched: beam.PCollection
  dead_letters: beam.PCollection


def reference_version(reference_dir: str) -> str:
  """Content hash of the reference files: the same data always has the same version."""
  digest = hashlib.sha256()
  for name in ("customers.avro", "terminals.avro"):
    with FileSystems.open(FileSystems.join(reference_dir, name)) as f:
      digest.update(f.read())
  return digest.hexdigest()[:16]


def load_reference(reference_dir: str) -> Tuple[dict, dict]:
  """The reference files as the dicts ``enrich`` takes, read in this process (the live hot path)."""
  import fastavro
  tables = []
  for name, key, fields in (("customers.avro", "customer_id", ("home_x", "home_y", "segment")),
                            ("terminals.avro", "terminal_id", ("x", "y", "merchant_category"))):
    with FileSystems.open(FileSystems.join(reference_dir, name)) as f:
      tables.append({r[key]: tuple(r[k] for k in fields) for r in fastavro.reader(f)})
  return tables[0], tables[1]


def enrich(tx: Transaction, customers, terminals, version: str) -> Optional[Transaction]:
  """``tx`` with segment, home distance and reference version; None when its customer is not on file."""
  customer = customers.get(tx.customer_id)
  if customer is None:
    return None
  terminal = terminals.get(tx.terminal_id)
  distance = None
  if terminal is not None:
    distance = round(math.hypot(customer[0] - terminal[0], customer[1] - terminal[1]), 3)
  return tx._replace(customer_segment=customer[2], home_distance=distance, reference_version=version)


class _EnrichFn(beam.DoFn):
  def __init__(self, version: str):
    self._version = version
    self._unknown_terminal = Metrics.counter(NAMESPACE, "enrich_unknown_terminal")
    self._dead = Metrics.counter(NAMESPACE, f"dead_letter.{STAGE}.unknown_customer")

  def process(self, tx: Transaction, customers, terminals):
    enriched = enrich(tx, customers, terminals, self._version)
    if enriched is None:
      self._dead.inc()
      yield beam.pvalue.TaggedOutput(DEAD, dead_letter(
          tx.source, None, STAGE, "unknown_customer", message=f"customer {tx.customer_id} is not on file"))
      return
    if enriched.home_distance is None:
      self._unknown_terminal.inc()
    yield enriched


class Enrich(beam.PTransform):
  """Transactions -> (enriched Transactions, DeadLetters).

  ``customers``: PCollection of (customer_id, (home_x, home_y, segment));
  ``terminals``: PCollection of (terminal_id, (x, y, merchant_category)).
  """
  def __init__(self, customers, terminals, version: str):
    super().__init__()
    if not version:
      raise ValueError("a reference-data version is required for lineage")
    self._customers = customers
    self._terminals = terminals
    self._version = version

  def expand(self, transactions):
    results = transactions | "Join" >> beam.ParDo(
        _EnrichFn(self._version),
        customers=beam.pvalue.AsDict(self._customers),
        terminals=beam.pvalue.AsDict(self._terminals)).with_outputs(DEAD, main="enriched")
    return EnrichResult(results.enriched,
                        results[DEAD])


class ReadReference(beam.PTransform):
  """Reads reference Avro files into the keyed shapes ``Enrich`` expects."""
  def __init__(self, reference_dir: str):
    super().__init__()
    self._dir = reference_dir

  def expand(self, pbegin):
    customers = (
        pbegin
        | "Customers" >> beam.io.ReadFromAvro(os.path.join(self._dir, "customers.avro"))
        | "KeyCustomers" >> beam.Map(lambda c: (c["customer_id"], (c["home_x"], c["home_y"], c["segment"]))))
    terminals = (
        pbegin
        | "Terminals" >> beam.io.ReadFromAvro(os.path.join(self._dir, "terminals.avro"))
        | "KeyTerminals" >> beam.Map(lambda t: (t["terminal_id"], (t["x"], t["y"], t["merchant_category"]))))
    return customers, terminals
