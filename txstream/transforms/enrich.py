"""Enrich: join each batch with customer and terminal reference data (``core.enrich``).

The reference files are read once per worker (``apache_beam.utils.shared``)
into sorted arrays; the reference-data version (their content hash) is
stamped on every row for lineage. A transaction whose customer is not on file
is a dead letter; an unknown terminal is kept with no distance, and counted.
"""
import logging
from typing import NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.utils import shared

from txstream.core import enrich
from txstream.core.batch import DeadLetterBatch, TransactionBatch
from txstream.transforms import counting

_LOGGER = logging.getLogger(__name__)
DEAD = "dead_letters"


class EnrichResult(NamedTuple):
  enriched: beam.PCollection
  dead_letters: beam.PCollection


def _read(path: str) -> bytes:
  try:
    with FileSystems.open(path) as f:
      return f.read()
  except OSError as e:  # Beam's BeamIOError is one too
    raise enrich.ReferenceDataError(f"cannot read reference file {path}: {' '.join(str(e).split())}") from None


def load_reference(reference_dir: str) -> enrich.Reference:
  """The reference files of ``reference_dir`` (local or any Beam filesystem) as arrays.

  Raises ``core.enrich.ReferenceDataError`` (one line naming the file) for a
  file that cannot be read or joined against.
  """
  paths = tuple(FileSystems.join(reference_dir, name) for name in enrich.REFERENCE_FILES)
  customers, terminals = (_read(path) for path in paths)
  return enrich.Reference.from_avro(customers, terminals, paths)


class _Shareable:
  """A weak-referenceable holder, as ``shared.Shared`` requires."""
  def __init__(self, reference: enrich.Reference):
    self.reference = reference


class _EnrichFn(beam.DoFn):
  def __init__(self, reference_dir: Optional[str], reference: Optional[enrich.Reference]):
    self._reference_dir = reference_dir
    self._given = reference
    self._shared = shared.Shared()

  def setup(self):
    if self._given is not None:
      self._reference = self._given
    else:
      self._reference = self._shared.acquire(lambda: _Shareable(load_reference(self._reference_dir)),
                                             tag=self._reference_dir).reference

  def process(self, batch: TransactionBatch):
    enriched, dead = enrich.enrich(batch.table, self._reference)
    counting.inc("enrich_unknown_terminal", enrich.unknown_terminals(enriched))
    counting.dead_letters(dead)
    if enriched.num_rows:
      yield TransactionBatch(enriched)
    if dead.num_rows:
      yield beam.pvalue.TaggedOutput(DEAD, DeadLetterBatch(dead))


class Enrich(beam.PTransform[beam.PCollection[TransactionBatch], EnrichResult]):
  """TransactionBatches -> (enriched TransactionBatches, DeadLetterBatches of unknown customers).

  Give ``reference_dir`` (read by each worker) or an in-memory ``reference``
  (tests, small tables). Fails at construction when the directory cannot be
  read: the reference version is known before anything runs.
  """
  def __init__(self, reference_dir: Optional[str] = None, reference: Optional[enrich.Reference] = None):
    super().__init__()
    if (reference_dir is None) == (reference is None):
      raise ValueError("give reference_dir or reference")
    if reference is None:
      reference = load_reference(reference_dir)
      self._version = reference.version
      reference = None  # workers read it themselves: the graph does not carry the tables
    else:
      self._version = reference.version
    self._fn = _EnrichFn(reference_dir, reference)

  @property
  def reference_version(self) -> str:
    return self._version

  def expand(self, batches):
    results = batches | "Join" >> beam.ParDo(self._fn).with_output_types(
        TransactionBatch, **{DEAD: DeadLetterBatch}).with_outputs(DEAD, main="enriched")
    return EnrichResult(results.enriched, results[DEAD])
